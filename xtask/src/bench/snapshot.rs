//! `cargo xtask bench snapshot`: how fast an instance restored from a
//! snapshot runs against the same instance booted cold, same image, same
//! guest size, same test machine, same run.
//!
//! For each guest size ([`SIZES`]) the guest side boots `vm-test:1.0.0`
//! detached with the counter entrypoint (tests/vm/guest/counter.sh, which
//! prints `count N uptime U marker …` once a second), waits for `count 2`,
//! and times `kiln snapshot create` (wall time, and the pause it reports),
//! recording the sizes of the snapshot's files; the source instance is
//! then terminated (a snapshot is self-contained). After one untimed
//! restore (the source's boot was the cold side's warm-up), `runs` times,
//! interleaved, it times:
//!
//! - cold: spawning `kiln run … --detach` to the first `count 1` line in
//!   `kiln logs` of the new instance;
//! - restore: spawning `kiln snapshot restore DIR --name …` to the first
//!   `count` line in `kiln logs` of the new instance (its console starts
//!   empty, so any `count` line is the restored guest running on);
//!
//! both polled every [`POLL`], each instance terminated afterwards. Both
//! sides include the detached-instance machinery equally: the `kiln`
//! process, registering the instance, spawning its VMM process, its API.
//!
//! The counter's one-second period does not quantize the cold side: its
//! `count 1` is printed as soon as the entrypoint starts. It does bound
//! the restore side: the snapshot catches the guest somewhere in its
//! `sleep 1`, and the restored guest prints its next line only when that
//! sleep ends, up to 1 s after it runs again. So the restore latency (and
//! the ratio, restore / cold, whose goal is at most 0.05) is an upper
//! bound, by up to 1 s. (A sharper signal would need the guest to answer
//! input, and `kiln attach` is not scriptable.)
use std::cell::RefCell;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{Stats, environment, millis, print_report, run_guest, save};
use crate::sh;

const IMAGE: &str = "vm-test:1.0.0";
const ENTRYPOINT: &str = "kiln.entrypoint=/tests/counter.sh";
/// Guest memory sizes, MiB.
const SIZES: [u64; 2] = [128, 256];
/// How often the console is read.
const POLL: Duration = Duration::from_millis(10);
/// Per boot, restore or snapshot under nested TCG, generously.
const PER_STEP: Duration = Duration::from_secs(60);
/// Restore / cold, medians: the goal is at most this.
const RATIO_GOAL: f64 = 0.05;

/// What `target/bench/snapshot.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotReport {
    pub environment: String,
    pub runs: usize,
    pub sizes: Vec<SizeReport>,
}

/// One guest size's measurements.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SizeReport {
    pub memory_mib: u64,
    /// Spawning `kiln run --detach` to the first `count 1` line.
    pub cold_ms: Stats,
    /// Spawning `kiln snapshot restore` to the first `count` line (an
    /// upper bound: see the module doc).
    pub restore_ms: Stats,
    /// Median restore / median cold: at most 0.05 is the goal.
    pub ratio: f64,
    /// `kiln snapshot create`, wall time.
    pub create_ms: f64,
    /// How long the guest was paused, as `kiln snapshot create` reports it.
    pub paused_ms: f64,
    /// The `memory` file's apparent size and the disk it takes (sparse).
    pub memory_file_bytes: u64,
    pub memory_file_on_disk_bytes: u64,
    pub state_bytes: u64,
    pub root_overlay_bytes: u64,
}

/// `kiln snapshot create`'s measurements of one snapshot.
#[derive(Debug, PartialEq)]
struct Created {
    create_ms: f64,
    paused_ms: f64,
    memory_file_bytes: u64,
    memory_file_on_disk_bytes: u64,
    state_bytes: u64,
    root_overlay_bytes: u64,
}

impl SizeReport {
    /// From the cold and restore samples (ms, not empty) and the snapshot.
    fn of(memory_mib: u64, cold: &[f64], restore: &[f64], created: Created) -> SizeReport {
        let (cold_ms, restore_ms) = (Stats::of(cold), Stats::of(restore));
        SizeReport {
            memory_mib,
            ratio: restore_ms.median / cold_ms.median,
            cold_ms,
            restore_ms,
            create_ms: created.create_ms,
            paused_ms: created.paused_ms,
            memory_file_bytes: created.memory_file_bytes,
            memory_file_on_disk_bytes: created.memory_file_on_disk_bytes,
            state_bytes: created.state_bytes,
            root_overlay_bytes: created.root_overlay_bytes,
        }
    }
}

/// Host side: runs the guest side where KVM is, writes the JSON, prints a table.
pub fn snapshot(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    let steps = SIZES.len() as u32 * (2 * runs as u32 + 4);
    let mut report: SnapshotReport = run_guest("snapshot", runs, PER_STEP * steps)?;
    report.environment = environment();
    let out = save("snapshot", &report)?;
    print_table(&report);
    println!("{}", out.display());
    Ok(())
}

fn print_table(r: &SnapshotReport) {
    println!(
        "snapshot benchmark, {} runs each ({})",
        r.runs, r.environment
    );
    println!(
        "| guest | cold min | median | p90 | max | restore min | median | p90 | max | restore / cold |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for s in &r.sizes {
        let (c, x) = (&s.cold_ms, &s.restore_ms);
        println!(
            "| {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} |",
            s.memory_mib, c.min, c.median, c.p90, c.max, x.min, x.median, x.p90, x.max, s.ratio
        );
    }
    println!(
        "latencies in ms to the first counter line; goal restore / cold <= {RATIO_GOAL} \
         (restore is an upper bound by up to 1 s: the counter's period)"
    );
    println!(
        "| guest | create (ms) | paused (ms) | memory file (MiB) | on disk (MiB) | state (KiB) | root.overlay (KiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    for s in &r.sizes {
        println!(
            "| {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            s.memory_mib,
            s.create_ms,
            s.paused_ms,
            mib(s.memory_file_bytes),
            mib(s.memory_file_on_disk_bytes),
            s.state_bytes as f64 / 1024.0,
            s.root_overlay_bytes as f64 / 1024.0,
        );
    }
}

/// Guest side (where KVM is): measures every size and prints the report
/// as one JSON line.
pub fn guest(runs: usize) -> Result<()> {
    let env = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let (bin, images, work) = (
        env("KILN")?,
        PathBuf::from(env("KILN_IMAGES")?),
        PathBuf::from(env("WORK_ROOT")?).join("bench-snapshot"),
    );
    let kiln = Kiln {
        bin,
        home: kiln_home(&images, &work)?,
        live: RefCell::default(),
    };
    let sizes = SIZES
        .into_iter()
        .map(|memory_mib| measure(&kiln, &work, memory_mib, runs))
        .collect::<Result<Vec<_>>>()?;
    print_report(&SnapshotReport {
        environment: environment(),
        runs,
        sizes,
    })
}

/// One guest size: a snapshot, then `runs` cold boots and restores.
fn measure(kiln: &Kiln, work: &Path, memory_mib: u64, runs: usize) -> Result<SizeReport> {
    let dir = work.join(format!("snapshot-{memory_mib}"));
    let created = create(kiln, &dir, memory_mib)?;
    let restore_cmd = |name: &str| {
        let mut cmd = kiln.command();
        cmd.args(["snapshot", "restore"])
            .arg(&dir)
            .args(["--name", name]);
        cmd
    };
    let restored = |line: &str| line.starts_with("count ");
    let warm_up = format!("warm-up-{memory_mib}");
    kiln.time_to_line(restore_cmd(&warm_up), &warm_up, restored)?;
    kiln.terminate(&warm_up)?;
    let (mut cold, mut restore) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("cold-{memory_mib}-{i}");
        cold.push(millis(kiln.time_to_line(
            kiln.run(&name, memory_mib),
            &name,
            |line| line.starts_with("count 1 "),
        )?));
        kiln.terminate(&name)?;
        let name = format!("restored-{memory_mib}-{i}");
        restore.push(millis(kiln.time_to_line(
            restore_cmd(&name),
            &name,
            restored,
        )?));
        kiln.terminate(&name)?;
    }
    // The memory file is as large as the guest: not kept in L1's tmpfs.
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(SizeReport::of(memory_mib, &cold, &restore, created))
}

/// Boots a source instance, snapshots it into `dir` once it counts, and
/// terminates it.
fn create(kiln: &Kiln, dir: &Path, memory_mib: u64) -> Result<Created> {
    let source = format!("source-{memory_mib}");
    kiln.time_to_line(kiln.run(&source, memory_mib), &source, |line| {
        line.starts_with("count 2 ")
    })?;
    let started = Instant::now();
    let printed = sh::output(
        kiln.command()
            .args(["snapshot", "create", &source])
            .arg(dir),
    )?;
    let create_ms = millis(started.elapsed());
    kiln.terminate(&source)?;
    let file = |name: &str| {
        let path = dir.join(name);
        std::fs::metadata(&path).with_context(|| format!("no {} in the snapshot", path.display()))
    };
    let memory = file("memory")?;
    Ok(Created {
        create_ms,
        paused_ms: paused_ms(&printed)?,
        memory_file_bytes: memory.len(),
        memory_file_on_disk_bytes: memory.blocks() * 512,
        state_bytes: file("state")?.len(),
        root_overlay_bytes: file("root.overlay")?.len(),
    })
}

/// The pause `kiln snapshot create` printed: `… paused 12.3 ms, …`.
fn paused_ms(printed: &str) -> Result<f64> {
    printed
        .rsplit_once(": paused ")
        .and_then(|(_, rest)| rest.split_once(" ms"))
        .and_then(|(ms, _)| ms.parse().ok())
        .with_context(|| format!("no pause in {printed:?}"))
}

/// `kiln` with its own home; instances it started and did not terminate
/// are terminated when it is dropped (a failed run leaves none behind).
struct Kiln {
    bin: String,
    home: PathBuf,
    live: RefCell<Vec<String>>,
}

impl Kiln {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("KILN_HOME", &self.home);
        cmd
    }

    /// `kiln run` of the counter, detached, as instance `name`.
    fn run(&self, name: &str, memory_mib: u64) -> Command {
        let mut cmd = self.command();
        cmd.args(["run", IMAGE, "--detach", "--name", name])
            .args(["--memory", &memory_mib.to_string(), "--vcpus", "1"])
            .args(["--cmdline", ENTRYPOINT]);
        cmd
    }

    /// Instance `name`'s console so far; nothing while it does not exist.
    fn logs(&self, name: &str) -> Vec<String> {
        match self.command().args(["logs", name]).output() {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|line| line.trim().to_string())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Spawns `cmd`, which starts instance `name`, and times its first
    /// console line for which `found` holds, reading the console every
    /// [`POLL`]. Fails if `cmd` fails or no such line shows within
    /// [`PER_STEP`].
    fn time_to_line(
        &self,
        mut cmd: Command,
        name: &str,
        found: fn(&str) -> bool,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", sh::describe(&cmd)))?;
        self.live.borrow_mut().push(name.to_string());
        let failed = |child: std::process::Child, why: &str| -> anyhow::Error {
            let out = child.wait_with_output();
            let printed = out
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout).into_owned()
                        + &String::from_utf8_lossy(&o.stderr)
                })
                .unwrap_or_default();
            anyhow::anyhow!(
                "{} {why}; it printed: {}; the console: {}",
                sh::describe(&cmd),
                printed.trim(),
                self.logs(name).join(" | ")
            )
        };
        let elapsed = loop {
            if self.logs(name).iter().any(|line| found(line)) {
                break started.elapsed();
            }
            if let Some(status) = child.try_wait()?
                && !status.success()
            {
                return Err(failed(child, &format!("failed: {status}")));
            }
            if started.elapsed() > PER_STEP {
                let _ = child.kill();
                return Err(failed(
                    child,
                    &format!("showed no awaited line within {PER_STEP:?}"),
                ));
            }
            std::thread::sleep(POLL);
        };
        let status = child.wait()?;
        if !status.success() {
            return Err(failed(child, &format!("failed: {status}")));
        }
        Ok(elapsed)
    }

    fn terminate(&self, name: &str) -> Result<()> {
        self.live.borrow_mut().retain(|n| n != name);
        sh::output(self.command().args(["terminate", name])).map(drop)
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        for name in self.live.take() {
            let _ = self
                .command()
                .args(["terminate", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A Kiln home in `work` whose store is `images`.
fn kiln_home(images: &Path, work: &Path) -> Result<PathBuf> {
    let home = work.join("home");
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(&home)?;
    std::os::unix::fs::symlink(images, home.join("images"))?;
    Ok(home)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_is_read_from_what_create_printed() {
        let printed = "i-0123456789abcdef snapshot in /tmp/work/snapshot-128: paused 12.3 ms, \
                       memory 20 of 128 MiB written, root volume 0.1 MiB\n";
        assert_eq!(paused_ms(printed).unwrap(), 12.3);
        assert!(paused_ms("i-0 snapshot in /x: memory 20 of 128 MiB written").is_err());
    }

    #[test]
    fn the_ratio_is_median_restore_over_median_cold() {
        let created = Created {
            create_ms: 40.0,
            paused_ms: 12.5,
            memory_file_bytes: 128 << 20,
            memory_file_on_disk_bytes: 20 << 20,
            state_bytes: 4096,
            root_overlay_bytes: 1 << 20,
        };
        let report = SizeReport::of(
            128,
            &[1000.0, 900.0, 1100.0, 5000.0],
            &[40.0, 60.0, 50.0, 45.0],
            created,
        );
        assert_eq!(report.cold_ms.median, 1000.0);
        assert_eq!(report.restore_ms.median, 45.0);
        assert_eq!(report.ratio, 0.045);
        assert!(report.ratio <= RATIO_GOAL);

        let json = serde_json::to_value(SnapshotReport {
            environment: "hardware KVM".into(),
            runs: 4,
            sizes: vec![report],
        })
        .unwrap();
        let size = &json["sizes"][0];
        for key in [
            "memory_mib",
            "cold_ms",
            "restore_ms",
            "ratio",
            "create_ms",
            "paused_ms",
            "memory_file_bytes",
            "memory_file_on_disk_bytes",
            "state_bytes",
            "root_overlay_bytes",
        ] {
            assert!(size.get(key).is_some(), "no {key} in {size}");
        }
        assert_eq!(size["cold_ms"]["p90"], 5000.0);
        assert_eq!(size["memory_file_on_disk_bytes"], 20 << 20);
        let back: SnapshotReport = serde_json::from_value(json).unwrap();
        assert_eq!(back.sizes[0].ratio, 0.045);
    }
}
