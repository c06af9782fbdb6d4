//! The definition of one VM: what [`crate::builder`] builds. It is plain
//! data, serializable, so the control plane can define a VM once
//! (`kiln_control::definition`) and hand it whole to the VM process as a
//! file (`kiln __vm --config FILE`), instead of re-deriving it from argv.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::devices::virtio::block::DiskSource;
pub use crate::devices::virtio::net::NetConfig;
pub use crate::devices::virtio::vsock::VsockConfig;
pub use crate::volume::CacheAccess;

use crate::durable;

/// A disk the guest sees as a virtio block device (/dev/vda, vdb, …).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The file (or image and overlay) behind the disk.
    pub source: DiskSource,
    /// The guest may read but not write it (virtio-blk's VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// The VMM deletes the disk's file (a raw image, or a volume's
    /// overlay) as soon as it has opened it: the data lives exactly as
    /// long as the VM, and goes even when the VMM is killed.
    pub ephemeral: bool,
}

/// Where a VM starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// A fresh boot of an uncompressed vmlinux ELF.
    Kernel(PathBuf),
    /// The moment a snapshot was taken (its directory); `consume` deletes
    /// the snapshot once restored (a hibernation is resumed once).
    Snapshot {
        /// The snapshot's directory.
        dir: PathBuf,
        /// Delete the snapshot once the VM has been restored from it.
        consume: bool,
    },
}

/// Everything needed to boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// A kernel to boot or a snapshot to go on from.
    pub boot: Boot,
    /// The first is the root filesystem; none boots the kernel alone (a
    /// stub guest). A restored VM needs the disks it had, in the same order.
    pub disks: Vec<DiskConfig>,
    /// How many vCPUs the guest has (a restored VM: as many as it had).
    pub vcpus: u8,
    /// Guest RAM in MiB (a restored VM: as much as it had).
    pub memory_mib: u32,
    /// Appended to Kiln's kernel command line (a fresh boot only).
    pub extra_cmdline: String,
    /// Off only for debugging (`kiln run --no-seccomp`).
    pub seccomp: bool,
    /// A virtio-vsock device, through whose unix socket host processes
    /// reach guest ports. A restored VM may be given another CID than
    /// the one it was snapshotted with; the guest re-reads it.
    pub vsock: Option<VsockConfig>,
    /// A virtio-net NIC over a tap. A restored VM needs one if its
    /// snapshot had one, and keeps the snapshot's MAC.
    pub net: Option<NetConfig>,
    /// Print the boot timer (`boot-to-init: N us`, from the VM process's
    /// start) on stderr the moment guest-init reports (`kiln run --timing`).
    pub announce_boot: bool,
}

/// Why a VM definition file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be staged, written or renamed into place.
    #[error("cannot write the VM definition {path}")]
    Write {
        /// The definition's file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be read.
    #[error("cannot read the VM definition {path}")]
    Read {
        /// The definition's file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a VM definition of this version of Kiln.
    #[error("{path} is not a VM definition")]
    Parse {
        /// The definition's file.
        path: PathBuf,
        /// Where and why the JSON did not match [`VmConfig`].
        #[source]
        source: serde_json::Error,
    },
}

impl VmConfig {
    /// Writes the definition to `path` whole or not at all (staged beside
    /// it in one write, renamed): a VM process never reads half of one.
    /// Not synced: it is a hand-over to the VM process, which reads it at
    /// once, and every start of a VM writes it anew, so no crash can leave
    /// a reader of a lost one. (Its two fsyncs took 12 ms of a cold start
    /// under strace while the disk was busy; on a quiet host they are lost
    /// in the cold start's noise.)
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let write_err = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        // A path that is not UTF-8 cannot be written as JSON.
        let mut json = serde_json::to_vec_pretty(self).map_err(|err| write_err(err.into()))?;
        json.push(b'\n');
        let mut staged = durable::stage(path).map_err(write_err)?;
        staged.write_all(&json).map_err(write_err)?;
        staged.persist(path).map_err(|err| write_err(err.error))?;
        Ok(())
    }

    /// Reads the definition `save` wrote.
    pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            boot: Boot::Snapshot {
                dir: "/snap".into(),
                consume: true,
            },
            disks: vec![DiskConfig {
                source: DiskSource::Volume {
                    image: "/store/image.kiln".into(),
                    overlay: Some("/i/root.overlay".into()),
                    cache_bytes: 32 << 20,
                    hydration: Some("/home/cache".into()),
                    hydration_access: CacheAccess::Fill,
                },
                read_only: false,
                ephemeral: false,
            }],
            vcpus: 2,
            memory_mib: 256,
            extra_cmdline: "kiln.meta.name=web".into(),
            seccomp: true,
            vsock: Some(VsockConfig {
                cid: 7,
                socket: "/i/vsock.sock".into(),
            }),
            net: Some(NetConfig {
                tap: "kt-1".into(),
                mac: [2, 0, 0, 0, 0, 1],
                bridge: Some("kiln0".into()),
            }),
            announce_boot: false,
        }
    }

    #[test]
    fn a_definition_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        config().save(&path).unwrap();
        assert_eq!(VmConfig::load(&path).unwrap(), config());
    }

    #[test]
    fn a_definition_json_cannot_hold_is_refused_whole_by_name() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        let mut vm = config();
        vm.boot = Boot::Kernel(std::ffi::OsStr::from_bytes(b"/boot/vmlinuz-\xff").into());
        let err = vm.save(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Write { .. }));
        let line = crate::report::one_line(&err);
        assert!(line.contains("vm.json") && line.contains("UTF-8"), "{line}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "nothing is left behind: {left:?}");
    }

    #[test]
    fn an_empty_drive_is_a_slot_in_snake_case_like_the_other_sources() {
        let slot = DiskConfig {
            source: DiskSource::Empty,
            read_only: false,
            ephemeral: false,
        };
        let json = serde_json::to_value(&slot).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"source": "empty", "read_only": false, "ephemeral": false})
        );
        assert_eq!(serde_json::from_value::<DiskConfig>(json).unwrap(), slot);
        let raw = serde_json::to_value(DiskSource::Raw("/d.img".into())).unwrap();
        assert_eq!(raw, serde_json::json!({"raw": "/d.img"}));
        let volume = serde_json::to_value(&config().disks[0].source).unwrap();
        assert_eq!(volume["volume"]["image"], "/store/image.kiln");
    }

    #[test]
    fn a_damaged_or_foreign_definition_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        let mut json = serde_json::to_value(config()).unwrap();
        json["vcpus"] = "two".into();
        std::fs::write(&path, json.to_string()).unwrap();
        let err = VmConfig::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(
            crate::report::one_line(&err).contains("vm.json is not a VM definition: invalid type"),
            "{}",
            crate::report::one_line(&err)
        );
        json["vcpus"] = 2.into();
        json["surprise"] = true.into();
        std::fs::write(&path, json.to_string()).unwrap();
        assert!(VmConfig::load(&path).is_err());
        let missing = dir.path().join("none.json");
        assert!(matches!(
            VmConfig::load(&missing),
            Err(ConfigError::Read { .. })
        ));
    }
}
