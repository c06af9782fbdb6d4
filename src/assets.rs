//! Where `kiln` finds the guest kernel, guest-init and the stub guest.
//!
//! A bare server needs only the `kiln` binary, a kernel and images, so the
//! lookup is plain files: an environment variable names the file explicitly;
//! otherwise it lives in `$KILN_HOME` (default `~/.local/share/kiln`), where
//! `cargo xtask kernel` and `cargo xtask init` install what they build.

use std::env;
use std::path::PathBuf;

/// A file Kiln needs from outside the image store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    /// The guest kernel, an uncompressed `vmlinux` ELF.
    Kernel,
    /// The static PID 1 that `kiln build` places at /sbin/init.
    GuestInit,
    /// The stub guest (docs/stub-guest.md): a few instructions in place of
    /// a kernel, which `kiln bench vmm` boots to measure the VMM alone.
    Stub,
}

impl Asset {
    /// The environment variable that overrides the default location.
    pub fn env_var(self) -> &'static str {
        match self {
            Asset::Kernel => "KILN_KERNEL",
            Asset::GuestInit => "KILN_GUEST_INIT",
            Asset::Stub => "KILN_STUB",
        }
    }

    /// The `cargo xtask` command that builds and installs it.
    pub fn xtask(self) -> &'static str {
        match self {
            Asset::Kernel => "cargo xtask kernel",
            Asset::GuestInit => "cargo xtask init",
            Asset::Stub => "cargo xtask stub",
        }
    }

    fn file_in_home(self) -> &'static str {
        match self {
            Asset::Kernel => "kernel/vmlinux",
            Asset::GuestInit => "guest-init",
            Asset::Stub => "stub/vmlinux-stub",
        }
    }

    /// Where this asset is expected: the environment variable's value if set,
    /// else its place in `$KILN_HOME`. The file may not exist.
    pub fn path(self) -> PathBuf {
        match env::var_os(self.env_var()) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => kiln_home().join(self.file_in_home()),
        }
    }
}

/// `$KILN_HOME` (see [`kiln_builder::store::default_home`]).
pub fn kiln_home() -> PathBuf {
    kiln_builder::store::default_home()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_have_distinct_homes_and_variables() {
        let all = [Asset::Kernel, Asset::GuestInit, Asset::Stub];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.env_var(), b.env_var());
                assert_ne!(a.file_in_home(), b.file_in_home());
            }
        }
    }
}
