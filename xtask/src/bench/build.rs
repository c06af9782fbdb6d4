//! `cargo xtask bench build`: `kiln build` of recipes/hello, cold and
//! cached, and its image's size against the same raw ext4 compressed whole
//! with `zstd -19` (what a plain "mkfs.ext4 + zstd" pipeline ships); the
//! Debian minbase root's compression by zstd level and thread count, on
//! this host; and recipes/debian's cold build where its VM steps and tests
//! run (nested under TCG on a PVM host), with the share of each phase.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_image::{Compression, DEFAULT_CHUNK_SIZE};
use serde::{Deserialize, Serialize};

use super::{L1, env, environment, millis, print_report, run_guest_with, save, stats};
use crate::{harness, sh};

/// The compressions measured on the Debian root: the small images' level
/// and the large ones', each on one thread and on two (this host's CPUs).
const COMPRESSIONS: [Compression; 4] = [
    Compression {
        level: 19,
        threads: 1,
    },
    Compression {
        level: 19,
        threads: 2,
    },
    Compression {
        level: 15,
        threads: 1,
    },
    Compression {
        level: 15,
        threads: 2,
    },
];
/// How long the nested cold build of recipes/debian may take.
const NESTED_ALLOWANCE: Duration = Duration::from_secs(40 * 60);

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
    pub debian: DebianReport,
}

/// recipes/debian's numbers.
#[derive(Debug, Serialize)]
pub struct DebianReport {
    /// recipes/debian-base built on this host (the base imported, no VM
    /// step, tests skipped): the parent image recipes/debian starts from,
    /// built once per store; mmdebstrap excluded.
    pub import_ms: f64,
    pub raw_bytes: u64,
    /// The imported root's raw ext4 written by each of [`COMPRESSIONS`].
    pub compression: Vec<CompressionRun>,
    /// The whole recipe built cold where its VM step and tests run, on
    /// as many CPUs as this host has cores (2): what the goal speaks of.
    pub nested: NestedBuild,
    /// The same on one CPU, as the vm-test scenarios' L1 has.
    pub nested_one_cpu: NestedBuild,
}

/// One compression of the Debian root's raw ext4.
#[derive(Debug, Serialize)]
pub struct CompressionRun {
    pub level: i32,
    pub threads: usize,
    pub ms: f64,
    pub image_bytes: u64,
    /// image / the level-19 image: what a level costs in size.
    pub size_vs_level_19: f64,
}

/// recipes/debian's cold build in L1 (or on hardware KVM), from `kiln
/// build --progress`'s phase times.
#[derive(Debug, Serialize, Deserialize)]
pub struct NestedBuild {
    pub environment: String,
    /// The CPUs the build had (L1's vCPUs when nested).
    pub cpus: usize,
    pub total_s: f64,
    /// Booting the build VM and running the step, until its tree is read back.
    pub build_vm_s: f64,
    pub compress_s: f64,
    /// The three tests, each booting the image, and publishing.
    pub tests_s: f64,
    /// The rest: unpacking the parent image, assembling, the ext4s.
    pub other_s: f64,
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
                // What is timed is the build: tests boot VMs, which this
                // host may not.
                .arg("--skip-tests")
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
    kiln_image::Reader::open(&image.image_path)?
        .flatten_to(&mut std::io::BufWriter::new(fs::File::create(&raw)?))?;
    let zstd = sh::output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("zstd -19 -q -c '{}' | wc -c", raw.display())),
    )?;
    let baseline: u64 = zstd.trim().parse().context("unreadable zstd size")?;
    let debian = debian(&kiln, &guest_init, &home)?;
    let report = BuildReport {
        recipe: "recipes/hello".into(),
        cold_ms,
        cached_ms: stats(&cached)?.p50,
        cached_runs,
        raw_bytes: image.manifest.raw_size,
        image_bytes: image.manifest.file_size,
        baseline_zstd19_bytes: baseline,
        size_ratio: image.manifest.file_size as f64 / baseline as f64,
        debian,
    };
    let out = save("build", &report)?;
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
    print_debian(&report.debian);
    println!("{}", out.display());
    Ok(())
}

/// Builds recipes/debian-base (the Debian base imported) on this host,
/// compresses its raw ext4 each of [`COMPRESSIONS`]' ways, and builds
/// recipes/debian, its child, nested.
fn debian(kiln: &Path, guest_init: &Path, home: &Path) -> Result<DebianReport> {
    crate::debian::base()?;
    let recipe = sh::workspace_root().join("recipes/debian-base");
    let started = Instant::now();
    kiln_build(kiln, &recipe, guest_init, home, &["--skip-tests"])?;
    let import_ms = millis(started.elapsed());
    let image = kiln_builder::store::Store::new(home).find("debian-base:12.0.0")?;
    let raw = home.join("debian.ext4");
    kiln_image::Reader::open(&image.image_path)?
        .flatten_to(&mut std::io::BufWriter::new(fs::File::create(&raw)?))?;
    let mut compression = Vec::new();
    for way in COMPRESSIONS {
        let started = Instant::now();
        let out = home.join("debian.img");
        let info = kiln_image::write_with(&raw, &out, DEFAULT_CHUNK_SIZE, way, None)?;
        compression.push((way, millis(started.elapsed()), info.file_size));
    }
    let level_19 = compression[0].2 as f64;
    let nested_on = |cpus| -> Result<NestedBuild> {
        let l1 = L1 {
            debian_base: true,
            vcpus: cpus,
        };
        let mut nested: NestedBuild = run_guest_with("build", 1, NESTED_ALLOWANCE, l1)?;
        // Inside L1, KVM is hardware-style; what matters is where L1 runs.
        nested.environment = environment();
        Ok(nested)
    };
    let nested = nested_on(2)?;
    let nested_one_cpu = nested_on(1)?;
    Ok(DebianReport {
        import_ms,
        raw_bytes: image.manifest.raw_size,
        compression: (compression.into_iter())
            .map(|(way, ms, bytes)| CompressionRun {
                level: way.level,
                threads: way.threads,
                ms,
                image_bytes: bytes,
                size_vs_level_19: bytes as f64 / level_19,
            })
            .collect(),
        nested,
        nested_one_cpu,
    })
}

/// `kiln build RECIPE --init INIT EXTRA…` in the Kiln home `home`;
/// returns what it printed on stderr.
fn kiln_build(
    kiln: &Path,
    recipe: &Path,
    guest_init: &Path,
    home: &Path,
    extra: &[&str],
) -> Result<String> {
    let mut command = Command::new(kiln);
    command
        .arg("build")
        .arg(recipe)
        .arg("--init")
        .arg(guest_init)
        .args(extra)
        .env("KILN_HOME", home)
        .stdin(Stdio::null());
    let out = command
        .output()
        .with_context(|| format!("cannot start {}", sh::describe(&command)))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "{} failed: {}: {stderr}",
            sh::describe(&command),
            out.status
        );
    }
    Ok(stderr)
}

/// Guest side (in L1, or on hardware KVM): builds recipes/debian cold,
/// with its VM step and tests, on its parent image (copied into a store of
/// its own from the harness's), and reports its phases.
pub fn guest() -> Result<()> {
    let home = PathBuf::from(env("WORK_ROOT")?).join("bench-build");
    let _ = fs::remove_dir_all(&home);
    let store = home.join("images");
    fs::create_dir_all(&store)?;
    let parent = PathBuf::from(env("KILN_IMAGES")?).join("debian-base");
    sh::run(Command::new("cp").arg("-a").arg(&parent).arg(&store))?;
    let recipe = PathBuf::from(env("KILN_WORKSPACE")?).join("recipes/debian");
    let (kiln, init) = (
        PathBuf::from(env("KILN")?),
        PathBuf::from(env("KILN_INIT")?),
    );
    let started = Instant::now();
    let printed = kiln_build(&kiln, &recipe, &init, &home, &["--progress"])?;
    let total_s = started.elapsed().as_secs_f64();
    let report = phases(&printed, total_s)?;
    print_report(&report)
}

/// The phases of a `kiln build --progress` that took `total_s`, from its
/// `kiln: [SECONDS s] PHASE…` lines.
fn phases(printed: &str, total_s: f64) -> Result<NestedBuild> {
    let lines: Vec<(f64, &str)> = printed
        .lines()
        .filter_map(|line| {
            let (seconds, phase) = line.strip_prefix("kiln: [")?.split_once(" s] ")?;
            Some((seconds.parse().ok()?, phase))
        })
        .collect();
    let at = |prefix: &str| {
        let index = lines
            .iter()
            .position(|(_, phase)| phase.starts_with(prefix));
        index.with_context(|| format!("kiln build printed no {prefix:?} phase: {printed}"))
    };
    let vm = lines[at("running build")?].0;
    let read_back = lines[at("reading back")?].0;
    let compress = at("compressing")?;
    let tests = lines
        .get(compress + 1)
        .map_or(total_s, |(seconds, _)| *seconds);
    let (build_vm_s, compress_s) = (read_back - vm, tests - lines[compress].0);
    let tests_s = total_s - tests;
    Ok(NestedBuild {
        environment: environment(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        total_s,
        build_vm_s,
        compress_s,
        tests_s,
        other_s: total_s - build_vm_s - compress_s - tests_s,
    })
}

fn print_debian(debian: &DebianReport) {
    println!();
    println!(
        "recipes/debian-base (the Debian minbase root imported): built in {:.1} s on this host, {} MiB raw",
        debian.import_ms / 1000.0,
        debian.raw_bytes >> 20
    );
    println!("| zstd level | threads | compression | image | size vs level 19 |");
    println!("|---|---|---|---|---|");
    for run in &debian.compression {
        println!(
            "| {} | {} | {:.1} s | {:.1} MiB | {:.3} |",
            run.level,
            run.threads,
            run.ms / 1000.0,
            run.image_bytes as f64 / (1 << 20) as f64,
            run.size_vs_level_19
        );
    }
    println!();
    println!(
        "recipes/debian cold build, its parent image stored ({}):",
        debian.nested.environment
    );
    println!("| CPUs | total | build VM | compression | tests | other |");
    println!("|---|---|---|---|---|---|");
    for n in [&debian.nested, &debian.nested_one_cpu] {
        print_nested(n);
    }
}

fn print_nested(n: &NestedBuild) {
    println!(
        "| {} | {:.0} s | {:.0} s ({:.0} %) | {:.0} s ({:.0} %) | {:.0} s ({:.0} %) | {:.0} s |",
        n.cpus,
        n.total_s,
        n.build_vm_s,
        100.0 * n.build_vm_s / n.total_s,
        n.compress_s,
        100.0 * n.compress_s / n.total_s,
        n.tests_s,
        100.0 * n.tests_s / n.total_s,
        n.other_s
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_come_from_the_progress_lines() {
        let printed = "kiln: [0.0 s] importing base.tar…\n\
                       kiln: [2.0 s] running build step 1 (dpkg-deb …) in a VM…\n\
                       kiln: step 1 (dpkg-deb …) | Setting up kiln-hello (1.0.0) ...\n\
                       kiln: [12.0 s] reading back what the build VM left…\n\
                       kiln: [14.0 s] compressing…\n\
                       kiln: [20.0 s] running 3 test(s), each in a VM…\n";
        let build = phases(printed, 30.0).unwrap();
        assert_eq!(
            (
                build.build_vm_s,
                build.compress_s,
                build.tests_s,
                build.other_s
            ),
            (10.0, 6.0, 10.0, 4.0)
        );
        let err = phases("kiln: [0.0 s] compressing…\n", 1.0).unwrap_err();
        assert!(err.to_string().contains("\"running build\""), "{err}");
    }
}
