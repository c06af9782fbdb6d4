//! VM snapshots, Firecracker-style: a directory that holds
//!
//! - `state`: everything about the VM except its RAM (vCPUs, VM, devices,
//!   configuration), framed by [`file`](mod@file) with a magic, a format
//!   version and a checksum;
//! - `memory`: guest RAM as one flat, sparse image
//!   ([`crate::vstate::memory::save_sparse`]);
//! - `root.overlay`, in snapshots taken with `kiln snapshot create`: a copy
//!   of the root volume's overlay at the moment of the pause, so the disk
//!   matches the memory.
//!
//! Restoring reads `state`, maps `memory` copy-on-write
//! ([`crate::vstate::memory::map_private`]), so the guest reads its pages on
//! demand and never writes the snapshot, loads the state into a new VM and
//! resumes its vCPUs.
//!
//! A snapshot may also hold `memory.ws`, the pages a restored guest
//! touched first ([`working_set`]), which later restores map ahead.
pub mod file;
pub mod machine;
pub mod working_set;

pub use file::{SavedState, SnapshotFileError, read_state, write_state};
pub use machine::{
    LoadedSnapshot, MEMORY_FILE, MachineState, NetState, ROOT_OVERLAY_FILE, STATE_FILE,
    SnapshotError, check_cpu, load,
};
