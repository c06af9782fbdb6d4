use std::os::unix::fs::MetadataExt;

use kiln_image as image;

use super::*;
use crate::report::one_line;

/// Small chunks so that a few KiB of I/O crosses several of them.
const CHUNK: u32 = 16 * 1024;
/// Not a multiple of the overlay's block: the last block is short.
const CAPACITY: usize = 300 * 1024 + 1024;
const CACHE: u64 = 2 * CHUNK as u64;

/// A deterministic xorshift generator: the same run on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes an image of `CAPACITY` bytes (runs of zeros and of noise) named
/// `name` in `dir`; returns its path and its raw bytes.
fn make_image(dir: &Path, name: &str, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = Rng(seed);
    let raw: Vec<u8> = (0..CAPACITY)
        .map(|i| {
            if (i / 7000) % 3 == 0 {
                0
            } else {
                rng.next() as u8
            }
        })
        .collect();
    let raw_path = dir.join(format!("{name}.raw"));
    std::fs::write(&raw_path, &raw).unwrap();
    let path = dir.join(format!("{name}.kiln"));
    image::write(&raw_path, &path, CHUNK).unwrap();
    (path, raw)
}

fn read_all(volume: &Volume) -> Vec<u8> {
    let mut out = Vec::new();
    volume.flatten_to(&mut out).unwrap();
    out
}

/// Random reads, writes, flushes, discards, clean reopens and crashes
/// against a plain byte vector. After a crash each block must hold what it
/// held at the last flush, or what it holds now, or (if discarded since)
/// zeros: never anything else.
#[test]
fn behaves_like_a_plain_disk_under_random_operations() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, raw) = make_image(dir.path(), "base", 7);
    let overlay_path = dir.path().join("root.overlay");
    let cache_dir = dir.path().join("cache");
    for seed in 1..=6u64 {
        let _ = std::fs::remove_file(&overlay_path);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Even seeds read the image through its hydration cache, which
        // the seeds before filled in part.
        let hydrated = seed % 2 == 0;
        let reopen = || {
            if hydrated {
                let mut volume = Volume::open_hydrated(
                    &image_path,
                    Some(&overlay_path),
                    (&cache_dir, CacheAccess::Fill),
                    CACHE,
                )
                .unwrap();
                // Workers reading ahead while the volume reads and writes.
                volume.start_prefetch(false, None).unwrap();
                volume
            } else {
                Volume::open(&image_path, Some(&overlay_path), CACHE).unwrap()
            }
        };
        drop(Volume::create(&image_path, &overlay_path, CACHE).unwrap());
        let mut volume = reopen();
        let mut model = raw.clone();
        let mut flushed = raw.clone();
        let mut discarded_since_flush = vec![false; CAPACITY.div_ceil(BLOCK_SIZE as usize)];
        for step in 0..400 {
            let offset = rng.below(CAPACITY as u64 / 512) * 512;
            let len = ((rng.below(24) + 1) * 512).min(CAPACITY as u64 - offset) as usize;
            let range = offset as usize..offset as usize + len;
            match rng.below(100) {
                0..40 => {
                    let mut buf = vec![0u8; len];
                    volume.read(offset, &mut buf).unwrap();
                    assert!(
                        buf == model[range],
                        "seed {seed} step {step}: read {offset}+{len}"
                    );
                }
                40..75 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    volume.write(offset, &data).unwrap();
                    model[range].copy_from_slice(&data);
                }
                75..85 => {
                    volume.flush().unwrap();
                    flushed.clone_from(&model);
                    discarded_since_flush.fill(false);
                }
                85..92 => {
                    volume.discard(offset, len as u64).unwrap();
                    let first = offset.div_ceil(BLOCK_SIZE);
                    let end = (offset + len as u64) / BLOCK_SIZE;
                    for block in first..end {
                        let bytes =
                            (block * BLOCK_SIZE) as usize..((block + 1) * BLOCK_SIZE) as usize;
                        model[bytes.clone()].copy_from_slice(&raw[bytes]);
                        discarded_since_flush[block as usize] = true;
                    }
                }
                92..96 => {
                    // A clean stop: dropping the volume flushes it.
                    drop(volume);
                    volume = reopen();
                    assert!(
                        read_all(&volume) == model,
                        "seed {seed} step {step}: reopen"
                    );
                    flushed.clone_from(&model);
                    discarded_since_flush.fill(false);
                }
                _ => {
                    // A crash: the process ends without a flush (the file's
                    // page cache survives, as it does a kill -9).
                    volume.crash();
                    volume = reopen();
                    let now = read_all(&volume);
                    for (block, discarded) in discarded_since_flush.iter().enumerate() {
                        let start = block * BLOCK_SIZE as usize;
                        let bytes = start..(start + BLOCK_SIZE as usize).min(CAPACITY);
                        let got = &now[bytes.clone()];
                        assert!(
                            got == &flushed[bytes.clone()]
                                || got == &model[bytes.clone()]
                                || (*discarded && got.iter().all(|b| *b == 0)),
                            "seed {seed} step {step}: block {block} after a crash"
                        );
                    }
                    model = now;
                    flushed.clone_from(&model);
                    discarded_since_flush.fill(false);
                }
            }
        }
        drop(volume);
        let reopened = reopen();
        assert!(read_all(&reopened) == model, "seed {seed}: final state");
    }
}

#[test]
fn the_image_file_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, raw) = make_image(dir.path(), "base", 3);
    let before = std::fs::read(&image_path).unwrap();
    let mut volume = Volume::create(&image_path, &dir.path().join("o"), CACHE).unwrap();
    volume.write(4096, &[0xab; 8192]).unwrap();
    volume.flush().unwrap();
    assert_eq!(std::fs::read(&image_path).unwrap(), before);
    let read_only = Volume::open(&image_path, None, CACHE).unwrap();
    assert!(read_all(&read_only) == raw);
    assert!(matches!(
        Volume::open(&image_path, None, CACHE)
            .unwrap()
            .write(0, &[1; 512]),
        Err(VolumeError::ReadOnly)
    ));
}

#[test]
fn a_damaged_chunk_fails_its_reads_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, raw) = make_image(dir.path(), "base", 5);
    let mut bytes = std::fs::read(&image_path).unwrap();
    // The header is 64 bytes; the first frame follows it: its zstd magic
    // number changed, the frame does not decompress.
    bytes[64] ^= 0x55;
    std::fs::write(&image_path, bytes).unwrap();
    let volume = Volume::open(&image_path, None, CACHE).unwrap();
    // The first chunk after that frame's.
    let reader = image::Reader::open(&image_path).unwrap();
    let whole = (0..reader.chunk_count())
        .find(|&n| !reader.is_zero_chunk(n) && reader.chunk(n).is_ok())
        .map(|n| reader.chunk_offset(n) as usize)
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = volume.read(0, &mut buf).unwrap_err();
    assert!(
        matches!(err, VolumeError::Image(ImageError::Chunk { chunk: 0, .. })),
        "{err}"
    );
    assert!(one_line(&err).contains("base.kiln"), "{err}");
    volume.read(whole as u64, &mut buf).unwrap();
    assert_eq!(buf, raw[whole..whole + 4096]);
}

#[test]
fn a_truncated_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, _) = make_image(dir.path(), "base", 5);
    let len = std::fs::metadata(&image_path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image_path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = Volume::open(&image_path, None, CACHE).unwrap_err();
    assert!(
        matches!(err, VolumeError::Image(ImageError::Header { .. })),
        "{err}"
    );
    assert!(one_line(&err).contains("truncated"), "{err}");
}

#[test]
fn an_overlay_of_another_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = make_image(dir.path(), "first", 1);
    let (second, _) = make_image(dir.path(), "second", 2);
    let overlay = dir.path().join("root.overlay");
    drop(Volume::create(&first, &overlay, CACHE).unwrap());
    let err = Volume::open(&second, Some(&overlay), CACHE).unwrap_err();
    assert!(
        matches!(err, VolumeError::Overlay(OverlayError::WrongBase { .. })),
        "{err}"
    );
    assert!(one_line(&err).contains("root.overlay"), "{err}");
}

#[test]
fn one_process_at_a_time_holds_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, _) = make_image(dir.path(), "base", 1);
    let overlay = dir.path().join("root.overlay");
    let first = Volume::create(&image_path, &overlay, CACHE).unwrap();
    let err = Volume::open(&image_path, Some(&overlay), CACHE).unwrap_err();
    assert!(
        matches!(err, VolumeError::Overlay(OverlayError::InUse { .. })),
        "{err}"
    );
    assert!(one_line(&err).contains("root.overlay"), "{err}");
    drop(first);
    Volume::open(&image_path, Some(&overlay), CACHE).unwrap();
}

#[test]
fn damaged_overlays_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, _) = make_image(dir.path(), "base", 1);
    let overlay = dir.path().join("root.overlay");
    drop(Volume::create(&image_path, &overlay, CACHE).unwrap());
    let pristine = std::fs::read(&overlay).unwrap();
    let damaged = |mutate: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = pristine.clone();
        mutate(&mut bytes);
        std::fs::write(&overlay, bytes).unwrap();
        Volume::open(&image_path, Some(&overlay), CACHE).unwrap_err()
    };
    let not_overlay = damaged(&|b| b[0] = b'X');
    assert!(matches!(
        not_overlay,
        VolumeError::Overlay(OverlayError::BadMagic { .. })
    ));
    let version = damaged(&|b| b[8] = 2);
    assert!(matches!(
        version,
        VolumeError::Overlay(OverlayError::Version { found: 2, .. })
    ));
    let truncated = damaged(&|b| b.truncate(b.len() - 4096));
    assert!(one_line(&truncated).contains("truncated"), "{truncated}");
    assert!(one_line(&truncated).contains("root.overlay"), "{truncated}");
    let empty = damaged(&|b| b.clear());
    assert!(matches!(
        empty,
        VolumeError::Overlay(OverlayError::BadMagic { .. })
    ));
}

#[test]
fn overlays_are_sparse_and_discard_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, raw) = make_image(dir.path(), "base", 9);
    let overlay = dir.path().join("root.overlay");
    let mut volume = Volume::create(&image_path, &overlay, CACHE).unwrap();
    let allocated = || std::fs::metadata(&overlay).unwrap().blocks() * 512;
    let empty = allocated();
    assert!(empty <= 2 * BLOCK_SIZE, "a new overlay holds {empty} bytes");
    volume.write(0, &vec![0x5a; 64 * 1024]).unwrap();
    volume.flush().unwrap();
    assert!(allocated() >= empty + 64 * 1024);
    // Discard with ragged edges: only the whole blocks inside are freed.
    volume.discard(512, 64 * 1024 - 512).unwrap();
    volume.flush().unwrap();
    // What stays: block 0 (the discard's ragged head) and the bitmap page.
    assert!(
        allocated() <= empty + 2 * BLOCK_SIZE,
        "{} bytes after discard",
        allocated()
    );
    let mut head = vec![0u8; 4096];
    volume.read(0, &mut head).unwrap();
    assert_eq!(head, [0x5a; 4096]);
    let mut freed = vec![0u8; 4096];
    volume.read(8192, &mut freed).unwrap();
    assert_eq!(freed, raw[8192..12288]);
}

#[test]
fn the_short_last_block_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, mut raw) = make_image(dir.path(), "base", 4);
    let overlay = dir.path().join("root.overlay");
    let mut volume = Volume::create(&image_path, &overlay, CACHE).unwrap();
    let last = CAPACITY as u64 - 512;
    volume.write(last, &[7; 512]).unwrap();
    raw[last as usize..].fill(7);
    drop(volume);
    let volume = Volume::open(&image_path, Some(&overlay), CACHE).unwrap();
    assert!(read_all(&volume) == raw);
    let err = volume.read(last, &mut [0; 1024]).unwrap_err();
    assert!(matches!(err, VolumeError::OutOfRange { .. }), "{err}");
}

#[test]
fn a_cache_that_cannot_be_made_leaves_the_chunks_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, raw) = make_image(dir.path(), "base", 5);
    // The cache directory's place is taken by a file.
    let not_a_dir = dir.path().join("cache");
    std::fs::write(&not_a_dir, b"").unwrap();
    let volume =
        Volume::open_hydrated(&image_path, None, (&not_a_dir, CacheAccess::Fill), CACHE).unwrap();
    assert!(volume.hydrated().is_none());
    assert!(read_all(&volume) == raw);
}

/// Waits (up to 20 s) until the volume's hydration cache holds `bytes`.
fn wait_hydrated(volume: &Volume, bytes: u64) {
    let cache = volume.hydrated().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while cache.hydrated_bytes() < bytes && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(cache.hydrated_bytes(), bytes);
}

/// The first hydrated volume of an image records the chunks it read; a
/// later one, over an empty cache, has its workers (under their seccomp
/// filter) fill those chunks before any read.
#[test]
fn a_boot_working_set_is_recorded_then_prefetched() {
    let dir = tempfile::tempdir().unwrap();
    let (image_path, raw) = make_image(dir.path(), "base", 3);
    let cache_dir = dir.path().join("cache");
    let record = working_set::path(&image_path);
    let open = || {
        let mut volume =
            Volume::open_hydrated(&image_path, None, (&cache_dir, CacheAccess::Fill), CACHE)
                .unwrap();
        volume.start_prefetch(true, Some(&record)).unwrap();
        volume
    };
    let first = open();
    let reader = image::Reader::open(&image_path).unwrap();
    let (id, count) = (reader.content_id(), reader.chunk_count());
    // Reads in chunks 5, 1, 5 again and 0 (10 bytes in each).
    let at = |n: u32, within: u64| reader.chunk_offset(n) + within;
    let mut buf = vec![0u8; 10];
    for at in [at(5, 10), at(1, 0), at(5, 20), at(0, 50)] {
        first.read(at, &mut buf).unwrap();
        assert_eq!(buf, raw[at as usize..at as usize + 10]);
    }
    assert!(!record.exists(), "written when the volume goes");
    drop(first);
    let chunks = working_set::read(&record, &id, count).unwrap().unwrap();
    assert_eq!(chunks, [5, 1, 0]);

    std::fs::remove_dir_all(&cache_dir).unwrap();
    let later = open();
    let bytes = |n: u32| reader.chunk_len(n) as u64;
    wait_hydrated(&later, bytes(5) + bytes(1) + bytes(0));
    drop(later);
    let again = working_set::read(&record, &id, count).unwrap().unwrap();
    assert_eq!(again, chunks, "a later volume records nothing");
}
