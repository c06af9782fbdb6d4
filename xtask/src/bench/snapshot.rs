//! `cargo xtask bench snapshot`: how fast an instance restored from a
//! snapshot answers against the same instance booted cold, same image,
//! same guest size, same test machine, same run.
//!
//! For each guest size ([`SIZES`]) the guest side boots `vm-test:1.0.0`
//! detached with the echo entrypoint (tests/vm/guest/echo.sh, which prints
//! `echo-ready`, then answers every console line `L` with `got L`), waits
//! for `echo-ready`, and times `kiln snapshot create` (wall time, and the
//! pause it reports), recording the sizes of the snapshot's files; the
//! source instance is then terminated (a snapshot is self-contained), and
//! its guest is caught waiting in `read`. After one untimed restore (the
//! source's boot was the cold side's warm-up), `runs` times, interleaved,
//! it times:
//!
//! - cold, "booted to answering": spawning `kiln run … --detach` to
//!   `echo-ready` in the new instance's console log (the entrypoint prints
//!   it first thing, right after guest-init starts it);
//! - restore, "restored to answering": spawning `kiln snapshot restore DIR
//!   --name …` to `got ping` in the new instance's console log, `ping`
//!   being written to its console input (`console.in`, as `kiln attach`
//!   does) as soon as that accepts a writer, which it does once the VMM
//!   has opened it for the VM process it is about to start: the line
//!   waits in the pipe until the restored guest reads it, and the answer
//!   shows that guest running on, its console input and output working.
//!
//! The files of the instance (under `$KILN_HOME/instances/`) are read
//! directly, every [`POLL`], without waiting for the `kiln` command
//! (which returns once the instance is running, the guest still on its
//! way); each instance is terminated afterwards. Both sides include the
//! detached-instance machinery equally: the `kiln` process, registering
//! the instance, spawning its VMM process and its VM process, the console
//! going through the VMM to the log file.
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_control::instance::{Instance, Registry};
use serde::{Deserialize, Serialize};

use super::{
    Kiln, Stats, env, environment, kiln_home, millis, print_report, run_guest, save, stats,
};
use crate::sh;

const IMAGE: &str = "vm-test:1.0.0";
const ENTRYPOINT: &str = "kiln.entrypoint=/tests/echo.sh";
/// What the echo entrypoint prints first.
const READY: &str = "echo-ready";
/// What a restored instance is sent, and its answer.
const PING: &str = "ping";
const ANSWER: &str = "got ping";
/// Guest memory sizes, MiB.
const SIZES: [u64; 2] = [128, 256];
/// How often the console log is read and the console input tried.
const POLL: Duration = Duration::from_millis(1);
/// Per boot, restore or snapshot under nested TCG, generously.
const PER_STEP: Duration = Duration::from_secs(60);
/// Restore / cold, medians: the goal is at most this.
const RATIO_GOAL: f64 = 0.05;

/// What `target/bench/snapshot.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub environment: String,
    pub runs: usize,
    pub sizes: Vec<SizeReport>,
}

/// One guest size's measurements.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SizeReport {
    pub memory_mib: u64,
    /// Spawning `kiln run --detach` to `echo-ready` on the console.
    pub cold_ms: Stats,
    /// Spawning `kiln snapshot restore` to `got ping` on the console.
    pub restore_ms: Stats,
    /// Median restore / median cold: at most 0.05 is the goal.
    pub ratio: f64,
    /// `kiln snapshot create`, wall time.
    pub create_ms: f64,
    /// How long the guest was paused, as `kiln snapshot create` reports it.
    pub paused_ms: f64,
    /// The `memory` file's apparent size and the disk it takes (sparse).
    pub memory_file_bytes: u64,
    pub memory_file_on_disk_bytes: u64,
    pub state_bytes: u64,
    pub root_overlay_bytes: u64,
}

/// `kiln snapshot create`'s measurements of one snapshot.
#[derive(Debug, PartialEq)]
struct Created {
    create_ms: f64,
    paused_ms: f64,
    memory_file_bytes: u64,
    memory_file_on_disk_bytes: u64,
    state_bytes: u64,
    root_overlay_bytes: u64,
}

impl SizeReport {
    /// From the cold and restore samples (ms, not empty) and the snapshot.
    fn of(memory_mib: u64, cold: &[f64], restore: &[f64], created: Created) -> Result<SizeReport> {
        let (cold_ms, restore_ms) = (stats(cold)?, stats(restore)?);
        Ok(SizeReport {
            memory_mib,
            ratio: restore_ms.p50 / cold_ms.p50,
            cold_ms,
            restore_ms,
            create_ms: created.create_ms,
            paused_ms: created.paused_ms,
            memory_file_bytes: created.memory_file_bytes,
            memory_file_on_disk_bytes: created.memory_file_on_disk_bytes,
            state_bytes: created.state_bytes,
            root_overlay_bytes: created.root_overlay_bytes,
        })
    }
}

/// Host side: runs the guest side where KVM is, writes the JSON, prints a table.
pub fn snapshot(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    let steps = SIZES.len() as u32 * (2 * runs as u32 + 4);
    let mut report: SnapshotReport = run_guest("snapshot", runs, PER_STEP * steps)?;
    report.environment = environment();
    let out = save("snapshot", &report)?;
    print_table(&report);
    println!("{}", out.display());
    Ok(())
}

fn print_table(r: &SnapshotReport) {
    println!(
        "snapshot benchmark, {} runs each ({})",
        r.runs, r.environment
    );
    println!(
        "| guest | cold min | median | p90 | max | restore min | median | p90 | max | restore / cold |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &r.sizes {
        let (c, x) = (&s.cold_ms, &s.restore_ms);
        println!(
            "| {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
            s.memory_mib, c.min, c.p50, c.p90, c.max, x.min, x.p50, x.p90, x.max, s.ratio
        );
    }
    println!(
        "ms from spawning the kiln command: cold to {READY:?}, restore to {ANSWER:?} \
         (sent {PING:?}); goal restore / cold <= {RATIO_GOAL}"
    );
    println!(
        "| guest | create (ms) | paused (ms) | memory file (MiB) | on disk (MiB) | state (KiB) | root.overlay (KiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    for s in &r.sizes {
        println!(
            "| {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.memory_mib,
            s.create_ms,
            s.paused_ms,
            mib(s.memory_file_bytes),
            mib(s.memory_file_on_disk_bytes),
            s.state_bytes as f64 / 1024.0,
            s.root_overlay_bytes as f64 / 1024.0,
        );
    }
}

/// Guest side (where KVM is): measures every size and prints the report
/// as one JSON line.
pub fn guest(runs: usize) -> Result<()> {
    let (bin, images, work) = (
        env("KILN")?,
        PathBuf::from(env("KILN_IMAGES")?),
        PathBuf::from(env("WORK_ROOT")?).join("bench-snapshot"),
    );
    let kiln = Kiln::new(bin, kiln_home(&images, &work)?);
    let sizes = SIZES
        .into_iter()
        .map(|memory_mib| measure(&kiln, &work, memory_mib, runs))
        .collect::<Result<Vec<_>>>()?;
    print_report(&SnapshotReport {
        environment: environment(),
        runs,
        sizes,
    })
}

/// One guest size: a snapshot, then `runs` cold boots and restores.
fn measure(kiln: &Kiln, work: &Path, memory_mib: u64, runs: usize) -> Result<SizeReport> {
    let dir = work.join(format!("snapshot-{memory_mib}"));
    let created = create(kiln, &dir, memory_mib)?;
    let restore = |name: &str| {
        let mut cmd = kiln.command();
        cmd.args(["snapshot", "restore"])
            .arg(&dir)
            .args(["--name", name]);
        kiln.time_to_answer(cmd, name, Some(PING), ANSWER)
    };
    let warm_up = format!("warm-up-{memory_mib}");
    restore(&warm_up)?;
    kiln.terminate(&warm_up)?;
    let (mut cold_ms, mut restore_ms) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("cold-{memory_mib}-{i}");
        cold_ms.push(millis(kiln.boot(&name, memory_mib)?));
        kiln.terminate(&name)?;
        let name = format!("restored-{memory_mib}-{i}");
        restore_ms.push(millis(restore(&name)?));
        kiln.terminate(&name)?;
    }
    // The memory file is as large as the guest: not kept in L1's tmpfs.
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    SizeReport::of(memory_mib, &cold_ms, &restore_ms, created)
}

/// Boots a source instance, snapshots it into `dir` once it waits for
/// input, and terminates it.
fn create(kiln: &Kiln, dir: &Path, memory_mib: u64) -> Result<Created> {
    let source = format!("source-{memory_mib}");
    kiln.boot(&source, memory_mib)?;
    let started = Instant::now();
    let printed = sh::output(
        kiln.command()
            .args(["snapshot", "create", &source])
            .arg(dir),
    )?;
    let create_ms = millis(started.elapsed());
    kiln.terminate(&source)?;
    let file = |name: &str| {
        let path = dir.join(name);
        std::fs::metadata(&path).with_context(|| format!("no {} in the snapshot", path.display()))
    };
    let memory = file("memory")?;
    Ok(Created {
        create_ms,
        paused_ms: paused_ms(&printed)?,
        memory_file_bytes: memory.len(),
        memory_file_on_disk_bytes: memory.blocks() * 512,
        state_bytes: file("state")?.len(),
        root_overlay_bytes: file("root.overlay")?.len(),
    })
}

/// The pause `kiln snapshot create` printed: `… paused 12.3 ms, …`.
fn paused_ms(printed: &str) -> Result<f64> {
    printed
        .rsplit_once(": paused ")
        .and_then(|(_, rest)| rest.split_once(" ms"))
        .and_then(|(ms, _)| ms.parse().ok())
        .with_context(|| format!("no pause in {printed:?}"))
}

impl Kiln {
    /// Boots instance `name` detached with the echo entrypoint and times
    /// it to [`READY`].
    fn boot(&self, name: &str, memory_mib: u64) -> Result<Duration> {
        let mut cmd = self.command();
        cmd.args(["run", IMAGE, "--detach", "--name", name])
            .args(["--memory", &memory_mib.to_string(), "--vcpus", "1"])
            .args(["--cmdline", ENTRYPOINT]);
        self.time_to_answer(cmd, name, None, READY)
    }

    /// The instance directories there are now (ids).
    fn instance_ids(&self) -> Result<HashSet<OsString>> {
        let root = self.home().join("instances");
        match std::fs::read_dir(&root) {
            Ok(entries) => entries
                .map(|entry| Ok(entry?.file_name()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot list {}", root.display())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(err) => Err(err).with_context(|| format!("cannot list {}", root.display())),
        }
    }

    /// The instance that is not one of `known`, once its directory is
    /// there (it appears whole, its record in it); it must be `name`.
    fn new_instance(&self, known: &HashSet<OsString>, name: &str) -> Result<Option<Instance>> {
        let Some(id) = self
            .instance_ids()?
            .into_iter()
            .find(|id| !known.contains(id) && id.to_string_lossy().starts_with("i-"))
        else {
            return Ok(None);
        };
        let instance = Registry::new(self.home()).find(&id.to_string_lossy())?;
        if instance.record.spec.name.as_deref() != Some(name) {
            bail!("instance {} appeared, not {name}", instance.label());
        }
        Ok(Some(instance))
    }

    /// Spawns `cmd`, which starts instance `name`, and times it to
    /// `answer` on the instance's console, reading the instance's console
    /// log every [`POLL`]; with `ask`, that line is first written to its
    /// console input as soon as that has a reader. Fails if `cmd` fails or
    /// no such line shows within [`PER_STEP`].
    fn time_to_answer(
        &self,
        mut cmd: Command,
        name: &str,
        ask: Option<&str>,
        answer: &str,
    ) -> Result<Duration> {
        let known = self.instance_ids()?;
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", sh::describe(&cmd)))?;
        self.track(name);
        Starting {
            cmd,
            child,
            name,
            known,
            ask: ask.map(|line| format!("{line}\n")),
            instance: None,
            log: None,
            console: Vec::new(),
        }
        .time_to(answer, started, self)
    }
}

/// A spawned command that starts instance `name`, and what its console
/// has shown so far.
struct Starting<'a> {
    cmd: Command,
    child: Child,
    name: &'a str,
    /// The instances there before `cmd` was spawned.
    known: HashSet<OsString>,
    /// The line still to write to the console input, if any.
    ask: Option<String>,
    instance: Option<Instance>,
    log: Option<File>,
    console: Vec<u8>,
}

impl Starting<'_> {
    /// The time from `started` to `answer` on the console, read every
    /// [`POLL`]; the command must then exit with success.
    fn time_to(mut self, answer: &str, started: Instant, kiln: &Kiln) -> Result<Duration> {
        let elapsed = loop {
            self.follow_console(kiln)?;
            if shows(&self.console, answer) {
                break started.elapsed();
            }
            if let Some(status) = self.child.try_wait()?
                && !status.success()
            {
                return Err(self.failed(&format!("failed: {status}")));
            }
            if started.elapsed() > PER_STEP {
                let _ = self.child.kill();
                return Err(self.failed(&format!("showed no {answer:?} within {PER_STEP:?}")));
            }
            std::thread::sleep(POLL);
        };
        let status = self.child.wait()?;
        if !status.success() {
            return Err(self.failed(&format!("failed: {status}")));
        }
        Ok(elapsed)
    }

    /// Finds the instance once it is there, writes `ask` to its console
    /// input once that has a reader, and reads what its console log gained.
    fn follow_console(&mut self, kiln: &Kiln) -> Result<()> {
        if self.instance.is_none() {
            self.instance = kiln.new_instance(&self.known, self.name)?;
        }
        let Some(instance) = &self.instance else {
            return Ok(());
        };
        if let Some(line) = &self.ask
            && let Ok(mut input) = instance.console_input_writer()
        {
            input
                .write_all(line.as_bytes())
                .with_context(|| format!("cannot write to {}'s console", self.name))?;
            self.ask = None;
        }
        if self.log.is_none() {
            self.log = File::open(instance.console_log()).ok();
        }
        if let Some(log) = &mut self.log {
            let path = instance.console_log();
            log.read_to_end(&mut self.console)
                .with_context(|| format!("cannot read {}", path.display()))?;
        }
        Ok(())
    }

    /// The error for a command that `why`, with what it and the console
    /// printed.
    fn failed(self, why: &str) -> anyhow::Error {
        let printed = self
            .child
            .wait_with_output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default();
        let console = String::from_utf8_lossy(&self.console);
        let console = console.lines().map(str::trim).collect::<Vec<_>>();
        anyhow::anyhow!(
            "{} {why}; it printed: {}; the console: {}",
            sh::describe(&self.cmd),
            printed.trim(),
            console.join(" | ")
        )
    }
}

/// Whether `text` is in `console`.
fn shows(console: &[u8], text: &str) -> bool {
    console
        .windows(text.len())
        .any(|window| window == text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_is_read_from_what_create_printed() {
        let printed = "i-0123456789abcdef snapshot in /tmp/work/snapshot-128: paused 12.3 ms, \
                       memory 20 of 128 MiB written, root volume 0.1 MiB\n";
        assert_eq!(paused_ms(printed).unwrap(), 12.3);
        assert!(paused_ms("i-0 snapshot in /x: memory 20 of 128 MiB written").is_err());
    }

    #[test]
    fn the_echo_entrypoint_says_ready_and_answers_the_ping() {
        let script = sh::workspace_root().join("tests/vm/guest/echo.sh");
        let mut child = Command::new("sh")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        writeln!(input, "{PING}").unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{READY}\n{ANSWER}\n")
        );
        assert!(std::fs::metadata(&script).unwrap().mode() & 0o111 != 0);
    }

    #[test]
    fn the_answer_is_looked_for_anywhere_on_the_console() {
        let console = b"[    0.1] ttyS0 at I/O 0x3f8\r\necho-ready\r\nping\r\ngot pi";
        assert!(shows(console, READY));
        assert!(!shows(console, ANSWER));
        assert!(shows(b"ping\r\ngot ping\r\n", ANSWER));
        assert!(!shows(b"", READY));
    }

    #[test]
    fn the_ratio_is_median_restore_over_median_cold() {
        let created = Created {
            create_ms: 40.0,
            paused_ms: 12.5,
            memory_file_bytes: 128 << 20,
            memory_file_on_disk_bytes: 20 << 20,
            state_bytes: 4096,
            root_overlay_bytes: 1 << 20,
        };
        let report = SizeReport::of(
            128,
            &[1000.0, 900.0, 1100.0, 5000.0],
            &[40.0, 60.0, 50.0, 45.0],
            created,
        )
        .unwrap();
        assert_eq!(report.cold_ms.p50, 1000.0);
        assert_eq!(report.restore_ms.p50, 45.0);
        assert_eq!(report.ratio, 0.045);
        assert!(report.ratio <= RATIO_GOAL);

        let json = serde_json::to_value(SnapshotReport {
            environment: "hardware KVM".into(),
            runs: 4,
            sizes: vec![report],
        })
        .unwrap();
        let size = &json["sizes"][0];
        for key in [
            "memory_mib",
            "cold_ms",
            "restore_ms",
            "ratio",
            "create_ms",
            "paused_ms",
            "memory_file_bytes",
            "memory_file_on_disk_bytes",
            "state_bytes",
            "root_overlay_bytes",
        ] {
            assert!(size.get(key).is_some(), "no {key} in {size}");
        }
        assert_eq!(size["cold_ms"]["p90"], 5000.0);
        assert_eq!(size["memory_file_on_disk_bytes"], 20 << 20);
        let back: SnapshotReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.sizes[0].ratio, 0.045);
    }
}
