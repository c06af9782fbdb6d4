//! The dependency closure of host executables: the program interpreter
//! and every shared library they need, found as the dynamic loader would
//! (ld.so(8): DT_RPATH unless DT_RUNPATH is present, then DT_RUNPATH, then
//! /etc/ld.so.conf's directories and the default ones), so an image can
//! carry a dynamically linked program without a distribution around it.
use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};

use goblin::elf::Elf;

/// Directories ld.so searches after the object's own paths (Debian's
/// multiarch layout first).
const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/lib",
    "/usr/lib64",
    "/usr/lib",
];
const LD_SO_CONF: &str = "/etc/ld.so.conf";

/// Why a closure could not be computed. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// A program, library or directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A file to copy with its libraries does not parse as ELF (a script,
    /// or a damaged binary).
    #[error("{path} is not an ELF file")]
    NotElf {
        /// The file.
        path: PathBuf,
        /// What the ELF parser found.
        #[source]
        source: goblin::error::Error,
    },
    /// A shared library a file needs is in no directory the loader would
    /// search.
    #[error("{path} needs {library}, which is in none of: {searched}")]
    Missing {
        /// The program or library that needs it.
        path: PathBuf,
        /// The library's name (its `DT_NEEDED` entry).
        library: String,
        /// The directories searched, ", " between them.
        searched: String,
    },
}

/// Every file that `programs` need to run: themselves, their interpreter
/// and their shared libraries, transitively. A directory stands for every
/// file in it (e.g. Python's lib-dynload, whose extension modules bring
/// their own libraries). Paths are as the loader would open them (symbolic
/// links not resolved).
pub fn closure(programs: &[PathBuf]) -> Result<BTreeSet<PathBuf>, ElfError> {
    let system_dirs = system_dirs();
    let mut found = BTreeSet::new();
    let mut queue = VecDeque::new();
    for program in programs {
        queue.extend(expand(program)?);
    }
    while let Some(path) = queue.pop_front() {
        if !found.insert(path.clone()) {
            continue;
        }
        let bytes = fs::read(&path).map_err(|source| ElfError::Read {
            path: path.clone(),
            source,
        })?;
        let elf = Elf::parse(&bytes).map_err(|source| ElfError::NotElf {
            path: path.clone(),
            source,
        })?;
        if let Some(interpreter) = elf.interpreter {
            queue.push_back(PathBuf::from(interpreter));
        }
        let dirs = search_dirs(&elf, &path, &system_dirs);
        for library in &elf.libraries {
            let resolved = dirs
                .iter()
                .map(|dir| dir.join(library))
                .find(|candidate| candidate.is_file());
            let resolved = resolved.ok_or_else(|| ElfError::Missing {
                path: path.clone(),
                library: library.to_string(),
                searched: dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
            queue.push_back(resolved);
        }
    }
    Ok(found)
}

/// A file, or the files of a directory, sorted.
fn expand(path: &Path) -> Result<Vec<PathBuf>, ElfError> {
    let read_err = |source| ElfError::Read {
        path: path.into(),
        source,
    };
    if !fs::metadata(path).map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_err)? {
        let entry = entry.map_err(read_err)?.path();
        if entry.is_file() {
            files.push(entry);
        }
    }
    files.sort();
    Ok(files)
}

/// The object's own search path (RUNPATH, or RPATH without RUNPATH, with
/// $ORIGIN expanded), then the system's.
fn search_dirs(elf: &Elf, path: &Path, system_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let origin = path
        .parent()
        .unwrap_or(Path::new("/"))
        .to_string_lossy()
        .into_owned();
    let own = if elf.runpaths.is_empty() {
        &elf.rpaths
    } else {
        &elf.runpaths
    };
    let mut dirs: Vec<PathBuf> = own
        .iter()
        .flat_map(|list| list.split(':'))
        .filter(|dir| !dir.is_empty())
        .map(|dir| {
            PathBuf::from(
                dir.replace("${ORIGIN}", &origin)
                    .replace("$ORIGIN", &origin),
            )
        })
        .collect();
    dirs.extend(system_dirs.iter().cloned());
    dirs
}

/// /etc/ld.so.conf's directories (following `include` globs of the form
/// DIR/*.conf, as Debian uses), then the defaults.
fn system_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    read_ld_so_conf(Path::new(LD_SO_CONF), &mut dirs);
    dirs.extend(DEFAULT_DIRS.iter().map(PathBuf::from));
    dirs.dedup();
    dirs
}

fn read_ld_so_conf(path: &Path, dirs: &mut Vec<PathBuf>) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    for line in text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
    {
        match line.strip_prefix("include ") {
            Some(pattern) => {
                let pattern = Path::new(pattern.trim());
                let (Some(dir), Some(suffix)) = (
                    pattern.parent(),
                    pattern
                        .file_name()
                        .and_then(|n| n.to_str()?.strip_prefix('*')),
                ) else {
                    continue;
                };
                let mut confs: Vec<PathBuf> = fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.to_string_lossy().ends_with(suffix))
                    .collect();
                confs.sort();
                confs.iter().for_each(|conf| read_ld_so_conf(conf, dirs));
            }
            None => dirs.push(PathBuf::from(line)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &BTreeSet<PathBuf>) -> Vec<String> {
        set.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_dynamic_program_brings_its_loader_and_libc() {
        let set = closure(&[PathBuf::from("/bin/ls")]).unwrap();
        let names = names(&set);
        for needed in ["ls", "libc.so.6", "ld-linux-x86-64.so.2", "libselinux.so.1"] {
            assert!(
                names.iter().any(|n| n == needed),
                "{needed} missing from {names:?}"
            );
        }
    }

    #[test]
    fn transitive_libraries_are_included() {
        // python3 needs libexpat and libz directly, and they need libc.
        let set = closure(&[PathBuf::from("/usr/bin/python3")]).unwrap();
        let names = names(&set);
        assert!(names.iter().any(|n| n.starts_with("libexpat")), "{names:?}");
        assert!(names.iter().any(|n| n == "libm.so.6"), "{names:?}");
    }

    #[test]
    fn a_directory_brings_every_module_and_its_libraries() {
        let set = closure(&[PathBuf::from("/usr/lib/python3.11/lib-dynload")]).unwrap();
        let names = names(&set);
        assert!(names.iter().any(|n| n.starts_with("_ssl.")), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("libcrypto.so")),
            "_hashlib and _ssl need libcrypto: {names:?}"
        );
        assert!(
            names.iter().any(|n| n.starts_with("libffi.so")),
            "_ctypes needs libffi: {names:?}"
        );
    }

    #[test]
    fn a_static_program_is_alone() {
        let set = closure(&[PathBuf::from("/bin/busybox")]).unwrap();
        assert_eq!(names(&set), ["busybox"]);
    }

    #[test]
    fn non_elf_and_missing_libraries_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script.sh");
        fs::write(&script, "#!/bin/sh\n").unwrap();
        let err = closure(&[script]).unwrap_err().to_string();
        assert!(err.contains("script.sh is not an ELF file"), "{err}");

        // A copy of ls whose DT_NEEDED names a library no directory has.
        let mut bytes = fs::read("/bin/ls").unwrap();
        let at = bytes.windows(9).position(|w| w == b"libc.so.6").unwrap();
        bytes[at..at + 9].copy_from_slice(b"libq.so.6");
        let broken = dir.path().join("broken-ls");
        fs::write(&broken, bytes).unwrap();
        let err = closure(&[broken]).unwrap_err().to_string();
        assert!(err.contains("broken-ls needs libq.so.6"), "{err}");
    }
}
