//! Files that appear whole or not at all: written under a temporary name
//! in their final directory, synced, renamed into place, and the directory
//! synced so the rename itself survives a crash.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tempfile::NamedTempFile;

/// A temporary file next to where `path` will be.
pub fn stage(path: &Path) -> io::Result<NamedTempFile> {
    NamedTempFile::new_in(parent(path))
}

/// Makes `staged` durable and renames it to `path`.
pub fn persist(staged: NamedTempFile, path: &Path) -> io::Result<()> {
    staged.as_file().sync_all()?;
    staged.persist(path).map_err(|err| err.error)?;
    File::open(parent(path))?.sync_all()
}

/// Renames the directory `from` to `to` (replacing nothing: `to` must not
/// exist) and syncs the parent, so the rename survives a crash. The files
/// inside must be synced already.
pub fn rename_dir(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    File::open(parent(to))?.sync_all()
}

/// Copies `src` into the empty file `dst`, both from their start, leaving
/// a hole wherever `src` has one (an overlay is mostly holes); returns the
/// bytes of data copied. Uses pread/pwrite, so neither file's position
/// matters to anyone else, and lseek's SEEK_DATA/SEEK_HOLE only to find
/// the data (they move the position of `src`, which nothing reads).
pub fn copy_sparse(src: &File, dst: &File) -> io::Result<u64> {
    const BUFFER: usize = 1 << 20;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut buffer = vec![0u8; BUFFER];
    let mut copied = 0;
    let mut offset = 0;
    while let Some(data) = seek(src, offset, libc::SEEK_DATA)? {
        let end = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < end {
            let chunk = &mut buffer[..(end - at).min(BUFFER as u64) as usize];
            src.read_exact_at(chunk, at)?;
            dst.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
        copied += end - data;
        offset = end;
    }
    Ok(copied)
}

/// lseek(2) with `whence`; `None` when there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is
    // open for as long as `file` is borrowed.
    let position = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    match position {
        -1 => {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(err),
            }
        }
        position => Ok(Some(position as u64)),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_copy_has_the_same_bytes_and_keeps_the_holes() {
        use std::os::unix::fs::MetadataExt;
        let src = tempfile::tempfile().unwrap();
        let len = 64u64 << 20;
        src.set_len(len).unwrap();
        src.write_all_at(b"start", 0).unwrap();
        src.write_all_at(&[7u8; 5000], 33 << 20).unwrap();
        src.write_all_at(b"end", len - 3).unwrap();
        let dst = tempfile::tempfile().unwrap();
        let copied = copy_sparse(&src, &dst).unwrap();
        // Data is copied a filesystem block at a time.
        assert!((5008..1 << 20).contains(&copied), "{copied}");
        assert_eq!(dst.metadata().unwrap().len(), len);
        assert!(dst.metadata().unwrap().blocks() * 512 < 1 << 20);
        let mut head = [0u8; 5];
        dst.read_exact_at(&mut head, 0).unwrap();
        assert_eq!(&head, b"start");
        let mut middle = vec![0u8; 5002];
        dst.read_exact_at(&mut middle, (33 << 20) - 1).unwrap();
        assert_eq!(middle[0], 0);
        assert!(middle[1..5001].iter().all(|&b| b == 7));
        let mut tail = [0u8; 3];
        dst.read_exact_at(&mut tail, len - 3).unwrap();
        assert_eq!(&tail, b"end");
    }
}
