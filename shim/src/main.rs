//! `containerd-shim-kiln-v2`: the shim containerd starts for
//! `io.containerd.kiln.v2` (see the library), or, as `__vm`, one
//! container's VMM process.
use std::process::ExitCode;

use containerd_shim::Config;
use kiln_shim::{RUNTIME_ID, Shim, vm};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some((first, rest)) = args.split_first()
        && first == vm::VM_SUBCOMMAND
    {
        return vm::run_vmm(rest);
    }
    let config = Config {
        // The VMM processes are waited for by their own threads (std's
        // Child::wait): the crate's reaper would take their statuses.
        no_reaper: true,
        no_sub_reaper: true,
        ..Config::default()
    };
    containerd_shim::run::<Shim>(RUNTIME_ID, Some(config));
    ExitCode::SUCCESS
}
