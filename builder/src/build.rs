//! `kiln build`: recipe → root tree → ext4 → compressed image → store.
//!
//! A build ends staged ([`Staged`]): the compressed image sits in the
//! store's scratch space, where the caller boots it to run the recipe's
//! tests (`kiln_control::image_test`: this crate boots nothing), and only
//! then publishes it, or drops it and leaves nothing behind.
//!
//! The recipe's `in = "vm"` build steps run after the tree is assembled
//! (Image Builder's build phase): the tree becomes a raw ext4, a
//! [`BuildVm`] (the control plane's: this crate boots nothing) boots it
//! as a writable root disk once per step, and what the steps left is
//! read back into a tree, of which the image is made.
//!
//! The cache key hashes everything the build reads: the recipe's
//! directory (its recipe, sources and build inputs), the `[[files]]`
//! sources, the binaries and their libraries, guest-init, the parent
//! image's digest or the imported archive, the image format, and with
//! VM steps the build VM's own inputs (its kernel). Same key, same
//! image: the stored one is reused.
//!
//! Reproducible: the same inputs give the same bytes. The filesystem is
//! always made from a tree by [`ext4::make`], which fixes every
//! timestamp, the UUID and the directory hash seed, never kept as a
//! guest wrote it (with its clock's times and its journal): what differs
//! between two builds is only what a step itself writes differently
//! (a random machine-id, a log with the date).
//!
//! [`publish_child`] publishes a raw filesystem made elsewhere (an
//! instance's root volume, by `kiln commit`) as a child image, through the
//! same compression and publication.
use std::error::Error;
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::assemble::{self, AssembleError};
use crate::elf::{self, ElfError};
use crate::ext4::{self, Ext4Error};
use crate::oci::{self, OciError};
use crate::recipe::{self, Base, BuildVmSize, Recipe, RecipeError, Size, StepPlace};
use crate::stage::{Stage, StageError};
use crate::store::{self, IMAGE_FILE, Manifest, Store, StoreError, StoredImage, TestResult};
use kiln_image::{self as image, DEFAULT_CHUNK_SIZE, ImageError};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The recipe does not load.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// The root tree could not be put together.
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    /// A binary or one of its libraries could not be resolved.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// Making the filesystem, or reading the parent's, failed.
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    /// Compressing the filesystem, or reading the parent image, failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The `oci:` or `tar:` base could not be imported.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// The directory the root tree is built in could not be made.
    #[error("cannot prepare the build stage")]
    Stage(#[from] StageError),
    /// The recipe's `base` names an image the store does not hold.
    #[error("{recipe}: base image {base} is not in the store; build it first")]
    MissingBase {
        /// The recipe file.
        recipe: PathBuf,
        /// The base's NAME:VERSION.
        base: String,
    },
    /// Following `base` from image to parent comes back to the image
    /// being built.
    #[error("{recipe}: base {base} leads back to {image} itself (a cycle: {chain})")]
    Cycle {
        /// The recipe file.
        recipe: PathBuf,
        /// The recipe's base.
        base: String,
        /// The image the recipe builds.
        image: String,
        /// The references followed, " -> " between them.
        chain: String,
    },
    /// A file the cache key covers could not be read.
    #[error("cannot read {path} for the cache key")]
    Input {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The recipe has `in = "vm"` steps and the build was given no
    /// [`BuildVm`] to run them.
    #[error("{recipe}: build {step} runs in a VM (`in = \"vm\"`), and this build cannot boot one")]
    NoBuildVm {
        /// The recipe file.
        recipe: PathBuf,
        /// The first VM step, described.
        step: String,
    },
    /// The build VM of a step could not be run at all.
    #[error("cannot run build {step} in the build VM")]
    BuildVm {
        /// The step, described.
        step: String,
        /// What went wrong.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// A step ran in the build VM and did not succeed: nothing is
    /// published.
    #[error("build {step} failed in the build VM: {end}")]
    VmStepFailed {
        /// The step, described.
        step: String,
        /// How it ended.
        end: StepEnd,
    },
    /// A new image's reference ([`check_new`]) is malformed.
    #[error(
        "{0:?}: expected NAME:VERSION, NAME 1-64 of a-z 0-9 - _ . starting with a letter or digit, VERSION semver such as 1.0.0"
    )]
    BadReference(String),
    /// A new image's NAME:VERSION ([`check_new`]) is in the store
    /// already: a published image is never replaced.
    #[error("{0} is already in the store: choose another NAME:VERSION, or `kiln rm {0}` first")]
    Exists(String),
    /// An imported archive's image config names no command to run.
    #[error("{0}: the image config has neither Entrypoint nor Cmd: nothing to run")]
    NoCommand(PathBuf),
    /// An imported archive names its image with no reference Kiln can use,
    /// and none was given.
    #[error(
        "{archive}: {found}: give the image's NAME:VERSION (VERSION semver such as 1.0.0) after the archive"
    )]
    Unnamed {
        /// The archive.
        archive: PathBuf,
        /// What the archive says, for the person to choose from.
        found: String,
    },
}

/// A `[[build]]` step with `in = "vm"`, ready for the build VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStep {
    /// The step for people: `step 2 (dpkg -i /build/hello.deb)`.
    pub label: String,
    /// The guest's entrypoint, words split on spaces (as
    /// `kiln.entrypoint=` splits them): the image's /bin/sh and the
    /// step's script in the image.
    pub command: String,
    /// Seconds after which the VM is killed and the step fails.
    pub timeout_secs: u64,
    /// The build VM's size, from the recipe's `[build_vm]`.
    pub size: BuildVmSize,
}

/// How a step in the build VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepEnd {
    /// Its command exited with this status (the VM process's own).
    Exited(u8),
    /// It was killed at its timeout, after this many seconds.
    TimedOut(u64),
    /// The VM process ended without an exit status (killed by a signal).
    NoStatus,
}

impl fmt::Display for StepEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepEnd::Exited(status) => write!(f, "exit status {status}"),
            StepEnd::TimedOut(secs) => write!(f, "timed out after {secs} s"),
            StepEnd::NoStatus => f.write_str("the VM ended without an exit status"),
        }
    }
}

/// Boots build VMs: implemented by the control plane, which owns VM
/// processes, and handed to [`build`] (this crate boots nothing).
pub trait BuildVm {
    /// Host files besides the recipe's that a VM step's result depends
    /// on (the guest kernel: `uname -r` in a step sees it): the build
    /// key covers them.
    fn inputs(&self) -> Vec<PathBuf>;

    /// Boots a VM whose writable root disk is the raw ext4 `root` and
    /// whose second disk is the raw ext4 `recipe_dir` (the recipe's
    /// directory), read-only, runs `step`'s command as its entrypoint
    /// with no network, shows its console output to the user as it
    /// comes, and says how it ended. The guest's writes stay in `root`.
    fn run_step(
        &self,
        root: &Path,
        recipe_dir: &Path,
        step: &VmStep,
    ) -> Result<StepEnd, Box<dyn Error + Send + Sync>>;
}

/// Room the build VM's disk has beyond what the image will: a step's
/// downloads and unpacking need space that the image, made again from
/// what the steps left, does not keep. The raw file is sparse: unused
/// room costs nothing.
const BUILD_VM_ROOM: u64 = 1 << 30;

/// What a build produced.
#[derive(Debug)]
pub enum Built {
    /// The stored image of the same inputs, reused as it is.
    Cached(Manifest),
    /// A new image, not in the store yet.
    Staged(Staged),
}

/// A built image waiting in the store's scratch space: its tests boot
/// [`Staged::image_path`], then [`Staged::publish`] moves it into the
/// store. Dropped unpublished, it is deleted: a failed test leaves
/// nothing, in the store or beside it.
#[derive(Debug)]
pub struct Staged {
    store: Store,
    /// Owns everything staged; removed on drop.
    _scratch: kiln_vmm::durable::ScratchDir,
    /// The directory [`Store::publish`] renames into place.
    dir: PathBuf,
    manifest: Manifest,
}

impl Staged {
    /// The manifest the image will be published with (no test results).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The compressed image file, bootable as it is.
    pub fn image_path(&self) -> PathBuf {
        self.dir.join(IMAGE_FILE)
    }

    /// Publishes the image with `test_results` (`None`: its tests were
    /// skipped) in its manifest, atomically ([`Store::publish`]).
    pub fn publish(
        mut self,
        test_results: Option<Vec<TestResult>>,
    ) -> Result<Manifest, BuildError> {
        self.manifest.test_results = test_results;
        self.store.publish(&self.dir, &self.manifest)?;
        Ok(self.manifest)
    }
}

/// Builds the recipe at `recipe_path` for `store`, with `guest_init` as
/// every image's /sbin/init, up to a [`Staged`] image; `vm` runs the
/// recipe's `in = "vm"` steps (a recipe with some and no `vm` is
/// refused). The stored image of the same inputs is reused instead,
/// unless it was published untested and this build runs the tests
/// (`skip_tests` false): then it is built again, to be tested.
/// `progress` hears about each long step.
pub fn build(
    recipe_path: &Path,
    store: &Store,
    guest_init: &Path,
    skip_tests: bool,
    vm: Option<&dyn BuildVm>,
    progress: &mut dyn FnMut(&str),
) -> Result<Built, BuildError> {
    let recipe = recipe::load(recipe_path)?;
    let vm = vm_for_steps(&recipe, vm)?;
    let parent = resolve_base(&recipe, store)?;
    let parent_manifest = parent.as_ref().map(|p| &p.manifest);
    let vm_inputs = vm.map(BuildVm::inputs).unwrap_or_default();
    let build_key = build_key(&recipe, guest_init, &vm_inputs, parent_manifest)?;
    if let Some(manifest) = cached(store, &recipe, &build_key, skip_tests)? {
        return Ok(Built::Cached(manifest));
    }

    let scratch = store.scratch_dir()?;
    let stage = Stage::create(&scratch.path().join("root"))?;
    let settings = stage_base(&recipe, parent.as_ref(), &stage, scratch.path(), progress)?;
    progress("assembling the root tree");
    let base_run = settings.as_ref().and_then(|s| s.run_config(&recipe.name));
    let entrypoint = assemble::assemble(&recipe, &stage, guest_init, base_run.as_ref())?;
    let stage = match vm {
        Some(vm) => {
            let uuid = uuid_from(&build_key);
            run_vm_steps(&recipe, stage, vm, scratch.path(), &uuid, progress)?
        }
        None => stage,
    };
    let (publish, info) = pack(
        &stage,
        scratch.path(),
        parent.as_ref(),
        (recipe.size, &build_key),
        progress,
    )?;
    let manifest = new_manifest(
        &recipe,
        build_key,
        parent_manifest,
        settings,
        &info,
        entrypoint,
    )?;
    Ok(Built::Staged(Staged {
        store: store.clone(),
        _scratch: scratch,
        dir: publish,
        manifest,
    }))
}

/// The build VM the recipe's `in = "vm"` steps run in: `vm`, or `None`
/// when the recipe has no such steps (then `vm`'s inputs stay out of the
/// build key). A recipe with some and no `vm` is refused before anything
/// is built, naming its first VM step.
fn vm_for_steps<'a>(
    recipe: &Recipe,
    vm: Option<&'a dyn BuildVm>,
) -> Result<Option<&'a dyn BuildVm>, BuildError> {
    let first_vm_step = (recipe.builds.iter().enumerate())
        .find(|(_, step)| matches!(step.place, StepPlace::Vm { .. }));
    match (first_vm_step, vm) {
        (Some((index, step)), None) => Err(BuildError::NoBuildVm {
            recipe: recipe.path.clone(),
            step: step.describe(index),
        }),
        (Some(_), Some(vm)) => Ok(Some(vm)),
        (None, _) => Ok(None),
    }
}

/// The manifest of the stored image of `recipe` to reuse instead of
/// building: one with the same `build_key` whose image file is there,
/// and, unless `skip_tests`, that was tested (an untested one is built
/// again, for this build to test it).
fn cached(
    store: &Store,
    recipe: &Recipe,
    build_key: &str,
    skip_tests: bool,
) -> Result<Option<Manifest>, BuildError> {
    Ok(store
        .get(&recipe.name, &recipe.version)?
        .filter(|stored| {
            stored.manifest.build_key == build_key
                && stored.image_path.is_file()
                && (skip_tests || !stored.manifest.untested())
        })
        .map(|stored| stored.manifest))
}

/// Puts the recipe's base into `stage`: the `parent` image's files, an
/// imported `oci:` archive's or `tar:` tarball's, or nothing for
/// `scratch`. Returns what an `oci:` archive says besides its files (its
/// run configuration, ports and labels), which the image inherits.
fn stage_base(
    recipe: &Recipe,
    parent: Option<&StoredImage>,
    stage: &Stage,
    scratch: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<oci::ImageSettings>, BuildError> {
    match (&recipe.base, parent) {
        (_, Some(parent)) => {
            progress(&format!("unpacking {}", parent.manifest.reference()));
            let reader = image::Reader::open(&parent.image_path)?;
            ext4::extract(
                image::CachedReader::new(reader, image::DEFAULT_CACHE_BYTES),
                stage,
            )?;
        }
        (Base::Oci(archive), None) => {
            progress(&format!("importing {}", archive.display()));
            return Ok(Some(oci::import_image(archive, stage, scratch)?));
        }
        (Base::Tarball(tarball), None) => {
            progress(&format!("importing {}", tarball.display()));
            oci::import_tarball(tarball, stage)?;
        }
        (Base::Scratch | Base::Image { .. }, None) => {}
    }
    Ok(None)
}

/// The manifest a built image is staged with (no test results yet),
/// `info` describing its compressed file.
fn new_manifest(
    recipe: &Recipe,
    build_key: String,
    parent: Option<&Manifest>,
    settings: Option<oci::ImageSettings>,
    info: &image::ImageInfo,
    entrypoint: Vec<String>,
) -> Result<Manifest, BuildError> {
    // What the image says of itself: the container image's, or the parent's.
    let (exposed_ports, labels) = match (settings, parent) {
        (Some(settings), _) => (settings.exposed_ports, settings.labels),
        (None, Some(parent)) => (parent.exposed_ports.clone(), parent.labels.clone()),
        (None, None) => Default::default(),
    };
    Ok(Manifest {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        description: recipe.description.clone(),
        digest: format!("sha256:{}", info.digest),
        parent: parent.map(Manifest::reference),
        recipe_digest: hash_file(&recipe.path)?,
        build_key,
        raw_size: info.raw_size,
        file_size: info.file_size,
        entrypoint,
        exposed_ports,
        labels,
        tests: recipe.tests.clone(),
        test_results: None,
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    })
}

/// The size of the filesystem holding `stage`: `size` if fixed, or the
/// content and its `free` space.
fn fs_size(size: Size, stage: &Stage) -> Result<u64, BuildError> {
    Ok(match size {
        Size::Fixed(bytes) => bytes.div_ceil(4096) * 4096,
        Size::Free(free) => ext4::size_for(ext4::content_size(stage.path())?, free),
    })
}

/// Runs the recipe's `in = "vm"` steps on the assembled `stage`: makes
/// it a raw ext4 in `scratch` (with [`BUILD_VM_ROOM`] to spare), and the
/// recipe's directory another, boots them once per step, in order, and
/// reads what the steps left into a new stage, which it returns. The
/// first step that fails ends the build.
fn run_vm_steps(
    recipe: &Recipe,
    stage: Stage,
    vm: &dyn BuildVm,
    scratch: &Path,
    uuid: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Stage, BuildError> {
    let (steps, set_aside) = assemble::prepare_vm_steps(recipe, &stage)?;
    let size = fs_size(recipe.size, &stage)? + BUILD_VM_ROOM;
    let disk = scratch.join("build-vm.ext4");
    progress(&format!("making the build VM's {} MiB disk", size >> 20));
    ext4::make_scratch(stage.path(), &disk, size, uuid)?;
    let _ = fs::remove_dir_all(stage.path());
    let recipe_disk = recipe_disk(recipe, scratch, uuid)?;
    for step in &steps {
        progress(&format!("running build {} in a VM", step.label));
        let end = vm
            .run_step(&disk, &recipe_disk, step)
            .map_err(|source| BuildError::BuildVm {
                step: step.label.clone(),
                source,
            })?;
        if end != StepEnd::Exited(0) {
            return Err(BuildError::VmStepFailed {
                step: step.label.clone(),
                end,
            });
        }
    }
    // guest-init syncs and remounts / read-only before the VM ends; a
    // journal left to replay all the same is replayed, as a mount would.
    ext4::replay_journal(&disk)?;
    progress("reading back what the build VM left");
    let after = Stage::create(&scratch.join("root-built"))?;
    let file = File::open(&disk).map_err(|source| BuildError::Input {
        path: disk.clone(),
        source,
    })?;
    ext4::extract(file, &after)?;
    let _ = fs::remove_file(&disk);
    assemble::finish_vm_steps(&after, set_aside)?;
    Ok(after)
}

/// The recipe's directory as a raw ext4 in `scratch`, for the build VM,
/// with a UUID of its own derived from the root's `uuid` (two disks of one
/// VM with the same UUID would confuse anything that mounts by UUID).
fn recipe_disk(recipe: &Recipe, scratch: &Path, uuid: &str) -> Result<PathBuf, BuildError> {
    let tree = Stage::create(&scratch.join("recipe-dir"))?;
    assemble::copy_recipe_dir(recipe, &tree)?;
    let size = ext4::size_for(ext4::content_size(tree.path())?, 0);
    let disk = scratch.join("recipe-dir.ext4");
    let own_uuid = uuid_from(&image::hex(&Sha256::digest(format!("{uuid}\0recipe-dir"))));
    ext4::make_scratch(tree.path(), &disk, size, &own_uuid)?;
    let _ = fs::remove_dir_all(tree.path());
    Ok(disk)
}

/// `kiln image import`: publishes the container image in `archive` (an
/// OCI image layout tar or `docker save` output) as an image of its own,
/// with no recipe: its layers, `guest_init` as /sbin/init, and its image
/// config as the run configuration. It is named `reference`, or else by
/// the archive ([`reference_from`]). Nothing is left in the store on
/// failure.
pub fn import(
    store: &Store,
    archive: &Path,
    reference: Option<&str>,
    guest_init: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, BuildError> {
    if let Some(reference) = reference {
        check_new(store, reference)?;
    }
    let scratch = store.scratch_dir()?;
    let stage = Stage::create(&scratch.path().join("root"))?;
    progress(&format!("importing {}", archive.display()));
    let settings = oci::import_image(archive, &stage, scratch.path())?;
    let reference = match reference {
        Some(reference) => reference.to_string(),
        None => reference_from(archive, &settings.names)?,
    };
    let (name, version) = check_new(store, &reference)?;
    let config = settings
        .run_config(&name)
        .ok_or_else(|| BuildError::NoCommand(archive.into()))?;
    assemble::finish_import(archive, &stage, guest_init, &config)?;
    let mut hasher = Sha256::new();
    hasher.update(format!("kiln-image-format-{}\0import\0", image::VERSION));
    hash_tree(archive, &mut hasher)?;
    hash_tree(guest_init, &mut hasher)?;
    let build_key = image::hex(&hasher.finalize());
    let size = Size::Free(recipe::DEFAULT_FREE);
    let (publish, info) = pack(&stage, scratch.path(), None, (size, &build_key), progress)?;
    let description = settings
        .labels
        .get(DESCRIPTION_LABEL)
        .cloned()
        .unwrap_or_else(|| format!("imported from {}", archive.display()));
    let manifest = Manifest {
        name,
        version,
        description,
        digest: format!("sha256:{}", info.digest),
        parent: None,
        recipe_digest: String::new(),
        build_key,
        raw_size: info.raw_size,
        file_size: info.file_size,
        entrypoint: config.argv(),
        exposed_ports: settings.exposed_ports,
        labels: settings.labels,
        tests: Vec::new(),
        test_results: None,
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    // As for a commit: the reference may have been taken meanwhile.
    check_new(store, &reference)?;
    store.publish(&publish, &manifest)?;
    Ok(manifest)
}

/// The label an OCI image describes itself in (OCI image spec,
/// "Pre-Defined Annotation Keys").
const DESCRIPTION_LABEL: &str = "org.opencontainers.image.description";

/// The first of an archive's `names` that makes a Kiln NAME:VERSION: the
/// repository's last path component as the name, the tag as the
/// version, semver, or a release number of one or two parts padded with
/// `.0` (`1.36` → `1.36.0`). `latest`, digests and other tags do not.
pub fn reference_from(archive: &Path, names: &[String]) -> Result<String, BuildError> {
    let convert = |full: &str| {
        let last = full.rsplit('/').next()?;
        let (name, tag) = last.split_once(':')?;
        let padded = match tag.split('.').count() {
            1 => format!("{tag}.0.0"),
            2 => format!("{tag}.0"),
            _ => tag.to_string(),
        };
        let version = semver::Version::parse(tag)
            .or_else(|_| semver::Version::parse(&padded))
            .ok()?;
        recipe::is_image_name(name).then(|| format!("{name}:{version}"))
    };
    names
        .iter()
        .find_map(|full| convert(full))
        .ok_or_else(|| BuildError::Unnamed {
            archive: archive.into(),
            found: match names {
                [] => "the archive does not name its image".into(),
                names => format!(
                    "the archive names its image {}, with no semver tag",
                    names.join(", ")
                ),
            },
        })
}

/// Makes the stage's tree an ext4 of `size` (its filesystem's UUID from
/// `build_key`) and compresses it into `scratch/publish/` ([`compress`]),
/// sharing `parent`'s chunks. The tree and the raw filesystem (as big as
/// the image's disk) go as soon as they are used: a staged image's tests
/// boot the compressed one. One that cannot be removed here goes with the
/// scratch directory.
fn pack(
    stage: &Stage,
    scratch: &Path,
    parent: Option<&StoredImage>,
    (size, build_key): (Size, &str),
    progress: &mut dyn FnMut(&str),
) -> Result<(PathBuf, image::ImageInfo), BuildError> {
    let size = fs_size(size, stage)?;
    progress(&format!("making a {} MiB ext4", size >> 20));
    let raw = scratch.join("root.ext4");
    ext4::make(stage.path(), &raw, size, &uuid_from(build_key))?;
    progress("compressing");
    let packed = compress(&raw, scratch, parent)?;
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_dir_all(stage.path());
    Ok(packed)
}

/// Compresses the raw filesystem `raw` into `scratch/publish/`, the
/// directory [`Store::publish`] takes. A child stores only the chunks its
/// `parent` lacks, and the directory gets hard links to the files of the
/// parent's that hold the others (its layers, see `kiln_image`): the
/// directory's rename publishes them with it, and a file's link count is
/// how many stored images use it, so removing any image frees exactly
/// the files no other image links.
fn compress(
    raw: &Path,
    scratch: &Path,
    parent: Option<&StoredImage>,
) -> Result<(PathBuf, image::ImageInfo), BuildError> {
    let publish = scratch.join("publish");
    fs::create_dir(&publish).map_err(|source| StoreError::Io {
        path: publish.clone(),
        source,
    })?;
    let out = publish.join(IMAGE_FILE);
    let Some(parent) = parent else {
        return Ok((publish, image::write(raw, &out, DEFAULT_CHUNK_SIZE)?));
    };
    let reader = image::Reader::open(&parent.image_path)?;
    let digest = parent.file_digest()?;
    let of = image::Parent {
        reader: &reader,
        digest,
    };
    let info = image::write_child(raw, &out, DEFAULT_CHUNK_SIZE, of)?;
    for layer in &info.layers {
        let from = if *layer == digest {
            parent.image_path.clone()
        } else {
            image::layer_path(&parent.image_path, layer)
        };
        let to = image::layer_path(&out, layer);
        link_or_copy(&from, &to).map_err(|source| StoreError::Link { from, to, source })?;
    }
    Ok((publish, info))
}

/// Hard-links `from` as `to`, or, where the parent is on another
/// filesystem (a store whose image directories are symlinks elsewhere, as
/// the e2e harness makes), copies it and makes the copy durable: the
/// child then stores the parent's file again, but reads the same.
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match fs::hard_link(from, to) {
        Err(err) if err.kind() == std::io::ErrorKind::CrossesDevices => {
            fs::copy(from, to)?;
            File::open(to)?.sync_all()
        }
        linked => linked,
    }
}

/// Checks that `reference` can name a new image: NAME:VERSION with the
/// names and versions recipes allow, and not in the store yet. Returns
/// the name and the version.
pub fn check_new(store: &Store, reference: &str) -> Result<(String, String), BuildError> {
    let bad = || BuildError::BadReference(reference.into());
    let (name, version) = store::parse_reference(reference).map_err(|_| bad())?;
    let version = semver::Version::parse(version).map_err(|_| bad())?;
    if !recipe::is_image_name(name) {
        return Err(bad());
    }
    let version = version.to_string();
    if store.get(name, &version)?.is_some() {
        return Err(BuildError::Exists(format!("{name}:{version}")));
    }
    Ok((name.to_string(), version))
}

/// Publishes the raw filesystem `raw` (an instance's root volume, say) as
/// the new image `reference`, a child of `parent`, compressed and
/// published as a build is. An ext4 journal left to replay (the guest did
/// not unmount it) is replayed first, in `raw` itself, as the next mount
/// would: the image then boots read-only and reads whole through the
/// `ext4` crate, as a child build's base or for `kiln inspect`.
/// Its manifest is the one a recipe with `base = parent` and nothing else
/// would get: the parent's entrypoint, no tests. With no recipe, the
/// recipe digest is empty and the build key is the SHA-256 of the image
/// format and the raw bytes: the same filesystem, the same key. Refuses a
/// reference the store already has; on failure nothing is left in the
/// store.
pub fn publish_child(
    store: &Store,
    raw: &Path,
    reference: &str,
    parent: &Manifest,
    description: String,
) -> Result<Manifest, BuildError> {
    let (name, version) = check_new(store, reference)?;
    ext4::replay_journal(raw)?;
    let build_key = content_key(raw)?;
    let scratch = store.scratch_dir()?;
    let stored_parent = store.find(&parent.reference())?;
    let (publish, info) = compress(raw, scratch.path(), Some(&stored_parent))?;
    let manifest = Manifest {
        name,
        version,
        description,
        digest: format!("sha256:{}", info.digest),
        parent: Some(parent.reference()),
        recipe_digest: String::new(),
        build_key,
        raw_size: info.raw_size,
        file_size: info.file_size,
        entrypoint: parent.entrypoint.clone(),
        exposed_ports: parent.exposed_ports.clone(),
        labels: parent.labels.clone(),
        tests: Vec::new(),
        test_results: None,
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    // Compressing takes a while: another build or commit may have taken
    // the reference meanwhile, and a publish would replace its image.
    check_new(store, reference)?;
    store.publish(&publish, &manifest)?;
    Ok(manifest)
}

/// SHA-256 of the image format and the raw filesystem `raw`, hex.
fn content_key(raw: &Path) -> Result<String, BuildError> {
    let err = |source| BuildError::Input {
        path: raw.into(),
        source,
    };
    let mut file = File::open(raw).map_err(err)?;
    let mut hasher = Sha256::new();
    hasher.update(format!("kiln-image-format-{}\0raw\0", image::VERSION));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(err)? {
            0 => return Ok(image::hex(&hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// The parent image, after checking the chain of bases for a cycle.
fn resolve_base(recipe: &Recipe, store: &Store) -> Result<Option<store::StoredImage>, BuildError> {
    let Base::Image { name, version } = &recipe.base else {
        return Ok(None);
    };
    let base = format!("{name}:{version}");
    let own = format!("{}:{}", recipe.name, recipe.version);
    let mut chain = vec![own.clone(), base.clone()];
    let parent = store
        .get(name, version)?
        .ok_or_else(|| BuildError::MissingBase {
            recipe: recipe.path.clone(),
            base: base.clone(),
        })?;
    let mut next = Some(parent.manifest.clone());
    while let Some(manifest) = next {
        if manifest.reference() == own || chain[1..chain.len() - 1].contains(&manifest.reference())
        {
            return Err(BuildError::Cycle {
                recipe: recipe.path.clone(),
                base,
                image: own,
                chain: chain.join(" -> "),
            });
        }
        next = match &manifest.parent {
            Some(reference) => {
                chain.push(reference.clone());
                Some(store.find(reference)?.manifest)
            }
            None => None,
        };
    }
    Ok(Some(parent))
}

/// SHA-256 over every input of the build, hex: `vm_inputs` are the
/// build VM's ([`BuildVm::inputs`]), empty without VM steps.
fn build_key(
    recipe: &Recipe,
    guest_init: &Path,
    vm_inputs: &[PathBuf],
    parent: Option<&Manifest>,
) -> Result<String, BuildError> {
    let mut hasher = Sha256::new();
    hasher.update(format!("kiln-image-format-{}\0", image::VERSION));
    hasher.update(parent.map_or("scratch", |p| p.digest.as_str()));
    let mut inputs = vec![recipe.dir.clone(), guest_init.to_path_buf()];
    inputs.extend(vm_inputs.iter().cloned());
    if let Base::Oci(archive) | Base::Tarball(archive) = &recipe.base {
        inputs.push(archive.clone());
    }
    inputs.extend(recipe.files.iter().map(|f| f.src.clone()));
    inputs.extend(elf::closure(&recipe.binaries)?);
    for input in inputs {
        hash_tree(&input, &mut hasher)?;
    }
    Ok(image::hex(&hasher.finalize()))
}

/// Hashes names, modes, link targets and contents under `path`.
fn hash_tree(path: &Path, hasher: &mut Sha256) -> Result<(), BuildError> {
    let err = |source| BuildError::Input {
        path: path.into(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(err)?;
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()).to_le_bytes());
    if meta.is_symlink() {
        hasher.update(
            fs::read_link(path)
                .map_err(err)?
                .as_os_str()
                .as_encoded_bytes(),
        );
        // The loader opens what the link points at: hash that too.
        if let Ok(target) = fs::canonicalize(path)
            && target.is_file()
        {
            hasher.update(fs::read(&target).map_err(err)?);
        }
    } else if meta.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            hash_tree(&entry, hasher)?;
        }
    } else {
        hasher.update(fs::read(path).map_err(err)?);
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<String, BuildError> {
    let bytes = fs::read(path).map_err(|source| BuildError::Input {
        path: path.into(),
        source,
    })?;
    Ok(format!("sha256:{}", image::hex(&Sha256::digest(bytes))))
}

/// A UUID (version 4 layout) from the first 16 bytes of `key`'s hex.
fn uuid_from(key: &str) -> String {
    let hex = &key[..32];
    let variant = ['8', '9', 'a', 'b'][usize::from_str_radix(&hex[16..17], 16).unwrap_or(0) % 4];
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[13..16],
        variant,
        &hex[17..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::TestCommand;
    use guest_init::config::RunConfig;

    /// A raw "filesystem" of 300 KiB (three chunks), its bytes from `seed`.
    fn raw_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
        let data: Vec<u8> = (0..300 * 1024u32)
            .map(|i| if i % 7000 < 3000 { 0 } else { (i as u8) ^ seed })
            .collect();
        let path = dir.join(name);
        fs::write(&path, data).unwrap();
        path
    }

    /// Publishes `raw` as `hello:1.0.0`, as a build would.
    fn parent(store: &Store, raw: &Path) -> Manifest {
        let scratch = store.scratch_dir().unwrap();
        let (publish, info) = compress(raw, scratch.path(), None).unwrap();
        let manifest = Manifest {
            name: "hello".into(),
            version: "1.0.0".into(),
            description: "says hello".into(),
            digest: format!("sha256:{}", info.digest),
            parent: None,
            recipe_digest: "sha256:00".into(),
            build_key: "k".into(),
            raw_size: info.raw_size,
            file_size: info.file_size,
            entrypoint: vec!["/bin/hello".into()],
            exposed_ports: Vec::new(),
            labels: Default::default(),
            tests: vec![TestCommand {
                run: "/bin/hello".into(),
                expect_exit: 0,
                expect_stdout: Some("Hello".into()),
                timeout_secs: 60,
            }],
            test_results: None,
            created: "2026-11-24T00:00:00Z".into(),
        };
        store.publish(&publish, &manifest).unwrap();
        manifest
    }

    fn scratch_is_empty(home: &Path) -> bool {
        fs::read_dir(home.join("tmp")).unwrap().next().is_none()
    }

    #[test]
    fn archive_names_become_references_or_a_request_for_one() {
        let archive = Path::new("a.tar");
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        for (given, want) in [
            ("busybox:1.36", "busybox:1.36.0"),
            ("docker.io/library/alpine:3", "alpine:3.0.0"),
            ("web:2.1.0-rc.1", "web:2.1.0-rc.1"),
        ] {
            assert_eq!(reference_from(archive, &names(&[given])).unwrap(), want);
        }
        assert_eq!(
            reference_from(archive, &names(&["x:latest", "x:1.2"])).unwrap(),
            "x:1.2.0"
        );
        let err = reference_from(archive, &names(&["busybox:latest"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.tar") && err.contains("busybox:latest") && err.contains("NAME:VERSION"),
            "{err}"
        );
        let err = reference_from(archive, &[]).unwrap_err().to_string();
        assert!(err.contains("does not name its image"), "{err}");
    }

    #[test]
    fn a_raw_filesystem_becomes_a_child_image_keyed_by_its_content() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let base = parent(&store, &raw_file(home.path(), "base.raw", 0));
        let raw = raw_file(home.path(), "changed.raw", 0x5a);
        let child = publish_child(&store, &raw, "web:1.0.0", &base, "from web".into()).unwrap();
        assert_eq!(child.reference(), "web:1.0.0");
        assert_eq!(child.parent.as_deref(), Some("hello:1.0.0"));
        assert_eq!(child.description, "from web");
        assert_eq!(child.entrypoint, base.entrypoint);
        assert!(child.tests.is_empty() && child.recipe_digest.is_empty());
        assert_eq!(child.raw_size, 300 * 1024);
        let stored = store.find("web:1.0.0").unwrap();
        assert_eq!(stored.manifest, child);
        assert_eq!(
            format!("sha256:{}", image::file_digest(&stored.image_path).unwrap()),
            child.digest
        );
        let mut flat = Vec::new();
        image::Reader::open(&stored.image_path)
            .unwrap()
            .flatten_to(&mut flat)
            .unwrap();
        assert!(
            flat == fs::read(&raw).unwrap(),
            "the image holds other bytes"
        );

        // The same bytes make the same key and the same image; others not.
        let again = publish_child(&store, &raw, "web:1.0.1", &base, "again".into()).unwrap();
        assert_eq!(
            (&again.build_key, &again.digest),
            (&child.build_key, &child.digest)
        );
        let other = raw_file(home.path(), "other.raw", 0x33);
        let other = publish_child(&store, &other, "web:2.0.0", &base, "other".into()).unwrap();
        assert_ne!(other.build_key, child.build_key);

        // The parent's very bytes: the child stores an index, and links
        // the parent's file for the rest.
        let same = raw_file(home.path(), "same.raw", 0);
        let same = publish_child(&store, &same, "web:3.0.0", &base, "same".into()).unwrap();
        let parent_file = store.find("hello:1.0.0").unwrap().image_path;
        let digest = store.find("hello:1.0.0").unwrap().file_digest().unwrap();
        let stored = store.find("web:3.0.0").unwrap().image_path;
        let chunks = u64::from(image::Reader::open(&stored).unwrap().chunk_count());
        assert_eq!(
            same.file_size,
            64 + 64 * chunks + 32,
            "header, index, one layer"
        );
        use std::os::unix::fs::MetadataExt;
        let inode = |path: &Path| fs::metadata(path).unwrap().ino();
        assert_eq!(
            inode(&image::layer_path(&stored, &digest)),
            inode(&parent_file)
        );
        assert!(scratch_is_empty(home.path()), "no scratch left behind");
    }

    #[test]
    fn a_child_needs_a_new_and_valid_reference() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let raw = raw_file(home.path(), "base.raw", 0);
        let base = parent(&store, &raw);
        let err = publish_child(&store, &raw, "hello:1.0.0", &base, String::new()).unwrap_err();
        assert!(matches!(err, BuildError::Exists(_)), "{err}");
        assert!(err.to_string().contains("hello:1.0.0 is already"), "{err}");
        for bad in [
            "web",
            "web:",
            ":1.0.0",
            "Web:1.0.0",
            "web:1.0",
            "a/b:1.0.0",
            "web:1.0.0/x",
        ] {
            let err = publish_child(&store, &raw, bad, &base, String::new()).unwrap_err();
            assert!(matches!(err, BuildError::BadReference(_)), "{bad}: {err}");
        }
        assert_eq!(
            check_new(&store, "web:1.0.0").unwrap(),
            ("web".into(), "1.0.0".into())
        );
        assert_eq!(store.list().unwrap(), [base]);
        assert!(scratch_is_empty(home.path()), "no scratch left behind");
    }

    #[test]
    fn uuids_from_keys_are_well_formed_and_stable() {
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(uuid_from(key), uuid_from(key));
        let uuid = uuid_from(key);
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        assert!("89ab".contains(&uuid[19..20]), "{uuid}");
    }

    /// A build stays staged until published: dropped, it leaves nothing;
    /// published untested, it is built again by the next build that runs
    /// the tests, and reused once tested.
    #[test]
    fn a_staged_image_is_published_whole_or_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("recipe");
        fs::create_dir(&recipe).unwrap();
        fs::write(recipe.join("f"), "#!/bin/x\n").unwrap();
        fs::write(
            recipe.join("recipe.toml"),
            "free = \"1M\"\n[image]\nname = \"staged\"\nversion = \"1.0.0\"\n\
             [[files]]\nsrc = \"f\"\ndst = \"/f\"\n[run]\nentrypoint = [\"/f\"]\n\
             [[test]]\nrun = \"/f\"\n",
        )
        .unwrap();
        let home = dir.path().join("home");
        let store = Store::new(&home);
        let build = |skip_tests| {
            build(
                &recipe,
                &store,
                Path::new("/bin/busybox"),
                skip_tests,
                None,
                &mut |_| {},
            )
            .unwrap()
        };
        let Built::Staged(staged) = build(false) else {
            panic!("nothing to reuse yet");
        };
        assert!(staged.image_path().is_file());
        drop(staged);
        assert!(store.list().unwrap().is_empty() && scratch_is_empty(&home));

        let Built::Staged(staged) = build(true) else {
            panic!("nothing to reuse yet");
        };
        let untested = staged.publish(None).unwrap();
        assert!(untested.untested());
        assert!(matches!(build(true), Built::Cached(_)));
        let Built::Staged(staged) = build(false) else {
            panic!("an untested image is built again when the tests run");
        };
        let result = TestResult {
            run: "/f".into(),
            passed: true,
            exit_status: Some(0),
            duration_ms: 5,
        };
        staged.publish(Some(vec![result.clone()])).unwrap();
        let Built::Cached(tested) = build(false) else {
            panic!("a tested image is reused");
        };
        assert_eq!(tested.test_results, Some(vec![result]));
        assert_eq!(
            tested.digest, untested.digest,
            "the same inputs, the same image"
        );
        assert!(scratch_is_empty(&home));
    }

    /// A build VM that runs no VM: it reads the step's script and the
    /// run configuration off the disk with debugfs, and "runs" the script
    /// by writing it into the disk at /etc/built-in-vm, as a guest's
    /// write would; a script with `exit 3` fails.
    struct FakeVm {
        kernel: PathBuf,
        seen: std::cell::RefCell<Vec<String>>,
    }

    fn debugfs(disk: &Path, request: &str) -> String {
        let output = std::process::Command::new("debugfs")
            .args(["-w", "-R", request])
            .arg(disk)
            .output()
            .unwrap();
        assert!(output.status.success(), "debugfs {request}");
        String::from_utf8(output.stdout).unwrap()
    }

    impl BuildVm for FakeVm {
        fn inputs(&self) -> Vec<PathBuf> {
            vec![self.kernel.clone()]
        }

        fn run_step(
            &self,
            root: &Path,
            recipe_dir: &Path,
            step: &VmStep,
        ) -> Result<StepEnd, Box<dyn Error + Send + Sync>> {
            assert_eq!(debugfs(recipe_dir, "cat /sh"), "#!/not/a/shell\n");
            assert!(
                debugfs(root, "ls -l /build").contains(" 40755 "),
                "no /build"
            );
            let script = debugfs(root, &format!("cat {}", &step.command["/bin/sh ".len()..]));
            let config = debugfs(root, "cat /etc/kiln/init.json");
            self.seen
                .borrow_mut()
                .push(format!("{} {}\n{config}", step.label, step.timeout_secs));
            let host_copy = root.with_extension("script");
            fs::write(&host_copy, &script).unwrap();
            debugfs(root, "rm /etc/built-in-vm");
            debugfs(
                root,
                &format!("write {} /etc/built-in-vm", host_copy.display()),
            );
            fs::remove_file(host_copy).unwrap();
            Ok(if script.contains("exit 3") {
                StepEnd::Exited(3)
            } else {
                StepEnd::Exited(0)
            })
        }
    }

    /// A recipe with a VM step: its script and a root configuration reach
    /// the build VM, what the step wrote is in the image, the scripts are
    /// not, and the image's own configuration is back. The same recipe
    /// builds to the same bytes; the kernel is in the build key; a failing
    /// step fails the build by its number and status, and leaves nothing.
    #[test]
    fn vm_steps_change_the_image_reproducibly() {
        let dir = tempfile::tempdir().unwrap();
        let recipe = dir.path().join("recipe");
        fs::create_dir(&recipe).unwrap();
        fs::write(recipe.join("sh"), "#!/not/a/shell\n").unwrap();
        let text = "free = \"1M\"\n[image]\nname = \"vm\"\nversion = \"1.0.0\"\n\
             [[build]]\nin = \"vm\"\nrun = \"echo it's built\"\nenv = { WHO = \"o'brien\" }\ntimeout = \"2m\"\n\
             [[files]]\nsrc = \"sh\"\ndst = \"/bin/sh\"\n\
             [run]\nentrypoint = [\"/bin/sh\"]\nuser = \"1000:1000\"\nenv = { MODE = \"serve\" }\n";
        fs::write(recipe.join("recipe.toml"), text).unwrap();
        let vm = FakeVm {
            kernel: recipe.join("sh"),
            seen: Default::default(),
        };
        let build_in = |home: &str, vm: Option<&dyn BuildVm>| {
            let store = Store::new(&dir.path().join(home));
            let built = build(
                &recipe,
                &store,
                Path::new("/bin/busybox"),
                true,
                vm,
                &mut |_| {},
            );
            let manifest = match built {
                Ok(Built::Staged(staged)) => staged.publish(None),
                Ok(Built::Cached(_)) => panic!("a new store caches nothing"),
                Err(err) => Err(err),
            };
            let home = dir.path().join(home);
            assert!(
                !home.join("tmp").exists() || scratch_is_empty(&home),
                "scratch left"
            );
            (store, manifest)
        };
        let (store, first) = build_in("one", Some(&vm));
        let first = first.unwrap();
        let seen = vm.seen.borrow().clone();
        assert_eq!(seen.len(), 1);
        assert!(
            seen[0].starts_with("step 1 (echo it's built) 120\n"),
            "{seen:?}"
        );
        let build_config =
            RunConfig::from_json(seen[0].split_once('\n').unwrap().1.as_bytes()).unwrap();
        assert_eq!((build_config.uid, build_config.gid), (0, 0));
        assert_eq!(build_config.env["HOME"], "/root");
        assert_eq!(
            build_config.env["PATH"],
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
        assert!(!build_config.env.contains_key("MODE"));

        let stored = store.find("vm:1.0.0").unwrap();
        let reader = image::Reader::open(&stored.image_path).unwrap();
        let fs_image = image::CachedReader::new(reader, image::DEFAULT_CACHE_BYTES);
        let extracted = Stage::create(&dir.path().join("extracted")).unwrap();
        ext4::extract(fs_image, &extracted).unwrap();
        let root = extracted.path();
        assert_eq!(
            fs::read_to_string(root.join("etc/built-in-vm")).unwrap(),
            "set -e\ncd /\nmount -t ext4 -o ro /dev/vdb /build\nexport WHO='o'\\''brien'\necho it's built\n"
        );
        assert!(!root.join("etc/kiln/build-steps").exists(), "scripts kept");
        assert!(!root.join("build").exists(), "mount point kept");
        let config =
            RunConfig::from_json(&fs::read(root.join("etc/kiln/init.json")).unwrap()).unwrap();
        assert_eq!((config.uid, config.env["MODE"].as_str()), (1000, "serve"));

        let (_, second) = build_in("two", Some(&vm));
        let second = second.unwrap();
        assert_eq!(
            (&second.digest, &second.build_key),
            (&first.digest, &first.build_key),
            "the same recipe, the same image"
        );
        let other_kernel = FakeVm {
            kernel: recipe.join("recipe.toml"),
            seen: Default::default(),
        };
        let (_, third) = build_in("three", Some(&other_kernel));
        assert_ne!(
            third.unwrap().build_key,
            first.build_key,
            "the kernel is an input"
        );

        let (_, refused) = build_in("none", None);
        let err = refused.unwrap_err();
        assert!(
            err.to_string()
                .contains("build step 1 (echo it's built) runs in a VM"),
            "{err}"
        );
        fs::write(
            recipe.join("recipe.toml"),
            text.replace("echo it's built", "exit 3"),
        )
        .unwrap();
        let (store, failed) = build_in("failed", Some(&vm));
        let err = failed.unwrap_err();
        assert_eq!(
            err.to_string(),
            "build step 1 (exit 3) failed in the build VM: exit status 3"
        );
        assert!(store.list().unwrap().is_empty(), "a failed build published");

        fs::write(
            recipe.join("recipe.toml"),
            text.replace("dst = \"/bin/sh\"", "dst = \"/bin/ash\""),
        )
        .unwrap();
        let (_, no_shell) = build_in("no-shell", Some(&vm));
        let err = crate::chain(&no_shell.unwrap_err());
        assert!(err.contains("and the image has none"), "{err}");
    }

    /// A Kiln home `home` next to a victim directory `outside`, and a
    /// recipe directory whose base is the tarball `base` and which puts a
    /// file through the path `/l/f` (where bases plant links).
    struct Hostile {
        dir: tempfile::TempDir,
        outside: PathBuf,
    }

    impl Hostile {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let outside = crate::oci::tests::victim(dir.path());
            fs::create_dir_all(dir.path().join("recipe")).unwrap();
            fs::write(dir.path().join("recipe/f"), "from the recipe").unwrap();
            fs::write(
                dir.path().join("recipe/recipe.toml"),
                "base = \"tar:base.tar\"\nfree = \"1M\"\n[image]\nname = \"hostile\"\nversion = \"1.0.0\"\n\
                 [[files]]\nsrc = \"f\"\ndst = \"/l/f\"\n[run]\nentrypoint = [\"/x\"]\n",
            )
            .unwrap();
            Hostile { dir, outside }
        }

        fn build(&self, base: &[u8]) -> Result<Manifest, BuildError> {
            let recipe = self.dir.path().join("recipe");
            fs::write(recipe.join("base.tar"), base).unwrap();
            let store = Store::new(&self.dir.path().join("home"));
            let result = build(
                &recipe,
                &store,
                Path::new("/bin/busybox"),
                true,
                None,
                &mut |_| {},
            )
            .and_then(|built| match built {
                Built::Staged(staged) => staged.publish(None),
                Built::Cached(manifest) => Ok(manifest),
            });
            crate::oci::tests::assert_untouched(&self.outside);
            assert!(
                scratch_is_empty(&self.dir.path().join("home")),
                "scratch left"
            );
            if result.is_err() {
                assert!(store.list().unwrap().is_empty(), "a failed build published");
            }
            result
        }
    }

    /// Issue 16, case 1: a base's file name with a quote and newlines
    /// became debugfs commands (`dump` copied a host file, `write` wrote
    /// one). Such a name is refused; nothing runs it.
    #[test]
    fn a_file_name_cannot_inject_debugfs_commands() {
        let hostile = Hostile::new();
        let dumped = hostile.dir.path().join("dumped");
        let name = format!("a\"\ndump /sbin/init {}\n#", dumped.display());
        let base = crate::oci::tests::raw_tar(&[crate::oci::tests::file(name.as_bytes(), b"x")]);
        let err = crate::chain(&hostile.build(&base).unwrap_err());
        assert!(
            err.contains("control character") && err.contains("base.tar"),
            "{err}"
        );
        assert!(!dumped.exists());
    }

    mod fuzz {
        //! Random tar streams as a build's base: names with quotes,
        //! newlines, `..` and absolute paths, symlink chains aimed at the
        //! victim directory, whiteouts, hard links and device nodes. Every
        //! build fails with an error or succeeds, and nothing outside the
        //! stage changes. Link targets only ever aim at the victim (never
        //! at `/`), so that a regression cannot harm the host running this.
        use super::*;
        use crate::oci::tests::{Raw, raw_tar};
        use proptest::prelude::*;

        /// What an entry is, with a link's target chosen from `TARGETS`.
        #[derive(Clone, Debug)]
        enum Kind {
            File,
            Dir,
            Symlink(usize),
            HardLink(usize),
            Device,
            Fifo,
        }

        const NAMES: &[&str] = &[
            "l",
            "a",
            "a/l",
            "l/f",
            "l/.wh..wh..opq",
            "l/.wh.important",
            "a/l/sub",
            ".wh.a",
            "..",
            "../x",
            "/abs",
            "./b",
            "q\"uote",
            "new\nline",
            "l/important",
            "a/l/.wh.sub",
            "sbin",
            "sbin/init",
            "tmp",
            "etc/kiln",
        ];

        /// `{outside}` is the victim's absolute path; the `..` chains
        /// climb from `home/tmp/.scratch.partial-*/root` (and one level deeper) to it.
        const TARGETS: &[&str] = &[
            "{outside}",
            "../../../../outside",
            "../../../../../outside",
            "{outside}/sub",
            "a",
            "l",
            "l/f",
            ".",
        ];

        fn entry() -> impl Strategy<Value = (usize, Kind)> {
            let kind = prop_oneof![
                Just(Kind::File),
                Just(Kind::Dir),
                (0..TARGETS.len()).prop_map(Kind::Symlink),
                (0..NAMES.len()).prop_map(Kind::HardLink),
                Just(Kind::Device),
                Just(Kind::Fifo),
            ];
            (0..NAMES.len(), kind)
        }

        fn tar(entries: &[(usize, Kind)], outside: &Path) -> Vec<u8> {
            let targets: Vec<String> = TARGETS
                .iter()
                .map(|t| t.replace("{outside}", &outside.display().to_string()))
                .collect();
            let raws: Vec<Raw> = entries
                .iter()
                .map(|(name, kind)| {
                    let (kind, link) = match kind {
                        Kind::File => (tar::EntryType::Regular, ""),
                        Kind::Dir => (tar::EntryType::Directory, ""),
                        Kind::Symlink(t) => (tar::EntryType::Symlink, targets[*t].as_str()),
                        Kind::HardLink(n) => (tar::EntryType::Link, NAMES[*n]),
                        Kind::Device => (tar::EntryType::Char, ""),
                        Kind::Fifo => (tar::EntryType::Fifo, ""),
                    };
                    let data: &[u8] = if kind == tar::EntryType::Regular {
                        b"pwned"
                    } else {
                        b""
                    };
                    Raw {
                        name: NAMES[*name].as_bytes(),
                        kind,
                        data,
                        link: link.as_bytes(),
                    }
                })
                .collect();
            raw_tar(&raws)
        }

        proptest! {
            // Each case is a whole build (mkfs, debugfs, compression) when
            // it gets that far: a few dozen keep this test to seconds.
            #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]
            #[test]
            fn random_tar_bases_never_touch_anything_outside_the_stage(
                entries in proptest::collection::vec(entry(), 1..12)
            ) {
                let hostile = Hostile::new();
                let _ = hostile.build(&tar(&entries, &hostile.outside));
            }
        }
    }

    /// Two builds at once both succeed: neither takes the other's live
    /// scratch directory for a leftover. A killed build's scratch (its
    /// lock gone with it) is removed, and nothing is left in the store's
    /// tmp once they are done.
    #[test]
    fn builds_at_once_both_succeed_and_remove_a_killed_ones_scratch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("home"));
        let killed = dir.path().join("home/tmp/.scratch.partial-k1lled");
        fs::create_dir_all(killed.join("root")).unwrap();
        let recipe = |n: usize| {
            let recipe = dir.path().join(format!("recipe{n}"));
            fs::create_dir(&recipe).unwrap();
            fs::write(recipe.join("f"), format!("build {n}")).unwrap();
            let text = format!(
                "free = \"1M\"\n[image]\nname = \"at-once-{n}\"\nversion = \"1.0.0\"\n\
                 [[files]]\nsrc = \"f\"\ndst = \"/f\"\n[run]\nentrypoint = [\"/f\"]\n"
            );
            fs::write(recipe.join("recipe.toml"), text).unwrap();
            recipe
        };
        let recipes = [recipe(1), recipe(2)];
        std::thread::scope(|scope| {
            let builds = recipes.each_ref().map(|recipe| {
                scope.spawn(|| {
                    let init = Path::new("/bin/busybox");
                    match build(recipe, &store, init, true, None, &mut |_| {}).unwrap() {
                        Built::Staged(staged) => staged.publish(None).unwrap(),
                        Built::Cached(_) => panic!("a new store caches nothing"),
                    }
                })
            });
            for build in builds {
                build.join().unwrap();
            }
        });
        for reference in ["at-once-1:1.0.0", "at-once-2:1.0.0"] {
            store.find(reference).unwrap();
        }
        assert!(!killed.exists(), "the killed build's scratch is removed");
        assert!(scratch_is_empty(&dir.path().join("home")), "scratch left");
    }
}
