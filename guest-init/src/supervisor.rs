//! Starting the entrypoint, reaping every child, forwarding signals.
//!
//! PID 1 blocks SIGCHLD, SIGTERM and SIGINT before anything else and takes
//! them with `sigwaitinfo`: it has nothing else to wait for, so a plain
//! synchronous wait is simpler than handlers or a signalfd, and no signal
//! can slip in between a check and a wait. (The kernel drops signals with a
//! default action that are sent to PID 1, but never blocked ones.)
//!
//! Function mode (`function_mode`) has a socket to wait for as well, so it
//! takes the same signals from a [`SignalFd`] in its `poll`, and starts its
//! handlers with [`command`] and collects them with [`reap_all`] like
//! [`run`] does: one reaper, which knows the child it waits for.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::config::RunConfig;
use crate::{exec_server, roots};

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

    /// A descriptor that becomes readable when one of the blocked signals
    /// is pending (non-blocking; see [`SignalFd::take`]).
    pub fn fd(&self) -> io::Result<SignalFd> {
        // SAFETY: the set is initialized; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &self.0, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(SignalFd(unsafe { OwnedFd::from_raw_fd(fd) }))
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

/// The blocked signals as a descriptor, from [`Signals::fd`].
pub struct SignalFd(OwnedFd);

impl SignalFd {
    /// The next pending signal, if any (never blocks).
    pub fn take(&self) -> Option<libc::c_int> {
        // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let len = std::mem::size_of_val(&info);
        // SAFETY: `info` is a writable buffer of `len` bytes that lives
        // across the call.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut info).cast(), len) };
        (n == len as isize).then_some(info.ssi_signo as libc::c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The command that starts `config`'s entrypoint: its argv, environment,
/// working directory and identity (`groups`, `gid`, `uid`: resolved by
/// `guest_init::user`), with an empty signal mask in the child.
pub fn command(config: &RunConfig) -> Command {
    let mut command = base_command(config);
    command.current_dir(&config.workdir);
    let become_user = user_switch(config);
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; it makes only sigprocmask,
    // setgroups, setgid and setuid calls, on its own stack and on the
    // groups, which the closure owns.
    unsafe {
        command.pre_exec(move || {
            unblock_all_signals()?;
            become_user()
        })
    };
    command
}

/// Like [`command`], in the root filesystem mounted at `root`
/// (`guest_init::roots`): the child enters it before it drops to its
/// user, so `workdir` and the program's PATH search are the root's.
pub fn command_in(config: &RunConfig, root: &Path) -> io::Result<Command> {
    let mut command = base_command(config);
    // Made before the fork: the child may not allocate.
    let root = CString::new(root.as_os_str().as_bytes())?;
    let workdir = CString::new(config.workdir.as_str())?;
    let become_user = user_switch(config);
    // SAFETY: as in `command`, plus unshare, mount, chroot and chdir
    // (`roots::enter`) on the two strings, which the closure owns.
    unsafe {
        command.pre_exec(move || {
            unblock_all_signals()?;
            roots::enter(&root, &workdir)?;
            become_user()
        })
    };
    Ok(command)
}

/// `config`'s argv and environment, whatever its root.
fn base_command(config: &RunConfig) -> Command {
    let (program, args) = config
        .entrypoint
        .split_first()
        .expect("validated: entrypoint is non-empty");
    let mut command = Command::new(program);
    command.args(args).env_clear().envs(&config.env);
    command
}

/// What drops the child to `config`'s identity ([`become_user`]), its
/// groups copied before the fork: the child may not allocate.
fn user_switch(config: &RunConfig) -> impl Fn() -> io::Result<()> + Send + Sync + 'static {
    let (uid, gid) = (config.uid, config.gid);
    let groups: Vec<libc::gid_t> = config.groups.clone();
    move || become_user(uid, gid, &groups)
}

/// Drops to `uid` with primary group `gid` and supplementary `groups`, in
/// the only order that works: the groups while still root, the user last
/// (after it, no other id can change). Not root (guest-init run by hand,
/// or in tests), only root may set groups: they stay, as std leaves them.
fn become_user(uid: u32, gid: u32, groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: geteuid takes no arguments.
    let root = unsafe { libc::geteuid() } == 0;
    // SAFETY: `groups` is a valid slice of `groups.len()` gid_t.
    if root && unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setgid takes no pointers.
    if unsafe { libc::setgid(gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setuid takes no pointers.
    if unsafe { libc::setuid(uid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The status of an entrypoint that could not be started (the shell's).
pub fn spawn_failure_status(err: &io::Error) -> u8 {
    match err.kind() {
        io::ErrorKind::NotFound => STATUS_NOT_FOUND,
        _ => STATUS_NOT_EXECUTABLE,
    }
}

/// Whether `cmdline` is a container VM's
/// ([`CONTAINER_CMDLINE_FLAG`](crate::exec::CONTAINER_CMDLINE_FLAG)).
pub fn container_mode(cmdline: &str) -> bool {
    use crate::exec::CONTAINER_CMDLINE_FLAG;
    cmdline
        .split_whitespace()
        .any(|word| word == CONTAINER_CMDLINE_FLAG)
}

/// Reaps every child (an exec'd process's status goes to its session)
/// until SIGTERM or SIGINT comes; returns 128 + that signal. A container
/// VM's PID 1 does this in place of running an entrypoint.
pub fn reap_until_stopped(signals: &Signals) -> u8 {
    loop {
        match signals.wait() {
            Ok(libc::SIGCHLD) => {
                reap_all(0);
            }
            Ok(sig) => return 128u8.saturating_add(sig as u8),
            Err(err) => {
                eprintln!("guest-init: waiting for signals failed: {err}");
                return STATUS_NOT_EXECUTABLE;
            }
        }
    }
}

/// Runs the entrypoint to its end and returns its status (the exit code, or
/// 128 + the signal that killed it), reaping every other child on the way.
pub fn run(config: &RunConfig, signals: &Signals) -> u8 {
    let child = match command(config).spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(err) => {
            eprintln!("guest-init: cannot start {}: {err}", config.entrypoint[0]);
            return spawn_failure_status(&err);
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

/// Reaps every exited child; returns the entrypoint's status if it was one
/// (pass 0 to only reap orphans). An exec'd process's status goes to its
/// session (`exec_server`), whose table stays locked meanwhile.
pub fn reap_all(entrypoint: libc::pid_t) -> Option<u8> {
    let mut exec_children = exec_server::children();
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
        } else {
            exec_children.reaped(pid, status_of(raw));
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
    fn only_the_exact_word_asks_for_container_mode() {
        assert!(container_mode("quiet kiln.container=1 kiln.hostname=web"));
        assert!(!container_mode("kiln.container=0 kiln.container=11"));
    }

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
