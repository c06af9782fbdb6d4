//! Kiln's microVMM.
//!
//! Modules are named after what they model; `builder` is the one place that
//! wires a VM together from a [`config::VmConfig`].
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
pub mod snapshot;
pub mod supervised;
pub mod volume;
pub mod vstate;
