//! Helpers shared by this crate's unit tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Writes `text` to `path` as an executable script (mode 0755).
///
/// A child process writes it, not this one: tests run on many threads, and
/// a sibling test that forks while this process holds the file open for
/// writing leaves the write descriptor in its child until that child
/// execs. Executing the script in that window fails with ETXTBSY ("Text
/// file busy"), as it did in CI.
pub(crate) fn write_script(path: &Path, text: impl AsRef<[u8]>) {
    let mut writer = Command::new("/bin/sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    writer
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_ref())
        .unwrap();
    assert!(writer.wait().unwrap().success(), "writing {path:?} failed");
}
