//! Instance metadata, as files: what EC2's metadata service answers, Kiln's
//! VMM passes on the kernel command line (`kiln.meta.KEY=VALUE`) and on a
//! user-data disk (`kiln.user-data=/dev/vdX`), and guest-init publishes
//! under /run/kiln/ (instance-id, instance-type, image, name, user-data).
//! User-data that starts with `#!` runs once, at the instance's first boot,
//! before the entrypoint; a mark on the root filesystem remembers it ran.
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use guest_init::config::{ConfigError, RunConfig, kiln_params};
use guest_init::protocol::{USER_DATA_HEADER_LEN, parse_user_data_header};

use crate::supervisor::{self, Signals};

/// Where the metadata appears in the guest.
const METADATA_DIR: &str = "/run/kiln";
/// On the root volume, so it survives reboots and stop/start.
const USER_DATA_DONE: &str = "/var/lib/kiln/user-data.done";
/// User-data larger than this is refused (EC2's limit is 16 KiB).
const USER_DATA_MAX: u64 = 1 << 20;

/// Why the metadata was not (all) published.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The command line does not split into `kiln.*` words.
    #[error(transparent)]
    Cmdline(#[from] ConfigError),
    /// A `kiln.meta.KEY` whose KEY could not be a file name here.
    #[error("kiln.{key}: not a metadata name")]
    BadName { key: String },
    /// A file under /run/kiln could not be written.
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The user-data disk could not be read.
    #[error("cannot read user-data from {device}")]
    Read {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The disk does not start with the user-data header.
    #[error("{device} is not a user-data disk")]
    NotUserData { device: PathBuf },
    /// The header announces more user-data than guest-init takes.
    #[error("user-data of {len} bytes: the limit is {USER_DATA_MAX}")]
    TooLarge { len: u64 },
}

/// Writes /run/kiln/* from the command line; returns the user-data file.
pub fn publish(cmdline: &str) -> Result<Option<PathBuf>, MetadataError> {
    let params = kiln_params(cmdline)?;
    let dir = Path::new(METADATA_DIR);
    let mut user_data = None;
    for (key, value) in params {
        if let Some(name) = key.strip_prefix("meta.") {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(MetadataError::BadName { key: key.into() });
            }
            write(&dir.join(name), value.as_bytes(), 0o644)?;
        } else if key == "user-data" {
            let data = read_user_data(Path::new(&value))?;
            let path = dir.join("user-data");
            write(&path, &data, 0o700)?;
            user_data = Some(path);
        }
    }
    Ok(user_data)
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), MetadataError> {
    let fail = |source| MetadataError::Write {
        path: path.into(),
        source,
    };
    fs::create_dir_all(METADATA_DIR).map_err(fail)?;
    fs::write(path, data).map_err(fail)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(fail)
}

/// The data on a user-data disk, checked against its header.
fn read_user_data(device: &Path) -> Result<Vec<u8>, MetadataError> {
    let fail = |source| MetadataError::Read {
        device: device.into(),
        source,
    };
    let mut disk = File::open(device).map_err(fail)?;
    let mut header = [0u8; USER_DATA_HEADER_LEN];
    disk.read_exact(&mut header).map_err(fail)?;
    let len = parse_user_data_header(&header).ok_or_else(|| MetadataError::NotUserData {
        device: device.into(),
    })?;
    if len > USER_DATA_MAX {
        return Err(MetadataError::TooLarge { len });
    }
    let mut data = vec![0u8; len as usize];
    disk.read_exact(&mut data).map_err(fail)?;
    Ok(data)
}

/// Runs executable user-data (`#!`) unless it ran at an earlier boot.
pub fn run_user_data_once(path: &Path, config: &RunConfig, signals: &Signals) {
    let script = fs::read(path).unwrap_or_default();
    if !script.starts_with(b"#!") || Path::new(USER_DATA_DONE).exists() {
        return;
    }
    let mut run = RunConfig::new(vec![path.display().to_string()]);
    run.env.clone_from(&config.env);
    let status = supervisor::run(&run, signals);
    eprintln!("guest-init: user-data exited with status {status}");
    let mark = Path::new(USER_DATA_DONE);
    let marked = mark
        .parent()
        .map_or(Ok(()), fs::create_dir_all)
        .and_then(|()| fs::write(mark, format!("{status}\n")));
    if let Err(err) = marked {
        eprintln!("guest-init: cannot mark user-data as run: {err}");
    }
}
