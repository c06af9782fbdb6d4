//! `xtask pty`: runs a command on a pseudo-terminal of its own, so that
//! scenarios can test terminal paths (`kiln exec -t`, `ctr run -t`) on a
//! test machine that has no terminal and whose busybox has no `script`.
//!
//! What this process reads on stdin is typed into the terminal, and its
//! end becomes a ^D; what the command writes to the terminal is copied to
//! stdout. The command is a session leader with the terminal as its
//! controlling one, as a login shell's would be, and the terminal has the
//! size asked for. Hand-written on rustix's pty calls: the crates that
//! wrap this (`expectrl`, `portable-pty`) bring far more than the few
//! calls it takes.
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

/// A terminal's size, rows by columns.
#[derive(Clone, Copy)]
pub struct Size {
    /// Rows (lines).
    pub rows: u16,
    /// Columns (characters per line).
    pub cols: u16,
}

impl Size {
    fn winsize(self) -> Winsize {
        Winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// A size change in the middle of a run: once the command has printed
/// `after`, the terminal takes `size` (the kernel signals SIGWINCH to the
/// command), and [`RESIZE_SETTLE`] later the ^D ending input is typed.
pub struct Resize {
    /// The new size.
    pub size: Size,
    /// What the command prints when it is ready for the change.
    pub after: String,
}

/// How long a size change has to reach the command's far end (a guest,
/// through `kiln exec`) before the ^D that follows it.
const RESIZE_SETTLE: Duration = Duration::from_secs(2);

/// Runs `command` on a new terminal of `size`, resized during the run as
/// `resize` says; exits as the command does.
pub fn run(size: Size, resize: Option<Resize>, command: &[String]) -> Result<ExitCode> {
    let Some((program, args)) = command.split_first() else {
        bail!("xtask pty: expected a command after --");
    };
    let (master, terminal) = open_terminal(size)?;
    let mut child = Command::new(program);
    child
        .args(args)
        .stdin(Stdio::from(terminal.try_clone()?))
        .stdout(Stdio::from(terminal.try_clone()?))
        .stderr(Stdio::from(terminal));
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two system calls (no allocation, no locks), as pre_exec requires.
    unsafe {
        child.pre_exec(|| {
            rustix::process::setsid()?;
            // fd 0 is the terminal: Command set up stdin just before.
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            Ok(())
        });
    }
    // The Command above held this process's copies of the terminal's end;
    // once it is dropped, the master reads EIO when the command's side closes.
    let mut running = child
        .spawn()
        .with_context(|| format!("xtask pty: cannot run {program}"))?;
    drop(child);
    let typed = File::from(master.try_clone()?);
    let end_at_eof = resize.is_none();
    std::thread::spawn(move || type_stdin(typed, end_at_eof));
    copy_until_closed(File::from(master), resize)?;
    let status = running.wait()?;
    Ok(ExitCode::from(status.code().unwrap_or(128) as u8))
}

/// A new pseudo-terminal of `size`: its master and its terminal end.
fn open_terminal(size: Size) -> Result<(OwnedFd, OwnedFd)> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)
        .context("xtask pty: cannot open /dev/ptmx")?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let terminal = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("xtask pty: cannot open {name:?}"))?;
    rustix::termios::tcsetwinsize(&terminal, size.winsize())?;
    Ok((master, terminal))
}

/// Types what this process reads on stdin into the terminal (its
/// master), then, if `end_at_eof`, the end-of-file character (^D, VEOF's
/// default), as a person ends input.
fn type_stdin(mut terminal: File, end_at_eof: bool) -> io::Result<()> {
    io::copy(&mut io::stdin().lock(), &mut terminal)?;
    if end_at_eof {
        terminal.write_all(&[CONTROL_D])?;
    }
    Ok(())
}

/// Whether `marker` is in the output so far, `seen` followed by `new`.
fn printed(seen: &mut Vec<u8>, new: &[u8], marker: &str) -> bool {
    seen.extend_from_slice(new);
    let found = seen.windows(marker.len()).any(|w| w == marker.as_bytes());
    // Only a marker's length of the past can begin a later match.
    seen.drain(..seen.len().saturating_sub(marker.len()));
    found
}

/// ^D: the terminal's default VEOF character (POSIX termios, "Special
/// Characters"), which ends a read in canonical mode.
const CONTROL_D: u8 = 0x04;

/// Copies the terminal's output to stdout until every holder of its
/// terminal end has closed it (a read of the master then fails with EIO),
/// making the size change of `resize` once its marker has been printed.
fn copy_until_closed(mut master: File, mut resize: Option<Resize>) -> Result<()> {
    let mut stdout = io::stdout().lock();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                stdout.write_all(&buf[..n])?;
                stdout.flush()?;
                if let Some(change) = resize.take_if(|r| printed(&mut seen, &buf[..n], &r.after)) {
                    rustix::termios::tcsetwinsize(&master, change.size.winsize())?;
                    std::thread::sleep(RESIZE_SETTLE);
                    master.write_all(&[CONTROL_D])?;
                }
            }
            Err(err) if err.raw_os_error() == Some(Errno::IO.raw_os_error()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err).context("xtask pty: reading the terminal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_split_across_reads_is_found_once_whole() {
        let mut seen = Vec::new();
        assert!(!printed(&mut seen, b"stty size\r\n40 ", "40 100"));
        assert!(printed(&mut seen, b"100\r\n", "40 100"));
        assert!(seen.len() <= "40 100".len(), "the past is bounded");
    }

    #[test]
    fn a_marker_never_printed_is_not_found() {
        let mut seen = Vec::new();
        for chunk in [&b"40 1"[..], b"0", b" 100"] {
            assert!(!printed(&mut seen, chunk, "40 100"));
        }
    }
}
