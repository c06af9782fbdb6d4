//! `kiln exec INSTANCE [-i] [-t] [-e K=V] [-u USER] [-w DIR] -- CMD…`:
//! another process in a running instance, as `docker exec` runs one:
//! its output here, its status kiln's, stdin forwarded with -i, a
//! pseudo-terminal in the guest with -t (its size this terminal's,
//! followed when it changes).
use std::io::{self, IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use anyhow::bail;
use guest_init::exec::{ExecRequest, WindowSize};
use kiln_control::instance::Registry;
use kiln_control::instance::exec::{ExecError, Input, Session};
use kiln_vmm::devices::serial::RawTerminal;

use crate::assets::kiln_home;

#[derive(clap::Args)]
pub struct Args {
    /// The instance's id or name; it must be running.
    instance: String,
    /// Forward stdin to the process (without it, its stdin is empty).
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Give the process a pseudo-terminal in the guest (stdout and stderr
    /// both come through it); this terminal is raw meanwhile.
    #[arg(long, short = 't')]
    tty: bool,
    /// Set a variable in the process's environment (which starts as the
    /// entrypoint's). Repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Run as USER[:GROUP] (names from the guest's /etc/passwd and
    /// /etc/group, or numbers); default: the entrypoint's user.
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// The working directory; default: the entrypoint's.
    #[arg(long, short = 'w', value_name = "DIR")]
    workdir: Option<String>,
    /// After `--`: the program (absolute, or found in the guest's PATH) and
    /// its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let instance = Registry::new(&kiln_home()).find(&args.instance)?;
    let request = request(&args)?;
    let session = Session::start(&instance, &request)?;
    let input = session.input();
    if args.interactive {
        std::thread::spawn(move || forward_stdin(&input));
    } else {
        input.stdin_end()?;
    }
    let _raw = if args.tty {
        follow_window_changes(session.input())?;
        RawTerminal::enable_if_tty()?
    } else {
        None
    };
    match session.wait(&mut io::stdout(), &mut io::stderr()) {
        Ok(status) => Ok(ExitCode::from(status)),
        // Nothing ran: say why, with the shell's status (as docker exec).
        Err(ExecError::Refused { status, reason, .. }) => {
            eprintln!("kiln: {reason}");
            Ok(ExitCode::from(status))
        }
        Err(err) => Err(err.into()),
    }
}

/// The request the arguments make.
fn request(args: &Args) -> anyhow::Result<ExecRequest> {
    let env = args
        .env
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => bail!("-e {pair:?}: expected KEY=VALUE"),
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(dir) = args.workdir.as_ref().filter(|dir| !dir.starts_with('/')) {
        bail!("-w {dir:?}: expected an absolute path");
    }
    Ok(ExecRequest {
        argv: args.command.clone(),
        env,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        groups: None,
        tty: args.tty.then(terminal_size),
        stdin: args.interactive,
        root: None,
        mounts: Vec::new(),
    })
}

/// This terminal's size, or 24x80 when stdout is not one.
fn terminal_size() -> WindowSize {
    let fallback = WindowSize { rows: 24, cols: 80 };
    let stdout = io::stdout();
    if !stdout.is_terminal() {
        return fallback;
    }
    // SAFETY: winsize is plain data; all zeroes is a valid value.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize, which lives across the call.
    if unsafe { libc::ioctl(stdout.as_raw_fd(), libc::TIOCGWINSZ, &mut size) } < 0
        || size.ws_row == 0
    {
        return fallback;
    }
    WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    }
}

/// Sends this terminal's size to the guest's terminal whenever it changes
/// (SIGWINCH), as `docker exec -t` does, so full-screen programs redraw.
fn follow_window_changes(input: Input) -> io::Result<()> {
    if !io::stdout().is_terminal() {
        return Ok(());
    }
    let mut changes = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH])?;
    std::thread::spawn(move || {
        for _ in changes.forever() {
            if input.resize(terminal_size()).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Sends what is read from stdin, then its end.
fn forward_stdin(input: &Input) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin = io::stdin().lock();
    while let Ok(n @ 1..) = stdin.read(&mut buf) {
        if input.stdin(&buf[..n]).is_err() {
            return;
        }
    }
    let _ = input.stdin_end();
}
