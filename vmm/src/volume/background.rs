//! The background fill of an image's hydration cache for VM processes that
//! only read it: jailed ones, each under a uid of its own, whose writes
//! the image's other VMs must not trust ([`Hydrated::open_read_only`]).
//! The trusted process that starts them (an instance's supervisor, a
//! plain `kiln run`, `kiln fn` for its clones; an image's test VMs use
//! no cache) opens the cache, which makes and checks it,
//! and fills it on one thread: the image's boot working set first, if an
//! earlier boot recorded one ([`super::working_set`]), then every other
//! chunk in order. The thread runs at idle priority (`SCHED_IDLE`: a core
//! the VMs leave idle), under the [`ThreadKind::Hydrate`] seccomp filter,
//! until the cache is full or the process ends; a fill cut short leaves
//! the cache consistent (`kiln_image::hydrate`'s crash safety). One fill
//! per cache per process: later VMs of the image find it under way.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_image::Reader;
use kiln_image::hydrate::{CacheFiles, Hydrated};

use super::{VolumeError, working_set};
use crate::seccomp::{self, ThreadKind};

/// The caches this process is filling, by their raw file.
static FILLING: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// [`FILLING`], locked: a panic elsewhere never leaves its set wrong.
fn filling() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    FILLING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens the hydration cache of the image at `image` in `cache_dir`
/// (made and checked if need be) and, unless this process fills it
/// already or it is full, starts filling it in the background; returns
/// its files, for the VM processes that read it.
pub fn start(image: &Path, cache_dir: &Path) -> Result<CacheFiles, VolumeError> {
    let cache = Hydrated::open(Reader::open(image)?, cache_dir)?;
    let files = cache.files().clone();
    let reader = cache.reader();
    if cache.hydrated_bytes() == reader.raw_size() {
        return Ok(files);
    }
    if !filling().insert(files.raw.clone()) {
        return Ok(files);
    }
    let (id, count) = (reader.content_id(), reader.chunk_count());
    let first = working_set::read(&working_set::path(image), &id, count)
        .ok()
        .flatten()
        .unwrap_or_default();
    let raw = files.raw.clone();
    let spawned = std::thread::Builder::new()
        .name("kiln-hydrate-bg".into())
        .spawn(move || fill(&cache, &first));
    if let Err(source) = spawned {
        filling().remove(&raw);
        return Err(VolumeError::Prefetch {
            image: image.to_path_buf(),
            source,
        });
    }
    Ok(files)
}

/// The filling thread's life: idle priority and its filter, then the
/// whole cache, `first` first. What stops it is logged; the VMs go on
/// reading what is there and decompressing the rest themselves.
fn fill(cache: &Hydrated, first: &[u32]) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads the sched_param it is given, which
    // lives across the call; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        log::warn!(
            "hydrating {} at normal priority: SCHED_IDLE refused: {}",
            cache.reader().path().display(),
            std::io::Error::last_os_error()
        );
    }
    let filled = seccomp::install(ThreadKind::Hydrate)
        .map_err(|err| crate::report::one_line(&err))
        .and_then(|()| {
            cache
                .hydrate_all_here(first)
                .map_err(|err| crate::report::one_line(&err))
        });
    if let Err(err) = filled {
        log::warn!("the background fill of a hydration cache stopped: {err}");
    }
    filling().remove(&cache.files().raw);
}
