//! Assembling an image's root tree in a staging directory: the parent
//! image's files, the recipe's build commands, files and binaries (with
//! their ELF closure), guest-init at /sbin/init and its run configuration.
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_init::config::{CONFIG_PATH, RunConfig};

use crate::elf::{self, ElfError};
use crate::recipe::Recipe;

/// Directories every image has: mount points guest-init uses, and /tmp.
const SKELETON: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("sbin", 0o755),
    ("etc/kiln", 0o755),
];

/// Why a root tree could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("build command `{command}` (in {dir}) failed: {status}")]
    Build {
        command: String,
        dir: PathBuf,
        status: String,
    },
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("{recipe}: no [run] entrypoint, and the base image has none either")]
    NoEntrypoint { recipe: PathBuf },
    #[error("{recipe}: the run configuration is invalid: {problem}")]
    RunConfig { recipe: PathBuf, problem: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.into(),
        source,
    }
}

/// Fills `stage` (which may already hold the parent image's files) from
/// `recipe`, with `guest_init` as /sbin/init; returns the argv it runs.
pub fn assemble(
    recipe: &Recipe,
    stage: &Path,
    guest_init: &Path,
) -> Result<Vec<String>, AssembleError> {
    for (dir, mode) in SKELETON {
        let path = stage.join(dir);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io_err(&path))?;
    }
    for command in &recipe.builds {
        run_build(command, &recipe.dir, stage)?;
    }
    for file in &recipe.files {
        let target = inside(stage, &file.dst);
        copy_tree(&file.src, &target, file.mode, &file.exclude)?;
        chown_tree(&target, file.owner)?;
    }
    for path in elf::closure(&recipe.binaries)? {
        copy_tree(&path, &inside(stage, &path), None, &[])?;
    }
    let init = stage.join("sbin/init");
    fs::copy(guest_init, &init).map_err(io_err(guest_init))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).map_err(io_err(&init))?;
    write_run_config(recipe, stage)
}

/// `path` (absolute in the image) under `stage`.
fn inside(stage: &Path, path: &Path) -> PathBuf {
    stage.join(path.strip_prefix("/").unwrap_or(path))
}

fn run_build(command: &str, dir: &Path, stage: &Path) -> Result<(), AssembleError> {
    let status = Command::new("sh")
        .args(["-ec", command])
        .current_dir(dir)
        .env("DESTDIR", stage)
        .status()
        .map_err(io_err(dir))?;
    if !status.success() {
        return Err(AssembleError::Build {
            command: command.into(),
            dir: dir.into(),
            status: status.to_string(),
        });
    }
    Ok(())
}

/// Copies a file (dereferenced), or a directory recursively (keeping its
/// symbolic links as links, skipping entries named in `exclude`), setting
/// `mode` on everything when given.
fn copy_tree(
    src: &Path,
    dst: &Path,
    mode: Option<u32>,
    exclude: &[String],
) -> Result<(), AssembleError> {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let meta = fs::metadata(src).map_err(io_err(src))?;
    if meta.is_dir() {
        fs::create_dir_all(dst).map_err(io_err(dst))?;
        for entry in fs::read_dir(src).map_err(io_err(src))? {
            let entry = entry.map_err(io_err(src))?;
            if exclude
                .iter()
                .any(|name| entry.file_name() == name.as_str())
            {
                continue;
            }
            let (from, to) = (entry.path(), dst.join(entry.file_name()));
            if entry.file_type().map_err(io_err(&from))?.is_symlink() {
                let target = fs::read_link(&from).map_err(io_err(&from))?;
                let _ = fs::remove_file(&to);
                std::os::unix::fs::symlink(target, &to).map_err(io_err(&to))?;
            } else {
                copy_tree(&from, &to, mode, exclude)?;
            }
        }
    } else {
        // Replace, never write through: the stage may hold a parent's link.
        let _ = fs::remove_file(dst);
        fs::copy(src, dst).map_err(io_err(src))?;
    }
    let mode = mode.unwrap_or(meta.permissions().mode() & 0o7777);
    fs::set_permissions(dst, fs::Permissions::from_mode(mode)).map_err(io_err(dst))
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) -> Result<(), AssembleError> {
    lchown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
    if fs::symlink_metadata(path).map_err(io_err(path))?.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            chown_tree(&entry.map_err(io_err(path))?.path(), (uid, gid))?;
        }
    }
    Ok(())
}

/// The recipe's [run] as guest-init's config; without one, the parent's
/// config (already in the stage) stays.
fn write_run_config(recipe: &Recipe, stage: &Path) -> Result<Vec<String>, AssembleError> {
    let path = inside(stage, Path::new(CONFIG_PATH));
    if recipe.run.argv.is_empty() {
        let inherited = fs::read(&path).map_err(|_| AssembleError::NoEntrypoint {
            recipe: recipe.path.clone(),
        })?;
        let config = RunConfig::from_json(&inherited).map_err(|err| AssembleError::RunConfig {
            recipe: recipe.path.clone(),
            problem: err.to_string(),
        })?;
        return Ok(config.entrypoint);
    }
    let mut config = RunConfig::new(recipe.run.argv.clone());
    config.env.extend(recipe.run.env.clone());
    if let Some(dir) = &recipe.run.workdir {
        config.workdir = dir.clone();
    }
    (config.uid, config.gid) = recipe.run.user;
    config.hostname = recipe.name.clone();
    let json = config
        .to_json_pretty()
        .map_err(|err| AssembleError::RunConfig {
            recipe: recipe.path.clone(),
            problem: err.to_string(),
        })?;
    fs::write(&path, json).map_err(io_err(&path))?;
    Ok(config.entrypoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe;

    fn recipe_in(dir: &Path, text: &str) -> Recipe {
        fs::write(dir.join("recipe.toml"), text).unwrap();
        recipe::load(dir).unwrap()
    }

    #[test]
    fn builds_files_binaries_init_and_config_land_in_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("site/css")).unwrap();
        fs::write(dir.path().join("site/index.html"), "<h1>hi</h1>").unwrap();
        fs::write(dir.path().join("site/css/a.css"), "h1{}").unwrap();
        fs::create_dir_all(dir.path().join("site/drafts")).unwrap();
        fs::write(dir.path().join("site/drafts/wip.html"), "wip").unwrap();
        let r = recipe_in(
            dir.path(),
            r#"binaries = ["/bin/ls"]
[image]
name = "web"
version = "1.0.0"
[[build]]
run = "mkdir -p $DESTDIR/opt && echo built > $DESTDIR/opt/marker"
[[files]]
src = "site"
dst = "/srv/www"
owner = "33:33"
exclude = ["drafts"]
[run]
entrypoint = ["/bin/ls", "/srv/www"]
env = { LANG = "C" }
"#,
        );
        let stage = dir.path().join("stage");
        let argv = assemble(&r, &stage, Path::new("/bin/busybox")).unwrap();
        assert_eq!(argv, ["/bin/ls", "/srv/www"]);
        assert_eq!(
            fs::read_to_string(stage.join("opt/marker")).unwrap(),
            "built\n"
        );
        assert_eq!(
            fs::read_to_string(stage.join("srv/www/css/a.css")).unwrap(),
            "h1{}"
        );
        assert!(!stage.join("srv/www/drafts").exists(), "excluded");
        let meta = fs::metadata(stage.join("srv/www/index.html")).unwrap();
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&meta),
                std::os::unix::fs::MetadataExt::gid(&meta)
            ),
            (33, 33)
        );
        assert!(stage.join("bin/ls").is_file());
        assert!(stage.join("lib/x86_64-linux-gnu/libc.so.6").is_file());
        assert_eq!(
            fs::metadata(stage.join("sbin/init"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        let config =
            RunConfig::from_json(&fs::read(stage.join("etc/kiln/init.json")).unwrap()).unwrap();
        assert_eq!(
            (config.env["LANG"].as_str(), config.hostname.as_str()),
            ("C", "web")
        );
        assert_eq!(
            fs::metadata(stage.join("tmp"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o1777
        );
    }

    #[test]
    fn failures_name_the_command_or_the_missing_entrypoint() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[build]]\nrun = \"exit 4\"\n",
        );
        let err = assemble(&r, &dir.path().join("s1"), Path::new("/bin/busybox"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`exit 4`") && err.contains("exit status: 4"),
            "{err}"
        );
        let r = recipe_in(dir.path(), "[image]\nname = \"x\"\nversion = \"1.0.0\"\n");
        let err = assemble(&r, &dir.path().join("s2"), Path::new("/bin/busybox"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no [run] entrypoint"), "{err}");
    }
}
