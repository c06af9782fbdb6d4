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
pub mod config;
#[cfg(feature = "wire")]
pub mod function;
#[cfg(feature = "init")]
pub mod function_mode;
#[cfg(feature = "init")]
pub mod network;
pub mod protocol;
#[cfg(feature = "init")]
pub mod supervisor;

/// `err` and each of its causes, outermost first, joined by ": ": how
/// guest-init says an error on the console and in a refused invocation's
/// `error`. Errors here follow Kiln's convention (a cause is the
/// `source()`, never part of the message), so the cause is said once.
/// The host has the same in `kiln_vmm::report::one_line`; the VMM depends
/// on this crate, so guest-init cannot use that one.
#[cfg(feature = "init")]
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
