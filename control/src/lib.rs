#![warn(missing_docs)]
//! Kiln's control plane: everything around the VM process. Instances and
//! their EC2-style lifecycle, the supervisor that runs each instance's VM
//! process, functions (snapshot clones), the host side of networking and
//! the published-port proxy, the per-instance HTTP API, commit (an
//! instance's root volume into a new image), running an image's tests
//! in VMs of their own, and its build steps in a build VM.
//!
//! The VM process itself is [`kiln_vmm`]; this crate starts it, talks to it
//! over its control channel ([`kiln_vmm::rpc`]) and keeps the records true.
pub mod api;
pub mod commit;
mod deadline;
pub mod definition;
pub mod functions;
pub mod image_build;
pub mod image_test;
pub mod instance;
pub mod jail;
pub mod network;

#[cfg(test)]
mod test_support;

/// Makes the directory `dir` anew, empty: what was there (a staging
/// directory a killed process left, say) goes first.
pub(crate) fn fresh_dir(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => std::fs::create_dir(dir),
    }
}
