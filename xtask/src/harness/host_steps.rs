//! Host steps: parts of a scenario that run on the build host while the
//! scenario waits inside L1, for clients the test machine cannot hold
//! (boto3 and Python are hundreds of MiB; L1 is an initramfs).
//!
//! L1 gets a NIC on QEMU's user-mode network with two ports forwarded from
//! the host's loopback: [`GUEST_SERVE_PORT`], where a scenario's server
//! listens, and [`GUEST_REPLY_PORT`], where the scenario waits for the
//! step's output. tests/vm/lib.sh's `host_step` listens on the reply port,
//! then prints `KILN-HOST-STEP SCRIPT ARG…`; [`HostLink::take_line`] runs
//! tests/vm/host/SCRIPT with `KILN_HOST_ENDPOINT` naming the forwarded
//! server, and sends what it printed back over the reply port, where the
//! scenario turns each line into a check. Results thus reach the console
//! like every other check's, from the scenario itself.
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sh;

/// The marker of a scenario's request for a host step.
const MARKER: &str = "KILN-HOST-STEP ";
/// Where a scenario's server listens inside L1 (or on the build host's
/// loopback when the scenarios run there): `KILN_HOST_SERVE_PORT`, which
/// tests/vm/lib.sh's `HOST_STEP_LISTEN` is made of.
const GUEST_SERVE_PORT: u16 = 9000;
/// Where tests/vm/lib.sh's `host_step` waits for the step's output:
/// `KILN_HOST_REPLY_PORT`.
const GUEST_REPLY_PORT: u16 = 9100;
/// L1's address on QEMU's user-mode network: the first the built-in DHCP
/// server hands out, and the one `hostfwd` forwards to when the rule names
/// no guest address (QEMU's "Network emulation" docs). l1-init.sh sets it
/// on L1's NIC as `KILN_HOST_ADDRESS`.
const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// The shell variables through which l1-init.sh and tests/vm/lib.sh learn
/// the link's address and ports, stated here alone: written into L1 as
/// `/kiln/host-link.env`, which l1-init.sh exports.
pub fn l1_environment() -> String {
    format!(
        "KILN_HOST_ADDRESS={GUEST_ADDRESS}\nKILN_HOST_SERVE_PORT={GUEST_SERVE_PORT}\n\
         KILN_HOST_REPLY_PORT={GUEST_REPLY_PORT}\n"
    )
}

/// The environment of scenarios run on the build host itself, where a
/// host step is a plain child of the scenario and its server listens on
/// loopback: only the serve port (no reply port, so `host_step` runs the
/// step itself).
pub fn direct_environment() -> (&'static str, String) {
    ("KILN_HOST_SERVE_PORT", GUEST_SERVE_PORT.to_string())
}
/// How often, and how far apart, the reply is offered: the scenario's
/// listener was started before its request was printed, but QEMU's
/// user-mode network drops a connection the guest does not accept yet.
const REPLY_ATTEMPTS: u32 = 30;
const REPLY_RETRY: Duration = Duration::from_secs(1);

/// The host's ends of L1's forwarded ports.
pub struct HostLink {
    serve_port: u16,
    reply_port: u16,
    /// Where the step scripts are: tests/vm/host.
    scripts: PathBuf,
}

impl HostLink {
    /// Picks two free loopback ports for the forwards.
    pub fn new() -> Result<Self> {
        Ok(Self {
            serve_port: free_port()?,
            reply_port: free_port()?,
            scripts: sh::workspace_root().join("tests/vm/host"),
        })
    }

    /// QEMU's arguments for L1's NIC: user-mode networking that reaches
    /// nothing beyond the host (`restrict=on`), with the two forwards.
    pub fn qemu_args(&self) -> [String; 4] {
        let forward = |host: u16, guest: u16| format!("hostfwd=tcp:127.0.0.1:{host}-:{guest}");
        [
            "-netdev".to_string(),
            format!(
                "user,id=host,restrict=on,{},{}",
                forward(self.serve_port, GUEST_SERVE_PORT),
                forward(self.reply_port, GUEST_REPLY_PORT)
            ),
            "-device".to_string(),
            "virtio-net-pci,netdev=host".to_string(),
        ]
    }

    /// Starts the host step a console line asks for, if it is one; its
    /// output goes back to L1 when it ends.
    pub fn take_line(&self, line: &str) {
        let Some(at) = line.find(MARKER) else {
            return;
        };
        let words: Vec<String> = line[at + MARKER.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let (serve_port, reply_port) = (self.serve_port, self.reply_port);
        let scripts = self.scripts.clone();
        thread::spawn(move || {
            let output = run_step(&scripts, &words, serve_port);
            if let Err(err) = reply(reply_port, &output) {
                eprintln!("xtask: host step {words:?}: {err:#}");
            }
        });
    }
}

/// A port nobody listens on now (the forward binds it a moment later).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind a port")?;
    Ok(listener.local_addr()?.port())
}

/// Runs SCRIPTS/SCRIPT ARG…; its stdout, with a failed check added when
/// it did not end well.
fn run_step(scripts: &Path, words: &[String], serve_port: u16) -> Vec<u8> {
    let Some((script, args)) = words.split_first() else {
        return b"FAIL host-step the request named no script\n".to_vec();
    };
    let path = scripts.join(script);
    let ran = Command::new(&path)
        .args(args)
        .env(
            "KILN_HOST_ENDPOINT",
            format!("http://127.0.0.1:{serve_port}"),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    match ran {
        Ok(output) if output.status.success() => output.stdout,
        Ok(output) => {
            let mut text = output.stdout;
            let reason = format!(
                "FAIL host-step {} ended with {}\n",
                path.display(),
                output.status
            );
            text.extend_from_slice(reason.as_bytes());
            text
        }
        Err(err) => format!("FAIL host-step cannot start {}: {err}\n", path.display()).into_bytes(),
    }
}

/// Offers `output` on the reply forward until the scenario acknowledges
/// it: QEMU's user-mode network accepts a connection on the host before
/// the guest does, so only the scenario's answer proves delivery.
fn reply(port: u16, output: &[u8]) -> Result<()> {
    let mut last = None;
    for _ in 0..REPLY_ATTEMPTS {
        match deliver(port, output) {
            Ok(true) => return Ok(()),
            Ok(false) => last = Some(anyhow::anyhow!("no acknowledgement")),
            Err(err) => last = Some(err.into()),
        }
        thread::sleep(REPLY_RETRY);
    }
    Err(last.expect("at least one attempt")).context("the scenario took no reply")
}

/// One offer: the output, the end of it, and the scenario's `ok`.
fn deliver(port: u16, output: &[u8]) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.write_all(output)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.trim() == "ok")
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A step's script runs with the forwarded endpoint, and its output
    /// reaches the scenario's listener, which acknowledges it.
    #[test]
    fn a_step_runs_and_its_output_is_delivered() {
        let scripts = tempfile::tempdir().unwrap();
        let script = scripts.path().join("say");
        fs::write(&script, "#!/bin/sh\necho \"ok $1 $KILN_HOST_ENDPOINT\"\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let scenario = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let link = HostLink {
            serve_port: 9999,
            reply_port: scenario.local_addr().unwrap().port(),
            scripts: scripts.path().to_path_buf(),
        };
        link.take_line("noise KILN-HOST-STEP say hello");
        let (mut stream, _) = scenario.accept().unwrap();
        let mut got = String::new();
        stream.read_to_string(&mut got).unwrap();
        stream.write_all(b"ok\n").unwrap();
        assert_eq!(got, "ok hello http://127.0.0.1:9999\n");
    }

    #[test]
    fn a_failing_or_missing_script_is_a_failed_check() {
        let scripts = tempfile::tempdir().unwrap();
        let missing = run_step(scripts.path(), &["nope".to_string()], 1);
        assert!(String::from_utf8_lossy(&missing).starts_with("FAIL host-step cannot start"));
        let script = scripts.path().join("false");
        fs::write(&script, "#!/bin/sh\necho ok before\nexit 3\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let failed =
            String::from_utf8(run_step(scripts.path(), &["false".to_string()], 1)).unwrap();
        assert!(failed.starts_with("ok before\nFAIL host-step "), "{failed}");
        assert!(failed.contains("exit status: 3"), "{failed}");
    }
}
