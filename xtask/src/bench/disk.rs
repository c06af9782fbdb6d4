//! `cargo xtask bench disk`: how fast a guest reads its root disk when
//! Kiln serves the compressed image itself, against the same filesystem as
//! a raw file, in the same VMM and the same run.
//!
//! The image is `disk-bench` (tests/vm/bench-disk: recipes/python's files
//! and a static reader). Its entrypoint reads /dev/vda with O_DIRECT, so
//! every read reaches the virtio disk, and times itself: sequentially in
//! 1 MiB requests, and 4 KiB requests at random offsets (the same sequence
//! every run). The raw file is the same image flattened by
//! `kiln image flatten`. Both are attached read-only; runs alternate
//! between the two after one warm-up each, so both find their files in
//! the host's page cache. The volume's chunk cache has its default size.
//! Under nested emulation the guest side mostly measures QEMU TCG running
//! zstd, so the report adds the backends alone on the host's own CPU: the
//! same reads (1 MiB sequential, 4 KiB at the same random offsets) through
//! a `Volume` with a cold chunk cache, against `pread` of the raw file in
//! the page cache. The report also holds the on-disk size of the hello
//! image against its raw filesystem.
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_builder::store::Store;
use kiln_image::DEFAULT_CACHE_BYTES;
use kiln_vmm::volume::Volume;
use serde::{Deserialize, Serialize};

use super::{Stats, env, environment, kiln_home, print_report, run_guest, save, stats, time_boot};
use crate::sh;

const IMAGE: &str = "disk-bench:1.0.0";
/// The size goal's image.
const HELLO: &str = "hello:1.0.0";
/// Bytes per read: diskread.c's sequential and random request sizes.
const SEQ_READ: u64 = 1 << 20;
const RAND_READ: u64 = 4096;
/// Random 4 KiB reads per run.
const RANDOM_READS: u32 = 2000;
/// The reader prints its result after this.
const RESULT: &str = "KILN-DISK ";
/// Per guest run under nested TCG, generously.
const PER_RUN: Duration = Duration::from_secs(60);

/// What `target/bench/disk.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskReport {
    pub environment: String,
    pub image: String,
    pub runs: usize,
    pub raw_bytes: u64,
    pub image_bytes: u64,
    pub random_reads_per_run: u32,
    pub chunk_cache_mib: u64,
    /// Read by the guest: at least 0.8 is the goal for both ratios.
    pub guest: Backends,
    /// The backends alone on the host CPU (filled in by the host side).
    #[serde(default)]
    pub host: Option<Backends>,
    pub hello_raw_bytes: u64,
    pub hello_image_bytes: u64,
    /// Image / raw ext4: at most 0.35 is the goal.
    pub hello_size_ratio: f64,
}

/// Both backends, both patterns: MiB/s and reads per second.
#[derive(Debug, Serialize, Deserialize)]
pub struct Backends {
    pub seq_raw_mib_s: Stats,
    pub seq_volume_mib_s: Stats,
    pub rand_raw_iops: Stats,
    pub rand_volume_iops: Stats,
    /// Volume / raw, medians.
    pub seq_ratio: f64,
    pub rand_ratio: f64,
}

impl Backends {
    /// From samples of sequential raw, sequential volume, random raw and
    /// random volume reads, in that order.
    fn of(samples: [Vec<f64>; 4]) -> Result<Backends> {
        let [seq_raw, seq_volume, rand_raw, rand_volume] = samples.map(|s| stats(&s));
        let (seq_raw, seq_volume, rand_raw, rand_volume) =
            (seq_raw?, seq_volume?, rand_raw?, rand_volume?);
        Ok(Backends {
            seq_ratio: seq_volume.p50 / seq_raw.p50,
            rand_ratio: rand_volume.p50 / rand_raw.p50,
            seq_raw_mib_s: seq_raw,
            seq_volume_mib_s: seq_volume,
            rand_raw_iops: rand_raw,
            rand_volume_iops: rand_volume,
        })
    }
}

/// Host side: runs the guest side where KVM is, measures the backends on
/// the host CPU, writes the JSON, prints a table.
pub fn disk(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    let allowance = PER_RUN * (4 * runs as u32 + 6);
    let mut report: DiskReport = run_guest("disk", runs, allowance)?;
    report.environment = environment();
    report.host = Some(host_backends(runs)?);
    let out = save("disk", &report)?;
    print_table(&report);
    println!("{}", out.display());
    Ok(())
}

fn print_table(r: &DiskReport) {
    println!(
        "disk benchmark: {} ({} KiB raw ext4, {} KiB image), {} runs each ({})",
        r.image,
        r.raw_bytes >> 10,
        r.image_bytes >> 10,
        r.runs,
        r.environment
    );
    println!("| guest reads | raw file (median) | compressed volume (median) | volume / raw |");
    println!("|---|---|---|---|");
    for (label, b) in
        std::iter::once(("guest", &r.guest)).chain(r.host.iter().map(|h| ("host CPU, no VM", h)))
    {
        println!(
            "| {label}: sequential 1 MiB | {:.1} MiB/s | {:.1} MiB/s | {:.2} |",
            b.seq_raw_mib_s.p50, b.seq_volume_mib_s.p50, b.seq_ratio
        );
        println!(
            "| {label}: random 4 KiB | {:.0} IOPS | {:.0} IOPS | {:.2} |",
            b.rand_raw_iops.p50, b.rand_volume_iops.p50, b.rand_ratio
        );
    }
    println!(
        "hello image on disk: {} KiB of {} KiB raw ext4 ({:.3})",
        r.hello_image_bytes >> 10,
        r.hello_raw_bytes >> 10,
        r.hello_size_ratio
    );
}

/// Where the guest side boots from.
#[derive(Clone, Copy)]
enum Backend {
    Raw,
    Volume,
}

/// Guest side (where KVM is): times both backends and prints the report.
pub fn guest(runs: usize) -> Result<()> {
    let (kiln, images, work) = (
        env("KILN")?,
        PathBuf::from(env("KILN_IMAGES")?),
        PathBuf::from(env("WORK_ROOT")?).join("bench-disk"),
    );
    let home = kiln_home(&images, &work)?;
    let raw = work.join("disk-bench.ext4");
    sh::run(
        Command::new(&kiln)
            .args(["image", "flatten", IMAGE])
            .arg(&raw)
            .env("KILN_HOME", &home),
    )?;
    let run = |backend, mode: &str| -> Result<f64> {
        let mut cmd = Command::new(&kiln);
        cmd.env("KILN_HOME", &home).arg("run");
        match backend {
            Backend::Raw => cmd.arg("--disk").arg(&raw),
            Backend::Volume => cmd.arg(IMAGE),
        };
        let entrypoint =
            format!("kiln.entrypoint=\"/bench/diskread /dev/vda {mode} {RANDOM_READS}\"");
        cmd.args(["--read-only", "--cmdline", &entrypoint]);
        let boot = time_boot(cmd, RESULT, PER_RUN)?;
        rate(&boot.output, mode)
    };
    // Sequential raw, sequential volume, random raw, random volume.
    let mut samples: [Vec<f64>; 4] = Default::default();
    for (m, mode) in ["seq", "rand"].into_iter().enumerate() {
        run(Backend::Raw, mode)?;
        run(Backend::Volume, mode)?;
        for _ in 0..runs {
            samples[2 * m].push(run(Backend::Raw, mode)?);
            samples[2 * m + 1].push(run(Backend::Volume, mode)?);
        }
    }
    let store = Store::new(&home);
    let (image, hello) = (store.find(IMAGE)?.manifest, store.find(HELLO)?.manifest);
    print_report(&DiskReport {
        environment: environment(),
        image: IMAGE.into(),
        runs,
        raw_bytes: image.raw_size,
        image_bytes: image.file_size,
        random_reads_per_run: RANDOM_READS,
        chunk_cache_mib: DEFAULT_CACHE_BYTES >> 20,
        guest: Backends::of(samples)?,
        host: None,
        hello_raw_bytes: hello.raw_size,
        hello_image_bytes: hello.file_size,
        hello_size_ratio: hello.file_size as f64 / hello.raw_size as f64,
    })
}

/// The backends alone, `runs` passes each, on this host's CPU.
fn host_backends(runs: usize) -> Result<Backends> {
    let home = sh::workspace_root().join("target/vm-test/kiln-home");
    let image = Store::new(&home).find(IMAGE)?.image_path;
    let raw = sh::workspace_root().join("target/bench/disk-bench.ext4");
    std::fs::create_dir_all(raw.parent().expect("has a parent"))?;
    let out =
        std::fs::File::create(&raw).with_context(|| format!("cannot create {}", raw.display()))?;
    Volume::open(&image, None, DEFAULT_CACHE_BYTES)?
        .flatten_to(&mut std::io::BufWriter::new(out))?;
    let file = std::fs::File::open(&raw)?;
    let size = file.metadata()?.len();
    // Sequential 1 MiB reads in MiB/s, then random 4 KiB reads per second.
    let sequential: Vec<u64> = (0..size / SEQ_READ).map(|i| i * SEQ_READ).collect();
    let patterns = [
        (sequential, SEQ_READ, SEQ_READ as f64 / f64::from(1 << 20)),
        (random_offsets(size), RAND_READ, 1.0),
    ];
    let mut buf = vec![0u8; SEQ_READ as usize];
    let mut samples: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        for (i, (offsets, len, unit)) in patterns.iter().enumerate() {
            let buf = &mut buf[..*len as usize];
            // A fresh volume: its chunk cache starts cold, as a VM's does.
            let volume = Volume::open(&image, None, DEFAULT_CACHE_BYTES)?;
            let raw = reads_per_second(offsets, |at| Ok(file.read_exact_at(buf, at)?))?;
            let compressed = reads_per_second(offsets, |at| Ok(volume.read(at, buf)?))?;
            samples[2 * i].push(raw * unit);
            samples[2 * i + 1].push(compressed * unit);
        }
    }
    Backends::of(samples)
}

/// The reader's random offsets (diskread.c): 4 KiB blocks chosen by the
/// same xorshift from the same seed.
fn random_offsets(size: u64) -> Vec<u64> {
    let blocks = size / RAND_READ;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..RANDOM_READS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % blocks) * RAND_READ
        })
        .collect()
}

/// Reads per second of `read` at each of `offsets`.
fn reads_per_second(offsets: &[u64], mut read: impl FnMut(u64) -> Result<()>) -> Result<f64> {
    let started = std::time::Instant::now();
    for &at in offsets {
        read(at)?;
    }
    Ok(offsets.len() as f64 / started.elapsed().as_secs_f64())
}

/// The reader's result: MiB/s for `seq`, reads per second for `rand`.
fn rate(output: &[String], mode: &str) -> Result<f64> {
    let line = output
        .iter()
        .find_map(|l| l.split_once(RESULT).map(|(_, rest)| rest))
        .context("the reader printed no result")?;
    let field = |name: &str| -> Result<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name}= in {line:?}"))
    };
    if !line.starts_with(mode) {
        bail!("expected a {mode} result, got {line:?}");
    }
    let seconds = field("ns")? / 1e9;
    Ok(match mode {
        "seq" => field("bytes")? / f64::from(1 << 20) / seconds,
        _ => field("bytes")? / RAND_READ as f64 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_results_become_rates() {
        let out = |line: &str| vec!["boot noise".to_string(), line.to_string()];
        let seq = rate(&out("KILN-DISK seq bytes=104857600 ns=2000000000"), "seq").unwrap();
        assert_eq!(seq, 50.0);
        let rand = rate(&out("KILN-DISK rand bytes=8192000 ns=500000000"), "rand").unwrap();
        assert_eq!(rand, 4000.0);
        assert!(rate(&out("KILN-DISK rand bytes=1 ns=1"), "seq").is_err());
        assert!(rate(&out("nothing"), "seq").is_err());
    }
}
