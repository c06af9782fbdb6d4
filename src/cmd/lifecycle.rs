//! The lifecycle verbs on one instance (by id or name): `kiln stop`,
//! `start`, `reboot`, `pause`, `resume`, `terminate`. The state table in
//! `kiln_control::instance::state` says which verb fits which state.
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_control::instance::{Instance, Registry, State, lifecycle};

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The instance's id or name.
    instance: String,
    /// Seconds to wait for the instance to get there.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// (stop) Save the VM's RAM and state first, as EC2's stop-hibernate
    /// does: `kiln start` then resumes it with its processes intact.
    #[arg(long)]
    hibernate: bool,
}

/// An error saying why a just-started instance is not running (its
/// record's reason), unless it runs.
pub fn running_or_why(instance: &Instance) -> anyhow::Result<()> {
    let r = &instance.record;
    if r.state != State::Running {
        anyhow::bail!(
            "instance {} is {}: {}",
            r.id,
            r.state,
            r.reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// Which verb.
#[derive(Clone, Copy)]
pub enum Verb {
    Stop,
    Start,
    Reboot,
    Pause,
    Resume,
    Terminate,
}

pub fn run(verb: Verb, args: Args) -> anyhow::Result<ExitCode> {
    if args.hibernate && !matches!(verb, Verb::Stop) {
        anyhow::bail!("--hibernate is for `kiln stop`");
    }
    let instance = Registry::new(&kiln_home()).find(&args.instance)?;
    let timeout = Duration::from_secs(args.timeout);
    let after = match verb {
        Verb::Stop => lifecycle::stop(&instance, args.hibernate, timeout)?,
        Verb::Start => {
            let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
            lifecycle::start(instance, &kiln, timeout)?
        }
        Verb::Reboot => lifecycle::reboot(&instance, timeout)?,
        Verb::Pause | Verb::Resume => {
            lifecycle::pause(&instance, matches!(verb, Verb::Pause))?;
            Registry::reread(&instance)?
        }
        Verb::Terminate => lifecycle::terminate(instance, timeout)?,
    };
    let r = &after.record;
    let paused = match (r.paused, after.hibernation().is_some()) {
        (true, _) => " (paused)",
        (_, true) => " (hibernated)",
        _ => "",
    };
    match &r.reason {
        Some(reason) => println!("{} {}{paused}: {reason}", r.id, r.state),
        None => println!("{} {}{paused}", r.id, r.state),
    }
    Ok(ExitCode::SUCCESS)
}
