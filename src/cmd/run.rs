//! `kiln run`: boot an image (or raw disks) in a new microVM, in this process.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use kiln_builder::store::Store;
use kiln_vmm::builder::{self, DiskConfig, DiskSource, VmConfig};
use kiln_vmm::instance::Instance;
use kiln_vmm::volume::Volume;
use tempfile::TempDir;

use crate::assets::{Asset, kiln_home};

/// `kiln run`'s exit status for a VMM error, as `docker run` uses 125:
/// distinct from any status the guest's entrypoint reports.
const VMM_ERROR_STATUS: u8 = 125;
/// The instance-store disk's file in its temporary directory.
const SCRATCH_FILE: &str = "scratch.img";
/// The overlay of a root volume that lives only as long as its VM.
const EPHEMERAL_OVERLAY: &str = "root.overlay";

#[derive(clap::Args)]
pub struct Args {
    /// The image to boot, NAME:VERSION from the local store. The root disk
    /// is the compressed image itself, with a copy-on-write overlay for the
    /// guest's writes: kept with --name, dropped at exit without.
    image: Option<String>,
    /// Keep the root volume as instance NAME ($KILN_HOME/instances/NAME):
    /// the next `kiln run --name NAME` boots it again with its writes.
    #[arg(long)]
    name: Option<String>,
    /// Attach an empty instance-store disk of this many MiB (the last
    /// /dev/vd*), erased when the VM ends.
    #[arg(long, value_name = "MIB")]
    scratch: Option<u64>,
    /// Decompressed image chunks kept in memory per volume, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    cache: u64,
    /// The guest kernel (an uncompressed vmlinux); default: the installed one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// A raw disk image; without an IMAGE the first is the root filesystem
    /// (/dev/vda). Append `,ro` to attach a disk read-only. Repeatable.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
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

/// A VM ready to boot, and the temporary files it uses, removed when this
/// is dropped after the VM has ended.
struct Launch {
    config: VmConfig,
    _temporary: Vec<TempDir>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The boot timer's zero: as close to process start as `run` gets.
    let started = Instant::now();
    let launch = match launch(&args) {
        Ok(launch) => launch,
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
    match builder::run(&launch.config, started) {
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

fn launch(args: &Args) -> anyhow::Result<Launch> {
    let kernel = args.kernel.clone().unwrap_or_else(|| Asset::Kernel.path());
    if !kernel.is_file() {
        bail!(
            "no guest kernel at {} (pass --kernel, set {}, or run `{}`)",
            kernel.display(),
            Asset::Kernel.env_var(),
            Asset::Kernel.xtask()
        );
    }
    let mut temporary = Vec::new();
    let store = Store::new(&kiln_home());
    let mut disks = Vec::new();
    if let Some(root) = root_volume(args, &store, &mut temporary)? {
        disks.push(root);
    }
    for spec in &args.disks {
        disks.push(parse_disk(spec)?);
    }
    let Some(root) = disks.first_mut() else {
        bail!("nothing to boot: give an IMAGE, --name of an instance, or --disk");
    };
    root.read_only |= args.read_only;
    if let Some(mib) = args.scratch {
        disks.push(scratch_disk(&store, mib, &mut temporary)?);
    }
    Ok(Launch {
        config: VmConfig {
            kernel,
            disks,
            vcpus: args.vcpus,
            memory_mib: args.memory,
            extra_cmdline: args.cmdline.clone(),
            seccomp: !args.no_seccomp,
        },
        _temporary: temporary,
    })
}

/// The root volume of an IMAGE or a named instance: the stored image with
/// the instance's overlay, a temporary one, or none when read-only.
fn root_volume(
    args: &Args,
    store: &Store,
    temporary: &mut Vec<TempDir>,
) -> anyhow::Result<Option<DiskConfig>> {
    let cache_bytes = args.cache << 20;
    let (reference, overlay) = match (&args.name, &args.image) {
        (None, None) => return Ok(None),
        (Some(name), image) => {
            let instance = Instance::find_or_create(&kiln_home(), name, image.as_deref())?;
            (instance.record.image.clone(), Some(instance.root_overlay()))
        }
        (None, Some(image)) if args.read_only => (image.clone(), None),
        (None, Some(image)) => {
            let dir = store.scratch_dir()?;
            let overlay = dir.path().join(EPHEMERAL_OVERLAY);
            temporary.push(dir);
            (image.clone(), Some(overlay))
        }
    };
    let image = store.find(&reference)?.image_path;
    if let Some(overlay) = &overlay
        && !overlay.exists()
    {
        Volume::create(&image, overlay, cache_bytes)?;
    }
    Ok(Some(DiskConfig {
        source: DiskSource::Volume {
            image,
            overlay,
            cache_bytes,
        },
        read_only: args.read_only,
    }))
}

/// An empty, sparse raw disk of `mib` MiB in a temporary directory.
fn scratch_disk(
    store: &Store,
    mib: u64,
    temporary: &mut Vec<TempDir>,
) -> anyhow::Result<DiskConfig> {
    if mib == 0 {
        bail!("--scratch 0: expected a size in MiB of at least 1");
    }
    let dir = store.scratch_dir()?;
    let path = dir.path().join(SCRATCH_FILE);
    std::fs::File::create(&path)
        .and_then(|file| file.set_len(mib << 20))
        .with_context(|| format!("cannot create the scratch disk {}", path.display()))?;
    temporary.push(dir);
    Ok(DiskConfig {
        source: DiskSource::Raw(path),
        read_only: false,
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
    let path = Path::new(path);
    std::fs::metadata(path).with_context(|| format!("--disk {}", path.display()))?;
    Ok(DiskConfig {
        source: DiskSource::Raw(path.to_path_buf()),
        read_only,
    })
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
