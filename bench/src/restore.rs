//! The restore scenario: `kiln snapshot restore` of the function's
//! template (a snapshot of the image booted, guest-init waiting on its
//! vsock port) into a new instance, to guest-init answering a ping there.
use std::collections::HashSet;
use std::ffi::OsString;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use guest_init::function::FUNCTION_PORT;
use kiln_control::functions::{ping, vsock};
use kiln_control::instance::{Instance, Registry};

use crate::clone::Function;
use crate::kiln::Kiln;
use crate::report::{Series, Vmm};
use crate::timing::{Watchdog, millis};
use crate::{BenchError, Config, Progress, Scenario, timed_series};

/// The restore scenario's timer.
pub const TIMER: (&str, &str) = (
    "exec of `kiln snapshot restore SNAPSHOT --name NAME`",
    "guest-init in the restored guest answering a ping on its vsock port",
);

/// How often the new instance is looked for.
const POLL: Duration = Duration::from_millis(1);
/// How long one round of connecting to its guest may take.
const CONNECT_ROUND: Duration = Duration::from_secs(5);

/// Why a restored guest did not answer: the cause of
/// [`BenchError::NoAnswer`].
#[derive(Debug, thiserror::Error)]
pub enum NoPong {
    /// No new instance of the name was recorded.
    #[error("the instance never appeared")]
    NoInstance,
    /// The instance exists, but connecting to its guest-init or pinging
    /// it failed, the last time it was tried.
    #[error("the last ping failed")]
    Ping(#[source] std::io::Error),
}

/// `kiln snapshot restore` of the function's template into a new
/// instance, to its guest answering a ping; each instance is terminated
/// (untimed) after its run.
pub fn kiln(
    config: &Config,
    kiln: &Kiln,
    function: &Function,
    progress: &dyn Progress,
) -> Result<Series, BenchError> {
    let run = |i: usize| {
        let name = format!("restore-{i}");
        let elapsed = restore_to_answer(config, kiln, function, &name)?;
        kiln.terminate(&name)?;
        Ok(millis(elapsed))
    };
    timed_series(config, Scenario::Restore, Vmm::Kiln, TIMER, progress, &run)
}

/// Spawns the restore of instance `name` and times it to the pong; the
/// command must then succeed.
fn restore_to_answer(
    config: &Config,
    kiln: &Kiln,
    function: &Function,
    name: &str,
) -> Result<Duration, BenchError> {
    let what = format!("kiln snapshot restore --name {name}");
    let mut cmd = kiln.command();
    cmd.args(["snapshot", "restore"])
        .arg(&function.template)
        .args(["--name", name]);
    let limit = config.limit;
    let (answered, _) = timed_restore(
        kiln,
        cmd,
        &what,
        name,
        limit,
        |known, restoring, started| wait_for_pong(kiln, name, known, restoring, started, limit),
        |last, printed| BenchError::NoAnswer {
            what: what.clone(),
            limit,
            printed,
            last,
        },
    )?;
    Ok(answered)
}

/// Spawns `cmd`, a `kiln` command that restores instance `name` (tracked:
/// terminated with `kiln` unless the caller does), and times it from just
/// before the spawn with `arrived` (given the instance directories from
/// before, the command, and the timer's start); the command must then
/// succeed within `limit`. A failure of `arrived` becomes an error by
/// `failed`, given the command's output. Returns what `arrived` did and
/// the spawn's `CLOCK_MONOTONIC` time in ns (for [`kiln_vmm::trace`]'s lines).
pub(crate) fn timed_restore<T, E>(
    kiln: &Kiln,
    mut cmd: Command,
    what: &str,
    name: &str,
    limit: Duration,
    arrived: impl FnOnce(HashSet<OsString>, &mut Child, Instant) -> Result<T, E>,
    failed: impl FnOnce(E, String) -> BenchError,
) -> Result<(T, u64), BenchError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let known = instance_dirs(kiln);
    let spawned_ns = kiln_vmm::trace::monotonic_ns();
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
        what: what.to_string(),
        source,
    })?;
    kiln.track(name);
    let watchdog = Watchdog::start(child.id(), limit);
    let arrived = arrived(known, &mut child, started);
    let output = child.wait_with_output();
    let killed = watchdog.finish();
    let output = output.map_err(|source| BenchError::Spawn {
        what: what.to_string(),
        source,
    })?;
    let printed = format!(
        "{} | {}",
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    if killed {
        return Err(BenchError::Timeout {
            what: what.to_string(),
            limit,
            printed,
        });
    }
    if !output.status.success() {
        return Err(BenchError::Failed {
            what: what.to_string(),
            status: output.status.to_string(),
            printed,
        });
    }
    match arrived {
        Ok(arrived) => Ok((arrived, spawned_ns)),
        Err(err) => Err(failed(err, printed)),
    }
}

/// Looks for instance `name`, then pings its guest until it answers;
/// the time since `started` of the pong, or the last failure at `limit`
/// or once `restoring` (the `kiln` command) has failed (which the caller
/// reports from its status). `known` are the
/// instance directories from before the restore: only new ones are read.
fn wait_for_pong(
    kiln: &Kiln,
    name: &str,
    mut known: HashSet<OsString>,
    restoring: &mut Child,
    started: Instant,
    limit: Duration,
) -> Result<Duration, NoPong> {
    let registry = Registry::new(kiln.home());
    let mut last = NoPong::NoInstance;
    let mut socket = None;
    while started.elapsed() < limit {
        if socket.is_none() {
            socket = new_instance(kiln, &registry, &mut known, name).map(|i| i.vsock_socket());
        }
        if let Some(socket) = &socket {
            // vsock::connect retries until the guest answers, as `kiln fn
            // invoke` does; a ping that fails after it is tried again, and
            // the restore's own failure is looked for every few seconds.
            let left = limit.saturating_sub(started.elapsed()).min(CONNECT_ROUND);
            match vsock::connect(socket, FUNCTION_PORT, left).and_then(ping) {
                Ok(()) => return Ok(started.elapsed()),
                Err(err) => last = NoPong::Ping(err),
            }
        }
        if let Ok(Some(status)) = restoring.try_wait()
            && !status.success()
        {
            return Err(last);
        }
        std::thread::sleep(POLL);
    }
    Err(last)
}

/// The instance directories there are now (a directory listing: cheaper
/// than reading every record while a guest is being restored).
pub(crate) fn instance_dirs(kiln: &Kiln) -> HashSet<OsString> {
    std::fs::read_dir(kiln.home().join("instances"))
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.file_name())).collect())
        .unwrap_or_default()
}

/// Instance `name`, if it is among the directories not `known` (an
/// instance's directory appears whole, its record in it); the others
/// (concurrent runs' instances) become known.
pub(crate) fn new_instance(
    kiln: &Kiln,
    registry: &Registry,
    known: &mut HashSet<OsString>,
    name: &str,
) -> Option<Instance> {
    for id in instance_dirs(kiln) {
        if known.contains(&id) || !id.to_string_lossy().starts_with("i-") {
            continue;
        }
        let Ok(instance) = registry.find(&id.to_string_lossy()) else {
            continue;
        };
        if instance.record.spec.name.as_deref() == Some(name) {
            return Some(instance);
        }
        known.insert(id);
    }
    None
}
