//! `kiln logs [-f] INSTANCE`: the serial console of a detached instance:
//! `console.log.1` (the log before its last rotation) if there is one,
//! then `console.log`, followed across rotations.
use std::fs::File;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_control::instance::Registry;
use kiln_control::instance::console::Follower;

use crate::assets::kiln_home;

/// How often `--follow` looks for more output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

#[derive(clap::Args)]
pub struct Args {
    /// The instance's id or name.
    instance: String,
    /// Keep printing what the console writes until the instance's VMM ends.
    #[arg(long, short = 'f')]
    follow: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let instance = Registry::new(&kiln_home()).find(&args.instance)?;
    let mut out = io::stdout().lock();
    let rotated = instance.console_log_rotated();
    match File::open(&rotated) {
        Ok(mut file) => {
            io::copy(&mut file, &mut out)
                .with_context(|| format!("cannot read {}", rotated.display()))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", rotated.display())),
    }
    let path = instance.console_log();
    let mut log = match Follower::open(&path) {
        Ok(log) => log,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(ExitCode::SUCCESS),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = log
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        // At the end of the log: done, unless following a live VMM (checked
        // after the last read, so its final output is not missed).
        if !args.follow || !instance.vmm_alive()? {
            let n = log.read(&mut buf)?;
            out.write_all(&buf[..n])?;
            return Ok(ExitCode::SUCCESS);
        }
        out.flush()?;
        std::thread::sleep(FOLLOW_POLL);
    }
}
