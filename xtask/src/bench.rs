//! Benchmarks, each measured against a peer in the same run.
//!
//! `cargo xtask bench build`: `kiln build` of recipes/hello, cold and
//! cached, and the image's size against the same raw ext4 compressed
//! whole with `zstd -19` (what a plain "mkfs.ext4 + zstd" pipeline ships).
//!
//! `cargo xtask bench boot`: boot latency of `kiln run` against QEMU's
//! microvm machine, same kernel, same image, same test machine, same run.
//!
//! Both VMMs are timed the same way from outside: from spawning the
//! process to the guest entrypoint's first line on the serial console
//! ("init"), and to the process's exit ("total"). Kiln's own boot timer
//! (`--timing`: process start to guest-init's port write) is recorded too.
//! Memory: the VMM's resident set while the guest runs, without the guest
//! RAM mapping. On a host without hardware KVM this runs inside the nested
//! harness, where only the ratio means anything.
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{harness, sh};

/// The hello image's entrypoint prints this, then exits 3.
const MARKER: &str = "hello from kiln guest-init";
/// The memory-sample entrypoint prints this, then sleeps.
const READY: &str = "kiln-bench-ready";
const MEMORY_MIB: u64 = 128;
const JSON_PREFIX: &str = "KILN-BENCH-JSON ";
/// Per boot under nested TCG, generously.
const PER_BOOT: Duration = Duration::from_secs(20);

/// min / median / p90 / max of a series, in milliseconds.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
}

impl Stats {
    /// Nearest-rank percentiles of `samples` (not empty).
    pub fn of(samples: &[f64]) -> Stats {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank =
            |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        Stats {
            min: sorted[0],
            median: rank(0.5),
            p90: rank(0.9),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// What `target/bench/boot.json` holds.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BootReport {
    pub environment: String,
    pub runs: usize,
    pub kiln_init_ms_median: f64,
    pub qemu_init_ms_median: f64,
    /// kiln / QEMU, median boot-to-init: below 1 is faster.
    pub ratio: f64,
    pub vmm_rss_kib: u64,
    pub qemu_rss_kib: u64,
    pub kiln_init_ms: Stats,
    pub qemu_init_ms: Stats,
    pub kiln_total_ms: Stats,
    pub qemu_total_ms: Stats,
    pub kiln_self_timed_init_ms: Stats,
}

/// Host side: runs the guest side where KVM is, writes the JSON, prints a table.
pub fn boot(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    let prepared = harness::prepare()?;
    let job = harness::Job {
        command: ["{xtask}", "bench-guest", "--runs", &runs.to_string()]
            .map(String::from)
            .to_vec(),
        allowance: PER_BOOT * (2 * runs as u32 + 4),
    };
    let (lines, _) = harness::run_job(&prepared, &job)?;
    let json = lines
        .iter()
        .find_map(|line| line.split_once(JSON_PREFIX).map(|(_, json)| json))
        .context("the benchmark printed no result (see target/vm-test/console.log)")?;
    let mut report: BootReport =
        serde_json::from_str(json.trim()).context("unreadable benchmark result")?;
    if !kiln_vmm::host::detect().can_boot_linux() {
        report.environment =
            "nested KVM under QEMU TCG (PVM host): only ratios mean anything".into();
    }
    let out = sh::workspace_root().join("target/bench/boot.json");
    fs::create_dir_all(out.parent().expect("has a parent"))?;
    fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    print_table(&report);
    println!("{}", out.display());
    Ok(())
}

fn print_table(r: &BootReport) {
    println!("boot benchmark, {} runs each ({})", r.runs, r.environment);
    println!("| metric (ms) | kiln min | median | p90 | max | QEMU min | median | p90 | max |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, kiln, qemu) in [
        ("spawn to init", &r.kiln_init_ms, &r.qemu_init_ms),
        ("spawn to exit", &r.kiln_total_ms, &r.qemu_total_ms),
    ] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            kiln.min, kiln.median, kiln.p90, kiln.max, qemu.min, qemu.median, qemu.p90, qemu.max
        );
    }
    println!("ratio (kiln/QEMU, median spawn to init): {:.2}", r.ratio);
    println!(
        "VMM RSS without guest RAM: kiln {} KiB, QEMU {} KiB",
        r.vmm_rss_kib, r.qemu_rss_kib
    );
}

/// What `target/bench/build.json` holds.
#[derive(Debug, Serialize)]
pub struct BuildReport {
    pub recipe: String,
    pub cold_ms: f64,
    /// Median of the cached rebuilds.
    pub cached_ms: f64,
    pub cached_runs: usize,
    pub raw_bytes: u64,
    pub image_bytes: u64,
    /// The same raw ext4 compressed whole with `zstd -19`.
    pub baseline_zstd19_bytes: u64,
    /// image / baseline: at most 1 means no bigger than the baseline.
    pub size_ratio: f64,
}

/// Host side: builds recipes/hello into a fresh Kiln home, cold then cached.
pub fn build(cached_runs: usize) -> Result<()> {
    crate::apt::ensure(&["zstd", "e2fsprogs"])?;
    let guest_init = crate::init::build()?;
    let kiln = harness::build_kiln()?;
    let home = sh::workspace_root().join("target/bench/kiln-home");
    let _ = fs::remove_dir_all(&home);
    let recipe = sh::workspace_root().join("recipes/hello");
    let timed = || -> Result<f64> {
        let started = Instant::now();
        sh::output(
            Command::new(&kiln)
                .arg("build")
                .arg(&recipe)
                .arg("--init")
                .arg(&guest_init)
                .env("KILN_HOME", &home),
        )?;
        Ok(millis(started.elapsed()))
    };
    let cold_ms = timed()?;
    let cached: Vec<f64> = (0..cached_runs).map(|_| timed()).collect::<Result<_>>()?;
    let store = kiln_builder::store::Store::new(&home);
    let image = store.find("hello:1.0.0")?;
    let raw = home.join("raw.ext4");
    kiln_builder::image::Reader::open(&image.image_path)?
        .flatten_to(&mut std::io::BufWriter::new(fs::File::create(&raw)?))?;
    let zstd = sh::output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("zstd -19 -q -c '{}' | wc -c", raw.display())),
    )?;
    let baseline: u64 = zstd.trim().parse().context("unreadable zstd size")?;
    let report = BuildReport {
        recipe: "recipes/hello".into(),
        cold_ms,
        cached_ms: Stats::of(&cached).median,
        cached_runs,
        raw_bytes: image.manifest.raw_size,
        image_bytes: image.manifest.file_size,
        baseline_zstd19_bytes: baseline,
        size_ratio: image.manifest.file_size as f64 / baseline as f64,
    };
    let out = sh::workspace_root().join("target/bench/build.json");
    fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!(
        "| recipe | cold build | cached build (median of {}) | raw ext4 | Kiln image | ext4 + zstd -19 | ratio |",
        report.cached_runs
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.0} ms | {:.1} ms | {} KiB | {} KiB | {} KiB | {:.3} |",
        report.recipe,
        report.cold_ms,
        report.cached_ms,
        report.raw_bytes >> 10,
        report.image_bytes >> 10,
        report.baseline_zstd19_bytes >> 10,
        report.size_ratio
    );
    println!("{}", out.display());
    Ok(())
}

/// One timed boot.
struct Boot {
    init: Duration,
    total: Duration,
    output: Vec<String>,
}

/// Guest side (where KVM is): boots both VMMs `runs` times, interleaved,
/// after one warm-up each, and prints the report as one JSON line.
pub fn guest(runs: usize) -> Result<()> {
    let env = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let (kiln, kernel, assets, qemu) = (
        env("KILN")?,
        env("KILN_KERNEL")?,
        PathBuf::from(env("KILN_ASSETS")?),
        env("QEMU")?,
    );
    let image = assets.join("hello.ext4");
    let kiln_cmd = |extra: &str| {
        let mut cmd = Command::new(&kiln);
        cmd.args([
            "run",
            "--timing",
            "--read-only",
            "--memory",
            &MEMORY_MIB.to_string(),
            "--kernel",
            &kernel,
            "--disk",
        ])
        .arg(&image)
        .args(["--cmdline", extra]);
        cmd
    };
    let qemu_cmd = |extra: &str| qemu_command(&qemu, &kernel, &image, extra);

    time_boot(kiln_cmd(""), MARKER)?;
    time_boot(qemu_cmd(""), MARKER)?;
    let (mut kiln_boots, mut qemu_boots) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        kiln_boots.push(time_boot(kiln_cmd(""), MARKER)?);
        qemu_boots.push(time_boot(qemu_cmd(""), MARKER)?);
    }
    let rss_entry = "kiln.entrypoint=/tests/bench-rss.sh";
    let report = BootReport {
        environment: "hardware KVM".into(),
        runs,
        kiln_init_ms_median: median_ms(&kiln_boots, |b| b.init),
        qemu_init_ms_median: median_ms(&qemu_boots, |b| b.init),
        ratio: median_ms(&kiln_boots, |b| b.init) / median_ms(&qemu_boots, |b| b.init),
        vmm_rss_kib: rss_without_guest_ram(kiln_cmd(rss_entry))?,
        qemu_rss_kib: rss_without_guest_ram(qemu_cmd(rss_entry))?,
        kiln_init_ms: stats(&kiln_boots, |b| b.init),
        qemu_init_ms: stats(&qemu_boots, |b| b.init),
        kiln_total_ms: stats(&kiln_boots, |b| b.total),
        qemu_total_ms: stats(&qemu_boots, |b| b.total),
        kiln_self_timed_init_ms: Stats::of(
            &kiln_boots
                .iter()
                .map(self_timed_ms)
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    println!("{JSON_PREFIX}{}", serde_json::to_string(&report)?);
    Ok(())
}

/// QEMU's microvm machine with the settings of the qemu-boot scenario.
fn qemu_command(qemu: &str, kernel: &str, image: &Path, extra: &str) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,acpi=off",
    ])
    .args([
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        &MEMORY_MIB.to_string(),
        "-smp",
        "1",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(["-kernel", kernel, "-append"])
    .arg(format!(
        "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro {extra}"
    ))
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,readonly=on",
        image.display()
    ))
    .args(["-device", "virtio-blk-device,drive=root"]);
    cmd
}

fn time_boot(mut cmd: Command, marker: &str) -> Result<Boot> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", sh::describe(&cmd)))?;
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut init = None;
    let mut output = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        if init.is_none() && line.contains(marker) {
            init = Some(started.elapsed());
        }
        output.push(line);
    }
    child.wait()?;
    let total = started.elapsed();
    output.extend(errors.join().expect("the stderr reader does not panic"));
    let init = init.with_context(|| {
        format!(
            "{} never printed {marker:?}: {}",
            sh::describe(&cmd),
            output.join(" | ")
        )
    })?;
    Ok(Boot {
        init,
        total,
        output,
    })
}

/// The VMM's resident memory outside the guest RAM mapping, sampled while
/// the guest waits.
fn rss_without_guest_ram(mut cmd: Command) -> Result<u64> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.contains(READY));
    let sample = if ready {
        fs::read_to_string(format!("/proc/{}/smaps", child.id())).ok()
    } else {
        None
    };
    lines.for_each(drop);
    child.wait()?;
    let smaps = sample.context("the VMM ended before its memory could be sampled")?;
    Ok(rss_outside(&smaps, MEMORY_MIB << 10))
}

/// Sums `Rss:` over the mappings of /proc/PID/smaps except those of
/// exactly `guest_kib` (the guest RAM).
fn rss_outside(smaps: &str, guest_kib: u64) -> u64 {
    let kib = |line: &str| {
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (mut total, mut in_guest_ram) = (0, false);
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            in_guest_ram = kib(line) == guest_kib;
        } else if line.starts_with("Rss:") && !in_guest_ram {
            total += kib(line);
        }
    }
    total
}

fn self_timed_ms(boot: &Boot) -> Result<f64> {
    let line = boot
        .output
        .iter()
        .find_map(|l| l.strip_prefix("boot-to-init: "))
        .context("kiln run --timing printed nothing")?;
    let micros: f64 = line
        .trim_end_matches(" us")
        .parse()
        .with_context(|| format!("unreadable timing {line:?}"))?;
    Ok(micros / 1000.0)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(boots: &[Boot], pick: fn(&Boot) -> Duration) -> Stats {
    Stats::of(&boots.iter().map(|b| millis(pick(b))).collect::<Vec<_>>())
}

fn median_ms(boots: &[Boot], pick: fn(&Boot) -> Duration) -> f64 {
    stats(boots, pick).median
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of(&[5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(
            s,
            Stats {
                min: 1.0,
                median: 5.0,
                p90: 9.0,
                max: 10.0
            }
        );
        assert_eq!(Stats::of(&[2.0, 1.0]).median, 1.0);
    }

    #[test]
    fn guest_ram_is_left_out_of_the_resident_set() {
        let smaps = "00400000-00500000 r-xp 0 0:0 0 /bin/kiln\nSize: 1024 kB\nRss: 800 kB\n\
                     7f0000000000-7f0008000000 rw-p 0 0:0 0\nSize: 131072 kB\nRss: 40000 kB\n\
                     7fff0000-7fff2000 rw-p 0 0:0 0 [stack]\nSize: 132 kB\nRss: 12 kB\n";
        assert_eq!(rss_outside(smaps, 131072), 812);
    }
}
