//! The threads that fill a volume's hydration cache in the background:
//! they serve the cache's prefetch queue (`kiln_image::hydrate`), which
//! holds the readahead of the guest's sequential reads and the chunks the
//! image's first boot read ([`super::working_set`]). Each goes under the
//! [`ThreadKind::Hydrate`] seccomp filter when the VM's threads do.
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_image::hydrate::Hydrated;

use crate::seccomp::{self, ThreadKind};

/// Workers per volume at most: two per core keep the cores busy while
/// each waits for its batch's fdatasync (`kiln_image::hydrate::fillers`);
/// decompression and SHA-256 are CPU-bound, so more only adds threads.
const MAX_WORKERS: usize = 8;

/// A volume's prefetch workers, stopped and joined when dropped.
#[derive(Debug)]
pub(super) struct Prefetchers {
    cache: Arc<Hydrated>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetchers {
    /// Two workers per host core (at most [`MAX_WORKERS`]) serving
    /// `cache`, each under its seccomp filter first when `seccomp`.
    pub(super) fn start(cache: Arc<Hydrated>, seccomp: bool) -> io::Result<Self> {
        let count = kiln_image::hydrate::fillers().min(MAX_WORKERS);
        let mut workers = Prefetchers {
            cache,
            threads: Vec::with_capacity(count),
        };
        for n in 0..count {
            let cache = workers.cache.clone();
            let thread = std::thread::Builder::new()
                .name(format!("kiln-hydrate-{n}"))
                .spawn(move || serve(&cache, seccomp))?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }
}

/// A worker's life: its filter, then the queue until the volume goes. A
/// worker whose filter cannot be installed serves nothing (the VMM thread
/// fills what the guest needs itself).
fn serve(cache: &Hydrated, seccomp: bool) {
    if seccomp && let Err(err) = seccomp::install(ThreadKind::Hydrate) {
        log::error!("{}", crate::report::one_line(&err));
        return;
    }
    cache.serve_prefetch();
}

impl Drop for Prefetchers {
    fn drop(&mut self) {
        self.cache.stop_prefetch();
        for thread in self.threads.drain(..) {
            // A worker does not panic; if one did, its message is printed.
            let _ = thread.join();
        }
    }
}
