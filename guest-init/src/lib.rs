//! Kiln's guest side: the PID 1 that runs inside every image, and the
//! protocol it speaks to the VMM.
//!
//! The `protocol` module has no dependencies, so the VMM can use it without
//! pulling in anything the guest binary needs (build without the default
//! `init` feature); `function` (feature `wire`) adds the function
//! invocation protocol's serde types. With `init`, the library also holds
//! the parts of PID 1 its integration tests drive directly: `supervisor`
//! (starting and reaping children) and `function_mode` (serving
//! invocations).
#![warn(missing_docs)]
#![cfg_attr(not(any(feature = "init", feature = "wire")), no_std)]

#[cfg(feature = "init")]
pub mod binds;
#[cfg(feature = "init")]
pub mod config;
#[cfg(feature = "wire")]
pub mod exec;
#[cfg(feature = "init")]
pub mod exec_server;
#[cfg(feature = "wire")]
pub mod function;
#[cfg(feature = "init")]
pub mod function_mode;
#[cfg(feature = "init")]
pub mod function_runtime;
#[cfg(feature = "init")]
pub mod mounts;
#[cfg(feature = "init")]
pub mod network;
pub mod protocol;
#[cfg(feature = "init")]
pub mod roots;
#[cfg(feature = "init")]
pub mod runtime_api;
#[cfg(feature = "init")]
pub mod supervisor;
#[cfg(feature = "init")]
pub mod user;

/// A system call's result that is 0, or -1 with `errno` set, as an
/// `io::Result`. It only reads `errno`, so a child between fork and exec
/// may call it.
#[cfg(feature = "init")]
pub(crate) fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `err` and each of its causes, outermost first, joined by ": ": how an
/// error reaches a person, in the guest (the console, a refused
/// invocation's `error`) and on the host (re-exported as
/// `kiln_vmm::report::one_line`). Kiln's errors follow one convention (a
/// cause is the `source()`, never part of the message), so each cause is
/// said once. It lives here, in the crate every other Kiln crate that
/// reports errors depends on, so that there is one.
#[cfg(feature = "wire")]
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        line.push_str(": ");
        line.push_str(&next.to_string());
        cause = next.source();
    }
    line
}
