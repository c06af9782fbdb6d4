//! `kiln` as the benchmarks run it: a home of its own, and the instances
//! it started terminated when it is dropped, so that a failed run leaves
//! none behind.
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::BenchError;

/// The `kiln` binary with `KILN_HOME` (and the kernel, and whatever else
/// the benchmark asks) set.
pub struct Kiln {
    bin: PathBuf,
    home: PathBuf,
    kernel: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    live: Mutex<Vec<String>>,
}

impl Kiln {
    /// Runs `bin` with `home` as its `KILN_HOME`; no instance is tracked
    /// yet.
    pub fn new(bin: impl Into<PathBuf>, home: impl Into<PathBuf>) -> Self {
        Kiln {
            bin: bin.into(),
            home: home.into(),
            kernel: None,
            env: Vec::new(),
            live: Mutex::default(),
        }
    }

    /// Boots `kernel` (`KILN_KERNEL`) whatever the home holds.
    pub fn with_kernel(mut self, kernel: impl Into<PathBuf>) -> Self {
        self.kernel = Some(kernel.into());
        self
    }

    /// Sets `key` to `value` in every command's environment.
    pub fn with_env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Its `KILN_HOME`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `kiln` with the environment set; add the arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("KILN_HOME", &self.home);
        if let Some(kernel) = &self.kernel {
            cmd.env("KILN_KERNEL", kernel);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `kiln ARGS` to its end, which must be a success; returns its stdout.
    pub fn output(&self, args: &[&str]) -> Result<String, BenchError> {
        let what = format!("kiln {}", args.join(" "));
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| BenchError::Spawn {
                what: what.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(BenchError::Failed {
                what,
                status: out.status.to_string(),
                printed: format!(
                    "{} | {}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(stdout)
    }

    /// Terminates instance `name` when this is dropped, unless done before.
    pub fn track(&self, name: &str) {
        self.live_names().push(name.to_string());
    }

    /// `kiln terminate NAME`.
    pub fn terminate(&self, name: &str) -> Result<(), BenchError> {
        self.live_names().retain(|n| n != name);
        self.output(&["terminate", name]).map(drop)
    }

    fn live_names(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        for name in std::mem::take(&mut *self.live_names()) {
            let _ = self
                .command()
                .args(["terminate", &name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
