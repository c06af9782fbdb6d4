//! `kiln`: the command line. Argument parsing and output only; each
//! subcommand calls into `kiln_builder` or `kiln_vmm`.
use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use cmd::lifecycle::Verb;

mod assets;
mod cmd;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build microVM images from recipes and boot them on KVM"
)]
struct Cli {
    /// Start VM processes without their jail: as root, in the host's
    /// namespaces (debugging only; the same as KILN_JAIL=0).
    #[arg(long, global = true)]
    no_jail: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tell what virtualization this host has and whether Kiln can boot VMs here.
    Doctor(cmd::doctor::Args),
    /// Boot an image (or raw disks) in a new microVM.
    Run(Box<cmd::run::Args>),
    /// Build an image from a recipe into the local store.
    Build(cmd::build::Args),
    /// List the images in the local store.
    Images(cmd::images::Args),
    /// Show an image's manifest, or the files inside it.
    Inspect(cmd::inspect::Args),
    /// Remove an image from the local store.
    Rm(cmd::rm::Args),
    /// Make a new image from a stopped instance's root volume.
    Commit(cmd::commit::Args),
    /// Work with images and instances' root volumes.
    #[command(subcommand)]
    Image(cmd::image::Command),
    /// List instances.
    Ps(cmd::ps::Args),
    /// List the instance types.
    Types(cmd::types::Args),
    /// Lambda-style functions: each invocation a clone of a booted VM's snapshot.
    #[command(subcommand, name = "fn")]
    Fn(cmd::function::Command),
    /// Startup latency: cold boot, restore, clone (and a peer VMM); `vmm`: the VMM's own cost.
    Bench(cmd::bench::Args),
    /// Save running instances whole, and start new ones from the saves.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::Command),
    /// Stop an instance: its VM ends, its root volume stays (--hibernate: its RAM too).
    Stop(cmd::lifecycle::Args),
    /// Start a stopped instance in a new VMM process.
    Start(cmd::lifecycle::Args),
    /// Reboot an instance: a new VM in the same VMM, same root volume.
    Reboot(cmd::lifecycle::Args),
    /// Pause an instance's vCPUs.
    Pause(cmd::lifecycle::Args),
    /// Resume a paused instance.
    Resume(cmd::lifecycle::Args),
    /// Terminate an instance: stop it and delete its volumes.
    Terminate(cmd::lifecycle::Args),
    /// Print a detached instance's console.
    Logs(cmd::logs::Args),
    /// Attach to a detached instance's serial console (Ctrl-] detaches).
    Attach(cmd::attach::Args),
    /// Run another process in a running instance (as `docker exec`).
    Exec(cmd::exec::Args),
    #[command(name = "__vmm", hide = true)]
    Vmm(cmd::vmm::Args),
    #[command(name = "__vm", hide = true)]
    Vm(cmd::vm::Args),
    #[command(name = "__generate", hide = true)]
    Generate(cmd::generate::Args),
}

/// `kiln __vm` alone: the VM process's few arguments, parsed without the
/// rest of the command line's definition.
#[derive(Parser)]
#[command(name = "kiln __vm")]
struct VmProcess {
    #[command(flatten)]
    args: cmd::vm::Args,
}

/// The command line `args` (the program's name first). A VM process,
/// started for every VM, parses only its own arguments: clap builds a
/// command's whole definition before it matches, and `kiln`'s (every
/// subcommand and argument) cost each VM process about 70 page faults and
/// 170 KiB of heap (measured natively: 170 page faults for `kiln __vm`
/// with a missing definition, 100 without building it).
fn parse(args: Vec<OsString>) -> Cli {
    if args.get(1).is_some_and(|first| first == "__vm") {
        let vm = VmProcess::parse_from(&args[1..]);
        return Cli {
            no_jail: false,
            command: Command::Vm(vm.args),
        };
    }
    Cli::parse_from(args)
}

fn main() -> ExitCode {
    let cli = parse(std::env::args_os().collect());
    if cli.no_jail {
        cmd::doctor::switch_jail_off();
    }
    // Before any thread exists, so before any seccomp filter (the VM
    // process's threads may not open or query anything the logger would).
    kiln_vmm::logger::init();
    // KILN_TRACE's file, opened before any filter too; the first stage of
    // every kiln process (`kiln bench vmm` reads them).
    kiln_vmm::trace::init();
    kiln_vmm::trace::mark("main");
    // Everything Kiln writes is its user's alone: images, instance
    // records, console logs, snapshots (guest RAM, secrets included).
    // Where a file must be shared, the code that makes it says so and
    // sets its mode; recipe build steps get 022 back for the image's files.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    if cli.command.prints_only() {
        end_quietly_when_the_reader_goes();
    }
    let vm_process = matches!(cli.command, Command::Vm(_));
    // A VM process keeps no home of its own: its supervisor made the
    // files it uses, and jailed it sees only those (its uid owns none of
    // the directories above them).
    if !vm_process
        && let Err(err) = kiln_builder::store::make_private(&kiln_builder::store::default_home())
    {
        eprintln!("kiln: {}", kiln_vmm::report::one_line(&err));
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Run(args) => cmd::run::run(*args),
        Command::Build(args) => cmd::build::run(args),
        Command::Images(args) => cmd::images::run(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Rm(args) => cmd::rm::run(args),
        Command::Commit(args) => cmd::commit::run(args),
        Command::Image(command) => cmd::image::run(command),
        Command::Ps(args) => cmd::ps::run(args),
        Command::Types(args) => cmd::types::run(args),
        Command::Snapshot(command) => cmd::snapshot::run(command),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Fn(command) => cmd::function::run(command),
        Command::Stop(args) => cmd::lifecycle::run(Verb::Stop, args),
        Command::Start(args) => cmd::lifecycle::run(Verb::Start, args),
        Command::Reboot(args) => cmd::lifecycle::run(Verb::Reboot, args),
        Command::Pause(args) => cmd::lifecycle::run(Verb::Pause, args),
        Command::Resume(args) => cmd::lifecycle::run(Verb::Resume, args),
        Command::Terminate(args) => cmd::lifecycle::run(Verb::Terminate, args),
        Command::Logs(args) => cmd::logs::run(args),
        Command::Attach(args) => cmd::attach::run(args),
        Command::Exec(args) => cmd::exec::run(args),
        Command::Vmm(args) => cmd::vmm::run(args),
        Command::Vm(args) => cmd::vm::run(args),
        Command::Generate(args) => cmd::generate::run(args, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: {}", once_each(&err));
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// Commands whose whole work is printing what they read: the ones a
    /// user pipes into `head` or `grep -q`. The others keep SIGPIPE
    /// ignored, as Rust sets it: they write to sockets (the VMM's API,
    /// exec's streams, a function's clients), where a reader gone is an
    /// error to handle, not a reason to die.
    fn prints_only(&self) -> bool {
        matches!(
            self,
            Command::Images(_)
                | Command::Inspect(_)
                | Command::Ps(_)
                | Command::Types(_)
                | Command::Logs(_)
                | Command::Doctor(_)
        )
    }
}

/// Restores SIGPIPE's default action, so that a printing command whose
/// reader has gone (`kiln images | grep -q x`) ends at once and quietly,
/// as `ls` does, where `println!` would panic on EPIPE.
fn end_quietly_when_the_reader_goes() {
    // SAFETY: called at the top of main, before any thread exists, and
    // sets a standard signal's action to SIG_DFL: no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// The error and its causes on one line, each said once. Kiln's own errors
/// keep their cause as `source()` only (see `kiln_vmm::report`), but some
/// other crates' errors also put it in their message (event-manager's,
/// for one): a cause whose text the line holds already is left out, so
/// `{:#}`'s doubled "a: b: b" reads "a: b".
fn once_each(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("base.tar: {source}")]
    struct Inline {
        source: std::io::Error,
    }

    #[test]
    fn a_vm_process_parses_its_own_arguments_as_the_whole_cli_would() {
        let line = "kiln __vm --config /run/vm.json --control-fd 9 --supervisor 42";
        let args: Vec<OsString> = line.split(' ').map(OsString::from).collect();
        let Command::Vm(alone) = parse(args.clone()).command else {
            panic!("not the VM process");
        };
        let Command::Vm(whole) = Cli::parse_from(args).command else {
            panic!("not the VM process");
        };
        assert_eq!(alone, whole);
    }

    #[test]
    fn each_cause_is_said_once() {
        let inline = Inline {
            source: std::io::Error::other("not a number"),
        };
        let err = anyhow::Error::new(inline).context("building x");
        assert_eq!(once_each(&err), "building x: base.tar: not a number");
        let plain = anyhow::anyhow!("root cause").context("outer");
        assert_eq!(once_each(&plain), "outer: root cause");
    }
}
