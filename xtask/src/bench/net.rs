//! `cargo xtask bench net`: HTTP request latency and download throughput
//! of the web image on Kiln's virtio-net against the same image on QEMU's
//! microvm machine with virtio-net over a tap, both on the kiln0 bridge,
//! same kernel, same run.
//!
//! The guest side starts `web-bench` (the web image and a 16 MiB file) as
//! a Kiln instance, and the same image, flattened, under QEMU with a tap
//! it joins to kiln0 and a fixed address. From the test machine, with a
//! plain TCP client:
//! - latency: `GET /` on a fresh connection each time, from connect to
//!   the last byte of the answer (what a short request costs end to end);
//!   Kiln is also measured through its published port (the proxy);
//! - throughput: `GET /blob`, the 16 MiB file from the guest's page cache,
//!   MiB/s.
//!
//! Each target is warmed up first (the first request faults the file in);
//! the timed requests then alternate between the targets.
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::boot::qemu_command;
use super::{
    Kiln, Stats, env, environment, kiln_home, millis, print_report, run_guest, save, stats,
};
use crate::sh;

const IMAGE: &str = "web-bench:1.0.0";
/// The file `GET /blob` downloads, and its size (tests/vm/bench-net).
const BLOB: &str = "/blob";
const BLOB_BYTES: usize = 16 << 20;
/// QEMU's guest: an address Kiln's allocation reaches last, its MAC and tap.
const QEMU_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 89, 0, 254);
const QEMU_TAP: &str = "kq-bench";
const QEMU_MAC: &str = "02:6b:0a:59:00:fe";
/// Kiln's published port for the proxy's line.
const PUBLISHED: u16 = 8080;
/// Short requests per run.
const REQUESTS_PER_RUN: usize = 10;
/// How long a guest may take to answer its first request (nested TCG).
const READY_LIMIT: Duration = Duration::from_secs(240);
const REQUEST_LIMIT: Duration = Duration::from_secs(60);

/// What `target/bench/net.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct NetReport {
    pub environment: String,
    pub runs: usize,
    pub requests: usize,
    /// `GET /`, connect to last byte, ms.
    pub kiln_latency_ms: Stats,
    pub kiln_proxy_latency_ms: Stats,
    pub qemu_latency_ms: Stats,
    /// `GET /blob`, MiB/s.
    pub kiln_mib_s: Stats,
    pub qemu_mib_s: Stats,
    /// kiln / QEMU, median latency: below 1 is faster.
    pub latency_ratio: f64,
    /// kiln / QEMU, median throughput: above 1 is faster.
    pub throughput_ratio: f64,
}

/// Host side: runs the guest side where KVM is, writes the JSON, prints a table.
pub fn net(runs: usize) -> Result<()> {
    if runs < 2 {
        bail!("--runs {runs}: at least 2");
    }
    let allowance = READY_LIMIT * 2 + REQUEST_LIMIT * (runs as u32 * 2 + 4);
    let mut report: NetReport = run_guest("net", runs, allowance)?;
    report.environment = environment();
    let out = save("net", &report)?;
    print_table(&report);
    println!("{}", out.display());
    Ok(())
}

fn print_table(r: &NetReport) {
    println!("network ({}), {} runs", r.environment, r.runs);
    println!("{:<22} {:>10} {:>10} {:>10}", "", "p50", "p90", "max");
    for (name, s) in [
        ("GET / kiln (ms)", &r.kiln_latency_ms),
        ("GET / kiln -p (ms)", &r.kiln_proxy_latency_ms),
        ("GET / qemu (ms)", &r.qemu_latency_ms),
        ("16 MiB kiln (MiB/s)", &r.kiln_mib_s),
        ("16 MiB qemu (MiB/s)", &r.qemu_mib_s),
    ] {
        println!("{name:<22} {:>10.2} {:>10.2} {:>10.2}", s.p50, s.p90, s.max);
    }
    println!(
        "kiln / qemu: latency {:.3}, throughput {:.3}",
        r.latency_ratio, r.throughput_ratio
    );
}

/// Guest side, where KVM is.
pub fn guest(runs: usize) -> Result<()> {
    let work = PathBuf::from(env("WORK_ROOT")?).join("bench-net");
    let kiln = Kiln::new(
        env("KILN")?,
        kiln_home(Path::new(&env("KILN_IMAGES")?), &work)?,
    );
    let kiln_address = kiln.web()?;
    let rootfs = work.join("web.ext4");
    sh::run(
        kiln.command()
            .args(["image", "flatten", IMAGE])
            .arg(&rootfs),
    )?;
    let _qemu = Qemu::start(&env("QEMU")?, &env("KILN_KERNEL")?, &rootfs)?;

    let targets = [
        SocketAddrV4::new(kiln_address, 80),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, PUBLISHED),
        SocketAddrV4::new(QEMU_ADDRESS, 80),
    ];
    for target in targets {
        wait_ready(target)?;
        get(target, BLOB)?;
    }
    let mut latency = [Vec::new(), Vec::new(), Vec::new()];
    let mut throughput = [Vec::new(), Vec::new()];
    for _ in 0..runs {
        for _ in 0..REQUESTS_PER_RUN {
            for (samples, target) in latency.iter_mut().zip(targets) {
                samples.push(millis(get(target, "/")?.elapsed));
            }
        }
        for (samples, target) in throughput.iter_mut().zip([targets[0], targets[2]]) {
            let fetched = get(target, BLOB)?;
            ensure!(
                fetched.body >= BLOB_BYTES,
                "{target}{BLOB}: {} bytes, expected {BLOB_BYTES}",
                fetched.body
            );
            samples.push(BLOB_BYTES as f64 / f64::from(1 << 20) / fetched.elapsed.as_secs_f64());
        }
    }
    let [kiln_lat, proxy_lat, qemu_lat] = [
        stats(&latency[0])?,
        stats(&latency[1])?,
        stats(&latency[2])?,
    ];
    let [kiln_tp, qemu_tp] = [stats(&throughput[0])?, stats(&throughput[1])?];
    let report = NetReport {
        environment: environment(),
        runs,
        requests: runs * REQUESTS_PER_RUN,
        latency_ratio: kiln_lat.p50 / qemu_lat.p50,
        throughput_ratio: kiln_tp.p50 / qemu_tp.p50,
        kiln_latency_ms: kiln_lat,
        kiln_proxy_latency_ms: proxy_lat,
        qemu_latency_ms: qemu_lat,
        kiln_mib_s: kiln_tp,
        qemu_mib_s: qemu_tp,
    };
    print_report(&report)
}

impl Kiln {
    /// Starts the web-bench instance with its published port; returns its
    /// address.
    fn web(&self) -> Result<Ipv4Addr> {
        let ports = format!("{PUBLISHED}:80");
        let id = self.output(&["run", IMAGE, "--detach", "--name", "web", "-p", &ports])?;
        self.track("web");
        let record = fs::read(
            self.home()
                .join("instances")
                .join(id.trim())
                .join("instance.json"),
        )?;
        let record: serde_json::Value = serde_json::from_slice(&record)?;
        record["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .context("the web instance has no address")
    }
}

/// QEMU's guest on kiln0, ended when dropped.
struct Qemu {
    child: Child,
}

impl Qemu {
    fn start(qemu: &str, kernel: &str, rootfs: &Path) -> Result<Qemu> {
        let words = format!("kiln.net.ip={QEMU_ADDRESS}/24 kiln.net.gateway=10.89.0.1");
        let mut cmd = qemu_command(qemu, kernel, rootfs, &words);
        cmd.args(["-netdev"])
            .arg(format!(
                "tap,id=net0,ifname={QEMU_TAP},script=no,downscript=no"
            ))
            .args(["-device"])
            .arg(format!("virtio-net-device,netdev=net0,mac={QEMU_MAC}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", sh::describe(&cmd)))?;
        let qemu = Qemu { child };
        // QEMU makes the tap; it joins the bridge like an instance's.
        let sys = Path::new("/sys/class/net").join(QEMU_TAP);
        let started = Instant::now();
        while !sys.exists() {
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "QEMU made no tap {QEMU_TAP}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        kiln_vmm::devices::virtio::net::bridge::attach(
            kiln_control::network::address::BRIDGE,
            QEMU_TAP,
        )?;
        Ok(qemu)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One answered request.
struct Fetched {
    elapsed: Duration,
    body: usize,
}

/// `GET path` on a fresh connection, read to the end; fails on anything
/// but 200.
fn get(target: SocketAddrV4, path: &str) -> Result<Fetched> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), REQUEST_LIMIT)?;
    stream.set_read_timeout(Some(REQUEST_LIMIT))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n",
        target.ip()
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let elapsed = started.elapsed();
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("{target}{path}: no HTTP header in the answer"))?;
    let status = String::from_utf8_lossy(&answer[..head_end.min(64)]).into_owned();
    ensure!(
        status.starts_with("HTTP/1.") && status.contains(" 200 "),
        "{target}{path}: {status:?}"
    );
    Ok(Fetched {
        elapsed,
        body: answer.len() - head_end - 4,
    })
}

/// Waits until `target` answers `GET /` (the guest has booted).
fn wait_ready(target: SocketAddrV4) -> Result<()> {
    let started = Instant::now();
    loop {
        match get(target, "/") {
            Ok(_) => return Ok(()),
            Err(err) if started.elapsed() > READY_LIMIT => {
                bail!("{target} never answered within {READY_LIMIT:?}: {err:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
