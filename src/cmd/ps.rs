//! `kiln ps [-a] [--format json]`: the instances, with their state,
//! uptime, address and published ports.
use std::process::ExitCode;
use std::time::Duration;

use kiln_control::instance::{Instance, Network, Registry, State, now_ms};
use kiln_control::jail::JailInfo;
use serde::Serialize;

use crate::assets::kiln_home;
use crate::cmd::format::Output;

#[derive(clap::Args)]
pub struct Args {
    /// Also list stopped and terminated instances.
    #[arg(long, short = 'a')]
    all: bool,
    #[command(flatten)]
    output: Output,
}

/// One instance as `ps` shows it: the table's columns, or a JSON object.
#[derive(Serialize)]
struct Row {
    id: String,
    name: Option<String>,
    image: String,
    #[serde(rename = "type")]
    instance_type: String,
    /// `running`, `paused`, `stopped`, `hibernated`, ...
    state: String,
    /// Seconds since the VM booted; `None` when it is not running.
    uptime_s: Option<u64>,
    /// The private address, or `isolated`.
    address: Option<String>,
    /// `127.0.0.1:HOST->GUEST` each.
    ports: Vec<String>,
    /// Why it stopped or failed, if it did.
    reason: Option<String>,
    /// Its VM process's jail (uid, cgroup limits), while one runs jailed.
    jail: Option<JailInfo>,
}

impl Row {
    fn of(instance: &Instance) -> Row {
        let r = &instance.record;
        let state = match (r.state, r.paused) {
            (State::Running, true) => "paused".to_string(),
            (State::Stopped, _) if instance.hibernation().is_some() => "hibernated".to_string(),
            (state, _) => state.to_string(),
        };
        let address = match (r.address, r.spec.network) {
            (Some(address), _) => Some(address.to_string()),
            (None, Network::Isolated) => Some("isolated".to_string()),
            (None, _) => None,
        };
        Row {
            id: r.id.clone(),
            name: r.spec.name.clone(),
            image: r.spec.image.clone(),
            instance_type: r.spec.instance_type.clone(),
            state,
            uptime_s: r.booted_at_ms.map(|at| now_ms().saturating_sub(at) / 1000),
            address,
            ports: r
                .spec
                .ports
                .iter()
                .map(|p| format!("127.0.0.1:{}->{}", p.host, p.guest))
                .collect(),
            reason: r.reason.clone(),
            jail: r.jail,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rows: Vec<Row> = Registry::new(&kiln_home())
        .list()?
        .iter()
        .filter(|instance| args.all || instance.record.state.has_vmm())
        .map(Row::of)
        .collect();
    if args.output.json(&rows)? {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18}  {:<16}  {:<20}  {:<10}  {:<10}  {:>8}  {:<15}  {:<20}  REASON",
        "ID", "NAME", "IMAGE", "TYPE", "STATE", "UPTIME", "ADDRESS", "PORTS"
    );
    let dash = |s: Option<&str>| s.unwrap_or("-").to_string();
    for row in rows {
        let uptime = row
            .uptime_s
            .map(|s| humantime::format_duration(Duration::from_secs(s)).to_string());
        let ports = (!row.ports.is_empty()).then(|| row.ports.join(","));
        println!(
            "{:<18}  {:<16}  {:<20}  {:<10}  {:<10}  {:>8}  {:<15}  {:<20}  {}",
            row.id,
            dash(row.name.as_deref()),
            row.image,
            row.instance_type,
            row.state,
            dash(uptime.as_deref()),
            dash(row.address.as_deref()),
            dash(ports.as_deref()),
            row.reason.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
