//! Stops of a running VM: the stub beats in `kiln run --kernel STUB`
//! (and in QEMU microvm, by turns), and once it has run [`STOP_AGE`]
//! past its first heartbeat the VMM gets SIGTERM; the time from that
//! signal to the process's exit is the sample. It is what `kiln stop`,
//! `timeout` or a supervisor's shutdown waits for: the VMM's teardown of
//! a live VM (vCPU threads, KVM, guest memory), with no guest shutdown in
//! it, since the stub has none.
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_vmm::machine::STOPPED_STATUS;

use crate::kiln::Kiln;
use crate::qemu::{InitPort, QEMU};
use crate::timing::{Watched, millis, printed, signal, spawn_watched, wait_to_exit};
use crate::{BenchError, Progress, io_err, paired};

use super::VmmConfig;
use super::cold::{stub_microvm, wrong_end};
use super::report::Latency;
use super::restore::{BEAT_CMDLINE, HEARTBEAT, first_heartbeat};

/// How long past its first heartbeat a VM runs before it is sent SIGTERM.
/// QEMU's KVM_CREATE_IRQCHIP (Kiln's split irqchip has none) starts an
/// SRCU grace period (about 16 ms on these hosts) that tearing its VM
/// down waits out: stopped younger, QEMU's stop would time that wait
/// rather than the stop itself. A real guest lives far longer than this
/// before it is stopped.
pub const STOP_AGE: Duration = Duration::from_millis(50);

/// QEMU's exit status on SIGTERM: it says `terminating on signal 15` and
/// shuts down as if asked to, with status 0.
const QEMU_TERMINATED_STATUS: i32 = 0;

/// The stop series of every VMM that took part.
pub struct Stops {
    /// Kiln's.
    pub kiln: Latency,
    /// QEMU microvm's, when `config.qemu`.
    pub qemu: Option<Latency>,
}

/// One VMM's stops: what the progress bar, the errors and the scratch
/// files call them, and the exit status SIGTERM must give.
struct Stopper {
    /// The VMM.
    vmm: &'static str,
    /// The series' label.
    label: &'static str,
    /// Its command line, as a person would type it.
    what: &'static str,
    /// The exit status of a run stopped by SIGTERM.
    terminated: i32,
}

/// Kiln's stops.
const KILN_STOPS: Stopper = Stopper {
    vmm: "kiln",
    label: "stop (kiln)",
    what: "kiln run --kernel STUB --cmdline kiln.stub=beat",
    terminated: STOPPED_STATUS as i32,
};

/// QEMU microvm's.
const QEMU_STOPS: Stopper = Stopper {
    vmm: "qemu",
    label: "stop (qemu)",
    what: "qemu-system-x86_64 -M microvm -kernel STUB -append kiln.stub=beat",
    terminated: QEMU_TERMINATED_STATUS,
};

/// Kiln's stops, and by turns with them QEMU's when `config.qemu`:
/// `config.warmup` untimed each, then `config.runs` timed.
pub fn run(
    config: &VmmConfig,
    kiln: &Kiln,
    work: &Path,
    progress: &dyn Progress,
) -> Result<Stops, BenchError> {
    let kiln_run = |i: usize| KILN_STOPS.stop(kiln_command(config, kiln), work, i, config.limit);
    let qemu_run = |i: usize| QEMU_STOPS.stop(qemu_command(config), work, i, config.limit);
    let plan = config.plan();
    if !config.qemu {
        let [(kiln, _)] = paired(plan, [KILN_STOPS.label], progress, [&kiln_run])?;
        return Ok(Stops {
            kiln: KILN_STOPS.latency(kiln)?,
            qemu: None,
        });
    }
    let labels = [KILN_STOPS.label, QEMU_STOPS.label];
    let [(kiln, _), (qemu, _)] = paired(plan, labels, progress, [&kiln_run, &qemu_run])?;
    Ok(Stops {
        kiln: KILN_STOPS.latency(kiln)?,
        qemu: Some(QEMU_STOPS.latency(qemu)?),
    })
}

/// `kiln run` of the stub, beating, as the cold series runs it otherwise.
fn kiln_command(config: &VmmConfig, kiln: &Kiln) -> Command {
    let mut cmd = kiln.command();
    cmd.arg("run").arg("--kernel").arg(&config.stub).args([
        "--cmdline",
        BEAT_CMDLINE,
        "--memory",
        &config.memory_mib.to_string(),
        "--vcpus",
        "1",
    ]);
    cmd
}

/// QEMU microvm with the stub, beating on its serial console (stdout),
/// nothing on the guest-init port to end it.
fn qemu_command(config: &VmmConfig) -> Command {
    stub_microvm(config, BEAT_CMDLINE, InitPort::None).command(Path::new(QEMU))
}

impl Stopper {
    /// The stops' timer, `(start, stop)`.
    fn timer(&self) -> (String, String) {
        (
            format!(
                "SIGTERM to `{}`, {} ms after the first heartbeat line on its stdout",
                self.what,
                STOP_AGE.as_millis()
            ),
            format!(
                "its exit (waitid), with exit status {} required",
                self.terminated
            ),
        )
    }

    /// The timed runs' `samples_ms` as a [`Latency`].
    fn latency(&self, samples_ms: Vec<f64>) -> Result<Latency, BenchError> {
        let runs = samples_ms.len();
        let (starts, stops) = self.timer();
        Latency::new((&starts, &stops), samples_ms).ok_or(BenchError::Runs(runs))
    }

    /// Run `i`: `cmd` spawned (a VMM booting the stub, beating; its
    /// stderr into a file of `work`), sent SIGTERM [`STOP_AGE`] after
    /// its first heartbeat, and waited for: the time from the signal to
    /// its exit, in ms. Killed past `limit`.
    fn stop(
        &self,
        mut cmd: Command,
        work: &Path,
        i: usize,
        limit: Duration,
    ) -> Result<f64, BenchError> {
        let errors = work.join(format!("stop-{}-{i}.err", self.vmm));
        let file = File::create(&errors).map_err(io_err(&errors))?;
        cmd.stderr(file);
        let Watched {
            child,
            watchdog,
            mut stdout,
        } = spawn_watched(cmd, self.what, limit)?;
        // The Child is never waited for by std: `wait_to_exit` reaps it.
        let pid = child.id();
        let beat = first_heartbeat(&mut stdout);
        // The console goes on until the VMM ends: drained meanwhile, so
        // that a full pipe never blocks the VM. Not joined: it ends with
        // the pipe, which nothing here waits for.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        if beat {
            std::thread::sleep(STOP_AGE);
        }
        // Without a heartbeat the VMM has ended, or closed its stdout:
        // the signal ends it in the second case.
        let sent = Instant::now();
        signal(pid, libc::SIGTERM);
        let exited = wait_to_exit(pid, watchdog, sent, self.what, limit, &errors)?;
        if !beat {
            return Err(BenchError::NoEvent {
                what: self.what.into(),
                event: format!("a line starting {HEARTBEAT:?} on its stdout"),
                status: format!("exit status {:?}", exited.code),
                printed: printed(&errors),
            });
        }
        if exited.code != Some(self.terminated) {
            let expected = format!("exit status {} at SIGTERM", self.terminated);
            return Err(wrong_end(self.what, &exited, &expected, &errors));
        }
        Ok(millis(exited.wall))
    }
}
