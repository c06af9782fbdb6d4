//! Running a test's work on a thread under a real seccomp filter, in a
//! child process of the test binary (a filter that kills, kills the whole
//! process). Shared by the VMM's and the control plane's seccomp tests.
use std::io::Write;
use std::process::{Command, Output};
use std::thread::JoinHandle;

use kiln_vmm::seccomp::{self, ThreadKind};
use kiln_vmm::sigsys;

/// Set in the child to the name of the test it runs.
const CHILD_ENV: &str = "KILN_SECCOMP_CHILD";
/// Printed by a child whose filtered thread got through its work.
const SURVIVED: &str = "filtered thread survived";

/// In the parent: runs `test` again in a child and returns its outcome.
/// In the child (`None`): the caller does the filtered work instead.
pub fn in_child_or_run(test: &str) -> Option<Output> {
    if std::env::var(CHILD_ENV).is_ok_and(|name| name == test) {
        return None;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .output()
        .unwrap();
    Some(output)
}

/// Runs `work` on a new thread under the `kind` filter and waits for it.
pub fn on_filtered_thread(kind: ThreadKind, work: impl FnOnce() + Send + 'static) {
    spawn_filtered(kind, work).join().unwrap();
}

/// Starts `work` on a new thread under the `kind` filter.
pub fn spawn_filtered(kind: ThreadKind, work: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    no_core_dumps();
    std::thread::spawn(move || {
        seccomp::install(kind).unwrap();
        work();
    })
}

/// No core dumps from the children that are meant to die.
pub fn no_core_dumps() {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit only reads the struct passed by reference.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) }, 0);
}

/// Asserts that the child's `kind` thread was stopped at `syscall`: the
/// SIGSYS handler reported it on stderr and ended the process with its
/// status, before the thread could go on.
pub fn assert_reported(output: &Output, kind: ThreadKind, syscall: i64) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!(
        "seccomp: {kind} thread made forbidden syscall {syscall} ({})\n",
        sigsys::syscall_name(syscall)
    );
    assert!(
        output.status.code() == Some(i32::from(sigsys::VIOLATION_STATUS))
            && stderr.contains(&report),
        "child ended with {:?}, expected {report:?}; stdout: {}; stderr: {stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains(SURVIVED));
}

pub fn assert_survived(output: &Output) {
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains(SURVIVED),
        "child ended with {:?}; stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn say_survived() {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{SURVIVED}").unwrap();
    stdout.flush().unwrap();
}
