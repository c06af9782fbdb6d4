//! A VM process started by a supervisor (an instance's VMM process) ends
//! with it, instead of running on unsupervised with nobody to keep the
//! instance's record true or to serve its API.
use std::io;

/// Arranges for SIGTERM (the VM stops and its disks flush) when the
/// supervisor, `supervisor_pid`, ends. Fails when it is already gone.
pub fn end_with(supervisor_pid: u32) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Checked after the prctl: a parent that died before it would not
    // have sent the signal. A jailed VM process is the init of its own
    // PID namespace, where its parent has no pid (getppid is 0): its jail
    // set the same signal before exec, while the supervisor was waiting
    // for that exec, so none was missed.
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() } as u32;
    if parent != supervisor_pid && parent != 0 {
        return Err(io::Error::other(
            "its supervisor (the instance's VMM process) is gone",
        ));
    }
    Ok(())
}
