//! `cargo xtask bench boot`: boot latency of `kiln run` against QEMU's
//! microvm machine, same kernel, same image, same test machine, same run.
//!
//! Both VMMs are timed the same way from outside: from spawning the
//! process to the guest entrypoint's first line on the serial console
//! ("init"), and to the process's exit ("total"). Kiln's own boot timer
//! (`--timing`: process start to guest-init's port write) is recorded too.
//! Memory: the VMM's resident set while the guest runs, without the guest
//! RAM mapping.
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{Boot, Stats, env, environment, millis, print_report, run_guest, save, time_boot};
use kiln_bench::qemu::{CPU_HOST, InitPort, Microvm};

/// The hello image's entrypoint prints this, then exits 3.
const MARKER: &str = "hello from kiln guest-init";
/// The memory-sample entrypoint prints this, then sleeps.
const READY: &str = "kiln-bench-ready";
const MEMORY_MIB: u64 = 128;
/// Per boot under nested TCG, generously.
const PER_BOOT: Duration = Duration::from_secs(20);

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
    let mut report: BootReport = run_guest("boot", runs, PER_BOOT * (2 * runs as u32 + 4))?;
    report.environment = environment();
    let out = save("boot", &report)?;
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
            kiln.min, kiln.p50, kiln.p90, kiln.max, qemu.min, qemu.p50, qemu.p90, qemu.max
        );
    }
    println!("ratio (kiln/QEMU, median spawn to init): {:.2}", r.ratio);
    println!(
        "VMM RSS without guest RAM: kiln {} KiB, QEMU {} KiB",
        r.vmm_rss_kib, r.qemu_rss_kib
    );
}

/// Guest side (where KVM is): boots both VMMs `runs` times, interleaved,
/// after one warm-up each, and prints the report as one JSON line.
pub fn guest(runs: usize) -> Result<()> {
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

    time_boot(kiln_cmd(""), MARKER, PER_BOOT)?;
    time_boot(qemu_cmd(""), MARKER, PER_BOOT)?;
    let (mut kiln_boots, mut qemu_boots) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        kiln_boots.push(time_boot(kiln_cmd(""), MARKER, PER_BOOT)?);
        qemu_boots.push(time_boot(qemu_cmd(""), MARKER, PER_BOOT)?);
    }
    let rss_entry = "kiln.entrypoint=/tests/bench-rss.sh";
    let report = BootReport {
        environment: environment(),
        runs,
        kiln_init_ms_median: median_ms(&kiln_boots, |b| b.init)?,
        qemu_init_ms_median: median_ms(&qemu_boots, |b| b.init)?,
        ratio: median_ms(&kiln_boots, |b| b.init)? / median_ms(&qemu_boots, |b| b.init)?,
        vmm_rss_kib: rss_without_guest_ram(kiln_cmd(rss_entry))?,
        qemu_rss_kib: rss_without_guest_ram(qemu_cmd(rss_entry))?,
        kiln_init_ms: boot_stats(&kiln_boots, |b| b.init)?,
        qemu_init_ms: boot_stats(&qemu_boots, |b| b.init)?,
        kiln_total_ms: boot_stats(&kiln_boots, |b| b.total)?,
        qemu_total_ms: boot_stats(&qemu_boots, |b| b.total)?,
        kiln_self_timed_init_ms: super::stats(
            &kiln_boots
                .iter()
                .map(self_timed_ms)
                .collect::<Result<Vec<_>>>()?,
        )?,
    };
    print_report(&report)
}

/// QEMU's microvm machine with the settings of the qemu-boot scenario,
/// the console on stdout, the root read-only.
pub(super) fn qemu_command(qemu: &str, kernel: &str, image: &Path, extra: &str) -> Command {
    Microvm {
        kernel: kernel.into(),
        rootfs: Some(image.to_path_buf()),
        cpu: CPU_HOST,
        memory_mib: MEMORY_MIB as u32,
        vcpus: 1,
        throwaway_writes: false,
        extra_cmdline: extra.to_string(),
        console: None,
        init_port: InitPort::None,
    }
    .command(Path::new(qemu))
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

fn boot_stats(boots: &[Boot], pick: fn(&Boot) -> Duration) -> Result<Stats> {
    super::stats(&boots.iter().map(|b| millis(pick(b))).collect::<Vec<_>>())
}

fn median_ms(boots: &[Boot], pick: fn(&Boot) -> Duration) -> Result<f64> {
    Ok(boot_stats(boots, pick)?.p50)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_left_out_of_the_resident_set() {
        let smaps = "00400000-00500000 r-xp 0 0:0 0 /bin/kiln\nSize: 1024 kB\nRss: 800 kB\n\
                     7f0000000000-7f0008000000 rw-p 0 0:0 0\nSize: 131072 kB\nRss: 40000 kB\n\
                     7fff0000-7fff2000 rw-p 0 0:0 0 [stack]\nSize: 132 kB\nRss: 12 kB\n";
        assert_eq!(rss_outside(smaps, 131072), 812);
    }
}
