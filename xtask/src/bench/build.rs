//! `cargo xtask bench build`: `kiln build` of recipes/hello, cold and
//! cached, and its image's size against the same raw ext4 compressed whole
//! with `zstd -19` (what a plain "mkfs.ext4 + zstd" pipeline ships).
use std::fs;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{millis, save, stats};
use crate::{harness, sh};

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
    let report = BuildReport {
        recipe: "recipes/hello".into(),
        cold_ms,
        cached_ms: stats(&cached)?.p50,
        cached_runs,
        raw_bytes: image.manifest.raw_size,
        image_bytes: image.manifest.file_size,
        baseline_zstd19_bytes: baseline,
        size_ratio: image.manifest.file_size as f64 / baseline as f64,
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
    println!("{}", out.display());
    Ok(())
}
