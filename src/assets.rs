//! Where `kiln` finds the guest kernel and guest-init.
//!
//! A bare server needs only the `kiln` binary, a kernel and images, so the
//! lookup is plain files: an environment variable names the file explicitly;
//! otherwise it lives in `$KILN_HOME` (default `~/.local/share/kiln`), where
//! `cargo xtask kernel` and `cargo xtask init` install what they build.

use std::env;
use std::path::{Path, PathBuf};

/// A file Kiln needs from outside the image store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    /// The guest kernel, an uncompressed `vmlinux` ELF.
    Kernel,
    /// The static PID 1 that `kiln build` places at /sbin/init.
    GuestInit,
}

impl Asset {
    /// The environment variable that overrides the default location.
    pub fn env_var(self) -> &'static str {
        match self {
            Asset::Kernel => "KILN_KERNEL",
            Asset::GuestInit => "KILN_GUEST_INIT",
        }
    }

    /// The `cargo xtask` command that builds and installs it.
    pub fn xtask(self) -> &'static str {
        match self {
            Asset::Kernel => "cargo xtask kernel",
            Asset::GuestInit => "cargo xtask init",
        }
    }

    fn file_in_home(self) -> &'static str {
        match self {
            Asset::Kernel => "kernel/vmlinux",
            Asset::GuestInit => "guest-init",
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

/// `$KILN_HOME`, or `~/.local/share/kiln`.
pub fn kiln_home() -> PathBuf {
    home_from(env::var_os("KILN_HOME"), env::var_os("HOME"))
}

fn home_from(kiln_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> PathBuf {
    match (kiln_home, home) {
        (Some(dir), _) if !dir.is_empty() => PathBuf::from(dir),
        (_, Some(home)) if !home.is_empty() => Path::new(&home).join(".local/share/kiln"),
        // No HOME at all (a bare init system): fall back to the FHS place.
        _ => PathBuf::from("/var/lib/kiln"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiln_home_prefers_the_variable_then_home() {
        assert_eq!(
            home_from(Some("/srv/kiln".into()), Some("/root".into())),
            PathBuf::from("/srv/kiln")
        );
        assert_eq!(
            home_from(None, Some("/root".into())),
            PathBuf::from("/root/.local/share/kiln")
        );
        assert_eq!(
            home_from(Some("".into()), Some("/root".into())),
            PathBuf::from("/root/.local/share/kiln")
        );
        assert_eq!(home_from(None, None), PathBuf::from("/var/lib/kiln"));
    }

    #[test]
    fn assets_have_distinct_homes_and_variables() {
        assert_ne!(Asset::Kernel.env_var(), Asset::GuestInit.env_var());
        assert_ne!(
            Asset::Kernel.file_in_home(),
            Asset::GuestInit.file_in_home()
        );
    }
}
