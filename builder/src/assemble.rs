//! Assembling an image's root tree in a staging directory: the parent
//! image's files, the mount points guest-init needs, the recipe's host
//! build commands, files and binaries (with their ELF closure), guest-init
//! at /sbin/init and its run configuration; then readying the tree for
//! the build VM's steps ([`prepare_vm_steps`]), and the tree they leave
//! for the image ([`finish_vm_steps`]).
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_init::config::{CONFIG_PATH, ConfigError, RunConfig};

use crate::build::VmStep;
use crate::confine::Confinement;
use crate::elf::{self, ElfError};
use crate::recipe::{BuildStep, Recipe, StepPlace};
use crate::stage::{Kind, Stage, StageError};

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
    /// A host file the recipe names could not be read, or a build command
    /// could not be started.
    #[error("cannot read or run {path}")]
    Io {
        /// The host path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Writing into the root tree failed, or the tree (an untrusted base)
    /// holds what no image may.
    #[error("in the image being built")]
    Stage(#[from] StageError),
    /// A host `[[build]]` command could not be started in its
    /// confinement (a mount namespace needs root: CAP_SYS_ADMIN).
    #[error("cannot start build command `{command}` confined to its mount namespace")]
    Confine {
        /// The command, as the recipe gives it.
        command: String,
        /// What the system said, at the fork, the confinement or the exec.
        #[source]
        source: io::Error,
    },
    /// A `[[build]]` command ran and did not succeed.
    #[error("build command `{command}` (in {dir}) failed: {status}")]
    Build {
        /// The command, as the recipe gives it.
        command: String,
        /// The directory it ran in: the recipe's.
        dir: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// A binary the recipe names, or one of its libraries, could not be
    /// resolved.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// The recipe has `in = "vm"` steps, which the image's /bin/sh runs,
    /// and the image has no /bin/sh.
    #[error(
        "{recipe}: build {step} runs in the build VM with the image's /bin/sh, and the image has none (base it on an image with a shell, such as busybox)"
    )]
    NoShell {
        /// The recipe file.
        recipe: PathBuf,
        /// The first VM step, described.
        step: String,
    },
    /// Neither the recipe nor its base says what the image runs.
    #[error("{recipe}: no [run] entrypoint, and the base image has none either")]
    NoEntrypoint {
        /// The recipe file.
        recipe: PathBuf,
    },
    /// The run configuration, the recipe's or the base's, does not
    /// encode or decode.
    #[error("{recipe}: the run configuration is invalid")]
    RunConfig {
        /// The recipe file, or the archive `kiln image import` reads.
        recipe: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ConfigError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Io {
        path: path.into(),
        source,
    }
}

/// Fills `stage` (which may already hold the parent image's files) from
/// `recipe`, with `guest_init` as /sbin/init; returns the argv it runs.
/// Without a `[run]`, the image runs `base_run` (a container image base's
/// configuration) or, without one, the configuration the stage holds (a
/// parent image's). Every write goes through [`Stage`]: the stage may
/// hold an untrusted base's symlinks, which resolve inside it.
pub fn assemble(
    recipe: &Recipe,
    stage: &Stage,
    guest_init: &Path,
    base_run: Option<&RunConfig>,
) -> Result<Vec<String>, AssembleError> {
    make_skeleton(stage)?;
    for step in recipe.builds.iter().filter(|s| s.place == StepPlace::Host) {
        run_build(step, &recipe.dir, stage)?;
    }
    for file in &recipe.files {
        copy_tree(stage, &file.src, &file.dst, file.mode, &file.exclude)?;
        chown_tree(stage, &file.dst, file.owner, file.mode)?;
    }
    for path in elf::closure(&recipe.binaries)? {
        copy_tree(stage, &path, &path, None, &[])?;
    }
    copy_file(stage, guest_init, Path::new("/sbin/init"), 0o755)?;
    write_run_config(recipe, stage, base_run)
}

/// Makes an imported container image's root tree (in `stage`) a Kiln
/// image's: the directories guest-init needs, `guest_init` as /sbin/init,
/// and `config` (from `archive`'s image config) as its run configuration.
pub fn finish_import(
    archive: &Path,
    stage: &Stage,
    guest_init: &Path,
    config: &RunConfig,
) -> Result<(), AssembleError> {
    make_skeleton(stage)?;
    copy_file(stage, guest_init, Path::new("/sbin/init"), 0o755)?;
    write_config(archive, stage, config)
}

/// The file guest-init writes the DNS settings it is given over, or
/// bind-mounts them onto where the root is read-only, which needs the file
/// there to mount on: every image has one, empty unless its base or recipe
/// brings its own, as Docker's init layer gives every container one.
const RESOLV_CONF: &str = "/etc/resolv.conf";

fn make_skeleton(stage: &Stage) -> Result<(), AssembleError> {
    for (dir, mode) in SKELETON {
        stage.create_dir_all(Path::new(dir), *mode)?;
        stage.set_mode(Path::new(dir), *mode)?;
    }
    let resolv_conf = Path::new(RESOLV_CONF);
    if stage.kind(resolv_conf)?.is_none() {
        stage.write_file(resolv_conf, 0o644, &mut io::empty())?;
    }
    Ok(())
}

/// Where the build VM finds its steps' scripts, removed from the tree
/// the image is made of ([`finish_vm_steps`]).
const VM_SCRIPTS: &str = "/etc/kiln/build-steps";

/// Where a VM step finds the recipe's directory, read-only: the build
/// VM's second disk ([`copy_recipe_dir`]), mounted by the step's script.
const RECIPE_MOUNT: &str = "/build";

/// What [`prepare_vm_steps`] changed in the assembled tree, for
/// [`finish_vm_steps`] to undo.
#[derive(Debug)]
pub struct SetAside {
    /// The tree's own run configuration, set aside while the build VM
    /// boots the tree with its own.
    config: Vec<u8>,
    /// Whether [`RECIPE_MOUNT`] was made for the build VM (the base had
    /// none), and goes again.
    made_mount_point: bool,
}

/// Readies the assembled `stage` for the recipe's `in = "vm"` steps,
/// and returns them, in order, with the run configuration set aside.
/// Each step becomes a script under [`VM_SCRIPTS`]: `set -e`, the
/// recipe's directory mounted read-only at [`RECIPE_MOUNT`], its
/// variables exported, its command line, which `/bin/sh SCRIPT` runs as
/// `sh -ec` would. The build VM's configuration runs it as root in `/`
/// with root's PATH and HOME=/root: the image's `[run]` user and environment
/// are for its workload, not its build.
pub fn prepare_vm_steps(
    recipe: &Recipe,
    stage: &Stage,
) -> Result<(Vec<VmStep>, SetAside), AssembleError> {
    let vm_steps: Vec<(usize, &BuildStep, u64)> = (recipe.builds.iter().enumerate())
        .filter_map(|(index, step)| match step.place {
            StepPlace::Vm { timeout_secs } => Some((index, step, timeout_secs)),
            StepPlace::Host => None,
        })
        .collect();
    if let Some((index, step, _)) = vm_steps.first()
        && stage.open_file(Path::new("/bin/sh")).is_err()
    {
        return Err(AssembleError::NoShell {
            recipe: recipe.path.clone(),
            step: step.describe(*index),
        });
    }
    let config = Path::new(CONFIG_PATH);
    let mut own = Vec::new();
    stage
        .open_file(config)?
        .read_to_end(&mut own)
        .map_err(io_err(config))?;
    let mut build_config = RunConfig::new(vec!["/bin/sh".into()]);
    // Root's PATH, sbin directories included: dpkg refuses to run
    // without ldconfig and start-stop-daemon in it (guest-init's default
    // is a workload's, without them).
    build_config.env.insert("PATH".into(), DEFAULT_PATH.into());
    build_config.env.insert("HOME".into(), "/root".into());
    build_config.hostname = recipe.name.clone();
    let json = build_config
        .to_json_pretty()
        .map_err(|source| AssembleError::RunConfig {
            recipe: recipe.path.clone(),
            source,
        })?;
    stage.write_file(config, 0o644, &mut json.as_bytes())?;
    let made_mount_point = stage.kind(Path::new(RECIPE_MOUNT))?.is_none();
    if made_mount_point {
        stage.create_dir_all(Path::new(RECIPE_MOUNT), 0o755)?;
    }
    stage.replace_with_dir(Path::new(VM_SCRIPTS), 0o700)?;
    let steps = vm_steps
        .into_iter()
        .map(|(index, step, timeout_secs)| {
            let script = Path::new(VM_SCRIPTS).join(format!("{}.sh", index + 1));
            stage.write_file(&script, 0o600, &mut vm_script(step).as_bytes())?;
            Ok(VmStep {
                label: step.describe(index),
                command: format!("/bin/sh {}", script.display()),
                timeout_secs,
                size: recipe.build_vm,
            })
        })
        .collect::<Result<_, AssembleError>>()?;
    Ok((
        steps,
        SetAside {
            config: own,
            made_mount_point,
        },
    ))
}

/// Undoes [`prepare_vm_steps`] in the tree the build VM left: the
/// scripts and the mount point it made go, and the run configuration
/// set aside comes back.
pub fn finish_vm_steps(stage: &Stage, set_aside: SetAside) -> Result<(), AssembleError> {
    stage.remove_all(Path::new(VM_SCRIPTS))?;
    if set_aside.made_mount_point {
        stage.remove_all(Path::new(RECIPE_MOUNT))?;
    }
    let config = &mut set_aside.config.as_slice();
    stage.write_file(Path::new(CONFIG_PATH), 0o644, config)?;
    Ok(())
}

/// Copies the recipe's directory into the empty `stage`, for the build
/// VM's second disk: the stage is made an ext4 of its own, so the
/// recipe's files keep their times (a filesystem made from a tree gets
/// fixed ones).
pub fn copy_recipe_dir(recipe: &Recipe, stage: &Stage) -> Result<(), AssembleError> {
    copy_dir_into(stage, &recipe.dir, Path::new("/"))
}

/// Copies what the host directory `src` holds into the stage's `dst`,
/// which exists: symbolic links as links, the rest as [`copy_tree`] does.
fn copy_dir_into(stage: &Stage, src: &Path, dst: &Path) -> Result<(), AssembleError> {
    for entry in fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if entry.file_type().map_err(io_err(&from))?.is_symlink() {
            stage.symlink(&fs::read_link(&from).map_err(io_err(&from))?, &to)?;
        } else {
            copy_tree(stage, &from, &to, None, &[])?;
        }
    }
    Ok(())
}

/// A VM step as a script for `/bin/sh`. The recipe's directory is the
/// build VM's second disk, /dev/vdb.
fn vm_script(step: &BuildStep) -> String {
    let mut script = format!("set -e\ncd /\nmount -t ext4 -o ro /dev/vdb {RECIPE_MOUNT}\n");
    for (name, value) in &step.env {
        script.push_str(&format!(
            "export {name}='{}'\n",
            value.replace('\'', "'\\''")
        ));
    }
    script.push_str(&step.run);
    script.push('\n');
    script
}

/// Root's PATH: a host build step's when the caller has none, and a VM
/// step's.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs a recipe's `[[build]]` step on the host: trusted code, like the
/// recipe itself (see docs/security.md), but given only what it needs.
/// Its environment is the caller's PATH (where the host's toolchain is)
/// and HOME (where tools keep their caches: a throwaway overlay), the step's
/// declared `env`, and DESTDIR, which no declaration overrides: none of
/// the caller's other variables (tokens, credentials, proxies) reach it.
/// It runs [`Confinement`]'s way: only the recipe's directory and DESTDIR
/// writable. A step with a `user` installs into an empty DESTDIR of its
/// own, whose tree is then copied into the stage as root's: an
/// unprivileged step could not write the base's directories, and what it
/// made would be the user's in the image.
fn run_build(step: &BuildStep, dir: &Path, stage: &Stage) -> Result<(), AssembleError> {
    let Some((uid, gid)) = step.user else {
        return run_confined(step, dir, stage.path());
    };
    let scratch = tempfile::Builder::new()
        .prefix("kiln-destdir-")
        .tempdir()
        .map_err(io_err(&std::env::temp_dir()))?;
    std::os::unix::fs::chown(scratch.path(), Some(uid), Some(gid))
        .map_err(io_err(scratch.path()))?;
    run_confined(step, dir, scratch.path())?;
    copy_dir_into(stage, scratch.path(), Path::new("/"))
}

/// Runs `step` in `dir`, installing into `destdir`, confined.
fn run_confined(step: &BuildStep, dir: &Path, destdir: &Path) -> Result<(), AssembleError> {
    let command = &step.run;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let confinement =
        Confinement::new(dir, destdir, home.as_deref(), step.user).map_err(io_err(dir))?;
    let mut child = Command::new("sh");
    child
        .args(["-ec", command])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
        )
        .envs(home.as_ref().map(|home| ("HOME", home)))
        .envs(&step.env)
        .env("DESTDIR", destdir);
    // Kiln itself runs with umask 077 (its own files are private), but
    // what a step creates is part of the image, where 022 is what every
    // tool expects. The confinement then enters the working directory.
    // SAFETY: the closure runs in the forked child before exec and only
    // calls umask(2) and [`Confinement::enter`], which makes system calls
    // on paths prepared before the fork: async-signal-safe, allocating
    // nothing and taking no lock.
    unsafe {
        child.pre_exec(move || {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
            confinement.enter()
        });
    }
    let status = child.status().map_err(|source| AssembleError::Confine {
        command: command.into(),
        source,
    })?;
    if !status.success() {
        return Err(AssembleError::Build {
            command: command.into(),
            dir: dir.into(),
            status,
        });
    }
    Ok(())
}

/// Copies the host file or directory `src` (trusted: the recipe's own
/// files, or binaries it names) to `dst` in the image: a file
/// dereferenced, a directory recursively keeping its symbolic links as
/// links and skipping entries named in `exclude`; `mode` on everything
/// when given, else the source's.
fn copy_tree(
    stage: &Stage,
    src: &Path,
    dst: &Path,
    given: Option<u32>,
    exclude: &[String],
) -> Result<(), AssembleError> {
    if let Some(parent) = dst.parent() {
        stage.create_dir_all(parent, 0o755)?;
    }
    let meta = fs::metadata(src).map_err(io_err(src))?;
    let mode = given.unwrap_or(meta.permissions().mode() & 0o7777);
    if !meta.is_dir() {
        return copy_file(stage, src, dst, mode);
    }
    stage.replace_with_dir(dst, mode)?;
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
            stage.symlink(&fs::read_link(&from).map_err(io_err(&from))?, &to)?;
        } else {
            copy_tree(stage, &from, &to, given, exclude)?;
        }
    }
    Ok(())
}

fn copy_file(stage: &Stage, src: &Path, dst: &Path, mode: u32) -> Result<(), AssembleError> {
    let mut file = File::open(src).map_err(io_err(src))?;
    stage.write_file(dst, mode, &mut file)?;
    Ok(())
}

/// Sets the owner on `path` and everything below it, without following
/// symlinks, then the mode again where one was given (chown(2) clears
/// setuid and setgid).
fn chown_tree(
    stage: &Stage,
    path: &Path,
    (uid, gid): (u32, u32),
    mode: Option<u32>,
) -> Result<(), AssembleError> {
    stage.set_owner(path, uid, gid)?;
    if stage.kind(path)? == Some(Kind::Dir) {
        for name in stage.read_dir(path)? {
            chown_tree(stage, &path.join(name), (uid, gid), mode)?;
        }
    }
    if let Some(mode) = mode {
        stage.set_mode(path, mode)?;
    }
    Ok(())
}

/// The recipe's [run] as guest-init's config; without one, `base_run`,
/// or else the parent's config (already in the stage) stays. Returns the
/// argv the image runs.
fn write_run_config(
    recipe: &Recipe,
    stage: &Stage,
    base_run: Option<&RunConfig>,
) -> Result<Vec<String>, AssembleError> {
    if recipe.run.entrypoint.is_empty() {
        if let Some(config) = base_run {
            write_config(&recipe.path, stage, config)?;
            return Ok(config.argv());
        }
        let no_entrypoint = || AssembleError::NoEntrypoint {
            recipe: recipe.path.clone(),
        };
        let mut inherited = Vec::new();
        stage
            .open_file(Path::new(CONFIG_PATH))
            .map_err(|_| no_entrypoint())?
            .read_to_end(&mut inherited)
            .map_err(|_| no_entrypoint())?;
        let config =
            RunConfig::from_json(&inherited).map_err(|source| AssembleError::RunConfig {
                recipe: recipe.path.clone(),
                source,
            })?;
        return Ok(config.argv());
    }
    let mut config = RunConfig::new(recipe.run.entrypoint.clone());
    config.cmd = recipe.run.args.clone();
    config.env.extend(recipe.run.env.clone());
    if let Some(dir) = &recipe.run.workdir {
        config.workdir = dir.clone();
    }
    (config.uid, config.gid) = recipe.run.user;
    config.hostname = recipe.name.clone();
    write_config(&recipe.path, stage, &config)?;
    Ok(config.argv())
}

/// Writes `config` (from `origin`, a recipe or an archive) to the stage's
/// [`CONFIG_PATH`].
fn write_config(origin: &Path, stage: &Stage, config: &RunConfig) -> Result<(), AssembleError> {
    let json = config
        .to_json_pretty()
        .map_err(|source| AssembleError::RunConfig {
            recipe: origin.into(),
            source,
        })?;
    stage.write_file(Path::new(CONFIG_PATH), 0o644, &mut json.as_bytes())?;
    Ok(())
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
        let staged = Stage::create(&dir.path().join("stage")).unwrap();
        let argv = assemble(&r, &staged, Path::new("/bin/busybox"), None).unwrap();
        let stage = staged.path();
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
    fn every_image_has_a_resolv_conf_to_mount_on_unless_it_brings_its_own() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("resolv"), "nameserver 192.0.2.53\n").unwrap();
        let bare = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[run]\nentrypoint = [\"/x\"]\n",
        );
        let stage = Stage::create(&dir.path().join("bare")).unwrap();
        assemble(&bare, &stage, Path::new("/bin/busybox"), None).unwrap();
        let made = stage.path().join("etc/resolv.conf");
        assert_eq!(fs::read(&made).unwrap(), b"");
        assert_eq!(
            fs::metadata(&made).unwrap().permissions().mode() & 0o7777,
            0o644
        );

        // A base's link (systemd-resolved's) stays a link.
        let linked = Stage::create(&dir.path().join("linked")).unwrap();
        let target = Path::new("../run/systemd/resolve/stub-resolv.conf");
        linked.create_dir_all(Path::new("/etc"), 0o755).unwrap();
        linked.symlink(target, Path::new(RESOLV_CONF)).unwrap();
        assemble(&bare, &linked, Path::new("/bin/busybox"), None).unwrap();
        let link = linked.path().join("etc/resolv.conf");
        assert_eq!(fs::read_link(link).unwrap(), target);

        // A recipe's own file wins.
        let own = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[files]]\nsrc = \"resolv\"\n\
             dst = \"/etc/resolv.conf\"\n[run]\nentrypoint = [\"/x\"]\n",
        );
        let stage = Stage::create(&dir.path().join("own")).unwrap();
        assemble(&own, &stage, Path::new("/bin/busybox"), None).unwrap();
        assert_eq!(
            fs::read_to_string(stage.path().join("etc/resolv.conf")).unwrap(),
            "nameserver 192.0.2.53\n"
        );
    }

    /// A build step sees PATH, HOME, DESTDIR and its declared `env`, and
    /// none of the caller's other variables (under `cargo test`, CARGO_*
    /// and the like: the whole environment was inherited before).
    #[test]
    fn a_build_step_gets_a_clean_environment() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[build]]\n\
             run = \"env > \\\"$DESTDIR/env\\\"\"\nenv = { GREETING = \"hi\", DESTDIR = \"/\" }\n\
             [run]\nentrypoint = [\"/x\"]\n",
        );
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap();
        let env = fs::read_to_string(stage.path().join("env")).unwrap();
        let names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        // What sh itself sets: its working directory and nesting level.
        let from_sh = ["PWD", "OLDPWD", "SHLVL", "_"];
        let leaked: Vec<&&str> = names
            .iter()
            .filter(|n| {
                !["PATH", "HOME", "DESTDIR", "GREETING"].contains(n) && !from_sh.contains(n)
            })
            .collect();
        assert!(
            leaked.is_empty(),
            "the caller's variables leaked: {leaked:?}"
        );
        assert!(env.contains("GREETING=hi\n"), "{env}");
        assert!(
            env.contains(&format!("DESTDIR={}\n", stage.path().display())),
            "a declaration cannot move DESTDIR: {env}"
        );
        assert_eq!(std::env::var_os("PATH").is_some(), names.contains(&"PATH"));
    }

    /// A host step writes its recipe directory, DESTDIR, a /tmp of its
    /// own and HOME's throwaway overlay; the host's /tmp and HOME keep
    /// nothing of it.
    #[test]
    fn a_host_step_writes_its_directories_and_a_fresh_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let marker = format!("kiln-step-{}", dir.path().file_name().unwrap().display());
        let r = recipe_in(
            dir.path(),
            &format!(
                "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[build]]\n\
                 run = 'echo made > \"$DESTDIR/made\" && echo o > built.o && \
                 ls -A /tmp > \"$DESTDIR/tmp-list\" && touch /tmp/{marker} \"$HOME/{marker}\"'\n\
                 [run]\nentrypoint = [\"/x\"]\n"
            ),
        );
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap();
        assert_eq!(
            fs::read_to_string(stage.path().join("made")).unwrap(),
            "made\n"
        );
        assert!(dir.path().join("built.o").is_file());
        // The fresh /tmp holds only the mount points of the two
        // directories, which live under the host's /tmp here, and HOME's
        // layers.
        let tmp_list = fs::read_to_string(stage.path().join("tmp-list")).unwrap();
        let top = dir
            .path()
            .strip_prefix("/tmp")
            .unwrap()
            .iter()
            .next()
            .unwrap();
        assert_eq!(tmp_list, format!(".kiln-home\n{}\n", top.display()));
        assert!(!Path::new("/tmp").join(&marker).exists());
        let home = std::env::var_os("HOME").expect("tests run with a HOME");
        assert!(!Path::new(&home).join(&marker).exists());
    }

    /// Outside the recipe directory, DESTDIR and /tmp, the host is
    /// read-only to a host step, root or not.
    #[test]
    fn a_host_step_cannot_write_the_rest_of_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir_in("/var/tmp").unwrap();
        let target = outside.path().join("written");
        let r = recipe_in(
            dir.path(),
            &format!(
                "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[build]]\n\
                 run = 'touch {} 2> \"$DESTDIR/why\" || {{ cat \"$DESTDIR/why\" >&2; exit 9; }}'\n\
                 [run]\nentrypoint = [\"/x\"]\n",
                target.display()
            ),
        );
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        let err = assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap_err();
        let line = crate::chain(&err);
        assert!(
            line.contains(&target.display().to_string()) && line.contains("exit status: 9"),
            "{line}"
        );
        let why = fs::read_to_string(stage.path().join("why")).unwrap();
        assert!(why.contains("Read-only file system"), "{why}");
        assert!(!target.exists());
    }

    /// A step with a `user` runs as it, into an empty DESTDIR whose tree
    /// lands in the image as root's; the recipe directory is only as
    /// writable as its permissions make it for that user.
    #[test]
    fn a_host_step_with_a_user_runs_unprivileged() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let r = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[build]]\n\
             run = 'id -u > \"$DESTDIR/uid\" && mkdir \"$DESTDIR/opt\" && ls -A \"$DESTDIR\" > \"$DESTDIR/opt/seen\" && \
             ! touch denied 2> /dev/null'\nuser = \"65534:65534\"\n\
             [run]\nentrypoint = [\"/x\"]\n",
        );
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap();
        let read = |p: &str| fs::read_to_string(stage.path().join(p)).unwrap();
        assert_eq!(read("uid"), "65534\n");
        assert_eq!(
            read("opt/seen"),
            "opt\nuid\n",
            "an empty DESTDIR of its own"
        );
        assert!(stage.path().join("sbin/init").is_file(), "the tree stays");
        let owner = |p: &str| {
            let meta = fs::symlink_metadata(stage.path().join(p)).unwrap();
            std::os::unix::fs::MetadataExt::uid(&meta)
        };
        assert_eq!((owner("uid"), owner("opt/seen")), (0, 0));
        assert!(!dir.path().join("denied").exists());
    }

    #[test]
    fn failures_name_the_command_or_the_missing_entrypoint() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[build]]\nrun = \"exit 4\"\n",
        );
        let err = assemble(
            &r,
            &Stage::create(&dir.path().join("s1")).unwrap(),
            Path::new("/bin/busybox"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`exit 4`") && err.contains("exit status: 4"),
            "{err}"
        );
        let r = recipe_in(dir.path(), "[image]\nname = \"x\"\nversion = \"1.0.0\"\n");
        let err = assemble(
            &r,
            &Stage::create(&dir.path().join("s2")).unwrap(),
            Path::new("/bin/busybox"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no [run] entrypoint"), "{err}");
    }

    /// Issue 16, case 3: a base's `tmp -> /etc` made the host's /etc 1777,
    /// `sbin -> X` overwrote X/init (on a real host, /sbin/init), and
    /// `srv -> X` put `[[files]]` into X. Now each lands inside the stage,
    /// or fails with an error when the link leads nowhere there.
    #[test]
    fn a_base_s_symlinks_cannot_lead_assembly_out_of_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let outside = crate::oci::tests::victim(dir.path());
        fs::create_dir(dir.path().join("site")).unwrap();
        fs::write(dir.path().join("site/page"), "page").unwrap();
        let r = recipe_in(
            dir.path(),
            r#"binaries = ["/bin/true"]
[image]
name = "x"
version = "1.0.0"
[[files]]
src = "site"
dst = "/srv/www"
owner = "1:1"
[run]
entrypoint = ["/bin/true"]
"#,
        );
        let plant = |stage: &Stage| {
            for name in ["tmp", "sbin", "srv", "bin"] {
                std::os::unix::fs::symlink(&outside, stage.path().join(name)).unwrap();
            }
            fs::create_dir(stage.path().join("etc")).unwrap();
            std::os::unix::fs::symlink(&outside, stage.path().join("etc/kiln")).unwrap();
        };
        // The links lead nowhere inside the stage (and `tmp` into a loop,
        // as the victim is under /tmp): refused.
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        plant(&stage);
        let err = assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap_err();
        assert!(
            crate::chain(&err).starts_with("in the image being built: "),
            "{err}"
        );
        crate::oci::tests::assert_untouched(&outside);

        // With their targets inside the stage, every write lands there.
        let stage = Stage::create(&dir.path().join("stage2")).unwrap();
        plant(&stage);
        let inside = stage.path().join(outside.strip_prefix("/").unwrap());
        fs::remove_file(stage.path().join("tmp")).unwrap();
        fs::create_dir_all(&inside).unwrap();
        assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap();
        crate::oci::tests::assert_untouched(&outside);
        for landed in ["init", "www/page", "init.json", "true"] {
            assert!(inside.join(landed).is_file(), "{landed}");
        }
    }

    #[test]
    fn setuid_survives_the_owner_and_dst_dirs_get_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("su"), "su").unwrap();
        let r = recipe_in(
            dir.path(),
            "[image]\nname = \"x\"\nversion = \"1.0.0\"\n[[files]]\nsrc = \"su\"\ndst = \"/usr/local/bin/su\"\nmode = \"4755\"\nowner = \"0:0\"\n[run]\nentrypoint = [\"/x\"]\n",
        );
        let stage = Stage::create(&dir.path().join("stage")).unwrap();
        assemble(&r, &stage, Path::new("/bin/busybox"), None).unwrap();
        let mode = |p: &str| {
            fs::metadata(stage.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/local/bin/su"), 0o4755);
        assert_eq!(mode("usr/local/bin"), 0o755);
    }
}
