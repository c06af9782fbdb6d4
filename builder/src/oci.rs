//! Importing a root tree from a container image archive or a tarball.
//!
//! - An OCI image layout in a tar (`index.json`, `blobs/sha256/…`; OCI image
//!   spec, "Image Layout") or `docker save` output (`manifest.json` listing
//!   `Layers`): the first image's layers, in order.
//! - A rootfs tarball: one layer.
//!
//! An image archive's configuration comes with its layers
//! ([`ImageSettings`]): how to run it (Entrypoint, Cmd, Env, WorkingDir,
//! User), what it says of itself (ExposedPorts, Labels), and the names
//! the archive gives it (`docker save`'s RepoTags; an OCI index's
//! `org.opencontainers.image.ref.name` and `io.containerd.image.name`
//! annotations). The rest of the configuration (Volumes, StopSignal,
//! Healthcheck, Shell, OnBuild) is not read: no Kiln mechanism does what
//! it asks.
//!
//! Layers may be plain, gzip or zstd tars. Whiteouts (OCI image spec,
//! "Representing Changes"): `.wh.NAME` deletes NAME from the layers below;
//! `.wh..wh..opq` empties its directory of what the layers below put there.
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use guest_init::config::RunConfig;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::stage::{Stage, StageError};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Why an archive could not be imported. Each names the archive.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The archive, or a layer in it, could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The archive or layer.
        path: PathBuf,
        /// What the system (or the decompressor) said.
        #[source]
        source: io::Error,
    },
    /// The archive has neither an OCI layout's `index.json` nor a
    /// `docker save` archive's `manifest.json`.
    #[error(
        "{archive}: not an OCI image layout or docker save archive (no index.json or manifest.json)"
    )]
    NotAnImage {
        /// The archive.
        archive: PathBuf,
    },
    /// A JSON document of the archive (index, manifest, image config) does
    /// not parse as its kind.
    #[error("{archive}: {document} is not a valid {kind}")]
    Json {
        /// The archive.
        archive: PathBuf,
        /// The document's path or digest in the archive.
        document: String,
        /// What it should be (`OCI image index`, `image config`, ...).
        kind: &'static str,
        /// Where and why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The archive breaks a rule of its format or one Kiln holds archives
    /// to (a digest that does not match, an unsafe path, an entry type
    /// no image holds).
    #[error("{archive}: {what}")]
    Invalid {
        /// The archive.
        archive: PathBuf,
        /// What is wrong, naming the entry or digest.
        what: String,
    },
    /// Writing an entry of the archive into the image failed, or the
    /// entry's name or path is one no image may hold.
    #[error("cannot unpack {archive}")]
    Stage {
        /// The archive.
        archive: PathBuf,
        /// Why the entry was refused.
        #[source]
        source: StageError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.into(),
        source,
    }
}

fn stage_err(archive: &Path) -> impl FnOnce(StageError) -> OciError + '_ {
    move |source| OciError::Stage {
        archive: archive.into(),
        source,
    }
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    /// Required by the spec; a manifest without one gives an image with
    /// no run configuration of its own.
    #[serde(default)]
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The index annotation naming an image's tag or full reference (OCI
/// image spec, "Pre-Defined Annotation Keys").
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd (`ctr image export`) puts the full
/// reference in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An image configuration (OCI image spec, "Image Configuration"): what
/// names its layers' contents (`rootfs.diff_ids`), and how to run it.
#[derive(Deserialize)]
struct ImageConfig {
    rootfs: RootFs,
    #[serde(default)]
    config: Option<ContainerConfig>,
}

/// The image configuration's `config`: each field may be absent or null.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    labels: Option<BTreeMap<String, String>>,
}

/// What an image archive says besides its files: how to run the image,
/// what it exposes, its labels and the names it carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSettings {
    /// Entrypoint: the program and its first arguments.
    pub entrypoint: Vec<String>,
    /// Cmd: the arguments after them, which a run's command replaces.
    pub cmd: Vec<String>,
    /// Env, as KEY → VALUE (a later duplicate wins, as in Docker).
    pub env: BTreeMap<String, String>,
    /// WorkingDir; `None` when empty or absent.
    pub workdir: Option<String>,
    /// User (`USER[:GROUP]`, names or numbers); `None` when empty or
    /// absent.
    pub user: Option<String>,
    /// ExposedPorts' keys (`80/tcp`), sorted: informational, as in
    /// Docker; `kiln run -p` publishes ports.
    pub exposed_ports: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The references the archive gives the image (`busybox:1.36`,
    /// `docker.io/library/busybox:latest`), in the archive's order.
    pub names: Vec<String>,
}

impl ImageSettings {
    /// Guest-init's run configuration for the image, with `hostname`;
    /// `None` when the image names no command (neither Entrypoint nor
    /// Cmd).
    pub fn run_config(&self, hostname: &str) -> Option<RunConfig> {
        if self.entrypoint.is_empty() && self.cmd.is_empty() {
            return None;
        }
        let mut config = RunConfig::new(self.entrypoint.clone());
        config.cmd = self.cmd.clone();
        config.env.extend(self.env.clone());
        if let Some(dir) = &self.workdir {
            config.workdir = dir.clone();
        }
        config.user = self.user.clone();
        config.hostname = hostname.to_string();
        Some(config)
    }

    /// The configuration's part: each `Env` entry must be KEY=VALUE.
    fn from_config(archive: &Path, config: ContainerConfig) -> Result<Self, OciError> {
        let env = config
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|entry| match entry.split_once('=') {
                Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
                _ => Err(invalid(
                    archive,
                    format!("image config Env entry {entry:?}: expected KEY=VALUE"),
                )),
            })
            .collect::<Result<_, _>>()?;
        let workdir = config.working_dir.filter(|dir| !dir.is_empty());
        if let Some(dir) = workdir.as_ref().filter(|dir| !dir.starts_with('/')) {
            return Err(invalid(
                archive,
                format!("image config WorkingDir {dir:?}: expected an absolute path"),
            ));
        }
        Ok(ImageSettings {
            entrypoint: config.entrypoint.unwrap_or_default(),
            cmd: config.cmd.unwrap_or_default(),
            env,
            workdir,
            user: config.user.filter(|user| !user.is_empty()),
            exposed_ports: config
                .exposed_ports
                .unwrap_or_default()
                .into_keys()
                .collect(),
            labels: config.labels.unwrap_or_default(),
            names: Vec::new(),
        })
    }
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// A layer to apply and the SHA-256 it must have.
struct Layer {
    /// Inside the unpacked archive.
    path: PathBuf,
    digest: Expected,
}

enum Expected {
    /// Of the blob as stored (an OCI descriptor's `digest`).
    Blob(String),
    /// Of the uncompressed tar (a `diff_id`, which `docker save` gives).
    Uncompressed(String),
}

/// Applies the first image's layers of the OCI or docker archive to
/// `stage` and returns its settings; `scratch` is a directory for
/// unpacking the archive itself. Every blob is checked against the
/// digest its manifest gives.
pub fn import_image(
    archive: &Path,
    stage: &Stage,
    scratch: &Path,
) -> Result<ImageSettings, OciError> {
    let unpacked = Stage::create(&scratch.join("oci-archive")).map_err(stage_err(archive))?;
    let file = File::open(archive).map_err(io_err(archive))?;
    // The archive's own entries are files like any other, whiteouts too.
    Applier::new(&unpacked, archive, false).apply(BufReader::new(file))?;
    let (layers, settings) = layers(archive, &unpacked)?;
    for layer in layers {
        apply_layer_blob(archive, &unpacked, &layer, stage)?;
    }
    Ok(settings)
}

/// Applies a rootfs tarball to `stage`.
pub fn import_tarball(tarball: &Path, stage: &Stage) -> Result<(), OciError> {
    let file = File::open(tarball).map_err(io_err(tarball))?;
    Applier::new(stage, tarball, true).apply(decompressed(BufReader::new(file), tarball)?)?;
    Ok(())
}

/// Parses `bytes`, the `document` of the archive, as JSON of a `kind`.
fn parse_json<T: serde::de::DeserializeOwned>(
    archive: &Path,
    document: &str,
    kind: &'static str,
    bytes: &[u8],
) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|source| OciError::Json {
        archive: archive.into(),
        document: document.into(),
        kind,
        source,
    })
}

fn invalid(archive: &Path, what: String) -> OciError {
    OciError::Invalid {
        archive: archive.into(),
        what,
    }
}

/// Reads a file of the unpacked archive (symlinks in it resolve inside it).
fn read_inside(archive: &Path, unpacked: &Stage, path: &Path) -> Result<Vec<u8>, OciError> {
    let mut bytes = Vec::new();
    unpacked
        .open_file(path)
        .map_err(stage_err(archive))?
        .read_to_end(&mut bytes)
        .map_err(io_err(archive))?;
    Ok(bytes)
}

/// `sha256:<64 hex digits>`'s hex digits.
fn sha256_hex<'d>(archive: &Path, digest: &'d str) -> Result<&'d str, OciError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            invalid(
                archive,
                format!("unsupported digest {digest:?}: expected sha256:<64 hex digits>"),
            )
        })
}

fn check_digest(archive: &Path, what: &str, want: &str, got: &[u8]) -> Result<(), OciError> {
    let got = kiln_image::hex(got);
    if !want.eq_ignore_ascii_case(&got) {
        return Err(invalid(
            archive,
            format!("{what} has sha256:{got}, but its manifest says sha256:{want}"),
        ));
    }
    Ok(())
}

/// The blob `digest` names, read whole and checked against it.
fn verified_blob(archive: &Path, unpacked: &Stage, digest: &str) -> Result<Vec<u8>, OciError> {
    let hex = sha256_hex(archive, digest)?;
    let bytes = read_inside(archive, unpacked, &Path::new("blobs/sha256").join(hex))?;
    check_digest(
        archive,
        &format!("blob {digest}"),
        hex,
        &Sha256::digest(&bytes),
    )?;
    Ok(bytes)
}

/// The settings an image configuration document holds.
fn settings_of(archive: &Path, config: Option<ContainerConfig>) -> Result<ImageSettings, OciError> {
    ImageSettings::from_config(archive, config.unwrap_or_default())
}

/// The first image's layers, and its settings.
fn layers(archive: &Path, unpacked: &Stage) -> Result<(Vec<Layer>, ImageSettings), OciError> {
    let exists = |name: &str| matches!(unpacked.kind(Path::new(name)), Ok(Some(_)));
    if exists("index.json") {
        return oci_layers(archive, unpacked);
    }
    if exists("manifest.json") {
        return docker_layers(archive, unpacked);
    }
    Err(OciError::NotAnImage {
        archive: archive.into(),
    })
}

fn oci_layers(archive: &Path, unpacked: &Stage) -> Result<(Vec<Layer>, ImageSettings), OciError> {
    let index: OciIndex = parse_json(
        archive,
        "index.json",
        "OCI image index",
        &read_inside(archive, unpacked, Path::new("index.json"))?,
    )?;
    let first = index
        .manifests
        .first()
        .ok_or_else(|| invalid(archive, "index.json lists no manifests".into()))?;
    let manifest: OciManifest = parse_json(
        archive,
        &first.digest,
        "OCI image manifest",
        &verified_blob(archive, unpacked, &first.digest)?,
    )?;
    let mut settings = match &manifest.config {
        Some(config) => {
            let config: ImageConfig = parse_json(
                archive,
                &config.digest,
                "image config",
                &verified_blob(archive, unpacked, &config.digest)?,
            )?;
            settings_of(archive, config.config)?
        }
        None => ImageSettings::default(),
    };
    settings.names = oci_names(&first.annotations);
    let layers = manifest
        .layers
        .into_iter()
        .map(|layer| {
            let hex = sha256_hex(archive, &layer.digest)?;
            Ok(Layer {
                path: Path::new("blobs/sha256").join(hex),
                digest: Expected::Blob(hex.to_string()),
            })
        })
        .collect::<Result<_, OciError>>()?;
    Ok((layers, settings))
}

/// An OCI index entry's names: containerd's full reference, else the
/// ref.name annotation when it is a whole reference (`NAME:TAG`), not a
/// bare tag.
fn oci_names(annotations: &BTreeMap<String, String>) -> Vec<String> {
    let full = annotations.get(CONTAINERD_NAME).or_else(|| {
        annotations
            .get(REF_NAME)
            .filter(|name| name.contains(':') || name.contains('/'))
    });
    full.cloned().into_iter().collect()
}

fn docker_layers(
    archive: &Path,
    unpacked: &Stage,
) -> Result<(Vec<Layer>, ImageSettings), OciError> {
    let manifests: Vec<DockerManifest> = parse_json(
        archive,
        "manifest.json",
        "docker save manifest",
        &read_inside(archive, unpacked, Path::new("manifest.json"))?,
    )?;
    let first = manifests
        .into_iter()
        .next()
        .ok_or_else(|| invalid(archive, "manifest.json lists no images".into()))?;
    let config = safe_relative(Path::new(&first.config), archive)?;
    let config: ImageConfig = parse_json(
        archive,
        &first.config,
        "image config",
        &read_inside(archive, unpacked, &config)?,
    )?;
    if config.rootfs.diff_ids.len() != first.layers.len() {
        return Err(invalid(
            archive,
            format!(
                "{} lists {} diff_ids for {} layers",
                first.config,
                config.rootfs.diff_ids.len(),
                first.layers.len()
            ),
        ));
    }
    let layers = first
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(layer, diff_id)| {
            Ok(Layer {
                path: safe_relative(Path::new(layer), archive)?,
                digest: Expected::Uncompressed(sha256_hex(archive, diff_id)?.to_string()),
            })
        })
        .collect::<Result<_, OciError>>()?;
    let mut settings = settings_of(archive, config.config)?;
    settings.names = first.repo_tags.unwrap_or_default();
    Ok((layers, settings))
}

/// Checks a layer blob against its digest and applies it to `stage`.
fn apply_layer_blob(
    archive: &Path,
    unpacked: &Stage,
    layer: &Layer,
    stage: &Stage,
) -> Result<(), OciError> {
    let mut file = unpacked
        .open_file(&layer.path)
        .map_err(stage_err(archive))?;
    let what = format!("layer {}", layer.path.display());
    match &layer.digest {
        Expected::Blob(want) => {
            let mut hashing = HashingReader {
                inner: &mut file,
                hasher: Sha256::new(),
            };
            io::copy(&mut hashing, &mut io::sink()).map_err(io_err(archive))?;
            check_digest(archive, &what, want, &hashing.hasher.finalize())?;
            file.rewind().map_err(io_err(archive))?;
            let reader = decompressed(BufReader::new(file), archive)?;
            Applier::new(stage, archive, true).apply(reader)?;
        }
        Expected::Uncompressed(want) => {
            // The digest is of what the tar reader reads: hash as it goes
            // (and what it leaves unread), then check. On a mismatch the
            // build fails and its stage is thrown away.
            let reader = decompressed(BufReader::new(file), archive)?;
            let mut hashing = HashingReader {
                inner: reader,
                hasher: Sha256::new(),
            };
            Applier::new(stage, archive, true).apply(&mut hashing)?;
            io::copy(&mut hashing, &mut io::sink()).map_err(io_err(archive))?;
            check_digest(archive, &what, want, &hashing.hasher.finalize())?;
        }
    }
    Ok(())
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Undoes gzip or zstd compression (told by magic bytes), or none.
fn decompressed<R: io::BufRead + 'static>(
    mut reader: R,
    archive: &Path,
) -> Result<Box<dyn Read>, OciError> {
    let peeked = reader.fill_buf().map_err(io_err(archive))?;
    let mut magic = [0u8; 4];
    magic[..peeked.len().min(4)].copy_from_slice(&peeked[..peeked.len().min(4)]);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(reader)),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            Box::new(zstd::Decoder::with_buffer(reader).map_err(io_err(archive))?)
        }
        _ => Box::new(reader),
    })
}

/// What a tar header says of an entry besides its path.
struct EntryMeta {
    kind: tar::EntryType,
    /// Permission bits, setuid, setgid and sticky (`0o7777`).
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Applies one tar stream to a stage, entry by entry, through
/// [`Stage`]: nothing it writes can leave the stage.
struct Applier<'a> {
    stage: &'a Stage,
    archive: &'a Path,
    /// Whether `.wh.` names are whiteouts (a layer) or plain files.
    whiteouts: bool,
    /// What this layer wrote: an opaque whiteout hides only what the
    /// layers below put in its directory (OCI image spec, "Opaque
    /// Whiteout"), whatever order the tar has.
    written: HashSet<PathBuf>,
}

impl<'a> Applier<'a> {
    fn new(stage: &'a Stage, archive: &'a Path, whiteouts: bool) -> Self {
        Applier {
            stage,
            archive,
            whiteouts,
            written: HashSet::new(),
        }
    }

    fn apply(mut self, reader: impl Read) -> Result<(), OciError> {
        let mut tar = tar::Archive::new(reader);
        for entry in tar.entries().map_err(io_err(self.archive))? {
            let mut entry = entry.map_err(io_err(self.archive))?;
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(&entry.path_bytes()));
            // Refused if it climbs; each name is checked by the stage as it is used.
            let relative = safe_relative(&path, self.archive)?;
            if relative.as_os_str().is_empty() {
                continue; // `./` itself: the stage's root stays as it is.
            }
            self.entry(&relative, &mut entry)?;
        }
        Ok(())
    }

    /// Applies one entry at `path` (relative, without `..`): a whiteout,
    /// or what it writes with its owner and mode.
    fn entry(&mut self, path: &Path, entry: &mut tar::Entry<impl Read>) -> Result<(), OciError> {
        let parent = path.parent().unwrap_or(Path::new(""));
        if self.whiteout(path, parent)? {
            return Ok(());
        }
        let meta = self.meta(entry.header())?;
        if !parent.as_os_str().is_empty() {
            self.stage
                .create_dir_all(parent, 0o755)
                .map_err(stage_err(self.archive))?;
        }
        if !self.write(path, &meta, entry)? {
            return Ok(());
        }
        self.written.insert(path.to_path_buf());
        if meta.kind == tar::EntryType::Link {
            return Ok(()); // A hard link shares its original's owner and mode.
        }
        self.set_owner_and_mode(path, &meta)
    }

    /// Applies the entry at `path` in `parent` if it is a whiteout (in a
    /// layer only); says whether it was one.
    fn whiteout(&self, path: &Path, parent: &Path) -> Result<bool, OciError> {
        if !self.whiteouts {
            return Ok(false);
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let err = stage_err(self.archive);
        // The opaque whiteout first: its name has the whiteout prefix too.
        if name == OPAQUE_WHITEOUT {
            let written = &self.written;
            let keep = |child: &std::ffi::OsStr| written.contains(&parent.join(child));
            self.stage.empty_dir(parent, &keep).map_err(err)?;
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            self.stage.remove_all(&parent.join(hidden)).map_err(err)?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// The entry's kind, mode and owner, from its header.
    fn meta(&self, header: &tar::Header) -> Result<EntryMeta, OciError> {
        Ok(EntryMeta {
            mode: header.mode().map_err(io_err(self.archive))? & 0o7777,
            uid: self.id(header.uid())?,
            gid: self.id(header.gid())?,
            kind: header.entry_type(),
        })
    }

    /// Writes the entry's directory, file or link at `path`; says whether
    /// its kind is one written at all.
    fn write(
        &self,
        path: &Path,
        meta: &EntryMeta,
        entry: &mut tar::Entry<impl Read>,
    ) -> Result<bool, OciError> {
        let stage = self.stage;
        let result = match meta.kind {
            tar::EntryType::Directory => stage.replace_with_dir(path, meta.mode),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                stage.write_file(path, meta.mode, entry)
            }
            tar::EntryType::Symlink => match entry.link_name_bytes() {
                Some(target) => {
                    stage.symlink(Path::new(std::ffi::OsStr::from_bytes(&target)), path)
                }
                None => return Err(self.missing_link(path)),
            },
            tar::EntryType::Link => match entry.link_name_bytes() {
                Some(original) => {
                    let original = safe_relative(
                        Path::new(std::ffi::OsStr::from_bytes(&original)),
                        self.archive,
                    )?;
                    stage.hard_link(&original, path)
                }
                None => return Err(self.missing_link(path)),
            },
            // Device nodes and fifos come from devtmpfs and the guest at
            // run time; a pax global header carries nothing to write.
            tar::EntryType::Char
            | tar::EntryType::Block
            | tar::EntryType::Fifo
            | tar::EntryType::XGlobalHeader => return Ok(false),
            other => {
                return Err(invalid(
                    self.archive,
                    format!("{}: unsupported tar entry type {other:?}", path.display()),
                ));
            }
        };
        result.map_err(stage_err(self.archive))?;
        Ok(true)
    }

    /// Gives a written entry its owner, then its mode (a symlink has none
    /// of its own).
    fn set_owner_and_mode(&self, path: &Path, meta: &EntryMeta) -> Result<(), OciError> {
        // The owner first: chown(2) clears setuid and setgid.
        self.stage
            .set_owner(path, meta.uid, meta.gid)
            .map_err(stage_err(self.archive))?;
        if meta.kind != tar::EntryType::Symlink {
            self.stage
                .set_mode(path, meta.mode)
                .map_err(stage_err(self.archive))?;
        }
        Ok(())
    }

    fn id(&self, id: io::Result<u64>) -> Result<u32, OciError> {
        let id = id.map_err(io_err(self.archive))?;
        u32::try_from(id)
            .map_err(|_| invalid(self.archive, format!("owner id {id} is over 2^32 - 1")))
    }

    fn missing_link(&self, path: &Path) -> OciError {
        invalid(
            self.archive,
            format!("{}: a link entry without a target", path.display()),
        )
    }
}

/// A path named by an archive as a relative path with no `..`:
/// archives are untrusted.
fn safe_relative(path: &Path, archive: &Path) -> Result<PathBuf, OciError> {
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir | Component::RootDir => {}
            _ => {
                return Err(OciError::Invalid {
                    archive: archive.into(),
                    what: format!("unsafe path {path:?} in the archive"),
                });
            }
        }
    }
    Ok(relative)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    /// A complete header, as real archives have (owner, time, mode).
    fn header(kind: tar::EntryType, size: usize) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(size as u64);
        header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header
    }

    /// A tar of (path, bytes) files.
    fn tar_files(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in files {
            builder
                .append_data(
                    &mut header(tar::EntryType::Regular, bytes.len()),
                    path,
                    *bytes,
                )
                .unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// A tar of (path, contents); contents `None` make a directory.
    pub(crate) fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, contents) in entries {
            match contents {
                Some(text) => builder.append_data(
                    &mut header(tar::EntryType::Regular, text.len()),
                    path,
                    text.as_bytes(),
                ),
                None => builder.append_data(
                    &mut header(tar::EntryType::Directory, 0),
                    path,
                    io::empty(),
                ),
            }
            .unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut encoder, bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Two layers: the second deletes /etc/a, makes /opt/dir opaque, adds files.
    pub(crate) fn layers() -> (Vec<u8>, Vec<u8>) {
        let lower = tar_of(&[
            ("etc", None),
            ("etc/a", Some("one")),
            ("etc/b", Some("two")),
            ("opt/dir", None),
            ("opt/dir/x", Some("lower")),
        ]);
        let upper = tar_of(&[
            ("etc/.wh.a", Some("")),
            ("opt/dir/.wh..wh..opq", Some("")),
            ("opt/dir/y", Some("upper")),
            ("etc/c", Some("three")),
        ]);
        (lower, gzip(&upper))
    }

    /// An OCI image layout tar holding `layers`.
    pub(crate) fn oci_archive(layers: &[Vec<u8>]) -> Vec<u8> {
        let digest = |bytes: &[u8]| kiln_image::hex(&Sha256::digest(bytes));
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut descriptors = Vec::new();
        for layer in layers {
            let hex = digest(layer);
            descriptors.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{hex}"), "size": layer.len()}));
            files.push((format!("blobs/sha256/{hex}"), layer.clone()));
        }
        let manifest =
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "layers": descriptors}))
                .unwrap();
        let manifest_hex = digest(&manifest);
        files.push((format!("blobs/sha256/{manifest_hex}"), manifest));
        files.push(("index.json".into(), serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{"digest": format!("sha256:{manifest_hex}")}]})).unwrap()));
        files.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec(),
        ));
        let files: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        tar_files(&files)
    }

    /// One tar entry with exactly these name and link bytes, which the
    /// tar crate's own builder would refuse to write (`..`, newlines).
    pub(crate) struct Raw<'a> {
        pub name: &'a [u8],
        pub kind: tar::EntryType,
        pub data: &'a [u8],
        pub link: &'a [u8],
    }

    pub(crate) fn raw_tar(entries: &[Raw]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for raw in entries {
            let mut header = header(raw.kind, raw.data.len());
            let old = header.as_old_mut();
            old.name[..raw.name.len()].copy_from_slice(raw.name);
            old.linkname[..raw.link.len()].copy_from_slice(raw.link);
            header.set_cksum();
            builder.append(&header, raw.data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    pub(crate) fn file<'a>(name: &'a [u8], data: &'a [u8]) -> Raw<'a> {
        Raw {
            name,
            kind: tar::EntryType::Regular,
            data,
            link: b"",
        }
    }

    pub(crate) fn link<'a>(name: &'a [u8], target: &'a [u8]) -> Raw<'a> {
        Raw {
            name,
            kind: tar::EntryType::Symlink,
            data: b"",
            link: target,
        }
    }

    pub(crate) fn directory(name: &[u8]) -> Raw<'_> {
        Raw {
            name,
            kind: tar::EntryType::Directory,
            data: b"",
            link: b"",
        }
    }

    /// A directory `outside` next to where a test stages, holding one
    /// file; what a hostile archive aims at.
    pub(crate) fn victim(dir: &Path) -> PathBuf {
        let outside = dir.join("outside");
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("important"), "keep").unwrap();
        outside
    }

    /// Panics if anything in `victim`'s directory changed.
    pub(crate) fn assert_untouched(outside: &Path) {
        let mut names: Vec<_> = fs::read_dir(outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["important", "sub"], "{outside:?} changed");
        assert_eq!(fs::read_dir(outside.join("sub")).unwrap().count(), 0);
        assert_eq!(
            fs::read_to_string(outside.join("important")).unwrap(),
            "keep"
        );
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(p).unwrap().permissions())
                & 0o7777
        };
        assert_eq!(mode(outside), 0o755, "{outside:?}'s mode changed");
    }

    fn assert_layers_applied(stage: &Path) {
        assert!(!stage.join("etc/a").exists(), "the whiteout deletes etc/a");
        assert_eq!(fs::read_to_string(stage.join("etc/b")).unwrap(), "two");
        assert_eq!(fs::read_to_string(stage.join("etc/c")).unwrap(), "three");
        let dir: Vec<_> = fs::read_dir(stage.join("opt/dir"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            dir,
            ["y"],
            "the opaque whiteout hides the lower layer's files"
        );
    }

    fn scratch(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs::create_dir(&path).unwrap();
        path
    }

    fn stage_in(dir: &Path) -> Stage {
        Stage::create(&dir.join("stage")).unwrap()
    }

    #[test]
    fn oci_layout_layers_apply_in_order_with_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = layers();
        let archive = dir.path().join("image.tar");
        fs::write(&archive, oci_archive(&[lower, upper])).unwrap();
        let stage = stage_in(dir.path());
        import_image(&archive, &stage, dir.path()).unwrap();
        assert_layers_applied(stage.path());
    }

    /// A `docker save` archive of `layers` (each `lN/layer.tar`), its
    /// config's diff_ids from `diff_ids`.
    fn docker_archive(layers: &[&[u8]], diff_ids: &[&[u8]]) -> Vec<u8> {
        let ids: Vec<String> = diff_ids
            .iter()
            .map(|tar| format!("sha256:{}", kiln_image::hex(&Sha256::digest(tar))))
            .collect();
        let config =
            serde_json::to_vec(&serde_json::json!({"rootfs": {"type": "layers", "diff_ids": ids}}))
                .unwrap();
        let names: Vec<String> = (0..layers.len())
            .map(|n| format!("l{n}/layer.tar"))
            .collect();
        let manifest = serde_json::to_vec(
            &serde_json::json!([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": names}]),
        )
        .unwrap();
        let mut files: Vec<(&str, &[u8])> = vec![("manifest.json", &manifest), ("c.json", &config)];
        files.extend(names.iter().map(String::as_str).zip(layers.iter().copied()));
        tar_files(&files)
    }

    #[test]
    fn docker_save_archives_are_read_too() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = layers();
        let plain_upper = {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&upper[..])
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        let archive = dir.path().join("saved.tar");
        fs::write(
            &archive,
            docker_archive(&[&lower, &upper], &[&lower, &plain_upper]),
        )
        .unwrap();
        let stage = stage_in(dir.path());
        import_image(&archive, &stage, dir.path()).unwrap();
        assert_layers_applied(stage.path());
    }

    #[test]
    fn the_image_config_and_names_come_with_the_layers() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_of(&[("hello", Some("hi"))]);
        let config = serde_json::json!({
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", kiln_image::hex(&Sha256::digest(&layer)))]},
            "config": {
                "Entrypoint": ["/entry.sh"], "Cmd": ["serve", "-v"],
                "Env": ["PATH=/bin", "A=1=2", "A=3"], "WorkingDir": "/srv", "User": "app:staff",
                "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}, "Labels": {"org.example": "yes"},
                "Volumes": null, "StopSignal": "SIGTERM"
            }
        });
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!([{"Config": "c.json", "RepoTags": ["web:1.2"], "Layers": ["l/layer.tar"]}])).unwrap();
        let archive = dir.path().join("saved.tar");
        fs::write(
            &archive,
            tar_files(&[
                ("manifest.json", &manifest),
                ("c.json", &config),
                ("l/layer.tar", &layer),
            ]),
        )
        .unwrap();
        let settings = import_image(&archive, &stage_in(dir.path()), dir.path()).unwrap();
        assert_eq!(settings.entrypoint, ["/entry.sh"]);
        assert_eq!(settings.cmd, ["serve", "-v"]);
        assert_eq!(settings.env["A"], "3", "a later duplicate wins");
        assert_eq!(settings.env["PATH"], "/bin");
        assert_eq!(
            (settings.workdir.as_deref(), settings.user.as_deref()),
            (Some("/srv"), Some("app:staff"))
        );
        assert_eq!(settings.exposed_ports, ["53/udp", "8080/tcp"]);
        assert_eq!(settings.labels["org.example"], "yes");
        assert_eq!(settings.names, ["web:1.2"]);
        let run = settings.run_config("web").unwrap();
        assert_eq!(run.argv(), ["/entry.sh", "serve", "-v"]);
        assert_eq!(
            (run.hostname.as_str(), run.workdir.as_str()),
            ("web", "/srv")
        );

        // A bad Env entry is named.
        let bad = String::from_utf8(config)
            .unwrap()
            .replace("\"A=3\"", "\"NOVALUE\"");
        let manifest = serde_json::to_vec(
            &serde_json::json!([{"Config": "c.json", "Layers": ["l/layer.tar"]}]),
        )
        .unwrap();
        fs::write(
            &archive,
            tar_files(&[
                ("manifest.json", &manifest),
                ("c.json", bad.as_bytes()),
                ("l/layer.tar", &layer),
            ]),
        )
        .unwrap();
        let stage = Stage::create(&dir.path().join("stage2")).unwrap();
        let err = import_image(&archive, &stage, &scratch(dir.path(), "s2")).unwrap_err();
        assert!(
            err.to_string().contains("\"NOVALUE\": expected KEY=VALUE"),
            "{err}"
        );
    }

    #[test]
    fn oci_names_are_whole_references_only() {
        let names = |pairs: &[(&str, &str)]| {
            oci_names(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert!(names(&[(REF_NAME, "latest")]).is_empty());
        assert_eq!(names(&[(REF_NAME, "web:1.0")]), ["web:1.0"]);
        assert_eq!(
            names(&[
                (REF_NAME, "latest"),
                (CONTAINERD_NAME, "docker.io/library/busybox:latest")
            ]),
            ["docker.io/library/busybox:latest"]
        );
    }

    #[test]
    fn bad_archives_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("plain.tar");
        fs::write(&archive, tar_of(&[("hello", Some("hi"))])).unwrap();
        let err = import_image(&archive, &stage_in(dir.path()), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain.tar: not an OCI image layout"), "{err}");
        let err = safe_relative(Path::new("../../etc/passwd"), &archive)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsafe path"), "{err}");
        // A rootfs tarball is one layer.
        let rootfs = Stage::create(&dir.path().join("rootfs")).unwrap();
        import_tarball(&archive, &rootfs).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("rootfs/hello")).unwrap(),
            "hi"
        );
    }

    /// Issue 16, case 2: `l1 -> /victim` then `l1/.wh..wh..opq` emptied a
    /// host directory, `l2/.wh.important` deleted a host file, and a file
    /// entry under a symlinked directory removed a host directory.
    #[test]
    fn whiteouts_and_replacements_never_follow_planted_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = victim(dir.path());
        let abs = outside.as_os_str().as_bytes();
        // From <dir>/stage, `../outside` is the victim unless resolution
        // stays inside the stage.
        let lower = raw_tar(&[
            link(b"l1", abs),
            link(b"l2", abs),
            link(b"l3", b"../outside"),
            link(b"l4", b"../../../../../../../../../../../.."),
        ]);
        let mut l4 = b"l4".to_vec();
        l4.extend_from_slice(abs);
        l4.extend_from_slice(b"/sub");
        let upper = raw_tar(&[
            file(b"l1/.wh..wh..opq", b""),
            file(b"l2/.wh.important", b""),
            file(b"l3/sub", b"a file where the victim has a directory"),
            directory(b"l3/important"),
            file(&l4, b"through a climbing link"),
        ]);
        let archive = dir.path().join("hostile.tar");
        fs::write(&archive, oci_archive(&[lower, upper])).unwrap();
        let stage = stage_in(dir.path());
        if let Err(err) = import_image(&archive, &stage, dir.path()) {
            // Refusing is fine (a link to a directory the stage lacks);
            // touching the outside is not.
            assert!(crate::chain(&err).contains("hostile.tar"), "{err}");
        }
        assert_untouched(&outside);
        // With the links' targets present inside the stage, the same
        // layers apply, and what they do lands there.
        let stage = Stage::create(&dir.path().join("stage2")).unwrap();
        let inside = stage.path().join(outside.strip_prefix("/").unwrap());
        fs::create_dir_all(inside.join("sub")).unwrap();
        fs::write(inside.join("important"), "inside").unwrap();
        fs::create_dir_all(stage.path().join("outside")).unwrap();
        let scratch = dir.path().join("scratch2");
        fs::create_dir(&scratch).unwrap();
        import_image(&archive, &stage, &scratch).unwrap();
        assert_untouched(&outside);
        // Emptied by the opaque whiteout, then the climbing link's file.
        let names: Vec<_> = fs::read_dir(&inside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sub"]);
        assert_eq!(
            fs::read_to_string(inside.join("sub")).unwrap(),
            "through a climbing link"
        );
        assert!(stage.path().join("outside/important").is_dir());
        assert!(stage.path().join("outside/sub").is_file());
    }

    /// Issue 16: a layer that was a symlink to a host tar imported that
    /// host file, and no blob was checked against its digest.
    #[test]
    fn blobs_must_match_their_digests_and_cannot_be_links_out() {
        let dir = tempfile::tempdir().unwrap();
        let outside = victim(dir.path());
        let host_tar = outside.join("sub/host.tar");
        let secret = tar_of(&[("secret", Some("host data"))]);
        // The victim directory gets a file for this test: compare after.
        let good = tar_of(&[("ok", Some("fine"))]);
        let hex = kiln_image::hex(&Sha256::digest(&secret));
        let mut archive_bytes = oci_archive(std::slice::from_ref(&good));
        // Point the one layer's blob at the host's tar instead.
        let manifest = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "layers": [{"digest": format!("sha256:{hex}")}]})).unwrap();
        let manifest_hex = kiln_image::hex(&Sha256::digest(&manifest));
        let index = serde_json::to_vec(
            &serde_json::json!({"manifests": [{"digest": format!("sha256:{manifest_hex}")}]}),
        )
        .unwrap();
        let manifest_name = format!("blobs/sha256/{manifest_hex}");
        let blob_name = format!("blobs/sha256/{hex}");
        let host = host_tar.as_os_str().as_bytes().to_vec();
        let linked = raw_tar(&[
            file(b"index.json", &index),
            file(manifest_name.as_bytes(), &manifest),
            link(blob_name.as_bytes(), &host),
        ]);
        fs::write(&host_tar, &secret).unwrap();
        let archive = dir.path().join("linked.tar");
        fs::write(&archive, &linked).unwrap();
        let stage = stage_in(dir.path());
        let err = import_image(&archive, &stage, &scratch(dir.path(), "s1")).unwrap_err();
        assert!(
            !stage.path().join("secret").exists(),
            "the host tar was imported"
        );
        assert!(crate::chain(&err).contains(&hex), "{err}");
        fs::remove_file(&host_tar).unwrap();
        assert_untouched(&outside);

        // A blob whose bytes are not what its digest says.
        let tampered = {
            let good_hex = kiln_image::hex(&Sha256::digest(&good));
            let at = archive_bytes.windows(4).position(|w| w == b"fine").unwrap();
            archive_bytes[at..at + 4].copy_from_slice(b"evil");
            (good_hex, archive_bytes)
        };
        fs::write(&archive, &tampered.1).unwrap();
        let stage = Stage::create(&dir.path().join("stage2")).unwrap();
        let err = import_image(&archive, &stage, &scratch(dir.path(), "s2"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("but its manifest says sha256:{}", tampered.0)),
            "{err}"
        );
        // docker save: the uncompressed layer against its diff_id.
        let archive = dir.path().join("saved.tar");
        fs::write(&archive, docker_archive(&[&good], &[&secret])).unwrap();
        let stage = Stage::create(&dir.path().join("stage3")).unwrap();
        let err = import_image(&archive, &stage, &scratch(dir.path(), "s3"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("but its manifest says"), "{err}");
    }

    /// Issue 16, case 1's source: names that carry commands.
    #[test]
    fn names_with_control_characters_or_dots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (name, expect) in [
            (&b"a\"\nwrite /etc/passwd x\n"[..], "control character"),
            (b"../../escape", "unsafe path"),
            (b"ok/../../escape", "unsafe path"),
        ] {
            let tarball = dir.path().join("t.tar");
            fs::write(&tarball, raw_tar(&[file(name, b"x")])).unwrap();
            let stage = Stage::create(&dir.path().join("s")).unwrap();
            let err = crate::chain(&import_tarball(&tarball, &stage).unwrap_err());
            assert!(
                err.contains(expect) && err.contains("t.tar"),
                "{name:?}: {err}"
            );
            fs::remove_dir_all(stage.path()).unwrap();
        }
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn hard_links_devices_and_owners() {
        let dir = tempfile::tempdir().unwrap();
        let mut setuid = header(tar::EntryType::Regular, 2);
        setuid.set_mode(0o4755);
        setuid.set_uid(1000);
        setuid.set_gid(1000);
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_data(&mut setuid, "bin/su", &b"su"[..])
            .unwrap();
        builder
            .append_link(&mut header(tar::EntryType::Link, 0), "bin/su2", "bin/su")
            .unwrap();
        builder
            .append_data(
                &mut header(tar::EntryType::Char, 0),
                "dev/null",
                io::empty(),
            )
            .unwrap();
        let tarball = dir.path().join("t.tar");
        fs::write(&tarball, builder.into_inner().unwrap()).unwrap();
        let stage = stage_in(dir.path());
        import_tarball(&tarball, &stage).unwrap();
        use std::os::unix::fs::MetadataExt;
        let su = fs::metadata(stage.path().join("bin/su")).unwrap();
        assert_eq!(
            (su.mode() & 0o7777, su.uid(), su.nlink()),
            (0o4755, 1000, 2)
        );
        assert!(
            !stage.path().join("dev/null").exists(),
            "devices come from devtmpfs"
        );
    }
}
