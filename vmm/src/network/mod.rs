//! Host-side networking.
pub mod proxy;
