//! Named instances on disk: `$KILN_HOME/instances/<name>/` holds what the
//! instance was launched from (`instance.json`) and its root volume's
//! overlay (`root.overlay`), which outlives each VM like an EBS root volume.
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;

/// The record's file in an instance's directory.
const RECORD_FILE: &str = "instance.json";
/// The root volume's overlay in an instance's directory.
const ROOT_OVERLAY_FILE: &str = "root.overlay";
/// Longest instance name: it names a directory and shows in listings.
const NAME_MAX: usize = 64;

/// What can go wrong with an instance's directory.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not an instance record: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error(
        "instance name {0:?}: expected 1 to {NAME_MAX} letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    #[error("no instance named {0:?}: give an IMAGE to launch it")]
    NotFound(String),
    #[error(
        "instance {name:?} runs {existing}, not {requested}: its root volume belongs to that image"
    )]
    OtherImage {
        name: String,
        existing: String,
        requested: String,
    },
}

/// What an instance was launched from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The image, as NAME:VERSION.
    pub image: String,
}

/// An instance's directory and record.
#[derive(Clone, Debug)]
pub struct Instance {
    dir: PathBuf,
    pub record: Record,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), InstanceError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty()
        || name.len() > NAME_MAX
        || name.starts_with('.')
        || !name.chars().all(allowed)
    {
        return Err(InstanceError::BadName(name.to_string()));
    }
    Ok(())
}

/// Where the instances of `home` (`$KILN_HOME`) live.
fn instances_dir(home: &Path) -> PathBuf {
    home.join("instances")
}

impl Instance {
    /// The instance `name`, if it exists.
    pub fn find(home: &Path, name: &str) -> Result<Option<Instance>, InstanceError> {
        check_name(name)?;
        let dir = instances_dir(home).join(name);
        let path = dir.join(RECORD_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_err(&path)(err)),
        };
        let record = serde_json::from_slice(&bytes).map_err(|err| InstanceError::Record {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        Ok(Some(Instance { dir, record }))
    }

    /// The instance `name`: the existing one (which must run `image`, when
    /// given), or a new one launched from `image`.
    pub fn find_or_create(
        home: &Path,
        name: &str,
        image: Option<&str>,
    ) -> Result<Instance, InstanceError> {
        match (Self::find(home, name)?, image) {
            (Some(instance), Some(image)) if instance.record.image != image => {
                Err(InstanceError::OtherImage {
                    name: name.to_string(),
                    existing: instance.record.image,
                    requested: image.to_string(),
                })
            }
            (Some(instance), _) => Ok(instance),
            (None, Some(image)) => Self::create(home, name, image),
            (None, None) => Err(InstanceError::NotFound(name.to_string())),
        }
    }

    /// Every instance of `home`, sorted by name.
    pub fn list(home: &Path) -> Result<Vec<Instance>, InstanceError> {
        let dir = instances_dir(home);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io_err(&dir)(err)),
        };
        let mut instances = Vec::new();
        for entry in entries {
            let name = entry.map_err(io_err(&dir))?.file_name();
            // Names that fail the rules are not Kiln's: skip them.
            if let Some(name) = name.to_str().filter(|n| check_name(n).is_ok())
                && let Some(instance) = Self::find(home, name)?
            {
                instances.push(instance);
            }
        }
        instances.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(instances)
    }

    /// Creates the directory and writes the record: under a temporary
    /// name, synced, then renamed, so a record is whole or absent.
    fn create(home: &Path, name: &str, image: &str) -> Result<Instance, InstanceError> {
        let dir = instances_dir(home).join(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let record = Record {
            name: name.to_string(),
            image: image.to_string(),
        };
        let path = dir.join(RECORD_FILE);
        let mut staged = durable::stage(&path).map_err(io_err(&path))?;
        let json = serde_json::to_vec_pretty(&record).expect("a record serializes");
        staged.write_all(&json).map_err(io_err(&path))?;
        durable::persist(staged, &path).map_err(io_err(&path))?;
        Ok(Instance { dir, record })
    }

    /// The root volume's overlay (it may not exist yet).
    pub fn root_overlay(&self) -> PathBuf {
        self.dir.join(ROOT_OVERLAY_FILE)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_created_once_and_keep_their_image() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        assert!(Instance::find(home, "web").unwrap().is_none());
        let err = Instance::find_or_create(home, "web", None).unwrap_err();
        assert!(matches!(err, InstanceError::NotFound(_)), "{err}");
        let made = Instance::find_or_create(home, "web", Some("hello:1.0.0")).unwrap();
        assert_eq!(made.root_overlay(), home.join("instances/web/root.overlay"));
        let again = Instance::find_or_create(home, "web", None).unwrap();
        assert_eq!(again.record, made.record);
        let err = Instance::find_or_create(home, "web", Some("busybox:1.35.0")).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("hello:1.0.0") && message.contains("busybox:1.35.0"),
            "{message}"
        );
        Instance::find_or_create(home, "db", Some("busybox:1.35.0")).unwrap();
        let names: Vec<String> = Instance::list(home)
            .unwrap()
            .into_iter()
            .map(|i| i.record.name)
            .collect();
        assert_eq!(names, ["db", "web"]);
    }

    #[test]
    fn names_that_cannot_be_directories_are_refused() {
        let home = tempfile::tempdir().unwrap();
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            let err = Instance::find_or_create(home.path(), bad, Some("i:1")).unwrap_err();
            assert!(matches!(err, InstanceError::BadName(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_damaged_record_is_named() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("instances/web");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(RECORD_FILE), "{not json").unwrap();
        let err = Instance::find(home.path(), "web").unwrap_err().to_string();
        assert!(err.contains("instances/web/instance.json"), "{err}");
    }
}
