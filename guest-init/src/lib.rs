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
