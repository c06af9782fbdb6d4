//! Kiln's guest side: the PID 1 that runs inside every image, and the
//! protocol it speaks to the VMM.
//!
//! The `protocol` module has no dependencies, so the VMM can use it without
//! pulling in anything the guest binary needs (build without the default
//! `init` feature).
#![cfg_attr(not(feature = "init"), no_std)]

#[cfg(feature = "init")]
pub mod config;
pub mod protocol;
