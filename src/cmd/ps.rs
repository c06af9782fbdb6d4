//! `kiln ps [-a]`: the instances, with their state, uptime, address and
//! published ports.
use std::process::ExitCode;
use std::time::Duration;

use kiln_control::instance::{Network, Registry, State, now_ms};

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// Also list stopped and terminated instances.
    #[arg(long, short = 'a')]
    all: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    println!(
        "{:<18}  {:<16}  {:<20}  {:<10}  {:<10}  {:>8}  {:<15}  {:<20}  REASON",
        "ID", "NAME", "IMAGE", "TYPE", "STATE", "UPTIME", "ADDRESS", "PORTS"
    );
    for instance in Registry::new(&kiln_home()).list()? {
        let r = &instance.record;
        if !args.all && !r.state.has_vmm() {
            continue;
        }
        let state = match (r.state, r.paused) {
            (State::Running, true) => "paused".to_string(),
            (State::Stopped, _) if instance.hibernation().is_some() => "hibernated".to_string(),
            (state, _) => state.to_string(),
        };
        let uptime = r
            .booted_at_ms
            .map(|at| Duration::from_secs(now_ms().saturating_sub(at) / 1000))
            .map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_else(|| "-".into());
        let address = match (r.address, r.spec.network) {
            (Some(address), _) => address.to_string(),
            (None, Network::Isolated) => "isolated".to_string(),
            (None, _) => "-".to_string(),
        };
        let ports = if r.spec.ports.is_empty() {
            "-".to_string()
        } else {
            let published: Vec<String> = r
                .spec
                .ports
                .iter()
                .map(|p| format!("127.0.0.1:{}->{}", p.host, p.guest))
                .collect();
            published.join(",")
        };
        println!(
            "{:<18}  {:<16}  {:<20}  {:<10}  {:<10}  {:>8}  {:<15}  {:<20}  {}",
            r.id,
            r.spec.name.as_deref().unwrap_or("-"),
            r.spec.image,
            r.spec.instance_type,
            state,
            uptime,
            address,
            ports,
            r.reason.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
