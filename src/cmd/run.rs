//! `kiln run`: boot a kernel and disks in a new microVM, in this process.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_vmm::builder::{self, DiskConfig, VmConfig};

use crate::assets::Asset;

/// `kiln run`'s exit status for a VMM error, as `docker run` uses 125:
/// distinct from any status the guest's entrypoint reports.
const VMM_ERROR_STATUS: u8 = 125;

#[derive(clap::Args)]
pub struct Args {
    /// The guest kernel (an uncompressed vmlinux); default: the installed one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// A raw disk image; the first is the root filesystem (/dev/vda).
    /// Append `,ro` to attach a disk read-only. Repeatable.
    #[arg(long = "disk", required = true, value_name = "PATH[,ro]")]
    disks: Vec<String>,
    /// Attach the root disk read-only.
    #[arg(long)]
    read_only: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Words appended to the kernel command line (e.g. kiln.entrypoint=/bin/sh).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline: String,
    /// Print the time from `kiln run` starting to guest-init running.
    #[arg(long)]
    timing: bool,
    /// Run without seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The boot timer's zero: as close to process start as `run` gets.
    let started = Instant::now();
    let config = match vm_config(
        args.kernel,
        &args.disks,
        args.read_only,
        args.vcpus,
        args.memory,
        &args.cmdline,
        !args.no_seccomp,
    ) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kiln: {err:#}");
            return Ok(ExitCode::from(VMM_ERROR_STATUS));
        }
    };
    if args.no_seccomp {
        eprintln!(
            "kiln: WARNING: --no-seccomp: the VMM runs WITHOUT its seccomp filters (debugging only)"
        );
    }
    match builder::run(&config, started) {
        Ok(outcome) => {
            if args.timing {
                match outcome.boot_to_init {
                    Some(time) => eprintln!("boot-to-init: {} us", time.as_micros()),
                    None => eprintln!("boot-to-init: guest-init never reported"),
                }
            }
            Ok(ExitCode::from(outcome.exit_status))
        }
        Err(err) => {
            eprintln!("kiln: {err}");
            Ok(ExitCode::from(VMM_ERROR_STATUS))
        }
    }
}

fn vm_config(
    kernel: Option<PathBuf>,
    disks: &[String],
    read_only_root: bool,
    vcpus: u8,
    memory_mib: u32,
    cmdline: &str,
    seccomp: bool,
) -> anyhow::Result<VmConfig> {
    let kernel = kernel.unwrap_or_else(|| Asset::Kernel.path());
    if !kernel.is_file() {
        bail!(
            "no guest kernel at {} (pass --kernel, set {}, or run `{}`)",
            kernel.display(),
            Asset::Kernel.env_var(),
            Asset::Kernel.xtask()
        );
    }
    let mut disks = disks
        .iter()
        .map(|spec| parse_disk(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    disks[0].read_only |= read_only_root;
    Ok(VmConfig {
        kernel,
        disks,
        vcpus,
        memory_mib,
        extra_cmdline: cmdline.to_string(),
        seccomp,
    })
}

/// `PATH` or `PATH,ro`; the file must exist.
fn parse_disk(spec: &str) -> anyhow::Result<DiskConfig> {
    let (path, read_only) = match spec.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, option)) => bail!("--disk {spec}: unknown option {option:?} (expected ro or rw)"),
        None => (spec, false),
    };
    let path = PathBuf::from(path);
    std::fs::metadata(&path).with_context(|| format!("--disk {}", path.display()))?;
    Ok(DiskConfig { path, read_only })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs_parse_and_name_their_problem() {
        let file = std::env::current_exe().unwrap();
        let shown = file.display().to_string();
        assert!(parse_disk(&format!("{shown},ro")).unwrap().read_only);
        assert!(!parse_disk(&shown).unwrap().read_only);
        let err = parse_disk(&format!("{shown},fast"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"fast\""), "{err}");
        let err = format!("{:#}", parse_disk("/no/such/disk.img").unwrap_err());
        assert!(err.contains("/no/such/disk.img"), "{err}");
    }
}
