//! The one place a VM is defined: an instance (or a plain `kiln run`)
//! becomes a [`VmConfig`], the serializable definition the VM process
//! builds. Everything an instance's guest learns about itself is decided
//! here: its disks and their order, the metadata words guest-init
//! publishes under /run/kiln, its NIC and its vsock CID.
use std::path::{Path, PathBuf};

use kiln_builder::store::{Store, StoreError};
use kiln_vmm::config::{
    Boot, CacheAccess, DiskConfig, DiskSource, NetConfig, VmConfig, VsockConfig,
};
use kiln_vmm::volume::{Volume, VolumeError};

use crate::instance::{Instance, Network, user_data_disk};
use crate::network::{self, NetworkError};

/// Name prefixes of the temporary disk files in `$KILN_HOME/tmp`: the
/// instance-store disk, an unnamed run's overlay, the user-data disk.
const SCRATCH_FILE: &str = "scratch-";
const EPHEMERAL_OVERLAY: &str = "overlay-";
const USER_DATA_DISK: &str = "user-data-";

/// Decompressed image chunks a volume keeps in memory unless told.
pub const DEFAULT_CACHE_MIB: u64 = 32;
/// The lowest CID a guest may have (virtio 1.2 §5.10.4): a plain run's.
pub const DEFAULT_CID: u64 = 3;
/// Guest CIDs run from 3 to 2^32 - 2 (virtio 1.2 §5.10.4): 2^32 - 4 of them.
pub const GUEST_CIDS: u64 = (1 << 32) - 4;

/// What one run adds to a VM's definition, for that run only: the
/// `kiln run` flags. An instance started by `kiln start` or `--detach`
/// gets [`RunOptions::new`]'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// The guest kernel, an uncompressed vmlinux.
    pub kernel: PathBuf,
    /// Raw disks after the image's root volume (a plain run without an
    /// image boots the first of them).
    pub disks: Vec<DiskConfig>,
    /// Attach the root disk read-only.
    pub read_only: bool,
    /// An empty instance-store disk of this many MiB, the last one,
    /// erased when the VM ends.
    pub scratch_mib: Option<u64>,
    /// Decompressed image chunks kept in memory per volume, in MiB.
    pub cache_mib: u64,
    /// Words appended to the kernel command line.
    pub cmdline: String,
    /// Print the boot-to-init time as soon as guest-init reports.
    pub timing: bool,
    /// Run the VM process under its seccomp filters (off only to debug).
    pub seccomp: bool,
}

impl RunOptions {
    /// A run of `kernel` with nothing added.
    pub fn new(kernel: PathBuf) -> Self {
        RunOptions {
            kernel,
            disks: Vec::new(),
            read_only: false,
            scratch_mib: None,
            cache_mib: DEFAULT_CACHE_MIB,
            cmdline: String::new(),
            timing: false,
            seccomp: true,
        }
    }
}

/// Why a VM cannot be defined.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The image is not in the store, or a scratch file cannot be made.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The root volume's overlay cannot be created.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The instance's NIC cannot be set up on the bridge.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A disk file the definition needs cannot be read or written.
    #[error("cannot {what} {path}")]
    DiskFile {
        /// What was being done ("write the user-data disk", …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// An instance-store disk of no size.
    #[error("a scratch disk of 0 MiB: expected a size in MiB of at least 1")]
    EmptyScratch,
    /// A flag about the root disk (`--read-only`, `--scratch`) in a plain
    /// run without one: the kernel alone boots only a guest that needs no
    /// root, such as the stub guest.
    #[error("{flag} needs a root disk: give an IMAGE, --name of an instance, or --disk")]
    NoRoot {
        /// The flag that wants the root.
        flag: &'static str,
    },
}

/// The VM of `instance`, starting from `boot`: its root volume (the image
/// and the instance's overlay, made on first boot), its user-data disk,
/// `options`' disks, its NIC and vsock device, and the kernel command line
/// that tells guest-init who it is.
pub fn for_instance(
    store: &Store,
    instance: &Instance,
    options: &RunOptions,
    boot: Boot,
) -> Result<VmConfig, DefinitionError> {
    let record = &instance.record;
    let mut words = metadata_words(instance);
    let mut disks = vec![root_volume(store, instance, options.cache_mib)?];
    if let Some(data) = instance.user_data() {
        disks.push(user_data(store, &data)?);
        // The second disk: /dev/vdb.
        words.push("kiln.user-data=/dev/vdb".to_string());
    }
    let net = instance_nic(instance, &mut words)?;
    words.push(record.spec.cmdline.clone());
    words.push(options.cmdline.clone());
    let mut config = VmConfig {
        boot,
        disks,
        vcpus: record.spec.vcpus,
        memory_mib: record.spec.memory_mib,
        extra_cmdline: words.join(" "),
        seccomp: options.seccomp,
        vsock: Some(VsockConfig {
            cid: instance_cid(&record.id),
            socket: instance.vsock_socket(),
        }),
        net,
        announce_boot: options.timing,
    };
    add_run_disks(store, &mut config, options)?;
    Ok(config)
}

/// A VM of no instance (`kiln run IMAGE` or `kiln run --disk …`): an
/// image's root volume that lives as long as the VM, or the first raw
/// disk, and no NIC.
pub fn for_plain_run(
    store: &Store,
    image: Option<&str>,
    options: &RunOptions,
    (vcpus, memory_mib): (u8, u32),
    vsock: Option<VsockConfig>,
) -> Result<VmConfig, DefinitionError> {
    let disks = match image {
        Some(image) => vec![ephemeral_root(store, image, options)?],
        None => Vec::new(),
    };
    let mut config = VmConfig {
        boot: Boot::Kernel(options.kernel.clone()),
        disks,
        vcpus,
        memory_mib,
        extra_cmdline: options.cmdline.clone(),
        seccomp: options.seccomp,
        vsock,
        net: None,
        announce_boot: options.timing,
    };
    add_run_disks(store, &mut config, options)?;
    Ok(config)
}

/// `options`' raw disks after the others, the root read-only if asked,
/// and the scratch disk last. A VM may have no disk at all (the kernel
/// alone: the stub guest), unless a flag asks for a root.
fn add_run_disks(
    store: &Store,
    config: &mut VmConfig,
    options: &RunOptions,
) -> Result<(), DefinitionError> {
    config.disks.extend(options.disks.iter().cloned());
    match config.disks.first_mut() {
        Some(root) => root.read_only |= options.read_only,
        // A scratch disk alone would become /dev/vda, the root.
        None if options.scratch_mib.is_some() => {
            return Err(DefinitionError::NoRoot { flag: "--scratch" });
        }
        None if options.read_only => {
            return Err(DefinitionError::NoRoot {
                flag: "--read-only",
            });
        }
        None => {}
    }
    if let Some(mib) = options.scratch_mib {
        config.disks.push(scratch_disk(store, mib)?);
    }
    Ok(())
}

/// What guest-init publishes under /run/kiln/meta, and the hostname.
fn metadata_words(instance: &Instance) -> Vec<String> {
    let record = &instance.record;
    let mut words = vec![
        format!("kiln.hostname={}", instance.label()),
        format!("kiln.meta.instance-id={}", record.id),
        format!("kiln.meta.instance-type={}", record.spec.instance_type),
        format!("kiln.meta.image={}", record.spec.image),
    ];
    words.extend(
        record
            .spec
            .name
            .iter()
            .map(|name| format!("kiln.meta.name={name}")),
    );
    words
}

/// The instance's root volume: its image with its own overlay, made on
/// its first boot and kept across stops.
fn root_volume(
    store: &Store,
    instance: &Instance,
    cache_mib: u64,
) -> Result<DiskConfig, DefinitionError> {
    let image = store.find(&instance.record.spec.image)?.image_path;
    let overlay = instance.root_overlay();
    let cache_bytes = cache_mib << 20;
    if !overlay.exists() {
        Volume::create(&image, &overlay, cache_bytes)?;
    }
    Ok(DiskConfig {
        source: DiskSource::Volume {
            image,
            overlay: Some(overlay),
            cache_bytes,
            hydration: Some(store.cache_dir()),
            hydration_access: CacheAccess::Fill,
        },
        read_only: false,
        ephemeral: false,
    })
}

/// The NIC of an instance with an address (its words put first in
/// `words` for guest-init), on the bridge, which is made ready; an
/// isolated instance's NIC is on no bridge.
fn instance_nic(
    instance: &Instance,
    words: &mut Vec<String>,
) -> Result<Option<NetConfig>, DefinitionError> {
    let record = &instance.record;
    match (record.spec.network, record.address) {
        (Network::Bridge, Some(address)) => {
            let (config, net_words) = network::guest_nic(&record.id, address)?;
            words.splice(0..0, net_words);
            Ok(Some(config))
        }
        (Network::Isolated, _) => Ok(Some(network::isolated_nic(&record.id))),
        _ => Ok(None),
    }
}

/// An instance's vsock CID, the same at every boot: 3 + the id's 64-bit
/// value (`i-` and 16 hex digits) mod 2^32 - 4, so any CID a guest may
/// have (3 to 2^32 - 2, virtio 1.2 §5.10.4), and distinct instances
/// (clones of one snapshot too) almost surely differ. An id of another
/// shape is hashed (FNV-1a) instead.
pub fn instance_cid(id: &str) -> u64 {
    let value = id
        .strip_prefix("i-")
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| {
            id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
            })
        });
    DEFAULT_CID + value % GUEST_CIDS
}

/// A root volume that lives as long as this VM: the image with a
/// temporary overlay, or the bare image when read-only.
fn ephemeral_root(
    store: &Store,
    image: &str,
    options: &RunOptions,
) -> Result<DiskConfig, DefinitionError> {
    let image = store.find(image)?.image_path;
    let cache_bytes = options.cache_mib << 20;
    let overlay = if options.read_only {
        None
    } else {
        let overlay = store.scratch_file(EPHEMERAL_OVERLAY)?;
        Volume::create(&image, &overlay, cache_bytes)?;
        Some(overlay)
    };
    Ok(DiskConfig {
        source: DiskSource::Volume {
            image,
            overlay,
            cache_bytes,
            hydration: Some(store.cache_dir()),
            hydration_access: CacheAccess::Fill,
        },
        read_only: options.read_only,
        ephemeral: true,
    })
}

/// The user-data disk: the file in guest-init's user-data format
/// ([`user_data_disk`]), read-only.
fn user_data(store: &Store, data: &Path) -> Result<DiskConfig, DefinitionError> {
    let file_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| DefinitionError::DiskFile { what, path, source }
    };
    let bytes = std::fs::read(data).map_err(file_err("read the user-data", data))?;
    let path = store.scratch_file(USER_DATA_DISK)?;
    std::fs::write(&path, user_data_disk(&bytes))
        .map_err(file_err("write the user-data disk", &path))?;
    Ok(DiskConfig {
        source: DiskSource::Raw(path),
        read_only: true,
        ephemeral: true,
    })
}

/// An empty, sparse raw disk of `mib` MiB.
fn scratch_disk(store: &Store, mib: u64) -> Result<DiskConfig, DefinitionError> {
    if mib == 0 {
        return Err(DefinitionError::EmptyScratch);
    }
    let path = store.scratch_file(SCRATCH_FILE)?;
    std::fs::File::create(&path)
        .and_then(|file| file.set_len(mib << 20))
        .map_err(|source| DefinitionError::DiskFile {
            what: "create the scratch disk",
            path: path.clone(),
            source,
        })?;
    Ok(DiskConfig {
        source: DiskSource::Raw(path),
        read_only: false,
        ephemeral: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Registry;
    use crate::instance::tests::spec;

    #[test]
    fn instance_cids_are_guest_cids_derived_from_the_id() {
        assert_eq!(instance_cid("i-0000000000000000"), 3);
        assert_eq!(instance_cid("i-0000000000000007"), 10);
        assert_eq!(
            instance_cid("i-ffffffffffffffff"),
            3 + u64::MAX % GUEST_CIDS
        );
        assert_ne!(
            instance_cid("i-0123456789abcdef"),
            instance_cid("i-0123456789abcdee")
        );
        for id in ["i-ffffffffffffffff", "web", "i-not-hex"] {
            let cid = instance_cid(id);
            assert!((3..=(1 << 32) - 2).contains(&cid), "{id}: {cid}");
        }
    }

    #[test]
    fn a_plain_run_of_the_kernel_alone_has_no_disk_and_no_root_flags() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let mut options = RunOptions::new("stub".into());
        let config = for_plain_run(&store, None, &options, (1, 128), None).unwrap();
        assert!(config.disks.is_empty());
        assert_eq!(config.boot, Boot::Kernel("stub".into()));
        options.scratch_mib = Some(2);
        assert!(matches!(
            for_plain_run(&store, None, &options, (1, 128), None),
            Err(DefinitionError::NoRoot { flag: "--scratch" })
        ));
        options.scratch_mib = None;
        options.read_only = true;
        let err = for_plain_run(&store, None, &options, (1, 128), None).unwrap_err();
        assert!(
            matches!(
                err,
                DefinitionError::NoRoot {
                    flag: "--read-only"
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("--read-only needs a root disk"));
    }

    #[test]
    fn a_plain_run_of_a_disk_takes_the_root_flags_and_a_sized_scratch_disk() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let mut options = RunOptions::new("vmlinux".into());
        options.disks.push(DiskConfig {
            source: DiskSource::Raw("root.img".into()),
            read_only: false,
            ephemeral: false,
        });
        options.read_only = true;
        options.scratch_mib = Some(0);
        assert!(matches!(
            for_plain_run(&store, None, &options, (1, 128), None),
            Err(DefinitionError::EmptyScratch)
        ));
        options.scratch_mib = Some(2);
        options.cmdline = "kiln.entrypoint=/bin/true".into();
        let config = for_plain_run(&store, None, &options, (1, 128), None).unwrap();
        assert!(config.disks[0].read_only, "--read-only reaches the root");
        assert_eq!(config.disks.len(), 2);
        let DiskSource::Raw(scratch) = &config.disks[1].source else {
            panic!("the scratch disk is a raw file");
        };
        assert_eq!(std::fs::metadata(scratch).unwrap().len(), 2 << 20);
        assert!(config.disks[1].ephemeral);
        assert_eq!(config.extra_cmdline, "kiln.entrypoint=/bin/true");
        assert_eq!(config.boot, Boot::Kernel("vmlinux".into()));
    }

    #[test]
    fn an_instance_of_a_missing_image_is_refused_by_its_name() {
        let home = tempfile::tempdir().unwrap();
        let (instance, _vmm) = Registry::new(home.path())
            .create(spec(Some("web")), None, None)
            .unwrap();
        let options = RunOptions::new("vmlinux".into());
        let err = for_instance(
            &Store::new(home.path()),
            &instance,
            &options,
            Boot::Kernel(options.kernel.clone()),
        )
        .unwrap_err();
        assert!(matches!(err, DefinitionError::Store(_)));
        assert!(
            err.to_string().contains(&instance.record.spec.image),
            "{err}"
        );
    }
}
