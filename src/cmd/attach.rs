//! `kiln attach INSTANCE`: the serial console of a detached instance,
//! interactive: what the guest writes from now on is shown, what is typed
//! goes to the guest. Ctrl-] detaches; the instance keeps running.
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_control::instance::Registry;
use kiln_control::instance::console::Follower;
use kiln_vmm::devices::serial::RawTerminal;

use crate::assets::kiln_home;

/// Ctrl-] (GS), telnet's and virsh's escape.
const DETACH: u8 = 0x1d;
/// How often the console log is checked for more output.
const POLL: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct Args {
    /// The instance's id or name.
    instance: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let instance = Registry::new(&kiln_home()).find(&args.instance)?;
    let mut input = instance.console_input_writer().with_context(|| {
        format!(
            "instance {} has no running VMM to attach to",
            instance.label()
        )
    })?;
    let log_path = instance.console_log();
    // Followed by its path, so a rotation of the log does not stop it.
    let log = Follower::open_at_end(&log_path)
        .with_context(|| format!("cannot read {}", log_path.display()))?;
    eprintln!("kiln: attached to {} (Ctrl-] detaches)", instance.label());
    std::thread::spawn(move || follow(log));
    let _raw = RawTerminal::enable_if_tty()?;
    let mut byte = [0u8; 1];
    let mut stdin = io::stdin().lock();
    while stdin.read(&mut byte)? == 1 && byte[0] != DETACH {
        input.write_all(&byte)?;
    }
    // Output that the last input caused, before leaving.
    std::thread::sleep(POLL * 4);
    eprintln!("\r\nkiln: detached");
    Ok(ExitCode::SUCCESS)
}

/// Copies what the console log gains to stdout, for as long as we live.
fn follow(mut log: Follower) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = io::stdout();
    loop {
        match log.read(&mut buf) {
            Ok(0) => std::thread::sleep(POLL),
            Ok(n) => {
                let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
            }
            Err(_) => return,
        }
    }
}
