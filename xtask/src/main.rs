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
        bench: bench::Bench,
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
        kind: bench::GuestBench,
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
        Task::Bench { bench } => bench::run(bench),
        Task::BenchCheck { file, peer, plot } => bench::check_report(&file, peer, plot.as_deref()),
        Task::BenchGuest { kind, runs } => bench::guest(kind, runs),
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
