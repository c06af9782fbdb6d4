//! Kiln's microVMM: exactly one VM process, from its definition
//! ([`config::VmConfig`]) to its end.
//!
//! Modules are named after what they model; [`builder`] is the one place
//! that wires a VM together, [`machine`] runs it, [`persist`] snapshots it.
#![warn(missing_docs)]
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod durable;
pub mod event_loop;
pub mod flock;
pub mod host;
pub mod loader;
pub mod logger;
pub mod machine;
pub mod persist;
pub mod report;
pub mod rpc;
pub mod seccomp;
pub mod sigsys;
pub mod snapshot;
pub mod supervised;
pub mod trace;
pub mod volume;
pub mod vstate;
