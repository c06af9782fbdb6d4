//! Images from instances, EC2's "create image": `kiln commit` flattens a
//! stopped instance's root volume (its image with the overlay's writes)
//! and publishes it as a new image whose parent is the instance's image.
//! The same root volume, flattened to a file, is `kiln image flatten
//! INSTANCE`.
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_builder::build::{self, BuildError};
use kiln_builder::store::{Manifest, Store, StoreError};
use kiln_image::DEFAULT_CACHE_BYTES;

use crate::instance::{Instance, InstanceError, Registry, State};
use kiln_vmm::durable;
use kiln_vmm::volume::{Volume, VolumeError};

/// Why an instance cannot be committed, or its volume flattened.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The instance's record or locks could not be had.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// The instance's image is not in the store, or the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The root volume could not be opened or read whole.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The new image's reference is taken or malformed, or publishing it
    /// failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A VM may still be writing the volume.
    #[error(
        "cannot commit instance {instance}: it is {state}; stop it first (its filesystem is consistent on disk only once its VM has ended)"
    )]
    NotStopped {
        /// The instance, as "name (id)" or its id.
        instance: String,
        /// Its state, one with a VM.
        state: State,
    },
    /// The instance has no root volume any more.
    #[error("cannot commit instance {instance}: it is terminated; its root volume is deleted")]
    Terminated {
        /// The instance, as "name (id)" or its id.
        instance: String,
    },
    /// The record says stopped, but the VMM still holds the volume.
    #[error(
        "cannot commit instance {instance}: it is stopped, but its VMM process is still exiting; try again in a moment"
    )]
    VmmAlive {
        /// The instance, as "name (id)" or its id.
        instance: String,
    },
    /// Part of the guest's filesystem is still in its saved memory.
    #[error(
        "cannot commit instance {instance}: it is hibernated, and what its guest had not written back yet is in its saved memory, not on its disk; start it and stop it first"
    )]
    Hibernated {
        /// The instance, as "name (id)" or its id.
        instance: String,
    },
    /// The flattened volume could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What the write, flush or rename said.
        #[source]
        source: io::Error,
    },
}

/// An instance's root volume: its image with its overlay (without one, as
/// before its first boot or after it was terminated, the bare image).
pub fn root_volume(store: &Store, instance: &Instance) -> Result<Volume, CommitError> {
    let image = store.find(&instance.record.spec.image)?.image_path;
    let overlay = instance.root_overlay();
    let overlay = overlay.exists().then_some(overlay.as_path());
    Ok(Volume::open(&image, overlay, DEFAULT_CACHE_BYTES)?)
}

/// Writes `volume` whole, as its guest sees it, to the file `out`, which
/// appears whole or not at all.
pub fn flatten_to_file(volume: &Volume, out: &Path) -> Result<(), CommitError> {
    let written = |source| CommitError::Write {
        path: out.into(),
        source,
    };
    let staged = durable::stage(out).map_err(written)?;
    let mut writer = BufWriter::new(staged.as_file());
    // A failed write is this file's: named, as running out of room is.
    volume.flatten_to(&mut writer).map_err(|err| match err {
        VolumeError::Output(source) => written(source),
        err => err.into(),
    })?;
    writer.flush().map_err(written)?;
    drop(writer);
    durable::persist(staged, out).map_err(written)
}

/// Commits the stopped `instance`'s root volume to `store` as the new
/// image `reference` (NAME:VERSION), a child of the instance's image.
/// Holds the instance's verb and VMM locks throughout, so no VM can boot
/// on the volume meanwhile. On failure nothing is left in the store.
pub fn commit(
    store: &Store,
    instance: &Instance,
    reference: &str,
) -> Result<Manifest, CommitError> {
    // Refused before any work: flattening and compressing take a while.
    build::check_new(store, reference)?;
    let _verb = instance.lock_for_verb()?;
    let instance = Registry::reread(instance)?;
    let named = describe(&instance);
    match instance.record.state {
        State::Stopped => {}
        State::Terminated => return Err(CommitError::Terminated { instance: named }),
        state @ (State::Pending | State::Running | State::Stopping) => {
            return Err(CommitError::NotStopped {
                instance: named,
                state,
            });
        }
    }
    let Some(_vmm) = instance.claim_vmm()? else {
        return Err(CommitError::VmmAlive { instance: named });
    };
    // A hibernated instance's saved VM holds its guest's memory, and with
    // it writes the guest had cached but not flushed to its disk. Checked
    // with the VMM lock held: nothing can hibernate the instance any more.
    if instance.hibernation_path().exists() {
        return Err(CommitError::Hibernated { instance: named });
    }
    let parent = store.find(&instance.record.spec.image)?;
    let volume = root_volume(store, &instance)?;
    let scratch = store.scratch_dir()?;
    let raw = scratch.path().join("root.ext4");
    flatten_to_file(&volume, &raw)?;
    drop(volume);
    let description = format!("committed from instance {named}");
    Ok(build::publish_child(
        store,
        &raw,
        reference,
        &parent.manifest,
        description,
    )?)
}

/// "web (i-…)", or the id alone for an instance without a name.
fn describe(instance: &Instance) -> String {
    let id = &instance.record.id;
    match &instance.record.spec.name {
        Some(name) => format!("{name} ({id})"),
        None => id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use kiln_builder::store::IMAGE_FILE;
    use kiln_image::{self as image, DEFAULT_CHUNK_SIZE};

    use super::*;
    use crate::instance::{FileLock, Spec};

    /// Four chunks of the default size.
    const RAW_SIZE: usize = 4 * DEFAULT_CHUNK_SIZE as usize;
    const BASE: &str = "base:1.0.0";
    /// Where the tests' guest "writes": inside the third chunk.
    const WRITTEN_AT: u64 = 300 * 1024;

    /// A Kiln home whose store holds `base:1.0.0`, a raw "filesystem" of
    /// runs of zeros and a byte pattern.
    fn home() -> (tempfile::TempDir, Store, Vec<u8>) {
        let home = tempfile::tempdir().unwrap();
        let store = Store::new(home.path());
        let raw: Vec<u8> = (0..RAW_SIZE)
            .map(|i| if i % 9000 < 4000 { 0 } else { (i / 3) as u8 })
            .collect();
        let scratch = store.scratch_dir().unwrap();
        let raw_path = scratch.path().join("raw");
        fs::write(&raw_path, &raw).unwrap();
        let publish = scratch.path().join("publish");
        fs::create_dir(&publish).unwrap();
        let info = image::write(&raw_path, &publish.join(IMAGE_FILE), DEFAULT_CHUNK_SIZE).unwrap();
        let manifest = Manifest {
            name: "base".into(),
            version: "1.0.0".into(),
            description: String::new(),
            digest: format!("sha256:{}", info.digest),
            parent: None,
            recipe_digest: "sha256:00".into(),
            build_key: "k".into(),
            raw_size: info.raw_size,
            file_size: info.file_size,
            entrypoint: vec!["/bin/sh".into()],
            exposed_ports: Vec::new(),
            labels: Default::default(),
            tests: Vec::new(),
            test_results: None,
            created: "2026-11-24T00:00:00Z".into(),
        };
        store.publish(&publish, &manifest).unwrap();
        (home, store, raw)
    }

    /// An instance of `base:1.0.0` in `state` whose guest wrote to its root
    /// volume; with the VMM lock a live VMM would hold.
    fn instance(
        home: &Path,
        store: &Store,
        name: Option<&str>,
        state: State,
    ) -> (Instance, FileLock) {
        let spec = Spec {
            image: BASE.into(),
            ..crate::instance::tests::spec(name)
        };
        let (mut instance, vmm) = Registry::new(home).create(spec, None, None).unwrap();
        let image = store.find(BASE).unwrap().image_path;
        let mut volume =
            Volume::create(&image, &instance.root_overlay(), DEFAULT_CACHE_BYTES).unwrap();
        volume.write(WRITTEN_AT, b"written by the guest").unwrap();
        volume.write(0, &[0xab; 4096]).unwrap();
        volume.flush().unwrap();
        drop(volume);
        instance
            .update(|r| {
                r.state = state;
                Ok(())
            })
            .unwrap();
        (instance, vmm)
    }

    fn flattened(volume: &Volume) -> Vec<u8> {
        let mut out = Vec::new();
        volume.flatten_to(&mut out).unwrap();
        out
    }

    /// The store holds `base:1.0.0` alone and no scratch is left.
    fn nothing_was_added(home: &Path, store: &Store) {
        let refs: Vec<String> = store
            .list()
            .unwrap()
            .iter()
            .map(Manifest::reference)
            .collect();
        assert_eq!(refs, [BASE]);
        assert!(
            fs::read_dir(home.join("tmp")).unwrap().next().is_none(),
            "scratch left behind"
        );
    }

    #[test]
    fn a_stopped_instance_commits_to_a_child_of_its_image() {
        let (home, store, base) = home();
        let (instance, vmm) = instance(home.path(), &store, Some("web"), State::Stopped);
        drop(vmm);
        let manifest = commit(&store, &instance, "web-image:1.0.0").unwrap();
        assert_eq!(manifest.reference(), "web-image:1.0.0");
        assert_eq!(manifest.parent.as_deref(), Some(BASE));
        let id = &instance.record.id;
        assert_eq!(
            manifest.description,
            format!("committed from instance web ({id})")
        );
        assert_eq!(manifest.raw_size, RAW_SIZE as u64);
        assert_eq!(manifest.entrypoint, ["/bin/sh"]);

        let committed = store.find("web-image:1.0.0").unwrap();
        assert_eq!(committed.manifest, manifest);
        let committed = Volume::open(&committed.image_path, None, DEFAULT_CACHE_BYTES).unwrap();
        let root = flattened(&root_volume(&store, &instance).unwrap());
        assert!(
            flattened(&committed) == root,
            "the image is not the instance's volume"
        );
        assert!(root != base, "the guest's writes are missing");
        assert_eq!(&root[WRITTEN_AT as usize..][..7], b"written");

        // The instance is as it was, and its locks are free again.
        let after = Registry::reread(&instance).unwrap();
        assert_eq!(after.record.state, State::Stopped);
        drop(after.lock_for_verb().unwrap());
        assert!(!after.vmm_alive().unwrap());
        let err = commit(&store, &instance, "web-image:1.0.0").unwrap_err();
        assert!(
            matches!(err, CommitError::Build(BuildError::Exists(_))),
            "{err}"
        );
        assert!(
            fs::read_dir(home.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[test]
    fn an_instance_with_a_vm_is_refused_naming_it_and_its_state() {
        let (home, store, _) = home();
        for (name, state) in [
            ("a", State::Pending),
            ("b", State::Running),
            ("c", State::Stopping),
        ] {
            let (instance, _vmm) = instance(home.path(), &store, Some(name), state);
            let err = commit(&store, &instance, "copy:1.0.0").unwrap_err();
            assert!(matches!(err, CommitError::NotStopped { .. }), "{err}");
            let message = err.to_string();
            let id = &instance.record.id;
            assert!(
                message.contains(&format!(
                    "instance {name} ({id}): it is {state}; stop it first"
                )),
                "{message}"
            );
        }
        // Stopped, but its VMM process has not exited yet.
        let (instance, _vmm) = instance(home.path(), &store, None, State::Stopped);
        let err = commit(&store, &instance, "copy:1.0.0").unwrap_err();
        assert!(matches!(err, CommitError::VmmAlive { .. }), "{err}");
        assert!(err.to_string().contains(&instance.record.id), "{err}");
        nothing_was_added(home.path(), &store);
    }

    #[test]
    fn terminated_and_hibernated_instances_are_refused() {
        let (home, store, _) = home();
        let (terminated, vmm) = instance(home.path(), &store, Some("gone"), State::Terminated);
        drop(vmm);
        terminated.delete_volumes().unwrap();
        let err = commit(&store, &terminated, "copy:1.0.0").unwrap_err();
        assert!(matches!(err, CommitError::Terminated { .. }), "{err}");
        assert!(err.to_string().contains("instance gone (i-"), "{err}");
        assert!(err.to_string().contains("it is terminated"), "{err}");

        let (hibernated, vmm) = instance(home.path(), &store, Some("asleep"), State::Stopped);
        drop(vmm);
        fs::create_dir(hibernated.hibernation_path()).unwrap();
        let err = commit(&store, &hibernated, "copy:1.0.0").unwrap_err();
        assert!(matches!(err, CommitError::Hibernated { .. }), "{err}");
        assert!(
            err.to_string().contains("start it and stop it first"),
            "{err}"
        );
        nothing_was_added(home.path(), &store);
    }

    #[test]
    fn an_existing_or_malformed_reference_is_refused() {
        let (home, store, _) = home();
        let (instance, vmm) = instance(home.path(), &store, Some("web"), State::Stopped);
        drop(vmm);
        let err = commit(&store, &instance, BASE).unwrap_err();
        assert!(
            matches!(err, CommitError::Build(BuildError::Exists(_))),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("base:1.0.0 is already in the store"),
            "{err}"
        );
        for bad in ["copy", "copy:latest", "Copy:1.0.0", "../copy:1.0.0"] {
            let err = commit(&store, &instance, bad).unwrap_err();
            assert!(
                matches!(err, CommitError::Build(BuildError::BadReference(_))),
                "{bad}: {err}"
            );
        }
        nothing_was_added(home.path(), &store);
    }

    #[test]
    fn a_failure_half_way_leaves_nothing_behind() {
        let (home, store, _) = home();
        let (instance, vmm) = instance(home.path(), &store, Some("web"), State::Stopped);
        drop(vmm);
        // Damage a chunk in the middle of the image (after the 64-byte
        // header, before the 48-byte index entries): the guest overwrote
        // two blocks only, so the flatten reads it, and fails there, after
        // the scratch files exist.
        let image = store.find(BASE).unwrap().image_path;
        let mut bytes = fs::read(&image).unwrap();
        let frames = 64..bytes.len() - 4 * 48;
        bytes[frames.start + frames.len() / 2] ^= 0x55;
        fs::write(&image, bytes).unwrap();
        let err = commit(&store, &instance, "copy:1.0.0").unwrap_err();
        assert!(matches!(err, CommitError::Volume(_)), "{err}");
        nothing_was_added(home.path(), &store);
    }
}
