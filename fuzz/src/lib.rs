//! The fuzz targets' entry points, one function per target, each taking
//! the fuzzer's bytes. `fuzz_targets/<name>.rs` calls `<name>` under
//! libFuzzer; the workspace's `tests/fuzz_corpus.rs` includes this file
//! and replays the kept corpus (`corpus/<name>/`) and crash cases
//! (`regressions/<name>/`) through the same functions on stable.
//!
//! A target returns normally on any input, accepted or refused: what it
//! finds is a panic (an index out of range, an overflow, a failed
//! assertion), a crash, a hang or an allocation beyond libFuzzer's limit.
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_vmm::devices::virtio::{block, net, vsock};
use sha2::{Digest, Sha256};

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by its name in `fuzz_targets/` and `corpus/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("recipe", recipe),
    ("image", image),
    ("snapshot_state", snapshot_state),
    ("oci_archive", oci_archive),
    ("api_request", api_request),
    ("virtio_blk", virtio_blk),
    ("virtio_net_tx", virtio_net_tx),
    ("vsock_tx", vsock_tx),
    ("guest_cmdline", guest_cmdline),
    ("init_json", init_json),
];

/// A recipe (`recipe.toml`), as `kiln build` parses it.
pub fn recipe(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kiln_builder::recipe::parse(text, Path::new("recipe.toml"));
    }
}

/// An image file: its header and index checked as `Reader::open` does,
/// then its first chunks decompressed and checked against the index. The
/// header's checksum of the index and layer table is made right first
/// (where the header says where they start), so that mutations of the
/// index reach its checks instead of stopping at the checksum.
pub fn image(data: &[u8]) {
    let mut data = data.to_vec();
    fix_index_checksum(&mut data);
    let path = scratch_file("image", &data);
    if let Ok(reader) = kiln_image::Reader::open(&path) {
        for n in 0..reader.chunk_count().min(4) {
            let _ = reader.chunk(n);
        }
    }
}

/// A snapshot's state file, read as a restore reads it. The body's
/// checksum is made right first (where the frame holds one), so that
/// mutations reach the state's parser instead of stopping at the checksum.
pub fn snapshot_state(data: &[u8]) {
    let mut data = data.to_vec();
    fix_state_checksum(&mut data);
    let path = scratch_file("state", &data);
    let _ =
        kiln_vmm::snapshot::file::read_state::<kiln_vmm::snapshot::machine::MachineState>(&path);
}

/// An OCI or `docker save` archive (the first byte even) or a rootfs
/// tarball (odd), imported into a fresh stage as a `tar:`/`oci:` base is.
pub fn oci_archive(data: &[u8]) {
    let Some((&kind, archive)) = data.split_first() else {
        return;
    };
    let path = scratch_file("archive", archive);
    let work = tempfile::tempdir_in(scratch_dir()).expect("a scratch directory");
    let Ok(stage) = kiln_builder::stage::Stage::create(&work.path().join("stage")) else {
        return;
    };
    // Either importer may refuse the archive; neither may panic.
    if kind % 2 == 0 {
        let _ = kiln_builder::oci::import_image(&path, &stage, work.path());
    } else {
        let _ = kiln_builder::oci::import_tarball(&path, &stage);
    }
}

/// Sets an image header's index checksum (docs in `kiln_image`: the first
/// 24 bytes, at 40, of the SHA-256 of everything from the index offset, at
/// 32, to the end) to that of what `data` holds there.
fn fix_index_checksum(data: &mut [u8]) {
    if data.len() < 64 {
        return; // shorter than a header
    }
    let index = u64::from_le_bytes(data[32..40].try_into().expect("8 bytes"));
    if let Some(tail) = usize::try_from(index).ok().and_then(|at| data.get(at..)) {
        let digest = Sha256::digest(tail);
        data[40..64].copy_from_slice(&digest[..24]);
    }
}

/// Sets the SHA-256 field of a state file's frame (docs in
/// `kiln_vmm::snapshot::file`: magic, version, the Kiln version's length
/// and bytes, the body's length, its SHA-256, the body) to the digest of
/// what follows it.
fn fix_state_checksum(data: &mut [u8]) {
    let Some(len) = data.get(12..16) else {
        return;
    };
    let version_len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    let digest_at = 16 + version_len.min(data.len()) + 8;
    if data.len() >= digest_at + 32 {
        let digest = Sha256::digest(&data[digest_at + 32..]);
        data[digest_at..digest_at + 32].copy_from_slice(&digest);
    }
}

/// A control API request (HTTP/1.1 on the instance's socket).
pub fn api_request(data: &[u8]) {
    let _ = kiln_control::api::parse_request(data);
}

/// A virtio-blk request chain.
pub fn virtio_blk(data: &[u8]) {
    block::fuzz_request(data);
}

/// A virtio-net transmit chain.
pub fn virtio_net_tx(data: &[u8]) {
    net::fuzz_tx_frame(data);
}

/// A virtio-vsock transmit chain.
pub fn vsock_tx(data: &[u8]) {
    vsock::fuzz_tx_packet(data);
}

/// A kernel command line, as guest-init reads its `kiln.*` parameters.
pub fn guest_cmdline(data: &[u8]) {
    let _ = guest_init::config::kiln_params(&String::from_utf8_lossy(data));
}

/// `/etc/kiln/init.json` (before the first NUL byte) with the kernel
/// command line's overrides (after it), resolved as guest-init does.
pub fn init_json(data: &[u8]) {
    let (file, cmdline) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let _ = guest_init::config::RunConfig::resolve(Some(file), &String::from_utf8_lossy(cmdline));
}

/// A directory of this process's, for the targets that read files.
fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"))
        .path()
}

/// Writes `data` to the scratch file `name` and returns its path.
fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    fs::write(&path, data).expect("the scratch file is writable");
    path
}
