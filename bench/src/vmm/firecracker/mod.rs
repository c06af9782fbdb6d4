//! Firecracker, a peer the user brings (`--peer firecracker=PATH`): the
//! benchmark does not build or package it. Its cold runs boot the stub
//! from a config file (`--no-api`); the stub's `InitStarted` write to
//! port 0x440 lands on no device of Firecracker's, and its i8042 reset
//! then ends the process. Its restores load a snapshot of the beating
//! stub through the API ([`api`]), each timed from the spawn to the first
//! heartbeat, as Kiln's and QEMU's are.
//!
//! Firecracker runs with `--level Error`: its info lines would share the
//! serial console's stdout (and could split a heartbeat line), and Kiln
//! prints nothing on these paths either.
pub mod api;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::io::BufReader;
use std::process::{ChildStdout, Stdio};
use std::time::Instant;

use kiln_vmm::report::one_line;
use serde_json::json;

use crate::timing::{Exited, Watched, millis, run_to_exit, signal, spawn_watched};
use crate::{BenchError, Progress, io_err, series};

use super::VmmConfig;
use super::cold::wrong_end;
use super::report::{Latency, PeerRestore};
use super::restore::{BEAT_CMDLINE, first_heartbeat};
use api::{Api, ApiError};

/// Firecracker's restore timer.
pub const RESTORE_TIMER: (&str, &str) = (
    "exec of `firecracker --api-sock SOCKET`, which is then sent PUT /snapshot/load \
     (a file memory backend, resume_vm: true)",
    "the first heartbeat line on its stdout (its serial console)",
);

/// Firecracker's log level in every run: errors only (see the module's
/// documentation).
const LOG_LEVEL: [&str; 2] = ["--level", "Error"];

/// A `kiln bench vmm --peer` value that names no usable peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Not of the form `firecracker=PATH`.
    #[error("{0:?}: expected firecracker=PATH")]
    Form(String),
    /// PATH is not an executable file.
    #[error("{0}: expected an executable file (a Firecracker binary)")]
    NotExecutable(PathBuf),
}

/// The PATH of a `--peer firecracker=PATH`, which must be an executable
/// file: found wrong here, before any VM has run, rather than at the
/// first Firecracker run.
pub fn peer_binary(value: &str) -> Result<PathBuf, PeerError> {
    let path = value
        .strip_prefix("firecracker=")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| PeerError::Form(value.to_string()))?;
    let executable = std::fs::metadata(&path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0);
    if !executable {
        return Err(PeerError::NotExecutable(path));
    }
    Ok(path)
}

/// Firecracker's cold command, as the report names it.
pub const COLD_COMMAND: &str = "firecracker --level Error --no-api --config-file FILE (the stub as \
                                boot-source, no drives; its i8042 reset ends it)";

/// What Firecracker logs when a vCPU's `KVM_RUN` returns
/// `KVM_EXIT_SHUTDOWN`: the stub's triple fault after its reset write.
const VCPU_SHUTDOWN: &str = "Unexpected exit reason on vcpu run: Shutdown";

/// How Firecracker (seen with v1.17.0-dev) ends at the stub's reset, a
/// race between two ends of the same reset: the i8042's reset event, if
/// its main thread gets to it first, is a clean stop, exit status 0
/// (`FcExitCode::Ok`); otherwise the vCPU, still running, reaches the
/// stub's fallback triple fault and reports that as an error, exit
/// status 1 (`FcExitCode::GenericError`) after [`VCPU_SHUTDOWN`].
/// Nothing else is the stub's end.
fn ended_at_reset(code: Option<i32>, printed: &str) -> bool {
    match code {
        Some(0) => true,
        Some(1) => printed.contains(VCPU_SHUTDOWN),
        _ => false,
    }
}

/// Firecracker's configuration (its `VmmConfig` JSON, as
/// `--config-file` reads it and as the API's `PUT /boot-source` and
/// `PUT /machine-config` bodies are named) for the stub with `boot_args`:
/// one vCPU, the benchmark's memory, no drives.
fn vm_config(config: &VmmConfig, boot_args: &str) -> serde_json::Value {
    json!({
        "boot-source": {
            "kernel_image_path": config.stub,
            "boot_args": boot_args,
        },
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": config.memory_mib,
        },
        "drives": [],
    })
}

/// Firecracker's cold boots: its binary and the config file they read.
pub struct ColdBoot {
    binary: PathBuf,
    config_file: PathBuf,
}

impl ColdBoot {
    /// Writes the cold runs' config file into `work`.
    pub fn write(config: &VmmConfig, binary: &Path, work: &Path) -> Result<ColdBoot, BenchError> {
        let config_file = work.join("firecracker-cold.json");
        let text = vm_config(config, "console=ttyS0").to_string();
        std::fs::write(&config_file, text).map_err(io_err(&config_file))?;
        Ok(ColdBoot {
            binary: binary.to_path_buf(),
            config_file,
        })
    }

    /// Cold run `i`, which must end at the stub's reset
    /// ([`ended_at_reset`]).
    pub fn run(&self, config: &VmmConfig, work: &Path, i: usize) -> Result<Exited, BenchError> {
        let what = "firecracker --no-api --config-file FILE";
        let mut cmd = Command::new(&self.binary);
        cmd.args(LOG_LEVEL)
            .arg("--no-api")
            .arg("--config-file")
            .arg(&self.config_file);
        let out = work.join(format!("cold-firecracker-{i}.out"));
        let exited = run_to_exit(cmd, what, &out, config.limit)?;
        let printed = std::fs::read_to_string(&out).unwrap_or_default();
        if !ended_at_reset(exited.code, &printed) {
            let expected = format!("exit status 0, or 1 after {VCPU_SHUTDOWN:?}");
            return Err(wrong_end(what, &exited, &expected, &out));
        }
        Ok(exited)
    }
}

/// Firecracker's restores of the beating stub, or why there are none.
pub fn restores(
    config: &VmmConfig,
    binary: &Path,
    work: &Path,
    progress: &dyn Progress,
) -> PeerRestore {
    match measure_restores(config, binary, work, progress) {
        Ok(latency) => PeerRestore::Measured(latency),
        Err(err) => PeerRestore::Unavailable(one_line(&err)),
    }
}

fn measure_restores(
    config: &VmmConfig,
    binary: &Path,
    work: &Path,
    progress: &dyn Progress,
) -> Result<Latency, BenchError> {
    progress.step("snapshotting a beating stub in Firecracker");
    let snapshot = Snapshot {
        binary,
        state: work.join("firecracker-state"),
        memory: work.join("firecracker-memory"),
    };
    snapshot.make(config, &work.join("firecracker-snapshot.sock"))?;
    let socket = work.join("firecracker-restore.sock");
    let run = |_: usize| snapshot.restore(config, &socket);
    let (samples, _) = series(config.plan(), "restore (firecracker)", progress, &run)?;
    Latency::new(RESTORE_TIMER, samples).ok_or(BenchError::Runs(config.runs))
}

/// A Firecracker snapshot: the binary that makes and loads it, its VM
/// state file and its guest memory file.
struct Snapshot<'a> {
    binary: &'a Path,
    state: PathBuf,
    memory: PathBuf,
}

impl Snapshot<'_> {
    /// Boots the stub beating in a Firecracker on `socket` and, at its
    /// first heartbeat, pauses it and snapshots it (Full) into `self`'s
    /// files.
    fn make(&self, config: &VmmConfig, socket: &Path) -> Result<(), BenchError> {
        let what = "firecracker --api-sock SOCKET (the stub, beating, snapshotted)";
        let vm = vm_config(config, &format!("console=ttyS0 {BEAT_CMDLINE}"));
        self.with_api(config, socket, what, |api, stdout| {
            api.call("PUT", "/boot-source", &vm["boot-source"])?;
            api.call("PUT", "/machine-config", &vm["machine-config"])?;
            api.call("PUT", "/actions", &json!({"action_type": "InstanceStart"}))?;
            if !first_heartbeat(stdout) {
                return Ok(None);
            }
            api.call("PATCH", "/vm", &json!({"state": "Paused"}))?;
            let body = json!({
                "snapshot_type": "Full",
                "snapshot_path": self.state,
                "mem_file_path": self.memory,
            });
            api.call("PUT", "/snapshot/create", &body).map(Some)
        })?;
        Ok(())
    }

    /// One restore: a Firecracker spawned on `socket`, sent
    /// `PUT /snapshot/load`, timed from its spawn to its first heartbeat.
    fn restore(&self, config: &VmmConfig, socket: &Path) -> Result<f64, BenchError> {
        let what = "firecracker --api-sock SOCKET, PUT /snapshot/load";
        let body = json!({
            "snapshot_path": self.state,
            "mem_backend": {"backend_type": "File", "backend_path": self.memory},
            "resume_vm": true,
        });
        let (started, beat) = self.with_api(config, socket, what, |api, stdout| {
            api.call("PUT", "/snapshot/load", &body)?;
            Ok(first_heartbeat(stdout).then(Instant::now))
        })?;
        Ok(millis(beat.duration_since(started)))
    }

    /// Spawns Firecracker on `socket` (its stdout, the serial console,
    /// piped), connects to its API and runs `talk` with both; then kills
    /// it, untimed. When it was spawned, and what `talk` gave; `talk`
    /// gives `None` when the stub never beat.
    fn with_api<T>(
        &self,
        config: &VmmConfig,
        socket: &Path,
        what: &str,
        talk: impl FnOnce(&mut Api, &mut BufReader<ChildStdout>) -> Result<Option<T>, ApiError>,
    ) -> Result<(Instant, T), BenchError> {
        // Firecracker will not bind over a socket left by the last run.
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(self.binary);
        cmd.args(LOG_LEVEL)
            .arg("--api-sock")
            .arg(socket)
            .stderr(Stdio::null());
        let started = Instant::now();
        let Watched {
            mut child,
            watchdog,
            mut stdout,
        } = spawn_watched(cmd, what, config.limit)?;
        let talked =
            Api::connect(socket, config.limit).and_then(|mut api| talk(&mut api, &mut stdout));
        // The console goes on until the kill: drained meanwhile.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        signal(child.id(), libc::SIGKILL);
        let killed = watchdog.finish();
        let _ = child.wait();
        let talked = talked.map_err(|source| BenchError::Firecracker {
            what: what.into(),
            source,
        })?;
        match talked {
            Some(value) if !killed => Ok((started, value)),
            _ => Err(BenchError::NoHeartbeat {
                what: what.into(),
                limit: config.limit,
                printed: String::new(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_firecracker_and_an_executable_file() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("firecracker");
        std::fs::write(&binary, "").unwrap();
        let value = format!("firecracker={}", binary.display());
        assert!(matches!(peer_binary(&value), Err(PeerError::NotExecutable(p)) if p == binary));
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(peer_binary(&value).unwrap(), binary);
        let not_a_file = format!("firecracker={}", dir.path().display());
        assert!(matches!(
            peer_binary(&not_a_file),
            Err(PeerError::NotExecutable(_))
        ));
        for bad in ["foo", "firecracker=", "qemu=/bin/true"] {
            assert_eq!(
                peer_binary(bad).unwrap_err().to_string(),
                format!("{bad:?}: expected firecracker=PATH")
            );
        }
    }

    #[test]
    fn the_stubs_reset_is_either_end_and_nothing_else() {
        assert!(ended_at_reset(Some(0), "Vmm is stopping."));
        let shutdown = format!("[fc_vcpu 0] {VCPU_SHUTDOWN}\nexit_code=1");
        assert!(ended_at_reset(Some(1), &shutdown));
        assert!(!ended_at_reset(Some(1), "Failed to load kernel"));
        assert!(!ended_at_reset(Some(152), &shutdown));
        assert!(!ended_at_reset(None, ""));
    }

    #[test]
    fn the_config_names_the_stub_one_vcpu_and_the_memory() {
        let config = VmmConfig {
            runs: 1,
            warmup: 0,
            memory_mib: 96,
            concurrencies: vec![1],
            qemu: false,
            firecracker: Some("/firecracker".into()),
            kiln: "/kiln".into(),
            home: "/home".into(),
            stub: "/stub".into(),
            limit: std::time::Duration::from_secs(1),
        };
        let json = vm_config(&config, "console=ttyS0");
        assert_eq!(json["boot-source"]["kernel_image_path"], "/stub");
        assert_eq!(json["boot-source"]["boot_args"], "console=ttyS0");
        assert_eq!(json["machine-config"]["vcpu_count"], 1);
        assert_eq!(json["machine-config"]["mem_size_mib"], 96);
        assert_eq!(json["drives"], json!([]));
    }
}
