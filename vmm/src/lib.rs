//! Kiln's microVMM.
//!
//! Modules are named after what they model; `builder` is the one place that
//! wires a VM together from a [`builder::VmConfig`].
pub mod api;
pub mod arch;
pub mod builder;
pub mod commit;
pub mod control;
pub mod devices;
pub mod durable;
pub mod event_loop;
mod flock;
pub mod functions;
pub mod host;
pub mod instance;
pub mod loader;
pub mod network;
pub mod seccomp;
pub mod snapshot;
pub mod volume;
pub mod vstate;
