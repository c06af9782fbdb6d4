//! Installing the Debian packages a task needs, only when missing.
use std::process::Command;

use anyhow::Result;

use crate::sh;

/// True when dpkg reports `package` as installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs whichever of `packages` are missing, with one `apt-get update`.
pub fn ensure(packages: &[&str]) -> Result<()> {
    let mut missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    sh::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    sh::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The installed version of `package`.
pub fn version(package: &str) -> Result<String> {
    sh::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
}
