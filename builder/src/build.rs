//! `kiln build`: recipe → root tree → ext4 → compressed image → store.
//!
//! The cache key hashes everything the build reads: the recipe's
//! directory (its recipe, sources and build inputs), the `[[files]]`
//! sources, the binaries and their libraries, guest-init, the parent
//! image's digest or the imported archive, and the image format. Same key, same image: the stored
//! one is reused.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::assemble::{self, AssembleError};
use crate::elf::{self, ElfError};
use crate::ext4::{self, Ext4Error};
use crate::image::{self, DEFAULT_CHUNK_SIZE, ImageError};
use crate::oci::{self, OciError};
use crate::recipe::{self, Base, Recipe, RecipeError, Size};
use crate::store::{self, IMAGE_FILE, Manifest, Store, StoreError};

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("{recipe}: base image {base} is not in the store; build it first")]
    MissingBase { recipe: PathBuf, base: String },
    #[error("{recipe}: base {base} leads back to {image} itself (a cycle: {chain})")]
    Cycle {
        recipe: PathBuf,
        base: String,
        image: String,
        chain: String,
    },
    #[error("cannot read {path} for the cache key: {source}")]
    Input {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a build produced.
#[derive(Debug)]
pub struct Built {
    pub manifest: Manifest,
    /// True when the stored image was reused.
    pub cached: bool,
}

/// Builds the recipe at `recipe_path` into `store`, with `guest_init` as
/// every image's /sbin/init. `progress` hears about each long step.
pub fn build(
    recipe_path: &Path,
    store: &Store,
    guest_init: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Built, BuildError> {
    let recipe = recipe::load(recipe_path)?;
    let parent = resolve_base(&recipe, store)?;
    let build_key = build_key(&recipe, guest_init, parent.as_ref().map(|p| &p.manifest))?;
    if let Some(stored) = store.get(&recipe.name, &recipe.version)?
        && stored.manifest.build_key == build_key
        && stored.image_path.is_file()
    {
        return Ok(Built {
            manifest: stored.manifest,
            cached: true,
        });
    }

    let scratch = store.scratch_dir()?;
    let stage = scratch.path().join("root");
    match (&recipe.base, &parent) {
        (_, Some(parent)) => {
            progress(&format!("unpacking {}", parent.manifest.reference()));
            let reader = image::Reader::open(&parent.image_path)?;
            ext4::extract(
                image::CachedReader::new(reader, image::DEFAULT_CACHE_BYTES),
                &stage,
            )?;
        }
        (Base::Oci(archive), None) => {
            progress(&format!("importing {}", archive.display()));
            oci::import_image(archive, &stage, scratch.path())?;
        }
        (Base::Tarball(tarball), None) => {
            progress(&format!("importing {}", tarball.display()));
            oci::import_tarball(tarball, &stage)?;
        }
        (Base::Scratch | Base::Image { .. }, None) => {}
    }
    progress("assembling the root tree");
    let entrypoint = assemble::assemble(&recipe, &stage, guest_init)?;
    let size = match recipe.size {
        Size::Fixed(bytes) => bytes.div_ceil(4096) * 4096,
        Size::Free(free) => ext4::size_for(ext4::content_size(&stage)?, free),
    };
    progress(&format!("making a {} MiB ext4", size >> 20));
    let raw = scratch.path().join("root.ext4");
    ext4::make(&stage, &raw, size, &uuid_from(&build_key))?;
    progress("compressing");
    let publish = scratch.path().join("publish");
    fs::create_dir(&publish).map_err(|source| BuildError::Input {
        path: publish.clone(),
        source,
    })?;
    let info = image::write(&raw, &publish.join(IMAGE_FILE), DEFAULT_CHUNK_SIZE)?;
    let manifest = Manifest {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        description: recipe.description.clone(),
        digest: format!("sha256:{}", info.digest),
        parent: parent.map(|p| p.manifest.reference()),
        recipe_digest: hash_file(&recipe.path)?,
        build_key,
        raw_size: info.raw_size,
        file_size: info.file_size,
        entrypoint,
        tests: recipe.tests.clone(),
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    };
    store.publish(&publish, &manifest)?;
    Ok(Built {
        manifest,
        cached: false,
    })
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

/// SHA-256 over every input of the build, hex.
fn build_key(
    recipe: &Recipe,
    guest_init: &Path,
    parent: Option<&Manifest>,
) -> Result<String, BuildError> {
    let mut hasher = Sha256::new();
    hasher.update(format!("kiln-image-format-{}\0", image::VERSION));
    hasher.update(parent.map_or("scratch", |p| p.digest.as_str()));
    let mut inputs = vec![recipe.dir.clone(), guest_init.to_path_buf()];
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

    #[test]
    fn uuids_from_keys_are_well_formed_and_stable() {
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(uuid_from(key), uuid_from(key));
        let uuid = uuid_from(key);
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "4");
        assert!("89ab".contains(&uuid[19..20]), "{uuid}");
    }
}
