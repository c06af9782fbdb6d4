//! Importing a root tree from a container image archive or a tarball.
//!
//! - An OCI image layout in a tar (`index.json`, `blobs/sha256/…`; OCI image
//!   spec, "Image Layout") or `docker save` output (`manifest.json` listing
//!   `Layers`): the first image's layers, in order.
//! - A rootfs tarball: one layer.
//!
//! Layers may be plain, gzip or zstd tars. Whiteouts (OCI image spec,
//! "Representing Changes"): `.wh.NAME` deletes NAME from the layers below;
//! `.wh..wh..opq` empties its directory of what the layers below put there.
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// Why an archive could not be imported. Each names the archive.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{archive}: not an OCI image layout or docker save archive (no index.json or manifest.json)"
    )]
    NotAnImage { archive: PathBuf },
    #[error("{archive}: {what}")]
    Invalid { archive: PathBuf, what: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.into(),
        source,
    }
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    layers: Vec<String>,
}

/// Applies the first image's layers of the OCI or docker archive to `stage`;
/// `scratch` is a directory for unpacking the archive itself.
pub fn import_image(archive: &Path, stage: &Path, scratch: &Path) -> Result<(), OciError> {
    let unpacked = scratch.join("oci-archive");
    fs::create_dir_all(&unpacked).map_err(io_err(&unpacked))?;
    let file = File::open(archive).map_err(io_err(archive))?;
    tar::Archive::new(BufReader::new(file))
        .unpack(&unpacked)
        .map_err(io_err(archive))?;
    for layer in layer_paths(archive, &unpacked)? {
        apply_layer(&layer, stage)?;
    }
    Ok(())
}

/// Applies a rootfs tarball to `stage`.
pub fn import_tarball(tarball: &Path, stage: &Path) -> Result<(), OciError> {
    apply_layer(tarball, stage)
}

fn layer_paths(archive: &Path, unpacked: &Path) -> Result<Vec<PathBuf>, OciError> {
    let invalid = |what: String| OciError::Invalid {
        archive: archive.into(),
        what,
    };
    let read_json = |name: &Path| -> Result<Vec<u8>, OciError> {
        fs::read(unpacked.join(name)).map_err(io_err(archive))
    };
    let blob = |digest: &str| -> Result<PathBuf, OciError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let hex = hex.ok_or_else(|| {
            invalid(format!(
                "unsupported digest {digest:?}: expected sha256:<64 hex digits>"
            ))
        })?;
        Ok(unpacked.join("blobs/sha256").join(hex))
    };
    if unpacked.join("index.json").is_file() {
        let index: OciIndex = serde_json::from_slice(&read_json(Path::new("index.json"))?)
            .map_err(|e| invalid(format!("index.json: {e}")))?;
        let first = index
            .manifests
            .first()
            .ok_or_else(|| invalid("index.json lists no manifests".into()))?;
        let manifest: OciManifest =
            serde_json::from_slice(&fs::read(blob(&first.digest)?).map_err(io_err(archive))?)
                .map_err(|e| invalid(format!("manifest {}: {e}", first.digest)))?;
        return manifest
            .layers
            .iter()
            .map(|layer| blob(&layer.digest))
            .collect();
    }
    if unpacked.join("manifest.json").is_file() {
        let manifests: Vec<DockerManifest> =
            serde_json::from_slice(&read_json(Path::new("manifest.json"))?)
                .map_err(|e| invalid(format!("manifest.json: {e}")))?;
        let first = manifests
            .first()
            .ok_or_else(|| invalid("manifest.json lists no images".into()))?;
        return first
            .layers
            .iter()
            .map(|layer| Ok(unpacked.join(safe_relative(layer, archive)?)))
            .collect();
    }
    Err(OciError::NotAnImage {
        archive: archive.into(),
    })
}

/// Opens a layer, undoing gzip or zstd compression (told by magic bytes).
fn open_layer(path: &Path) -> Result<Box<dyn Read>, OciError> {
    let mut file = BufReader::new(File::open(path).map_err(io_err(path))?);
    let mut magic = [0u8; 4];
    let peeked = io::BufRead::fill_buf(&mut file).map_err(io_err(path))?;
    magic[..peeked.len().min(4)].copy_from_slice(&peeked[..peeked.len().min(4)]);
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(file)),
        [0x28, 0xb5, 0x2f, 0xfd] => {
            Box::new(zstd::Decoder::with_buffer(file).map_err(io_err(path))?)
        }
        _ => Box::new(file),
    })
}

fn apply_layer(layer: &Path, stage: &Path) -> Result<(), OciError> {
    fs::create_dir_all(stage).map_err(io_err(stage))?;
    let mut archive = tar::Archive::new(open_layer(layer)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(io_err(layer))? {
        let mut entry = entry.map_err(io_err(layer))?;
        let path = entry.path().map_err(io_err(layer))?.into_owned();
        let relative = safe_relative(&path.to_string_lossy(), layer)?;
        let name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = stage.join(relative.parent().unwrap_or(Path::new("")));
        if name == OPAQUE_WHITEOUT {
            empty_dir(&parent)?;
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            remove_any(&parent.join(hidden))?;
        } else {
            // A lower layer's file where this layer has a directory, or
            // the other way round: the upper layer wins.
            let target = stage.join(&relative);
            if entry.header().entry_type().is_dir()
                != fs::symlink_metadata(&target)
                    .map(|m| m.is_dir())
                    .unwrap_or(true)
            {
                remove_any(&target)?;
            }
            entry.unpack_in(stage).map_err(io_err(layer))?;
        }
    }
    Ok(())
}

/// A layer path as a relative path with no `..`: archives are untrusted.
fn safe_relative(path: &str, archive: &Path) -> Result<PathBuf, OciError> {
    let mut relative = PathBuf::new();
    for component in Path::new(path).components() {
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

fn remove_any(path: &Path) -> Result<(), OciError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err),
    };
    result.map_err(io_err(path))
}

fn empty_dir(dir: &Path) -> Result<(), OciError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        remove_any(&entry.map_err(io_err(dir))?.path())?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

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
        let digest = |bytes: &[u8]| crate::image::hex(&Sha256::digest(bytes));
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

    #[test]
    fn oci_layout_layers_apply_in_order_with_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = layers();
        let archive = dir.path().join("image.tar");
        fs::write(&archive, oci_archive(&[lower, upper])).unwrap();
        let stage = dir.path().join("stage");
        import_image(&archive, &stage, dir.path()).unwrap();
        assert_layers_applied(&stage);
    }

    #[test]
    fn docker_save_archives_are_read_too() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = layers();
        let manifest = serde_json::to_vec(&serde_json::json!([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}])).unwrap();
        let archive = dir.path().join("saved.tar");
        fs::write(
            &archive,
            tar_files(&[
                ("manifest.json", &manifest),
                ("l1/layer.tar", &lower),
                ("l2/layer.tar", &upper),
            ]),
        )
        .unwrap();
        let stage = dir.path().join("stage");
        import_image(&archive, &stage, dir.path()).unwrap();
        assert_layers_applied(&stage);
    }

    #[test]
    fn bad_archives_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("plain.tar");
        fs::write(&archive, tar_of(&[("hello", Some("hi"))])).unwrap();
        let err = import_image(&archive, &dir.path().join("s"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain.tar: not an OCI image layout"), "{err}");
        let err = safe_relative("../../etc/passwd", &archive)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsafe path"), "{err}");
        // A rootfs tarball is one layer.
        import_tarball(&archive, &dir.path().join("rootfs")).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("rootfs/hello")).unwrap(),
            "hi"
        );
    }
}
