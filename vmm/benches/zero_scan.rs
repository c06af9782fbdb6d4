//! How fast a snapshot's zero-page scan goes
//! ([`kiln_vmm::vstate::memory::nonzero_runs`]): 128 MiB of real zero pages
//! with one non-zero byte at the very end, the shape of a mostly idle
//! guest's RAM, whose zero pages a snapshot leaves as holes.
//!
//! Run it with `cargo bench -p kiln-vmm --bench zero_scan`. It prints one
//! JSON object on stdout (the scan's throughput in GiB/s over the measured
//! runs: `zero_scan_gib_per_s_p50`, `_min` and `_max`, with the bytes and
//! runs behind them) and one line for people on stderr.
use std::hint::black_box;
use std::time::Instant;

use kiln_vmm::vstate::memory::{PAGE_SIZE, nonzero_runs};

/// The guest RAM scanned per run.
const SCANNED_BYTES: usize = 128 << 20;
/// Runs measured, after one that warms the caches and TLB.
const RUNS: usize = 15;

fn main() {
    // Written twice so the pages are real ones, not the shared zero page a
    // calloc'd buffer reads as (`black_box` keeps the first write).
    let mut bytes = black_box(vec![1u8; SCANNED_BYTES]);
    bytes.fill(0);
    *bytes.last_mut().expect("the buffer is not empty") = 1;
    scan_seconds(&bytes);
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| SCANNED_BYTES as f64 / f64::from(1 << 30) / scan_seconds(&bytes))
        .collect();
    rates.sort_by(f64::total_cmp);
    let (min, p50, max) = (rates[0], rates[RUNS / 2], rates[RUNS - 1]);
    let report = serde_json::json!({
        "zero_scan_bytes": SCANNED_BYTES,
        "zero_scan_runs": RUNS,
        "zero_scan_gib_per_s_p50": p50,
        "zero_scan_gib_per_s_min": min,
        "zero_scan_gib_per_s_max": max,
    });
    println!("{report}");
    eprintln!(
        "zero scan: {} MiB, {RUNS} runs: p50 {p50:.1} GiB/s (min {min:.1}, max {max:.1})",
        SCANNED_BYTES >> 20
    );
}

/// Seconds one scan of `bytes` takes; panics unless it finds exactly the
/// last page, so a scan that stops early cannot look fast.
fn scan_seconds(bytes: &[u8]) -> f64 {
    let started = Instant::now();
    let runs: Vec<_> = nonzero_runs(black_box(bytes)).collect();
    let seconds = started.elapsed().as_secs_f64();
    let last_page = bytes.len() - PAGE_SIZE..bytes.len();
    assert_eq!(runs, [last_page]);
    seconds
}
