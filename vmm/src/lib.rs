//! Kiln's microVMM.
//!
//! Modules are named after what they model; `builder` is the one place that
//! wires a VM together from a [`builder::VmConfig`].
#![warn(missing_docs)]
pub mod arch;
pub mod builder;
pub mod devices;
pub mod durable;
pub mod event_loop;
pub mod flock;
pub mod host;
pub mod loader;
pub mod report;
pub mod rpc;
pub mod seccomp;
pub mod snapshot;
pub mod volume;
pub mod vstate;
