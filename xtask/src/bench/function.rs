//! `cargo xtask bench fn`: what a function invocation costs as a clone of
//! the function's template snapshot (its runtime already initialized), and
//! in a warm environment, against the same work booted cold, same image,
//! same guest size, same test machine, same run.
//!
//! The guest side creates the function `echo` in `runtime-api` mode
//! (`kiln fn create echo --image python-echo:1.0.0 --entrypoint
//! "/usr/bin/python3 /app/runtime.py" --memory 256 --timeout 60`, timed;
//! the runtime's init time is what it prints), runs one untimed warm-up of
//! each side, then `runs` times, interleaved, times from spawning the
//! `kiln` command to the line of its output that holds the answer (the
//! response, as a client sees it: before the cold VM's shutdown or the
//! clone's teardown, which follow it):
//!
//! - clone: `kiln fn invoke echo --payload '{"n": 1}'`, a clone restored
//!   from the template, released from `restore/next`, the event handled
//!   by its runtime, the clone torn down; it maps the template's memory
//!   working set ahead, which the untimed first clone recorded;
//! - the same clone invoke with the working set's record removed first
//!   (as every clone was before it existed; that invoke records it
//!   again): the working set's A/B, alternating with the above;
//! - cold: a foreground `kiln run python-echo:1.0.0 --memory 256` (1 vCPU
//!   like the function's VMs), whose entrypoint is the same handler
//!   reading the console: the payload is written to its stdin, then `^D`
//!   so that the guest's console (canonical mode) reads the end of input,
//!   the handler answers and exits, and so does the VM: what invoking costs
//!   without snapshots. The host's end of stdin does not reach the guest,
//!   hence `^D`; the payload is preceded by blank lines, which JSON
//!   ignores, because the guest's UART driver discards a byte or two
//!   waiting in its receive FIFO when the console is opened.
//!
//! Both must print `"echo": {"n": 1}`, or the benchmark fails. Each
//! timed clone invoke also writes its processes' stage marks to a trace
//! file (`KILN_TRACE`: the command's, and its jailed VM process's through
//! the descriptor it is passed), cut into `clone_breakdown`. Then warm:
//! `kiln fn serve echo --max-concurrency 1` is started, one event warms
//! its environment, and `runs` Invoke API requests
//! (`POST /2015-03-31/functions/echo/invocations`) are timed from the
//! connect to the whole answer: a reused environment, no restore. Then:
//! clones per second, `kiln fn invoke echo --count N --concurrency 2`
//! (N = max(runs, 4)), read from the summary it prints; and the memory of
//! idle clones: the template restored twice with `kiln snapshot restore`,
//! left 3 s, then the proportional set size (`Pss:` of
//! /proc/PID/smaps_rollup) of each one's VM process (the child of its
//! VMM, the record's `vmm_pid`), which holds the guest's RAM.
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kiln_bench::vmm::breakdown;
use kiln_bench::vmm::report::Stage;
use kiln_control::instance::Registry;
use kiln_control::instance::supervisor::VM_SUBCOMMAND;
use serde::{Deserialize, Serialize};

use super::{
    Kiln, Stats, Watchdog, env, environment, kiln_home, millis, print_report, run_guest, save,
};
use crate::sh;

const IMAGE: &str = "python-echo:1.0.0";
const FUNCTION: &str = "echo";
/// The cold side's handler: the image's entrypoint.
const HANDLER: &str = "/usr/bin/python3 /app/echo.py";
/// The function's runtime (the same echo, as a Lambda runtime).
const ENTRYPOINT: &str = "/usr/bin/python3 /app/runtime.py";
/// Where the warm side's `kiln fn serve` listens.
const SERVE_ADDRESS: &str = "127.0.0.1:18090";
const MEMORY_MIB: u64 = 256;
const PAYLOAD: &str = r#"{"n": 1}"#;
/// What both sides must print.
const ANSWER: &str = r#""echo": {"n": 1}"#;
/// Invocations in flight for the throughput run.
const CONCURRENCY: usize = 2;
/// Idle clones whose memory is measured.
const IDLE_CLONES: usize = 2;
/// How long the idle clones are left before they are measured.
const IDLE_WAIT: Duration = Duration::from_secs(3);
/// Per boot, invocation or creation under nested TCG, generously.
const PER_STEP: Duration = Duration::from_secs(120);
/// Clone / cold, p50: the goal is at most this.
const CLONE_RATIO_GOAL: f64 = 0.10;
/// Warm / cold, p50: the goal is at most this.
const WARM_RATIO_GOAL: f64 = 0.01;
/// Clones per second: the goal is at least this (on 2 cores).
const RATE_GOAL: f64 = 100.0;
/// PSS of an idle clone / its guest memory: the goal is at most this.
const PSS_GOAL: f64 = 0.10;

/// What `target/bench/fn.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct FnReport {
    pub environment: String,
    pub runs: usize,
    /// CPUs where the guest side ran (L1's, under nesting).
    pub cpus: usize,
    pub image: String,
    /// The cold side's handler.
    pub handler: String,
    /// The function's runtime.
    pub entrypoint: String,
    pub memory_mib: u64,
    /// `kiln fn create`, wall time.
    pub create_ms: f64,
    /// The runtime's init in the template (its start to its first wait
    /// for work), as `kiln fn create` printed it.
    pub init_ms: f64,
    /// Foreground `kiln run`, payload on the console, spawn to the answer.
    pub cold_invoke_ms: Stats,
    /// `kiln fn invoke`, spawn to the answer; the clone maps the
    /// template's working set ahead (the first clone recorded it).
    pub clone_invoke_ms: Stats,
    /// The same with the working set's record removed first, as every
    /// clone was before it existed (that invoke records it again after
    /// its answer): the A/B of the working set, alternating with the above.
    pub clone_without_working_set_ms: Stats,
    /// An Invoke API request to `kiln fn serve`, a warm environment.
    pub warm_invoke_ms: Stats,
    /// Where a clone invoke's milliseconds go, from the stage marks its
    /// processes write to `KILN_TRACE` (p50 of each stage over the runs).
    pub clone_breakdown: Vec<Stage>,
    /// p50 clone / p50 cold.
    pub clone_ratio: f64,
    /// p50 warm / p50 cold.
    pub warm_ratio: f64,
    pub throughput: Throughput,
    pub idle_clones: Vec<IdleClone>,
    /// Mean PSS of an idle clone's VM process.
    pub pss_kib_per_clone: f64,
    /// That, over the clone's guest memory.
    pub pss_fraction: f64,
    pub goals: Vec<Goal>,
}

/// `kiln fn invoke --count N --concurrency C`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Throughput {
    pub invocations: usize,
    pub concurrency: usize,
    /// The spawn-to-exit wall time of the command.
    pub wall_s: f64,
    /// What it printed: the time of its invocations, and invocations / s.
    pub reported_s: f64,
    pub per_s: f64,
}

/// One idle clone's VM process.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct IdleClone {
    pub name: String,
    pub vm_pid: u32,
    pub pss_kib: u64,
}

/// A goal, and whether this run met it.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Goal {
    pub what: String,
    pub goal: f64,
    pub measured: f64,
    pub met: bool,
}

fn goals(clone_ratio: f64, warm_ratio: f64, per_s: f64, pss_fraction: f64) -> Vec<Goal> {
    vec![
        Goal {
            what: "clone invoke p50 / cold-boot invoke p50, at most".into(),
            goal: CLONE_RATIO_GOAL,
            measured: clone_ratio,
            met: clone_ratio <= CLONE_RATIO_GOAL,
        },
        Goal {
            what: "warm invoke p50 / cold-boot invoke p50, at most".into(),
            goal: WARM_RATIO_GOAL,
            measured: warm_ratio,
            met: warm_ratio <= WARM_RATIO_GOAL,
        },
        Goal {
            what: "clones per second (on 2 cores), at least".into(),
            goal: RATE_GOAL,
            measured: per_s,
            met: per_s >= RATE_GOAL,
        },
        Goal {
            what: "PSS per idle clone / its guest memory, at most".into(),
            goal: PSS_GOAL,
            measured: pss_fraction,
            met: pss_fraction <= PSS_GOAL,
        },
    ]
}

/// Host side: runs the guest side where KVM is, writes the JSON, prints a table.
pub fn function(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    let steps = 3 * runs as u32 + runs.max(4) as u32 + 10;
    let mut report: FnReport = run_guest("fn", runs, PER_STEP * steps)?;
    report.environment = environment();
    let out = save("fn", &report)?;
    print_table(&report);
    println!("{}", out.display());
    Ok(())
}

fn print_table(r: &FnReport) {
    println!(
        "function benchmark, {} runs each, {} MiB guests, {} CPU(s) ({})",
        r.runs, r.memory_mib, r.cpus, r.environment
    );
    println!("| ms | min | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (what, l) in [
        ("cold-boot invoke", &r.cold_invoke_ms),
        ("clone invoke", &r.clone_invoke_ms),
        (
            "clone invoke, no working set",
            &r.clone_without_working_set_ms,
        ),
        ("warm invoke", &r.warm_invoke_ms),
    ] {
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} | {:.1} |",
            l.min, l.p50, l.p99, l.max
        );
    }
    let t = &r.throughput;
    println!("| clone invoke, stage (p50 of each) | ends in | ms | at ms |");
    println!("|---|---|---|---|");
    for stage in &r.clone_breakdown {
        println!(
            "| {} | {} | {:.1} | {:.1} |",
            stage.stage, stage.process, stage.ms_p50, stage.at_ms_p50
        );
    }
    println!(
        "clone / cold (p50): {:.3}; warm / cold (p50): {:.4}; kiln fn create: {:.1} ms, runtime init {:.1} ms",
        r.clone_ratio, r.warm_ratio, r.create_ms, r.init_ms
    );
    println!(
        "{} invocations at concurrency {}: {:.2} s ({:.2} s wall), {:.2}/s",
        t.invocations, t.concurrency, t.reported_s, t.wall_s, t.per_s
    );
    for c in &r.idle_clones {
        println!(
            "idle clone {}: VM process {} PSS {} KiB",
            c.name, c.vm_pid, c.pss_kib
        );
    }
    println!(
        "PSS per idle clone: {:.0} KiB, {:.3} of {} MiB",
        r.pss_kib_per_clone, r.pss_fraction, r.memory_mib
    );
    for g in &r.goals {
        let met = if g.met { "met" } else { "NOT met" };
        println!("goal: {} {}: {:.3}, {met}", g.what, g.goal, g.measured);
    }
}

/// Guest side (where KVM is): measures and prints the report as one JSON line.
pub fn guest(runs: usize) -> Result<()> {
    let (bin, images, work) = (
        env("KILN")?,
        PathBuf::from(env("KILN_IMAGES")?),
        PathBuf::from(env("WORK_ROOT")?).join("bench-fn"),
    );
    let kiln = Kiln::new(bin, kiln_home(&images, &work)?);
    let (create_ms, init_ms) = kiln.create_function()?;
    let invokes = Invokes::measure(&kiln, &work.join("invoke.trace"), runs)?;
    let warm_invoke_ms = super::stats(&kiln.warm(runs)?)?;
    let clone_ratio = invokes.clone.p50 / invokes.cold.p50;
    let warm_ratio = warm_invoke_ms.p50 / invokes.cold.p50;

    let throughput = kiln.throughput(runs.max(4))?;
    let idle_clones = kiln.idle_clones()?;
    let pss_kib_per_clone =
        idle_clones.iter().map(|c| c.pss_kib as f64).sum::<f64>() / idle_clones.len() as f64;
    let pss_fraction = pss_kib_per_clone / (MEMORY_MIB * 1024) as f64;
    sh::output(kiln.command().args(["fn", "rm", FUNCTION]))?;
    print_report(&FnReport {
        environment: environment(),
        runs,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        image: IMAGE.into(),
        handler: HANDLER.into(),
        entrypoint: ENTRYPOINT.into(),
        memory_mib: MEMORY_MIB,
        create_ms,
        init_ms,
        goals: goals(clone_ratio, warm_ratio, throughput.per_s, pss_fraction),
        cold_invoke_ms: invokes.cold,
        clone_invoke_ms: invokes.clone,
        clone_without_working_set_ms: invokes.clone_without_working_set,
        warm_invoke_ms,
        clone_breakdown: invokes.clone_breakdown,
        clone_ratio,
        warm_ratio,
        throughput,
        idle_clones,
        pss_kib_per_clone,
        pss_fraction,
    })
}

/// The cold and clone invokes' times, and where a clone's time goes.
struct Invokes {
    cold: Stats,
    clone: Stats,
    clone_without_working_set: Stats,
    clone_breakdown: Vec<Stage>,
}

impl Invokes {
    /// One untimed warm-up of each side, then `runs` of each, interleaved
    /// so that a change in the host's load falls on all of them alike.
    fn measure(kiln: &Kiln, trace: &Path, runs: usize) -> Result<Self> {
        // Warm-ups: the page cache, the image's chunks, python's files.
        kiln.cold()?;
        kiln.invoke(trace)?;
        let (mut cold, mut clone, mut traces) = (Vec::new(), Vec::new(), Vec::new());
        let mut without_working_set = Vec::new();
        for _ in 0..runs {
            cold.push(millis(kiln.cold()?));
            let (answered, traced) = kiln.invoke(trace)?;
            clone.push(millis(answered));
            traces.push(traced);
            kiln.forget_working_set()?;
            without_working_set.push(millis(kiln.invoke(trace)?.0));
        }
        Ok(Self {
            cold: super::stats(&cold)?,
            clone: super::stats(&clone)?,
            clone_without_working_set: super::stats(&without_working_set)?,
            clone_breakdown: breakdown::stages(&breakdown::clone_invoke_path(), &traces),
        })
    }
}

/// Spawns `cmd`, writes `stdin` to it (else none), and times it to the
/// line of its output that holds [`ANSWER`] (the response, before the
/// VM's shutdown or the clone's teardown); it must then exit with
/// success. A command still running after [`PER_STEP`] is killed and the
/// step fails.
fn timed_answer(mut cmd: Command, stdin: Option<&[u8]>) -> Result<Duration> {
    let answered = std::cell::Cell::new(None);
    let started = Instant::now();
    timed_output_seeing(
        &mut cmd,
        stdin,
        |out| out.contains(ANSWER),
        |line| {
            if answered.get().is_none() && line.contains(ANSWER) {
                answered.set(Some(started.elapsed()));
            }
        },
    )?;
    Ok(answered
        .get()
        .expect("the output was checked to hold the answer"))
}

/// Spawns `cmd`, writes `stdin` to it (else none), and times it to its
/// exit, which must be a success with output that `ok` accepts; returns
/// that time and what it printed on stdout.
fn timed_output(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    ok: impl Fn(&str) -> bool,
) -> Result<(Duration, String)> {
    timed_output_seeing(cmd, stdin, ok, |_| {})
}

/// [`timed_output`], handing each stdout line to `seen` as it arrives.
fn timed_output_seeing(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    ok: impl Fn(&str) -> bool,
    seen: impl Fn(&str),
) -> Result<(Duration, String)> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", sh::describe(cmd)))?;
    let pid = child.id();
    let watchdog = Watchdog::start(pid, PER_STEP);
    if let (Some(bytes), Some(mut input)) = (stdin, child.stdin.take()) {
        // A VM that ends early closes its end: that shows in its output.
        let _ = input.write_all(bytes);
    }
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    let mut stdout = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        seen(&line);
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait()?;
    let elapsed = started.elapsed();
    let killed = watchdog.finish();
    let errors = errors.join().expect("the stderr reader does not panic");
    let printed = || format!("{} | {}", stdout.trim(), errors.trim());
    if killed {
        bail!(
            "{} was still running after {PER_STEP:?} and was killed; it printed: {}",
            sh::describe(cmd),
            printed()
        );
    }
    if !status.success() || !ok(&stdout) {
        bail!(
            "{} failed ({status}) or printed no {ANSWER:?}: {}",
            sh::describe(cmd),
            printed()
        );
    }
    Ok((elapsed, stdout))
}

/// What the cold side writes to the console: blank lines (see the module
/// docs), the payload, and `^D` at the start of a line, end of input.
fn cold_input() -> Vec<u8> {
    format!("\n\n\n\n\n\n\n\n{PAYLOAD}\n\x04").into_bytes()
}

/// From `function echo ready (init 412.3 ms)`: the init time.
fn init_ms(printed: &str) -> Option<f64> {
    let (_, rest) = printed.split_once("(init ")?;
    rest.split_once(" ms)")?.0.parse().ok()
}

/// One Invoke API request to the serve at [`SERVE_ADDRESS`], timed from
/// the connect to the end of the answer, which must hold [`ANSWER`].
fn invoke_api() -> Result<Duration> {
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect(SERVE_ADDRESS)
        .with_context(|| format!("cannot connect to kiln fn serve on {SERVE_ADDRESS}"))?;
    stream.set_read_timeout(Some(PER_STEP))?;
    let request = format!(
        "POST /2015-03-31/functions/{FUNCTION}/invocations HTTP/1.1\r\nHost: kiln\r\n\
         Content-Length: {}\r\n\r\n{PAYLOAD}",
        PAYLOAD.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let elapsed = started.elapsed();
    if !answer.starts_with("HTTP/1.1 200") || !answer.contains(ANSWER) {
        bail!("kiln fn serve answered without {ANSWER:?}: {answer}");
    }
    Ok(elapsed)
}

/// From `… in 12.3 s (4.56/s)`: seconds and invocations / s.
fn summary(printed: &str) -> Option<(f64, f64)> {
    let line = printed.lines().find(|l| l.contains(" invocations at "))?;
    let (_, rest) = line.rsplit_once(" in ")?;
    let (seconds, rest) = rest.split_once(" s (")?;
    let rate = rest.strip_suffix("/s)")?;
    Some((seconds.parse().ok()?, rate.parse().ok()?))
}

/// The VM process of the VMM `parent`: the pid whose `/proc/PID/stat`
/// says its parent is `parent` and whose command line is `kiln __vm …`,
/// if any.
fn vm_process_of(parent: u32) -> Result<Option<u32>> {
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let vm = || {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|line| {
                line.split(|&b| b == 0)
                    .any(|arg| arg == VM_SUBCOMMAND.as_bytes())
            })
        };
        if ppid(&stat) == Some(parent) && vm() {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// The parent pid in a `/proc/PID/stat` line (its 4th field, after the
/// command name in parentheses, which may hold spaces).
fn ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `Pss:` in `/proc/PID/smaps_rollup`, KiB.
fn pss_kib(rollup: &str) -> Option<u64> {
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

impl Kiln {
    /// Creates the function, timed: `kiln fn create`'s wall time and the
    /// runtime's init time it printed, in ms.
    fn create_function(&self) -> Result<(f64, f64)> {
        let mut created = self.command();
        created
            .args([
                "fn",
                "create",
                FUNCTION,
                "--image",
                IMAGE,
                "--entrypoint",
                ENTRYPOINT,
            ])
            .args(["--memory", &MEMORY_MIB.to_string(), "--timeout", "60"]);
        let (create, printed) = timed_output(&mut created, None, |out| init_ms(out).is_some())?;
        let init_ms = init_ms(&printed).expect("checked by timed_output");
        Ok((millis(create), init_ms))
    }

    /// The payload through a cold boot of the image, foreground.
    fn cold(&self) -> Result<Duration> {
        let mut cmd = self.command();
        cmd.args(["run", IMAGE, "--memory", &MEMORY_MIB.to_string()])
            .args(["--vcpus", "1"]);
        timed_answer(cmd, Some(&cold_input()))
    }

    /// Removes the template's memory working set (which the next clone
    /// then records again).
    fn forget_working_set(&self) -> Result<()> {
        let template = self
            .home()
            .join("functions")
            .join(FUNCTION)
            .join("template");
        let record = template.join(kiln_vmm::snapshot::working_set::WORKING_SET_FILE);
        fs::remove_file(&record).with_context(|| format!("no working set at {}", record.display()))
    }

    /// The payload through one clone of the template.
    fn invoke(&self, trace: &Path) -> Result<(Duration, breakdown::Run)> {
        let mut cmd = self.command();
        cmd.args(["fn", "invoke", FUNCTION, "--payload", PAYLOAD])
            .env(kiln_vmm::trace::TRACE_ENV, trace);
        let spawned_ns = kiln_vmm::trace::monotonic_ns();
        let answered = timed_answer(cmd, None)?;
        let answered_ns = spawned_ns + answered.as_nanos() as u64;
        Ok((
            answered,
            breakdown::Run::read(trace, spawned_ns, answered_ns)?,
        ))
    }

    /// `runs` events in the warm environment of a `kiln fn serve` (one
    /// untimed event first warms it); the serve is stopped after.
    fn warm(&self, runs: usize) -> Result<Vec<f64>> {
        let mut serve = self
            .command()
            .args(["fn", "serve", FUNCTION, "--listen", SERVE_ADDRESS])
            .args(["--max-concurrency", "1", "--keep-warm", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start kiln fn serve")?;
        let measured = (|| {
            let deadline = Instant::now() + PER_STEP;
            while std::net::TcpStream::connect(SERVE_ADDRESS).is_err() {
                if Instant::now() > deadline {
                    bail!("kiln fn serve did not listen on {SERVE_ADDRESS} within {PER_STEP:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            invoke_api()?;
            (0..runs).map(|_| invoke_api().map(millis)).collect()
        })();
        // SIGTERM, so that the serve terminates its environments; the
        // serve is our child, not yet reaped, so its pid is its own.
        sh::run(Command::new("kill").args(["-TERM", &serve.id().to_string()]))?;
        serve.wait().context("waiting for kiln fn serve to stop")?;
        measured
    }

    fn throughput(&self, count: usize) -> Result<Throughput> {
        let mut cmd = self.command();
        cmd.args(["fn", "invoke", FUNCTION, "--payload", PAYLOAD])
            .args(["--count", &count.to_string()])
            .args(["--concurrency", &CONCURRENCY.to_string()]);
        let ok = format!("{count} ok, 0 failed");
        let (wall, printed) = timed_output(&mut cmd, None, |out| out.contains(&ok))?;
        let (reported_s, per_s) =
            summary(&printed).with_context(|| format!("no summary line in {printed:?}"))?;
        Ok(Throughput {
            invocations: count,
            concurrency: CONCURRENCY,
            wall_s: wall.as_secs_f64(),
            reported_s,
            per_s,
        })
    }

    /// Restores the template [`IDLE_CLONES`] times, waits, measures each
    /// clone's VM process, and terminates them.
    fn idle_clones(&self) -> Result<Vec<IdleClone>> {
        let template = self
            .home()
            .join("functions")
            .join(FUNCTION)
            .join("template");
        let names: Vec<String> = (0..IDLE_CLONES).map(|i| format!("idle{i}")).collect();
        for name in &names {
            self.track(name);
            sh::output(
                self.command()
                    .args(["snapshot", "restore"])
                    .arg(&template)
                    .args(["--name", name]),
            )?;
        }
        std::thread::sleep(IDLE_WAIT);
        let registry = Registry::new(self.home());
        let clones = names
            .iter()
            .map(|name| {
                let instance = registry.find(name)?;
                let vmm = instance
                    .record
                    .vmm_pid
                    .with_context(|| format!("{name} has no VMM process"))?;
                let vm_pid = vm_process_of(vmm)?
                    .with_context(|| format!("{name}'s VMM {vmm} has no VM process"))?;
                let path = Path::new("/proc")
                    .join(vm_pid.to_string())
                    .join("smaps_rollup");
                let rollup = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let pss_kib =
                    pss_kib(&rollup).with_context(|| format!("no Pss: in {}", path.display()))?;
                Ok(IdleClone {
                    name: name.clone(),
                    vm_pid,
                    pss_kib,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for name in &names {
            self.terminate(name)?;
        }
        Ok(clones)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_line_of_fn_invoke_is_read() {
        let printed = "5 ok, 0 failed, 5 invocations at concurrency 2 in 7.3 s (0.68/s)\n\
                       latency ms: min 1.0  p50 2.0  p90 3.0  p99 3.0  max 3.0\n";
        assert_eq!(summary(printed), Some((7.3, 0.68)));
        assert_eq!(summary("latency ms: min 1.0"), None);
    }

    #[test]
    fn the_parent_is_read_after_the_command_name() {
        let stat = "4242 (kiln run (x) y) S 4200 4242 4242 0 -1 4194560 0";
        assert_eq!(ppid(stat), Some(4200));
        assert_eq!(ppid("garbage"), None);
    }

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  40960 kB\n\
                      Pss:               30123 kB\nPss_Anon:  1000 kB\n";
        assert_eq!(pss_kib(rollup), Some(30123));
        assert_eq!(pss_kib("Rss: 1 kB\n"), None);
    }

    #[test]
    fn the_cold_input_is_the_payload_then_end_of_input() {
        let input = String::from_utf8(cold_input()).unwrap();
        let (padding, rest) = input.split_once('{').unwrap();
        assert!(padding.chars().all(|c| c == '\n'));
        assert_eq!(format!("{{{rest}"), format!("{PAYLOAD}\n\x04"));
        let echoed: serde_json::Value = serde_json::from_str(input.trim_end_matches('\x04'))
            .expect("blank lines before the payload are still JSON");
        assert_eq!(echoed["n"], 1);
    }

    #[test]
    fn goals_say_whether_they_were_met() {
        let g = goals(0.2, 0.005, 150.0, 0.05);
        assert_eq!(
            g.iter().map(|g| g.met).collect::<Vec<_>>(),
            [false, true, true, true]
        );
        assert!(goals(0.09, 0.5, 10.0, 0.5)[0].met);
        assert!(!goals(0.09, 0.5, 10.0, 0.5)[1].met);
        assert!(!goals(0.09, 0.5, 10.0, 0.5)[3].met);
    }

    #[test]
    fn the_init_time_is_read_from_fn_create() {
        assert_eq!(
            init_ms("function echo ready (init 412.3 ms)\n"),
            Some(412.3)
        );
        assert_eq!(init_ms("function echo ready\n"), None);
    }
}
