//! `cargo xtask …`: Kiln's developer tasks.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod apt;
mod bench;
mod debian;
mod demo;
mod harness;
mod init;
mod install;
mod kernel;
mod pod_probe;
mod pty;
mod sh;
mod stub;
mod test;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Kiln's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Bench {
    /// `kiln build` of recipes/hello (cold, cached, size against ext4 + zstd -19); the Debian
    /// root's compression by level and threads; recipes/debian's cold build, nested.
    Build {
        /// Cached rebuilds to time.
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Boot latency and VMM memory of `kiln run` against QEMU microvm.
    Boot {
        /// Timed boots per VMM (after one warm-up each).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
    /// Guest read throughput from the compressed image against a raw file.
    Disk {
        /// Timed runs per backend and access pattern (after one warm-up each).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only the host side (the volume and the hydration cache on this
        /// host's CPU, no VM), into target/bench/disk-host.json.
        #[arg(long)]
        host_only: bool,
    },
    /// Restore latency of `kiln snapshot restore` against a cold boot, and snapshot size.
    Snapshot {
        /// Timed cold boots and restores per guest size.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Invoke latency of a function clone against a cold boot, clones per second, idle clone memory.
    Fn {
        /// Timed cold-boot and clone invocations.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// HTTP latency and throughput of the web image on Kiln against QEMU, both over a tap.
    Net {
        /// Rounds of 10 short requests and one 16 MiB download per target.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// `kiln bench vmm`: the VMM's own cost with the stub guest, on this host's own KVM.
    Vmm {
        /// Timed runs per series, and clones per concurrency.
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
    /// `kiln bench all --peer qemu` where KVM is (nested, labelled as emulation, without it).
    Startup {
        /// Timed runs per scenario and VMM (after one warm-up each).
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

/// What `bench-guest` measures.
#[derive(Clone, Copy, clap::ValueEnum)]
enum GuestBench {
    Build,
    Boot,
    Disk,
    Snapshot,
    Fn,
    Net,
    Startup,
}

#[derive(Subcommand)]
enum Task {
    /// Build (or fetch from the cache) the guest kernel and install it; prints its path last.
    Kernel,
    /// Build the static guest-init and install it; prints its path last.
    Init,
    /// Make (or find in the cache) the Debian 12 minbase root recipes/debian-base
    /// imports, with mmdebstrap, and link it at target/debian-base.tar; prints its path last.
    DebianBase,
    /// Assemble the stub guest (a few instructions in place of a kernel,
    /// for measuring the VMM itself) and install it; prints its path last.
    Stub {
        /// The hostile stub guest instead, which attacks the VMM's devices
        /// (docs/security.md, "Bad guests").
        #[arg(long)]
        hostile: bool,
    },
    /// Run end-to-end scenarios (tests/vm/<name>.sh) that boot real VMs.
    VmTest {
        /// Scenario names; all when none are given.
        scenarios: Vec<String>,
    },
    /// Format check, clippy, unit tests, then every vm-test scenario (what CI runs).
    Test,
    /// Set up a fresh machine and boot a guest: the README's first command.
    Demo,
    /// Install `kiln` into ~/.cargo/bin (`cargo install --path .`), with
    /// its shell completions and man pages.
    InstallCli,
    /// Benchmarks, measured against a peer in the same run.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
    /// Check a `kiln bench --json` report: every scenario, sound numbers (used by vm-test bench); redraw its plot.
    #[command(hide = true)]
    BenchCheck {
        file: std::path::PathBuf,
        /// QEMU's cold series must be there too.
        #[arg(long)]
        peer: bool,
        /// Also draw the report's CDF plot into this SVG file.
        #[arg(long, value_name = "OUT.svg")]
        plot: Option<std::path::PathBuf>,
    },
    /// Run a command on a pseudo-terminal of its own (stdin typed into it,
    /// its output to stdout), for scenarios that test `-t` (used by vm-test).
    #[command(hide = true)]
    Pty {
        /// The terminal's rows.
        #[arg(long, default_value_t = 24)]
        rows: u16,
        /// The terminal's columns.
        #[arg(long, default_value_t = 80)]
        cols: u16,
        /// Once the command has printed `--after`'s text, resize the
        /// terminal to ROWSxCOLS (the command gets SIGWINCH), and type the
        /// ^D ending input two seconds later (not at stdin's end).
        #[arg(long, value_name = "ROWSxCOLS", value_parser = parse_size, requires = "after")]
        resize: Option<pty::Size>,
        /// The text `--resize` waits for.
        #[arg(long, value_name = "TEXT", requires = "resize")]
        after: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Boot a container VM with empty drives, fill them with `attachdisk`
    /// and run processes in their roots (used by vm-test pod-disk).
    #[command(hide = true)]
    PodProbe(pod_probe::Args),
    /// The benchmark runner itself, where KVM is (used by `bench`).
    #[command(hide = true)]
    BenchGuest {
        kind: GuestBench,
        #[arg(long, default_value_t = 10)]
        runs: usize,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Kernel => kernel::build().map(|path| println!("{}", path.display())),
        Task::Init => init::build().map(|path| println!("{}", path.display())),
        Task::DebianBase => debian::base().map(|path| println!("{}", path.display())),
        Task::Stub { hostile } => if hostile {
            stub::build_hostile()
        } else {
            stub::build()
        }
        .map(|path| println!("{}", path.display())),
        Task::VmTest { scenarios } => harness::vm_test(&scenarios).map(drop),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::InstallCli => install::install_cli(),
        Task::PodProbe(args) => return finish(pod_probe::run(args)),
        Task::Pty {
            rows,
            cols,
            resize,
            after,
            command,
        } => {
            let resize = resize
                .zip(after)
                .map(|(size, after)| pty::Resize { size, after });
            return finish(pty::run(pty::Size { rows, cols }, resize, &command));
        }
        Task::Bench {
            bench: Bench::Build { runs },
        } => bench::build(runs),
        Task::Bench {
            bench: Bench::Boot { runs },
        } => bench::boot(runs),
        Task::Bench {
            bench: Bench::Disk { runs, host_only },
        } => {
            if host_only {
                bench::disk_host(runs)
            } else {
                bench::disk(runs)
            }
        }
        Task::Bench {
            bench: Bench::Snapshot { runs },
        } => bench::snapshot(runs),
        Task::Bench {
            bench: Bench::Fn { runs },
        } => bench::function(runs),
        Task::Bench {
            bench: Bench::Net { runs },
        } => bench::net(runs),
        Task::Bench {
            bench: Bench::Startup { runs },
        } => bench::startup(runs),
        Task::Bench {
            bench: Bench::Vmm { runs },
        } => bench::vmm(runs),
        Task::BenchCheck { file, peer, plot } => bench::check_report(&file, peer, plot.as_deref()),
        Task::BenchGuest {
            kind: GuestBench::Startup,
            runs,
        } => bench::startup_guest(runs),
        Task::BenchGuest {
            kind: GuestBench::Build,
            runs: _,
        } => bench::build_guest(),
        Task::BenchGuest {
            kind: GuestBench::Boot,
            runs,
        } => bench::boot_guest(runs),
        Task::BenchGuest {
            kind: GuestBench::Disk,
            runs,
        } => bench::disk_guest(runs),
        Task::BenchGuest {
            kind: GuestBench::Snapshot,
            runs,
        } => bench::snapshot_guest(runs),
        Task::BenchGuest {
            kind: GuestBench::Fn,
            runs,
        } => bench::function_guest(runs),
        Task::BenchGuest {
            kind: GuestBench::Net,
            runs,
        } => bench::net_guest(runs),
    };
    finish(result.map(|()| ExitCode::SUCCESS))
}

/// `ROWSxCOLS`, as `xtask pty --resize` takes a terminal size.
fn parse_size(text: &str) -> Result<pty::Size, String> {
    let parsed = text
        .split_once('x')
        .and_then(|(rows, cols)| Some((rows.parse().ok()?, cols.parse().ok()?)));
    match parsed {
        Some((rows, cols)) => Ok(pty::Size { rows, cols }),
        None => Err(format!("{text:?}: expected ROWSxCOLS, e.g. 50x120")),
    }
}

/// The task's exit code, or its error printed and a failure.
fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|err| {
        eprintln!("xtask: {err:#}");
        ExitCode::FAILURE
    })
}
