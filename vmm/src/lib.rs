//! Kiln's microVMM.
//!
//! Modules are named after what they model; `builder` is the one place that
//! wires a VM together from a [`builder::VmConfig`].
pub mod devices;
pub mod host;
pub mod seccomp;
