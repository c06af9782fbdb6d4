//! Starting the entrypoint, reaping every child, forwarding signals.
//!
//! PID 1 blocks SIGCHLD, SIGTERM and SIGINT before anything else and takes
//! them with `sigwaitinfo`: it has nothing else to wait for, so a plain
//! synchronous wait is simpler than handlers or a signalfd, and no signal
//! can slip in between a check and a wait. (The kernel drops signals with a
//! default action that are sent to PID 1, but never blocked ones.)
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use guest_init::config::RunConfig;

/// Status for an entrypoint that could not be found (the shell's 127).
pub const STATUS_NOT_FOUND: u8 = 127;
/// Status for an entrypoint that could not be executed (the shell's 126).
pub const STATUS_NOT_EXECUTABLE: u8 = 126;

/// The signals PID 1 handles itself.
pub struct Signals(libc::sigset_t);

impl Signals {
    /// Blocks SIGCHLD, SIGTERM and SIGINT for this process. A blocked mask
    /// survives fork and exec, so [`run`] empties it again in the child.
    pub fn block() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset below initializes it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            // SAFETY: `set` is initialized and `signal` is a valid signal.
            unsafe { libc::sigaddset(&mut set, signal) };
        }
        // SAFETY: `set` is initialized; the old mask is not asked for.
        let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(Signals(set))
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits for the next of the blocked signals.
    fn wait(&self) -> io::Result<libc::c_int> {
        loop {
            // SAFETY: the set is initialized; a null siginfo is allowed.
            let sig = unsafe { libc::sigwaitinfo(&self.0, std::ptr::null_mut()) };
            if sig >= 0 {
                return Ok(sig);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

/// Runs the entrypoint to its end and returns its status (the exit code, or
/// 128 + the signal that killed it), reaping every other child on the way.
pub fn run(config: &RunConfig, signals: &Signals) -> u8 {
    let (program, args) = config
        .entrypoint
        .split_first()
        .expect("validated: entrypoint is non-empty");
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(&config.env)
        .current_dir(&config.workdir)
        .uid(config.uid)
        .gid(config.gid);
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; it makes only sigemptyset and
    // sigprocmask calls on its own stack.
    unsafe { command.pre_exec(unblock_all_signals) };
    let spawned = command.spawn();
    let child = match spawned {
        Ok(child) => child.id() as libc::pid_t,
        Err(err) => {
            eprintln!("guest-init: cannot start {program}: {err}");
            return match err.kind() {
                io::ErrorKind::NotFound => STATUS_NOT_FOUND,
                _ => STATUS_NOT_EXECUTABLE,
            };
        }
    };
    loop {
        match signals.wait() {
            Ok(libc::SIGCHLD) => {
                if let Some(status) = reap_all(child) {
                    return status;
                }
            }
            Ok(sig) => {
                // SAFETY: kill takes no pointers; a child that is already
                // gone makes it fail harmlessly with ESRCH.
                unsafe { libc::kill(child, sig) };
            }
            Err(err) => {
                eprintln!("guest-init: waiting for signals failed: {err}");
                return STATUS_NOT_EXECUTABLE;
            }
        }
    }
}

/// Empties the calling process's blocked-signal mask (PID 1 blocks the
/// signals it waits for, and a child would inherit that).
fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset below initializes it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut empty) };
    // SAFETY: `empty` is initialized; the old mask is not asked for.
    if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps every exited child; returns the entrypoint's status if it was one.
fn reap_all(entrypoint: libc::pid_t) -> Option<u8> {
    let mut result = None;
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a valid out-pointer for the status.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid <= 0 {
            return result;
        }
        if pid == entrypoint {
            result = Some(status_of(raw));
        }
    }
}

/// The shell convention: exit code, or 128 + signal number.
pub fn status_of(raw: libc::c_int) -> u8 {
    if libc::WIFSIGNALED(raw) {
        128u8.saturating_add(libc::WTERMSIG(raw) as u8)
    } else {
        libc::WEXITSTATUS(raw) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_signals_follow_the_shell_convention() {
        // Raw wait statuses as the kernel encodes them (exit code << 8, or
        // the signal number in the low 7 bits).
        assert_eq!(status_of(3 << 8), 3);
        assert_eq!(status_of(0), 0);
        assert_eq!(status_of(255 << 8), 255);
        assert_eq!(status_of(libc::SIGKILL), 137);
        assert_eq!(status_of(libc::SIGTERM), 143);
    }
}
