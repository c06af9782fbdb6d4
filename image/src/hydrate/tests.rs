use super::*;
use crate::write;

/// The frame size: frames of one or two chunks.
const CHUNK: u32 = 16 * 1024;

/// An image of noise, but for 160 KiB of zeros from 96 KiB on (twice the
/// largest chunk: a chunk of zeros, [`zero_chunk`]); returns its raw
/// bytes too.
fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let len = 24 * CHUNK as usize + 5000;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut data: Vec<u8> = (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    data[6 * CHUNK as usize..16 * CHUNK as usize].fill(0);
    let raw = dir.join("raw");
    std::fs::write(&raw, &data).unwrap();
    let image = dir.join("image.kiln");
    write(&raw, &image, CHUNK).unwrap();
    (image, data)
}

/// The first chunk of zeros.
fn zero_chunk(reader: &Reader) -> u32 {
    (0..reader.chunk_count())
        .find(|&n| reader.is_zero_chunk(n))
        .expect("a chunk of zeros")
}

/// Raw bytes of `chunks`.
fn bytes_of(reader: &Reader, chunks: impl IntoIterator<Item = u32>) -> u64 {
    chunks.into_iter().map(|n| reader.chunk_len(n) as u64).sum()
}

/// Raw bytes of the chunks of zeros.
fn zero_bytes(reader: &Reader) -> u64 {
    bytes_of(
        reader,
        (0..reader.chunk_count()).filter(|&n| reader.is_zero_chunk(n)),
    )
}

fn open(image: &Path, dir: &Path) -> Hydrated {
    Hydrated::open(Reader::open(image).unwrap(), &dir.join("cache")).unwrap()
}

fn read_all(cache: &Hydrated) -> Vec<u8> {
    let mut buf = vec![0; cache.reader().raw_size() as usize];
    cache.read_exact_at(0, &mut buf).unwrap();
    buf
}

/// The first byte of chunk `n`'s frame flipped in the image file: every
/// chunk of that frame is damaged; returns them.
fn damage_chunk(image: &Path, n: u32) -> Vec<u32> {
    let reader = Reader::open(image).unwrap();
    let entry = &reader.index[n as usize];
    let mut bytes = std::fs::read(image).unwrap();
    // Its zstd magic number: the frame does not decompress at all.
    bytes[entry.frame_offset as usize] ^= 0x40;
    std::fs::write(image, bytes).unwrap();
    (0..reader.chunk_count())
        .filter(|&m| reader.index[m as usize].frame_offset == entry.frame_offset)
        .collect()
}

#[test]
fn reads_fill_the_cache_and_zeros_take_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache = open(&image, dir.path());
    assert_eq!(cache.hydrated_bytes(), 0);
    let mut piece = vec![0; 40_000];
    cache.read_exact_at(30_000, &mut piece).unwrap();
    assert_eq!(piece, &data[30_000..70_000]);
    let touched = bytes_of(cache.reader(), cache.reader().chunks_of(30_000, 40_000));
    assert_eq!(cache.hydrated_bytes(), touched, "the chunks read");
    assert_eq!(read_all(&cache), data);
    assert_eq!(cache.hydrated_bytes(), data.len() as u64);
    let on_disk = cache.files().hydrated_bytes(cache.reader()).unwrap();
    assert_eq!(on_disk, data.len() as u64);
    // The zero chunks are holes of the raw file
    let zeros = cache.reader().chunk_offset(zero_chunk(cache.reader()));
    // (from the block after the one the chunk before ends in)
    let hole = zeros.next_multiple_of(4096);
    assert_eq!(seek(&cache.raw, zeros, libc::SEEK_HOLE).unwrap(), hole);
    drop(cache);
    let again = open(&image, dir.path());
    assert_eq!(again.hydrated_bytes(), data.len() as u64);
    assert_eq!(read_all(&again), data);
}

#[test]
fn a_chunk_is_decompressed_once_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let first = open(&image, dir.path());
    let second = open(&image, dir.path());
    let mut buf = vec![0; first.reader().chunk_len(0)];
    first.read_exact_at(0, &mut buf).unwrap();
    // Chunk 0 can no longer be decompressed: the second cache serves it
    // from what the first wrote, which it learns of under the lock.
    damage_chunk(&image, 0);
    let second_reader = Reader::open(&image).unwrap();
    assert!(second_reader.chunk(0).is_err());
    second.read_exact_at(0, &mut buf).unwrap();
    assert_eq!(buf, &data[..buf.len()]);
}

#[test]
fn concurrent_fills_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let caches: Vec<Hydrated> = (0..3).map(|_| open(&image, dir.path())).collect();
    std::thread::scope(|scope| {
        for (i, cache) in caches.iter().enumerate() {
            let data = &data;
            scope.spawn(move || {
                // Each walks the image from another chunk, 4 KiB at a time.
                let len = data.len() as u64;
                let mut at = i as u64 * 3 * u64::from(CHUNK) % len;
                let mut buf = [0u8; 4096];
                for _ in 0..len.div_ceil(4096) {
                    let n = (len - at).min(4096) as usize;
                    cache.read_exact_at(at, &mut buf[..n]).unwrap();
                    assert_eq!(buf[..n], data[at as usize..at as usize + n]);
                    at = (at + n as u64) % len;
                }
            });
        }
    });
    let whole = Hydrated::open(Reader::open(&image).unwrap(), &dir.path().join("cache")).unwrap();
    assert_eq!(whole.hydrated_bytes(), data.len() as u64);
}

#[test]
fn a_damaged_chunk_never_enters_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = image(dir.path());
    let damaged = damage_chunk(&image, 1);
    let cache = open(&image, dir.path());
    let mut buf = vec![0; 100];
    let err = cache
        .read_exact_at(cache.reader().chunk_offset(1), &mut buf)
        .unwrap_err();
    assert!(matches!(
        err,
        HydrateError::Image(ImageError::Chunk { chunk: 1, .. })
    ));
    assert_eq!(cache.hydrated_bytes(), 0);
    // A fill of several stops at nothing but the damaged ones.
    assert!(cache.fill(&[0, 1, 2, 3]).is_err());
    let whole = (0..4).filter(|n| !damaged.contains(n));
    assert_eq!(cache.hydrated_bytes(), bytes_of(cache.reader(), whole));
    // So does hydrating it all: the damage is reported, and nothing of it
    // is held.
    let err = cache.hydrate_all(2, 2, &mut |_| {}).unwrap_err();
    assert!(matches!(err, HydrateError::Image(ImageError::Chunk { .. })));
    let states = cache.states().clone();
    assert!(damaged.iter().all(|&n| states[n as usize] == ABSENT));
}

#[test]
fn a_damaged_cache_is_refilled_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache = open(&image, dir.path());
    read_all(&cache);
    let files = cache.files().clone();
    drop(cache);
    // A hole punched where chunk 1 was.
    let raw = OpenOptions::new().write(true).open(&files.raw).unwrap();
    // SAFETY: fallocate only reads its integer arguments; `raw` is open.
    let punched = unsafe {
        libc::fallocate(
            raw.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            i64::from(CHUNK),
            4096,
        )
    };
    assert_eq!(punched, 0);
    let cache = open(&image, dir.path());
    let holed = bytes_of(
        cache.reader(),
        cache.reader().chunks_of(u64::from(CHUNK), 4096),
    );
    assert_eq!(cache.hydrated_bytes(), data.len() as u64 - holed);
    assert_eq!(read_all(&cache), data);
    drop(cache);
    // A truncated raw file.
    let reader = Reader::open(&image).unwrap();
    let kept = reader.chunk_offset(2);
    raw.set_len(kept + 10).unwrap();
    let cache = open(&image, dir.path());
    assert_eq!(
        cache.hydrated_bytes(),
        kept + zero_bytes(&reader),
        "chunks 0 and 1 kept, the zero chunks need no data"
    );
    assert_eq!(read_all(&cache), data);
    drop(cache);
    // A garbled record starts over.
    std::fs::write(&files.present, b"garbage").unwrap();
    let cache = open(&image, dir.path());
    assert_eq!(cache.hydrated_bytes(), 0);
    assert_eq!(read_all(&cache), data);
    cache.files().remove().unwrap();
    assert!(!files.raw.exists() && !files.present.exists());
}

#[test]
fn a_read_only_process_reads_what_the_filler_wrote_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache_dir = dir.path().join("cache");
    let reader_of = || Reader::open(&image).unwrap();
    assert!(matches!(
        Hydrated::open_read_only(reader_of(), &cache_dir),
        Err(HydrateError::Io { .. })
    ));
    let filler = open(&image, dir.path());
    let reader = Hydrated::open_read_only(reader_of(), &cache_dir).unwrap();
    assert!(filler.fills() && !reader.fills());
    // Nothing there yet: served from memory, and the cache stays empty.
    let (offset, len) = (u64::from(CHUNK) / 2, 2 * CHUNK as usize);
    let mut buf = vec![0; len];
    reader.read_exact_at(offset, &mut buf).unwrap();
    assert_eq!(buf, data[offset as usize..][..len]);
    assert_eq!(filler.files().hydrated_bytes(filler.reader()).unwrap(), 0);
    // Once the filler wrote the chunks, the reader's next read finds them.
    filler.read_exact_at(offset, &mut buf).unwrap();
    let chunks = reader.reader().chunks_of(offset, len as u64);
    let mut pieces = Vec::new();
    reader
        .read_with(offset, len, |piece| {
            pieces.push(matches!(piece, Piece::File { .. }));
            Ok::<_, HydrateError>(())
        })
        .unwrap();
    assert_eq!(pieces, [true], "one run of the raw file");
    let filled = bytes_of(reader.reader(), chunks);
    assert_eq!(reader.hydrated_bytes(), filled);
    assert_eq!(read_all(&reader), data);
    assert_eq!(
        filler.files().hydrated_bytes(filler.reader()).unwrap(),
        filled,
        "the reader's whole read wrote nothing"
    );
    // A filler with no threads of its own, the listed chunks (those past
    // the end ignored) first.
    filler.hydrate_all_here(&[7, 3, u32::MAX]).unwrap();
    assert_eq!(filler.hydrated_bytes(), data.len() as u64);
    assert_eq!(read_all(&reader), data);
}

#[test]
fn hydrate_all_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache = open(&image, dir.path());
    let mut seen = Vec::new();
    cache
        .hydrate_all(4, 2, &mut |bytes| seen.push(bytes))
        .unwrap();
    // Once per fill, never going back, the last one all of it.
    let fills = cache.batches(0..cache.reader().chunk_count(), 4).len();
    assert_eq!(seen.len(), fills);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(seen.last(), Some(&(data.len() as u64)));
    assert_eq!(read_all(&cache), data);
    let err = cache.read_exact_at(data.len() as u64 - 1, &mut [0; 2]);
    assert!(matches!(
        err,
        Err(HydrateError::Image(ImageError::OutOfRange { .. }))
    ));
}

#[test]
fn a_cache_that_cannot_take_chunks_serves_them_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let mut cache = open(&image, dir.path());
    // Every write of chunk data fails with ENOSPC.
    cache.raw = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut buf = vec![0; 20 * CHUNK as usize];
    cache.read_exact_at(100, &mut buf).unwrap();
    assert_eq!(buf, data[100..100 + buf.len()]);
    // Only chunks of zeros, which need no data.
    let zeros = (cache.reader().chunks_of(100, buf.len() as u64))
        .filter(|&n| cache.reader().is_zero_chunk(n));
    let zeros = bytes_of(cache.reader(), zeros);
    assert!(zeros > 0);
    assert_eq!(cache.hydrated_bytes(), zeros);
    assert!(matches!(
        cache.take_fill_error(),
        Some(HydrateError::Io { .. })
    ));
    cache.read_exact_at(100, &mut buf).unwrap();
    assert!(cache.take_fill_error().is_none(), "reported once");
}

/// Runs `f` with `workers` prefetch workers serving `cache`, then stops
/// them.
fn with_workers(cache: &Hydrated, workers: usize, f: impl FnOnce()) {
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| cache.serve_prefetch());
        }
        while cache.queue().workers < workers {
            std::thread::yield_now();
        }
        f();
        cache.stop_prefetch();
    });
}

/// Waits (up to 10 s) until `cache` holds `bytes`.
fn wait_for_bytes(cache: &Hydrated, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cache.hydrated_bytes() != bytes && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(cache.hydrated_bytes(), bytes);
}

#[test]
fn a_sequential_read_queues_the_chunks_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache = open(&image, dir.path());
    let reader = cache.reader();
    let last = reader.chunk_count() - 1;
    let (at, len) = (
        reader.chunk_offset(last - 3),
        reader.chunk_len(last - 3) as u64,
    );
    with_workers(&cache, 2, || {
        let mut buf = vec![0; 10];
        // A first read, then one elsewhere: no readahead.
        cache.read_exact_at(0, &mut buf).unwrap();
        cache.read_exact_at(at, &mut buf).unwrap();
        assert_eq!(cache.hydrated_bytes(), bytes_of(reader, [0, last - 3]));
        // Reading on queues the chunks after it, to the image's end.
        cache.read_exact_at(at + 10, &mut buf).unwrap();
        wait_for_bytes(&cache, bytes_of(reader, [0]) + data.len() as u64 - at);
        let mut buf = vec![0; (data.len() as u64 - at - len) as usize];
        cache.read_exact_at(at + len, &mut buf).unwrap();
        assert_eq!(buf, data[(at + len) as usize..]);
    });
}

#[test]
fn without_workers_a_read_fills_only_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = image(dir.path());
    let cache = open(&image, dir.path());
    // Two reads, one after the other, within chunk 0.
    let mut buf = vec![0; cache.reader().chunk_len(0) / 2];
    cache.read_exact_at(0, &mut buf).unwrap();
    cache.read_exact_at(buf.len() as u64, &mut buf).unwrap();
    assert_eq!(cache.hydrated_bytes(), bytes_of(cache.reader(), [0]));
    assert!(cache.queue().chunks.is_empty(), "nothing queued");
}

#[test]
fn workers_fill_a_long_read_and_a_prefetch_list_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache = open(&image, dir.path());
    let reader = cache.reader();
    with_workers(&cache, 3, || {
        // Chunks 0-6 at once: this thread fills some, the workers others.
        let mut buf = vec![0; reader.chunk_offset(7) as usize];
        cache.read_exact_at(0, &mut buf).unwrap();
        assert_eq!(buf, data[..buf.len()]);
        assert_eq!(cache.hydrated_bytes(), buf.len() as u64);
        cache.prefetch([8, 7, 4242]);
        wait_for_bytes(&cache, reader.chunk_offset(9));
    });
    assert!(cache.queue().chunks.is_empty());
    assert_eq!(read_all(&cache), data);
}

#[test]
fn a_fill_waits_for_another_open_files_lock_on_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = image(dir.path());
    let cache = open(&image, dir.path());
    // Another open file of `.present` holding chunk 2's byte: a fill of
    // chunk 2 waits for it, with chunk 1 (both locked together).
    let other = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cache.files().present)
        .unwrap();
    let held = RecordLocks::take(&other, [(HEADER_LEN as u64 + 2, 1)]).unwrap();
    std::thread::scope(|scope| {
        let fill = scope.spawn(|| cache.fill(&[1, 2]));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!fill.is_finished(), "the fill waits for chunk 2's lock");
        assert_eq!(cache.hydrated_bytes(), 0, "chunk 1 is locked with it");
        drop(held);
        fill.join().unwrap().unwrap();
    });
    assert_eq!(cache.hydrated_bytes(), bytes_of(cache.reader(), [1, 2]));
}

#[test]
fn a_frame_goes_whole_to_one_filler() {
    let dir = tempfile::tempdir().unwrap();
    let (image, data) = image(dir.path());
    let cache = open(&image, dir.path());
    let reader = cache.reader();
    let count = reader.chunk_count();
    let batches = cache.batches(0..count, 1);
    // The batches cover every chunk in order, no frame is cut between two
    // of them, and a batch goes on past its size only within a frame.
    let flat: Vec<u32> = batches.concat();
    assert_eq!(flat, (0..count).collect::<Vec<_>>());
    for pair in batches.windows(2) {
        let (last, next) = (*pair[0].last().unwrap(), pair[1][0]);
        assert!(!reader.same_frame(last, next), "frame cut at {last}");
    }
    for batch in &batches {
        assert!(batch.iter().all(|&n| reader.same_frame(batch[0], n)));
    }
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "frames of one chunk only"
    );
    // Filled on two fillers, the cache holds the image.
    cache.hydrate_all(1, 2, &mut |_| {}).unwrap();
    assert_eq!(read_all(&cache), data);
}

#[test]
fn a_vectored_write_of_more_buffers_than_one_call_takes_writes_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let file = File::create(dir.path().join("out")).unwrap();
    let bytes: Vec<[u8; 3]> = (0..libc::UIO_MAXIOV as u32 + 500)
        .map(|n| [n as u8, (n >> 8) as u8, 0xa5])
        .collect();
    let mut slices: Vec<IoSlice<'_>> = bytes.iter().map(|b| IoSlice::new(b)).collect();
    write_all_vectored_at(&file, &mut slices, 7).unwrap();
    let written = std::fs::read(dir.path().join("out")).unwrap();
    assert_eq!(&written[..7], &[0; 7]);
    assert_eq!(written[7..], bytes.concat());
}
