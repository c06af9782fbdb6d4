//! `kiln doctor`: can Kiln boot VMs on this host, and what is missing?
use std::fs;
use std::path::Path;
use std::process::ExitCode;

use kiln_control::jail::{self, JAIL_ENV, cgroup};
use kiln_control::network::{self, address::BRIDGE};
use kiln_vmm::host::{self, HostVirt};

use crate::assets::Asset;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let virt = host::detect();
    println!("virtualization: {virt}");
    // The opt-in changes nothing for Linux guests, so not readiness either.
    if virt == HostVirt::Pvm {
        println!(
            "stub guest: {}=1 lets the VMM benchmarks run their stub guest here, \
             natively; for those only (docs/stub-guest.md)",
            host::ALLOW_PVM_ENV
        );
    }
    let mut ready = virt.can_boot_linux();
    // When /dev/kvm does not open, the line above says why.
    match kiln_vmm::vstate::vm::missing_caps_here() {
        Some(missing) if missing.is_empty() => println!("KVM: every capability Kiln needs"),
        Some(missing) => {
            ready = false;
            println!("KVM: lacks {}, which Kiln needs", missing.join(", "));
        }
        None => {}
    }
    for (label, asset) in [
        ("guest kernel", Asset::Kernel),
        ("guest-init", Asset::GuestInit),
    ] {
        let path = asset.path();
        match describe_file(&path) {
            Some(size) => println!("{label}: {} ({size})", path.display()),
            None => {
                ready = false;
                println!(
                    "{label}: missing at {} (build it with `{}`, or set {})",
                    path.display(),
                    asset.xtask(),
                    asset.env_var()
                );
            }
        }
    }
    // Instances can do without (`--network none`): not a readiness matter.
    match network::unavailable() {
        None => println!("networking: instances can have NICs on {BRIDGE}"),
        Some(why) => println!("networking: unavailable: {why}; use --network none"),
    }
    report_jail();
    if ready {
        println!("ready: Kiln can boot VMs on this host");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("not ready: see above");
        Ok(ExitCode::FAILURE)
    }
}

/// `--no-jail`: every VM process this process and its children (a
/// detached instance's supervisor, `kiln fn serve`'s clones) start runs
/// unjailed, which is said on stderr. Called first thing in `main`.
pub fn switch_jail_off() {
    // SAFETY: called before any thread of this process exists (clap's
    // parsing starts none), so nothing reads the environment meanwhile.
    unsafe { std::env::set_var(JAIL_ENV, "0") };
    jail::warn_off(jail::warn_on_stderr);
}

/// Whether VM processes are jailed here, and with a cgroup. A host that
/// cannot jail still boots VMs, unjailed: not a readiness matter.
fn report_jail() {
    let on = match jail::JailSettings::from_env() {
        Ok(settings) => settings.is_some(),
        Err(err) => {
            println!("jail: {}", kiln_vmm::report::one_line(&err));
            return;
        }
    };
    match (on, jail::unavailable()) {
        (_, Some(why)) => println!("jail: unavailable: {why}; VM processes run unjailed"),
        (true, None) => println!(
            "jail: on: each VM process runs in a jail of its own (--no-jail or {JAIL_ENV}=0 turns it off, for debugging)"
        ),
        (false, None) => println!(
            "jail: OFF ({JAIL_ENV}=0): VM processes run as root in the host's namespaces (debugging only)"
        ),
    }
    match cgroup::unavailable() {
        None => println!("jail cgroups: cgroup v2 with cpu, memory and pids"),
        Some(why) => println!("jail cgroups: unavailable: {why}; jails go without limits"),
    }
}

/// The file's size in human units, or `None` if it is not a regular file.
fn describe_file(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some(format!("{:.1} MiB", meta.len() as f64 / (1024.0 * 1024.0)))
}
