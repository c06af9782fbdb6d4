//! QEMU's restore, for comparison: a beating stub in QEMU microvm is
//! migrated to a file (`migrate "exec:cat > FILE"` on its human monitor),
//! and each run is a QEMU started with `-incoming "exec:cat FILE"`, timed
//! to the first heartbeat on its serial console. Where QEMU cannot do
//! that, the report says why instead.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_vmm::report::one_line;

use crate::qemu::{InitPort, QEMU};
use crate::timing::{Event, Stream, Then, Watched, millis, spawn_watched, time_to};
use crate::{BenchError, Progress, series};

use super::VmmConfig;
use super::cold::stub_microvm;
use super::report::{Latency, PeerRestore};
use super::restore::{BEAT_CMDLINE, HEARTBEAT, first_heartbeat};

/// The timer.
pub const TIMER: (&str, &str) = (
    "exec of `qemu-system-x86_64 -M microvm … -incoming \"exec:cat STATE\"`",
    "the first heartbeat line on its stdout (its serial console)",
);

/// How long a monitor command may take.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's restores, or why there are none.
pub fn restores(config: &VmmConfig, work: &Path, progress: &dyn Progress) -> PeerRestore {
    match measure(config, work, progress) {
        Ok(latency) => PeerRestore::Measured(latency),
        Err(err) => PeerRestore::Unavailable(one_line(&err)),
    }
}

fn measure(
    config: &VmmConfig,
    work: &Path,
    progress: &dyn Progress,
) -> Result<Latency, BenchError> {
    progress.step("migrating a beating stub out of QEMU");
    let state = work.join("qemu-state");
    save_state(config, work, &state)?;
    let run = |_: usize| {
        let mut cmd = stub_microvm(config, BEAT_CMDLINE, InitPort::None).command(Path::new(QEMU));
        cmd.arg("-incoming")
            .arg(format!("exec:cat {}", state.display()));
        let timed = time_to(
            cmd,
            "qemu-system-x86_64 -incoming",
            Stream::Stdout,
            Event::LineStarting(HEARTBEAT),
            Then::Terminate,
            config.limit,
        )?;
        Ok(millis(timed.elapsed))
    };
    let (samples, _) = series(config.plan(), "restore (qemu -incoming)", progress, &run)?;
    Latency::new(TIMER, samples).ok_or(BenchError::Runs(config.runs))
}

/// Boots the stub beating in QEMU, and at its first heartbeat migrates it
/// into the file `state`; QEMU is then told to quit.
fn save_state(config: &VmmConfig, work: &Path, state: &Path) -> Result<(), BenchError> {
    let what = "qemu-system-x86_64 (the stub, beating, migrated to a file)";
    let socket = work.join("qemu-monitor.sock");
    let mut cmd = stub_microvm(config, BEAT_CMDLINE, InitPort::None).command(Path::new(QEMU));
    cmd.arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stderr(Stdio::piped());
    let Watched {
        mut child,
        watchdog,
        mut stdout,
    } = spawn_watched(cmd, what, config.limit)?;
    let beat = first_heartbeat(&mut stdout);
    // The console goes on until QEMU quits: drained meanwhile.
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let migrated = if beat {
        migrate(&socket, state, config.limit)
    } else {
        Err("QEMU ended before the stub's first heartbeat".to_string())
    };
    if migrated.is_err() {
        crate::timing::signal(child.id(), libc::SIGTERM);
    }
    let status = child.wait();
    watchdog.finish();
    let _ = drain.join();
    let mut printed = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut printed);
    }
    let status = status.map_err(|source| BenchError::Spawn {
        what: what.into(),
        source,
    })?;
    migrated.map_err(|why| BenchError::Failed {
        what: what.into(),
        status: format!("{status}; {why}"),
        printed: printed.trim().to_string(),
    })
}

/// Over the monitor at `socket`: migrates to `state`, waits for the
/// migration to complete, and quits; or says what went wrong.
fn migrate(socket: &Path, state: &Path, limit: Duration) -> Result<(), String> {
    let mut monitor = Monitor::connect(socket, limit)
        .map_err(|err| format!("cannot reach its monitor {}: {err}", socket.display()))?;
    let said = |err: std::io::Error| format!("its monitor: {err}");
    monitor
        .call(&format!("migrate \"exec:cat > {}\"", state.display()))
        .map_err(said)?;
    let started = Instant::now();
    loop {
        let info = monitor.call("info migrate").map_err(said)?;
        if info.contains("Migration status: completed") {
            break;
        }
        if info.contains("failed") || info.contains("cancelled") || started.elapsed() > limit {
            return Err(format!("the migration did not complete: {}", info.trim()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // QEMU ends at once; the answer may never come.
    let _ = monitor.call("quit");
    Ok(())
}

/// QEMU's human monitor on a unix socket.
struct Monitor(UnixStream);

/// The monitor's prompt, which ends each answer.
const PROMPT: &str = "(qemu) ";

impl Monitor {
    /// Connects (retrying while QEMU creates the socket) and reads the banner.
    fn connect(socket: &Path, limit: Duration) -> std::io::Result<Monitor> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(err) if started.elapsed() > limit => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream.set_read_timeout(Some(MONITOR_TIMEOUT))?;
        let mut monitor = Monitor(stream);
        monitor.until_prompt()?;
        Ok(monitor)
    }

    /// Sends `command`; its answer, up to the next prompt.
    fn call(&mut self, command: &str) -> std::io::Result<String> {
        self.0.write_all(format!("{command}\n").as_bytes())?;
        self.until_prompt()
    }

    fn until_prompt(&mut self) -> std::io::Result<String> {
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        while !text.ends_with(PROMPT.as_bytes()) {
            match self.0.read(&mut chunk)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => text.extend_from_slice(&chunk[..n]),
            }
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }
}
