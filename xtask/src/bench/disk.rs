//! `cargo xtask bench disk`: how fast a guest reads its root disk when
//! Kiln serves the compressed image itself, against the same filesystem as
//! a raw file, in the same VMM and the same run.
//!
//! The image is `disk-bench` (tests/vm/bench-disk: recipes/python's files
//! and a static reader). Its entrypoint reads /dev/vda with O_DIRECT, so
//! every read reaches the virtio disk, and times itself: sequentially in
//! 1 MiB requests, and 4 KiB requests at random offsets (the same sequence
//! every run). The raw file is the same image flattened by
//! `kiln image flatten`. Both are attached read-only to jailed VMs, as
//! every `kiln run` is by default; runs alternate between the two after
//! one warm-up each, so both find their files in the host's page cache,
//! and the volume its chunks in the image's hydration cache
//! (`kiln_image::hydrate`). A jailed VM only reads that cache, which its
//! supervisor fills in the background at idle priority
//! (`kiln_vmm::volume::background`); the report says how much of the
//! image the warm-up's supervisor filled before its VM ended, and `kiln
//! image hydrate` then fills the rest, so that the volume rows measure a
//! hydrated image. The
//! guest side also times boots (to the result of a one-read run) from
//! each: the volume's are the second and later cold boots of the image.
//! Under nested emulation the guest side mostly measures QEMU TCG, so
//! the report adds the backends alone on the host's own CPU: the same
//! reads (1 MiB sequential, 4 KiB at the same random offsets) through a
//! `Volume` with a cold in-memory chunk cache, through a hydrated cache
//! (warm) and through an empty one (cold), against `pread` of the raw
//! file in the page cache. The report also holds the on-disk size of the
//! hello image against its raw filesystem, and what `disk-bench` (a
//! one-file child of `python`) stores of its own against its parent.
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kiln_builder::store::Store;
use kiln_image::hydrate::{HYDRATE_BATCH, Hydrated, fillers};
use kiln_image::{DEFAULT_CACHE_BYTES, Reader};
use kiln_vmm::volume::{CacheAccess, Volume};
use serde::{Deserialize, Serialize};

use super::{
    Boot, Stats, env, environment, kiln_home, print_report, run_guest, save, stats, time_boot,
};
use crate::sh;

const IMAGE: &str = "disk-bench:1.0.0";
/// The size goal's image.
const HELLO: &str = "hello:1.0.0";
/// [`IMAGE`]'s parent: the image a one-file child of shares its chunks with.
const PARENT: &str = "python:3.11.2";
/// Bytes per read: diskread.c's sequential and random request sizes.
const SEQ_READ: u64 = 1 << 20;
const RAND_READ: u64 = 4096;
/// Random 4 KiB reads per run.
const RANDOM_READS: u32 = 2000;
/// The reader prints its result after this.
const RESULT: &str = "KILN-DISK ";
/// Per guest run under nested TCG, generously: a random run took 21 s
/// on an idle host and over 60 s on one loaded by other builds.
const PER_RUN: Duration = Duration::from_secs(150);

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
    /// Read by the guest, the volume through its hydrated cache: at least
    /// 0.9 is the goal for both ratios. Under nested emulation
    /// (`environment`), emulated numbers.
    pub guest: Backends,
    /// Seconds from `kiln run` to the one-read run's result, from the raw
    /// file and from the hydrated volume: the volume's are the image's
    /// second and later cold boots. Emulated under nested emulation.
    pub guest_boot_raw_s: Stats,
    pub guest_boot_volume_s: Stats,
    /// Volume / raw boot, medians: at most 1.02 is the goal (emulated
    /// under nested emulation).
    pub boot_vs_raw: f64,
    /// The fraction of the image's raw bytes in its hydration cache once
    /// the first (sequential) warm-up VM ended: what that jailed VM's
    /// supervisor filled in the background while it ran.
    #[serde(default)]
    pub hydrated_by_warmup: Option<f64>,
    /// The keys above measured in a guest under nested emulation (QEMU
    /// TCG): emulated numbers, whose ratios alone mean anything. Empty on
    /// hardware KVM (filled in by the host side).
    #[serde(default)]
    pub emulated: Vec<String>,
    /// The backends alone on the host CPU, the volume with a cold
    /// in-memory chunk cache (filled in by the host side).
    #[serde(default)]
    pub host: Option<Backends>,
    /// The backends alone on the host CPU, the volume through a hydrated
    /// cache (filled in by the host side).
    #[serde(default)]
    pub host_warm: Option<Backends>,
    /// Host CPU, hydrated cache against the raw file: sequential and
    /// random ratios, at least 0.9 the goal.
    #[serde(default)]
    pub warm_seq_ratio: f64,
    #[serde(default)]
    pub warm_rand_ratio: f64,
    /// Host CPU, MiB/s of sequential 1 MiB volume reads through an empty
    /// hydration cache (decompressing, verifying and filling it, as a VM's
    /// first boot does), median: at least 900 is the goal.
    #[serde(default)]
    pub cold_seq_mib_s: f64,
    /// ... and all its runs.
    #[serde(default)]
    pub cold_seq_mib_s_stats: Option<Stats>,
    /// Host CPU, MiB/s of `kiln image hydrate`'s fill of an empty cache on
    /// every core.
    #[serde(default)]
    pub cold_hydrate_mib_s: Option<Stats>,
    pub hello_raw_bytes: u64,
    pub hello_image_bytes: u64,
    /// Image / raw ext4: at most 0.35 is the goal.
    pub hello_size_ratio: f64,
    /// Bytes of [`PARENT`]'s image file.
    #[serde(default)]
    pub parent_image_bytes: u64,
    /// [`IMAGE`]'s own stored bytes (its file, without the chunks it
    /// takes from its parent's) over [`PARENT`]'s: at most 0.10 is the goal.
    #[serde(default)]
    pub child_own_ratio: f64,
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
    let host = host_backends(runs)?;
    report.warm_seq_ratio = host.warm.seq_ratio;
    report.warm_rand_ratio = host.warm.rand_ratio;
    report.host = Some(host.cold_memory);
    report.host_warm = Some(host.warm);
    report.cold_seq_mib_s = host.cold_seq_mib_s.p50;
    report.cold_seq_mib_s_stats = Some(host.cold_seq_mib_s);
    if !kiln_vmm::host::detect().can_boot_linux() {
        report.emulated = [
            "guest",
            "guest_boot_raw_s",
            "guest_boot_volume_s",
            "boot_vs_raw",
            "hydrated_by_warmup",
        ]
        .map(String::from)
        .to_vec();
    }
    report.cold_hydrate_mib_s = Some(host.cold_hydrate_mib_s);
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
    let rows = [
        ("guest, hydrated cache", Some(&r.guest)),
        ("host CPU, no VM, cold in-memory cache", r.host.as_ref()),
        ("host CPU, no VM, hydrated cache", r.host_warm.as_ref()),
    ];
    for (label, b) in rows.into_iter().filter_map(|(l, b)| Some((l, b?))) {
        print_backends(label, b);
    }
    println!(
        "| guest: boot to the first read | {:.2} s | {:.2} s | {:.3} |",
        r.guest_boot_raw_s.p50, r.guest_boot_volume_s.p50, r.boot_vs_raw
    );
    if let Some(fraction) = r.hydrated_by_warmup {
        println!(
            "hydrated by the first jailed VM's supervisor in the background: {:.1} % of the image",
            100.0 * fraction
        );
    }
    let cold = [
        ("sequential reads, empty cache", &r.cold_seq_mib_s_stats),
        ("kiln image hydrate, every core", &r.cold_hydrate_mib_s),
    ];
    print_cold(
        &cold
            .map(|(label, s)| s.as_ref().map(|s| (label, s)))
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
    );
    println!(
        "hello image on disk: {} KiB of {} KiB raw ext4 ({:.3})",
        r.hello_image_bytes >> 10,
        r.hello_raw_bytes >> 10,
        r.hello_size_ratio
    );
    println!(
        "{} stores {} KiB of its own beside its parent {}'s {} KiB ({:.3})",
        r.image,
        r.image_bytes >> 10,
        PARENT,
        r.parent_image_bytes >> 10,
        r.child_own_ratio
    );
}

/// The table rows of one backend pair, both access patterns.
fn print_backends(label: &str, b: &Backends) {
    println!(
        "| {label}: sequential 1 MiB | {:.1} MiB/s | {:.1} MiB/s | {:.2} |",
        b.seq_raw_mib_s.p50, b.seq_volume_mib_s.p50, b.seq_ratio
    );
    println!(
        "| {label}: random 4 KiB | {:.0} IOPS | {:.0} IOPS | {:.2} |",
        b.rand_raw_iops.p50, b.rand_volume_iops.p50, b.rand_ratio
    );
}

/// The cold fills' lines.
fn print_cold(rows: &[(&str, &Stats)]) {
    for (label, s) in rows {
        println!("host CPU, cold: {label}: {:.0} MiB/s (median)", s.p50);
    }
}

/// Where the guest side boots from.
#[derive(Clone, Copy)]
enum Backend {
    Raw,
    Volume,
}

/// The fraction of [`IMAGE`]'s raw bytes its hydration cache holds.
fn hydrated_fraction(home: &std::path::Path) -> Result<f64> {
    let store = Store::new(home);
    let reader = Reader::open(&store.find(IMAGE)?.image_path)?;
    let files = kiln_image::hydrate::CacheFiles::new(&store.cache_dir(), &reader.content_id());
    Ok(files.hydrated_bytes(&reader)? as f64 / reader.raw_size() as f64)
}

/// What the guest side boots: `kiln` (`bin`), a home of its own, and
/// [`IMAGE`] flattened into a raw file.
struct GuestSetup {
    bin: String,
    home: PathBuf,
    raw: PathBuf,
}

impl GuestSetup {
    /// A fresh home under the harness's work root, and the raw file beside it.
    fn prepare() -> Result<GuestSetup> {
        let (bin, images, work) = (
            env("KILN")?,
            PathBuf::from(env("KILN_IMAGES")?),
            PathBuf::from(env("WORK_ROOT")?).join("bench-disk"),
        );
        let setup = GuestSetup {
            bin,
            home: kiln_home(&images, &work)?,
            raw: work.join("disk-bench.ext4"),
        };
        sh::run(
            setup
                .kiln()
                .args(["image", "flatten", IMAGE])
                .arg(&setup.raw),
        )?;
        Ok(setup)
    }

    /// `kiln` in this home.
    fn kiln(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("KILN_HOME", &self.home);
        cmd
    }

    /// A VM on `backend` whose reader does `reads` reads of `mode`, timed.
    fn boot(&self, backend: Backend, mode: &str, reads: u32) -> Result<Boot> {
        let mut cmd = self.kiln();
        cmd.arg("run");
        match backend {
            Backend::Raw => cmd.arg("--disk").arg(&self.raw),
            Backend::Volume => cmd.arg(IMAGE),
        };
        let entrypoint = format!("kiln.entrypoint=\"/bench/diskread /dev/vda {mode} {reads}\"");
        cmd.args(["--read-only", "--cmdline", &entrypoint]);
        time_boot(cmd, RESULT, PER_RUN)
    }

    /// One reader run of `mode` on `backend`: its [`rate`].
    fn run(&self, backend: Backend, mode: &str) -> Result<f64> {
        rate(&self.boot(backend, mode, RANDOM_READS)?.output, mode)
    }

    /// Both patterns' runs on both backends, alternating after a warm-up
    /// each, and how much of the image the warm-up hydrated.
    fn time_reads(&self, runs: usize) -> Result<(Backends, Option<f64>)> {
        // Sequential raw, sequential volume, random raw, random volume. The
        // first volume run's supervisor fills the image's hydration cache in
        // the background; `kiln image hydrate` finishes it.
        let mut samples: [Vec<f64>; 4] = Default::default();
        let mut hydrated_by_warmup = None;
        for (m, mode) in ["seq", "rand"].into_iter().enumerate() {
            self.run(Backend::Raw, mode)?;
            self.run(Backend::Volume, mode)?;
            if hydrated_by_warmup.is_none() {
                hydrated_by_warmup = Some(hydrated_fraction(&self.home)?);
                sh::run(self.kiln().args(["image", "hydrate", IMAGE]))?;
            }
            for _ in 0..runs {
                samples[2 * m].push(self.run(Backend::Raw, mode)?);
                samples[2 * m + 1].push(self.run(Backend::Volume, mode)?);
            }
        }
        Ok((Backends::of(samples)?, hydrated_by_warmup))
    }

    /// Seconds to the result of a single 4 KiB read, raw and volume, alternating.
    fn time_boots(&self, runs: usize) -> Result<(Stats, Stats)> {
        let (mut raw, mut volume) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            raw.push(self.boot(Backend::Raw, "rand", 1)?.init.as_secs_f64());
            volume.push(self.boot(Backend::Volume, "rand", 1)?.init.as_secs_f64());
        }
        Ok((stats(&raw)?, stats(&volume)?))
    }
}

/// Guest side (where KVM is): times both backends and prints the report.
pub fn guest(runs: usize) -> Result<()> {
    let setup = GuestSetup::prepare()?;
    let (reads, hydrated_by_warmup) = setup.time_reads(runs)?;
    let (boot_raw, boot_volume) = setup.time_boots(runs)?;
    let store = Store::new(&setup.home);
    let (image, hello) = (store.find(IMAGE)?.manifest, store.find(HELLO)?.manifest);
    let parent = store.find(PARENT)?.manifest;
    print_report(&DiskReport {
        environment: environment(),
        image: IMAGE.into(),
        runs,
        raw_bytes: image.raw_size,
        image_bytes: image.file_size,
        random_reads_per_run: RANDOM_READS,
        chunk_cache_mib: DEFAULT_CACHE_BYTES >> 20,
        guest: reads,
        boot_vs_raw: boot_volume.p50 / boot_raw.p50,
        hydrated_by_warmup,
        guest_boot_raw_s: boot_raw,
        guest_boot_volume_s: boot_volume,
        host: None,
        host_warm: None,
        warm_seq_ratio: 0.0,
        warm_rand_ratio: 0.0,
        emulated: Vec::new(),
        cold_seq_mib_s: 0.0,
        cold_seq_mib_s_stats: None,
        cold_hydrate_mib_s: None,
        hello_raw_bytes: hello.raw_size,
        hello_image_bytes: hello.file_size,
        hello_size_ratio: hello.file_size as f64 / hello.raw_size as f64,
        parent_image_bytes: parent.file_size,
        child_own_ratio: image.file_size as f64 / parent.file_size as f64,
    })
}

/// The host side's measurements.
struct HostSide {
    cold_memory: Backends,
    warm: Backends,
    cold_seq_mib_s: Stats,
    cold_hydrate_mib_s: Stats,
}

/// What `target/bench/disk-host.json` holds (`--host-only`): the host
/// side alone, under the keys of [`DiskReport`].
#[derive(Debug, Serialize)]
pub struct HostReport {
    pub environment: String,
    pub image: String,
    pub runs: usize,
    pub warm_seq_ratio: f64,
    pub warm_rand_ratio: f64,
    pub cold_seq_mib_s: f64,
    pub host: Backends,
    pub host_warm: Backends,
    pub cold_seq_mib_s_stats: Stats,
    pub cold_hydrate_mib_s: Stats,
}

/// `--host-only`: the images built as vm-test builds them, then the host
/// side alone, on this host's CPU (no VM, so it needs no usable KVM and
/// takes seconds): what a change to the volume or the hydration cache
/// does, measured where the nested guest side would drown it.
pub fn disk_host(runs: usize) -> Result<()> {
    crate::harness::prepare(false)?;
    let host = host_backends(runs)?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let report = HostReport {
        environment: format!("this host's CPU ({cores} cores), no VM"),
        image: IMAGE.to_string(),
        runs,
        warm_seq_ratio: host.warm.seq_ratio,
        warm_rand_ratio: host.warm.rand_ratio,
        cold_seq_mib_s: host.cold_seq_mib_s.p50,
        host: host.cold_memory,
        host_warm: host.warm,
        cold_seq_mib_s_stats: host.cold_seq_mib_s,
        cold_hydrate_mib_s: host.cold_hydrate_mib_s,
    };
    let out = save("disk-host", &report)?;
    println!(
        "| host reads ({}) | raw file (median) | compressed volume (median) | volume / raw |",
        report.environment
    );
    println!("|---|---|---|---|");
    print_backends("host CPU, no VM, cold in-memory cache", &report.host);
    print_backends("host CPU, no VM, hydrated cache", &report.host_warm);
    print_cold(&[
        (
            "sequential reads, empty cache",
            &report.cold_seq_mib_s_stats,
        ),
        ("kiln image hydrate, every core", &report.cold_hydrate_mib_s),
    ]);
    println!("{}", out.display());
    Ok(())
}

/// One of the host side's access patterns: where each read starts, its
/// bytes, and the pattern's unit (MiB or reads) per read.
struct Pattern {
    offsets: Vec<u64>,
    len: u64,
    unit: f64,
}

/// What the host side reads: [`IMAGE`] in vm-test's store, and the raw
/// file and the hydration cache made of it under target/bench.
struct HostSetup {
    image: PathBuf,
    raw: std::fs::File,
    cache_dir: PathBuf,
    /// The raw file's size in MiB.
    mib: f64,
    /// Sequential 1 MiB reads in MiB/s, then random 4 KiB reads per second.
    patterns: [Pattern; 2],
}

impl HostSetup {
    /// The raw file flattened from [`IMAGE`], and the patterns over it.
    fn prepare() -> Result<HostSetup> {
        let home = sh::workspace_root().join("target/vm-test/kiln-home");
        let image = Store::new(&home).find(IMAGE)?.image_path;
        let bench = sh::workspace_root().join("target/bench");
        let (raw, cache_dir) = (bench.join("disk-bench.ext4"), bench.join("disk-cache"));
        std::fs::create_dir_all(&bench)?;
        let out = std::fs::File::create(&raw)
            .with_context(|| format!("cannot create {}", raw.display()))?;
        // Written 1 MiB at a time, as `cp` writes a file: the page cache then
        // holds it in large folios (small writes make small ones, which read
        // back markedly slower), as the hydration cache's runs of chunks are.
        Volume::open(&image, None, DEFAULT_CACHE_BYTES)?
            .flatten_to(&mut std::io::BufWriter::with_capacity(1 << 20, out))?;
        let raw = std::fs::File::open(&raw)?;
        let size = raw.metadata()?.len();
        let sequential = Pattern {
            offsets: (0..size / SEQ_READ).map(|i| i * SEQ_READ).collect(),
            len: SEQ_READ,
            unit: SEQ_READ as f64 / f64::from(1 << 20),
        };
        let random = Pattern {
            offsets: random_offsets(size),
            len: RAND_READ,
            unit: 1.0,
        };
        Ok(HostSetup {
            image,
            raw,
            cache_dir,
            mib: size as f64 / f64::from(1 << 20),
            patterns: [sequential, random],
        })
    }

    /// Removes the hydration cache, if there is one.
    fn empty_cache(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.cache_dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }

    /// A volume reading through, and filling, the hydration cache.
    fn hydrated_volume(&self) -> Result<Volume> {
        Ok(Volume::open_hydrated(
            &self.image,
            None,
            (&self.cache_dir, CacheAccess::Fill),
            DEFAULT_CACHE_BYTES,
        )?)
    }

    /// MiB/s of sequential reads through an empty hydration cache, as a
    /// VM's first boot fills it (with its prefetch workers reading ahead).
    fn cold_seq(&self, buf: &mut [u8]) -> Result<f64> {
        self.empty_cache()?;
        let mut volume = self.hydrated_volume()?;
        volume.start_prefetch(false, None)?;
        let [sequential, _] = &self.patterns;
        let buf = &mut buf[..sequential.len as usize];
        let rate = reads_per_second(&sequential.offsets, |at| Ok(volume.read(at, buf)?))?;
        Ok(rate * sequential.unit)
    }

    /// MiB/s of filling an empty hydration cache whole, as `kiln image
    /// hydrate` does, on every core.
    fn cold_hydrate(&self) -> Result<f64> {
        self.empty_cache()?;
        let cache = Hydrated::open(Reader::open(&self.image)?, &self.cache_dir)?;
        let started = std::time::Instant::now();
        cache.hydrate_all(HYDRATE_BATCH, fillers(), &mut |_| {})?;
        Ok(self.mib / started.elapsed().as_secs_f64())
    }

    /// `pattern` read from the raw file, then through a volume with a cold
    /// in-memory chunk cache, then through the hydration cache.
    fn read_pattern(&self, pattern: &Pattern, buf: &mut [u8]) -> Result<[f64; 3]> {
        let buf = &mut buf[..pattern.len as usize];
        // A fresh volume: its chunk cache starts cold, as a VM's does.
        let volume = Volume::open(&self.image, None, DEFAULT_CACHE_BYTES)?;
        let hydrated = self.hydrated_volume()?;
        let offsets = &pattern.offsets;
        let raw = reads_per_second(offsets, |at| Ok(self.raw.read_exact_at(buf, at)?))?;
        let compressed = reads_per_second(offsets, |at| Ok(volume.read(at, buf)?))?;
        let cached = reads_per_second(offsets, |at| Ok(hydrated.read(at, buf)?))?;
        Ok([raw, compressed, cached].map(|rate| rate * pattern.unit))
    }
}

/// The backends alone, `runs` passes each, on this host's CPU.
fn host_backends(runs: usize) -> Result<HostSide> {
    let host = HostSetup::prepare()?;
    let mut buf = vec![0u8; SEQ_READ as usize];
    let (mut cold, mut warm): ([Vec<f64>; 4], [Vec<f64>; 4]) = Default::default();
    let (mut cold_seq, mut cold_hydrate) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // The empty cache read through, then filled whole: the patterns
        // below read it hydrated.
        cold_seq.push(host.cold_seq(&mut buf)?);
        cold_hydrate.push(host.cold_hydrate()?);
        for (i, pattern) in host.patterns.iter().enumerate() {
            let [raw, compressed, cached] = host.read_pattern(pattern, &mut buf)?;
            // One raw pass is the baseline of both.
            for samples in [&mut cold, &mut warm] {
                samples[2 * i].push(raw);
            }
            cold[2 * i + 1].push(compressed);
            warm[2 * i + 1].push(cached);
        }
    }
    Ok(HostSide {
        cold_memory: Backends::of(cold)?,
        warm: Backends::of(warm)?,
        cold_seq_mib_s: stats(&cold_seq)?,
        cold_hydrate_mib_s: stats(&cold_hydrate)?,
    })
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
