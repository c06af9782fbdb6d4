//! The local image store: `<root>/images/<name>/<version>/` holds
//! `manifest.json` and `image.kiln`. An image appears there whole or not
//! at all: it is written into `<root>/tmp/`, fsynced, and renamed into place.
//! Once a VM has booted the image, the directory also holds `image.boot`,
//! the chunks that boot read (`kiln_vmm::volume::working_set`, which
//! names it after the image file), so it goes with the image: removed
//! with it, and replaced (dropped) when the image is rebuilt.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use kiln_vmm::durable::{self, ScratchDir, ScratchError};
use serde::{Deserialize, Serialize};

use crate::recipe::TestCommand;

/// The image file's name in its directory.
pub const IMAGE_FILE: &str = "image.kiln";
const MANIFEST_FILE: &str = "manifest.json";
/// What [`Store::scratch_dir`]'s directories are named after:
/// `.scratch.partial-XXXXXX`.
const SCRATCH_NAME: &str = "scratch";

/// What the store knows about an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The image's name: 1-64 of a-z 0-9 - _ . starting with a letter or
    /// digit.
    pub name: String,
    /// Its semantic version; NAME:VERSION is unique in the store.
    pub version: String,
    /// The recipe's one-line description (empty if it gave none).
    pub description: String,
    /// `sha256:` + the SHA-256 of the image file.
    pub digest: String,
    /// `name:version` of the image this one starts from.
    pub parent: Option<String>,
    /// SHA-256 of the recipe file; empty for an image committed from an
    /// instance, which has none.
    pub recipe_digest: String,
    /// SHA-256 of everything the build read: the cache key. For an image
    /// committed from an instance, of its raw filesystem.
    pub build_key: String,
    /// Bytes of the raw ext4 filesystem: the root volume's size.
    pub raw_size: u64,
    /// Bytes of the compressed image file.
    pub file_size: u64,
    /// What guest-init runs (argv), as the image's run configuration
    /// says: a child image inherits it, and `kiln bench` takes it as the
    /// clone scenario's handler.
    pub entrypoint: Vec<String>,
    /// The ports the image says it listens on (`80/tcp`), from a
    /// container image's ExposedPorts: informational, as in Docker; a
    /// child image inherits them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    /// A container image's Labels; a child image inherits them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The recipe's `[[test]]` commands: `kiln image test` runs them again.
    pub tests: Vec<TestCommand>,
    /// How each of `tests` went when the image was built, in order; `None`
    /// when they were not run: built with `--skip-tests`, or by a Kiln
    /// older than test runs (whose manifests lack the field).
    #[serde(default)]
    pub test_results: Option<Vec<TestResult>>,
    /// RFC 3339, UTC.
    pub created: String,
}

/// How one `[[test]]` went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestResult {
    /// The test's command.
    pub run: String,
    /// Whether it passed: the expected exit status and output, in time.
    pub passed: bool,
    /// The status the command exited with; `None` when it never did (the
    /// VM was killed at the timeout, or ended without reporting one).
    pub exit_status: Option<u8>,
    /// From starting the test's VM to its end, in milliseconds.
    pub duration_ms: u64,
}

impl Manifest {
    /// `name:version`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// Whether the image has tests that were not run when it was built.
    pub fn untested(&self) -> bool {
        !self.tests.is_empty() && self.test_results.is_none()
    }
}

/// Errors from the store. Each names the image or the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the store could not be read or written.
    #[error("cannot read or write {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An image's `manifest.json` is not JSON of a [`Manifest`].
    #[error("{path}: unreadable manifest")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// Where and why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The store holds no image of that reference.
    #[error("no image {0} in the store (see `kiln images`)")]
    NotFound(String),
    /// A reference that is not NAME:VERSION.
    #[error("{0}: expected NAME:VERSION")]
    BadReference(String),
    /// Linking a parent's image file into a child's directory failed.
    #[error("cannot link {from} as {to}")]
    Link {
        /// The parent's file.
        from: PathBuf,
        /// The link in the child's directory.
        to: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// A scratch directory could not be made, or the leftovers of killed
    /// commands beside it removed.
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    /// A manifest's digest is not `sha256:` and 64 hex digits.
    #[error("{image}: manifest digest {digest:?} is not sha256: and 64 hex digits")]
    Digest {
        /// NAME:VERSION of the image.
        image: String,
        /// What the manifest says.
        digest: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.into(),
        source,
    }
}

/// The Kiln home: `$KILN_HOME`, or `~/.local/share/kiln`, or (with no HOME
/// at all, as under a bare init system) `/var/lib/kiln`. The store, the
/// installed kernel and guest-init live there.
pub fn default_home() -> PathBuf {
    home_from(std::env::var_os("KILN_HOME"), std::env::var_os("HOME"))
}

fn home_from(kiln_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> PathBuf {
    match (kiln_home, home) {
        (Some(dir), _) if !dir.is_empty() => PathBuf::from(dir),
        (_, Some(home)) if !home.is_empty() => Path::new(&home).join(".local/share/kiln"),
        _ => PathBuf::from("/var/lib/kiln"),
    }
}

/// Creates the Kiln home if need be, and makes it private (0700) if it
/// is not: it holds guest RAM in snapshots, console logs and images that
/// are nobody else's to read. Everything below it is created under the
/// CLI's umask of 077 (see `src/main.rs`), so 0700 directories and 0600
/// files.
pub fn make_private(home: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)
        .map_err(io_err(home))?;
    let mode = fs::metadata(home)
        .map_err(io_err(home))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(home, fs::Permissions::from_mode(0o700)).map_err(io_err(home))?;
    }
    Ok(())
}

/// Splits `name:version`.
pub fn parse_reference(reference: &str) -> Result<(&str, &str), StoreError> {
    reference
        .split_once(':')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty() && !n.contains('/') && !v.contains('/'))
        .ok_or_else(|| StoreError::BadReference(reference.into()))
}

/// An image in the store.
#[derive(Clone, Debug)]
pub struct StoredImage {
    /// What it is and where it came from.
    pub manifest: Manifest,
    /// Its `image.kiln` file.
    pub image_path: PathBuf,
}

impl StoredImage {
    /// The SHA-256 of the image file, as its manifest records it: the name
    /// a child's layer table gives the file.
    pub fn file_digest(&self) -> Result<[u8; 32], StoreError> {
        let digest = &self.manifest.digest;
        digest
            .strip_prefix("sha256:")
            .and_then(kiln_image::digest_from_hex)
            .ok_or_else(|| StoreError::Digest {
                image: self.manifest.reference(),
                digest: digest.clone(),
            })
    }
}

/// The store under a Kiln home directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The store in `home` (`$KILN_HOME`); created on first write.
    pub fn new(home: &Path) -> Self {
        Store {
            root: home.to_path_buf(),
        }
    }

    fn dir(&self, name: &str, version: &str) -> PathBuf {
        self.root.join("images").join(name).join(version)
    }

    /// The directory of the stored images' host-wide hydration caches
    /// (`kiln_image::hydrate`), named by each image's content id.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// A fresh directory on the store's filesystem (in `<root>/tmp/`) for
    /// building, committing or importing into, locked for as long as the
    /// command lives; the scratch directories there that killed commands
    /// left go first ([`durable::scratch_dir`]).
    pub fn scratch_dir(&self) -> Result<ScratchDir, StoreError> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(durable::scratch_dir(&tmp, SCRATCH_NAME)?)
    }

    /// A new, empty, uniquely named file on the store's filesystem, which
    /// the caller owns (and removes).
    pub fn scratch_file(&self, prefix: &str) -> Result<PathBuf, StoreError> {
        let tmp = self.root.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(&tmp)
            .and_then(|file| file.into_temp_path().keep().map_err(|err| err.error))
            .map_err(io_err(&tmp))
    }

    /// The image `name:version`, if stored.
    pub fn get(&self, name: &str, version: &str) -> Result<Option<StoredImage>, StoreError> {
        let dir = self.dir(name, version);
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&manifest_path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_err(&manifest_path)(err)),
        };
        let manifest = serde_json::from_slice(&bytes).map_err(|source| StoreError::Manifest {
            path: manifest_path.clone(),
            source,
        })?;
        Ok(Some(StoredImage {
            manifest,
            image_path: dir.join(IMAGE_FILE),
        }))
    }

    /// The image named by `name:version`, or an error saying it is missing.
    pub fn find(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let (name, version) = parse_reference(reference)?;
        self.get(name, version)?
            .ok_or_else(|| StoreError::NotFound(reference.into()))
    }

    /// Every stored image, sorted by name and version.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let images = self.root.join("images");
        let mut manifests = Vec::new();
        for name in read_dir_names(&images)? {
            for version in read_dir_names(&images.join(&name))? {
                if let Some(image) = self.get(&name, &version)? {
                    manifests.push(image.manifest);
                }
            }
        }
        manifests.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        Ok(manifests)
    }

    /// Moves a finished build (`staged` holds the image file, already
    /// synced) into the store with its manifest, replacing an older build
    /// of the same name:version.
    pub fn publish(&self, staged: &Path, manifest: &Manifest) -> Result<PathBuf, StoreError> {
        let manifest_path = staged.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(manifest).expect("a manifest serializes");
        fs::write(&manifest_path, json).map_err(io_err(&manifest_path))?;
        sync(&manifest_path)?;
        sync(staged)?;
        let dir = self.dir(&manifest.name, &manifest.version);
        let parent = dir.parent().expect("image dirs have a parent");
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        // A rename cannot replace a non-empty directory: an older build is
        // swapped with the new one in one step, so that a crash at any
        // point leaves one of them published (moving the old aside first
        // left neither, should the process die between the two renames).
        match fs::rename(staged, &dir) {
            Ok(()) => sync(parent)?,
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    staged,
                    rustix::fs::CWD,
                    &dir,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .map_err(|errno| io_err(&dir)(errno.into()))?;
                sync(parent)?;
                // `staged` holds the old build now.
                fs::remove_dir_all(staged).map_err(io_err(staged))?;
            }
            Err(err) => return Err(io_err(&dir)(err)),
        }
        Ok(dir.join(IMAGE_FILE))
    }

    /// Removes `name:version`; returns its manifest and the bytes freed.
    /// Its directory's files that other images link (its own image file,
    /// when children share its chunks; its parents' files) stay, with
    /// them, until the last image that links them goes.
    pub fn remove(&self, reference: &str) -> Result<(Manifest, u64), StoreError> {
        let image = self.find(reference)?;
        let dir = self.dir(&image.manifest.name, &image.manifest.version);
        let freed = unshared_bytes(&dir)?;
        // Rename away first so a crash never leaves half an image listed.
        let trash = self.scratch_dir()?;
        fs::rename(&dir, trash.path().join("removed")).map_err(io_err(&dir))?;
        let name_dir = dir.parent().expect("image dirs have a parent");
        if read_dir_names(name_dir)?.is_empty() {
            let _ = fs::remove_dir(name_dir);
        }
        Ok((image.manifest, freed))
    }
}

/// Bytes of the files in `dir` that no other directory links.
fn unshared_bytes(dir: &Path) -> Result<u64, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    for name in read_dir_names(dir)? {
        let path = dir.join(name);
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if meta.nlink() == 1 {
            bytes += meta.len();
        }
    }
    Ok(bytes)
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(io_err(dir)(err)),
    }
}

/// fsyncs a file or directory.
pub fn sync(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_home_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("a/kiln");
        make_private(&home).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&home), 0o700);
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        make_private(&home).unwrap();
        assert_eq!(mode(&home), 0o700);
    }

    fn manifest(name: &str, version: &str, parent: Option<&str>) -> Manifest {
        Manifest {
            name: name.into(),
            version: version.into(),
            description: String::new(),
            digest: "sha256:00".into(),
            parent: parent.map(String::from),
            recipe_digest: "r".into(),
            build_key: "k".into(),
            raw_size: 1,
            file_size: 1,
            entrypoint: vec!["/bin/x".into()],
            exposed_ports: Vec::new(),
            labels: Default::default(),
            tests: Vec::new(),
            test_results: None,
            created: "2026-11-24T00:00:00Z".into(),
        }
    }

    /// Publishes `m` from a directory in a scratch directory, as a build
    /// does, with `image` as its image file and `parent` linked beside.
    fn publish_with(store: &Store, m: &Manifest, image: &[u8], parent: Option<&Path>) {
        let scratch = store.scratch_dir().unwrap();
        let staged = scratch.path().join("publish");
        fs::create_dir(&staged).unwrap();
        fs::write(staged.join(IMAGE_FILE), image).unwrap();
        if let Some(parent) = parent {
            fs::hard_link(parent, staged.join("parent.kiln")).unwrap();
        }
        store.publish(&staged, m).unwrap();
    }

    fn publish(store: &Store, m: &Manifest) {
        publish_with(store, m, b"image", None);
    }

    #[test]
    fn the_home_is_the_variable_then_under_home() {
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
    fn publish_list_find_and_replace() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        publish(&store, &manifest("hello", "1.0.0", None));
        publish(&store, &manifest("busybox", "1.36.0", None));
        let mut newer = manifest("hello", "1.0.0", None);
        newer.build_key = "k2".into();
        publish(&store, &newer);
        let refs: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(Manifest::reference)
            .collect();
        assert_eq!(refs, ["busybox:1.36.0", "hello:1.0.0"]);
        assert_eq!(store.find("hello:1.0.0").unwrap().manifest.build_key, "k2");
        assert!(matches!(
            store.find("hello:2.0.0"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.find("hello"),
            Err(StoreError::BadReference(_))
        ));
        assert!(
            fs::read_dir(home.path().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "no scratch left behind"
        );
    }

    /// The next scratch directory removes what a killed command left in
    /// the store's tmp, and nothing else there: not a live command's
    /// scratch, nor a file made for a VM ([`Store::scratch_file`]).
    #[test]
    fn a_scratch_directory_removes_only_a_killed_commands() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let overlay = store.scratch_file("overlay-").unwrap();
        let live = store.scratch_dir().unwrap();
        let killed = home.path().join("tmp/.scratch.partial-k1lled");
        fs::create_dir_all(killed.join("publish")).unwrap();
        let next = store.scratch_dir().unwrap();
        assert!(!killed.exists(), "the killed command's scratch is removed");
        assert!(live.path().is_dir() && next.path().is_dir());
        assert!(overlay.is_file(), "not a scratch directory");
    }

    /// A manifest written before tests ran (no `test_results`, tests
    /// without `expect_stdout` or `timeout_secs`) still loads: untested.
    #[test]
    fn an_older_manifest_loads_as_untested() {
        let old = r#"{"name": "hello", "version": "1.0.0", "description": "",
            "digest": "sha256:00", "parent": null, "recipe_digest": "r",
            "build_key": "k", "raw_size": 1, "file_size": 1,
            "entrypoint": ["/bin/hello"],
            "tests": [{"run": "/bin/hello", "expect_exit": 0}],
            "created": "2026-11-24T00:00:00Z"}"#;
        let manifest: Manifest = serde_json::from_str(old).unwrap();
        assert!(manifest.untested());
        assert_eq!(manifest.tests[0].expect_stdout, None);
        assert_eq!(
            manifest.tests[0].timeout_secs,
            crate::recipe::DEFAULT_TEST_TIMEOUT_SECS
        );
    }

    /// A file two images' directories link is freed with the second.
    #[test]
    fn removing_frees_only_what_no_other_image_links() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        publish(&store, &manifest("hello", "1.0.0", None));
        let parent_file = store.find("hello:1.0.0").unwrap().image_path;
        let child = manifest("hello-plus", "1.0.0", Some("hello:1.0.0"));
        publish_with(&store, &child, b"child", Some(&parent_file));
        let manifest_len = fs::metadata(parent_file.with_file_name(MANIFEST_FILE))
            .unwrap()
            .len();
        let (_, freed) = store.remove("hello:1.0.0").unwrap();
        assert_eq!(freed, manifest_len, "the child links the parent's file");
        let child_dir = store.find("hello-plus:1.0.0").unwrap().image_path;
        let kept = child_dir.with_file_name("parent.kiln");
        assert_eq!(fs::read(&kept).unwrap(), b"image");
        let dir = kept.parent().unwrap();
        let all: u64 = (fs::read_dir(dir).unwrap())
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let (_, freed) = store.remove("hello-plus:1.0.0").unwrap();
        assert_eq!(freed, all, "its own file, the parent's and its manifest");
        assert!(store.list().unwrap().is_empty());
    }
}
