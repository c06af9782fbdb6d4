//! The logger `main` installs works under every thread's seccomp filter:
//! a line logged on a filtered thread reaches stderr as
//! `kiln: <level>: <message>`, and the thread lives on. Runs itself again
//! as a child process, as the seccomp tests do.
use kiln_vmm::seccomp::ThreadKind;

#[path = "support/filtered.rs"]
#[allow(dead_code)] // shared with the seccomp tests, which use all of it
mod filtered;
use filtered::*;

const KINDS: [ThreadKind; 5] = [
    ThreadKind::Vmm,
    ThreadKind::Vcpu,
    ThreadKind::Api,
    ThreadKind::Actions,
    ThreadKind::Proxy,
];

#[test]
fn filtered_threads_log_and_survive() {
    let Some(output) = in_child_or_run("filtered_threads_log_and_survive") else {
        kiln_vmm::logger::init();
        let log_lines = |kind| {
            log::warn!("a warning from a {kind} thread");
            log::info!("an info line from a {kind} thread");
        };
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Actions,
            ThreadKind::Proxy,
        ] {
            on_filtered_thread(kind, move || log_lines(kind));
        }
        // The event loop's thread never returns: the VMM ends with it.
        on_filtered_thread(ThreadKind::Vmm, move || {
            log_lines(ThreadKind::Vmm);
            say_survived();
            std::process::exit(0);
        });
        return;
    };
    assert_survived(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for kind in KINDS {
        let line = format!("kiln: warn: a warning from a {kind} thread");
        assert!(stderr.lines().any(|l| l == line), "no {line:?} in {stderr}");
    }
    // Warnings and errors only, unless KILN_LOG says otherwise.
    assert!(!stderr.contains("info"), "{stderr}");
}
