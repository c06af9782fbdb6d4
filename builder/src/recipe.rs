//! Recipes: what an image is made of, in TOML.
//!
//! ```toml
//! base = "scratch"                # or "NAME:VERSION" of a stored image,
//!                                 # "oci:FILE" (OCI layout tar / docker save), "tar:FILE" (rootfs)
//! binaries = ["/usr/bin/python3"] # host programs, with their shared libraries
//! free = "8M"                     # free space on top of the content (or `size = "64M"`)
//!
//! [image]
//! name = "hello"
//! version = "1.0.0"               # semver
//! description = "prints a greeting"
//!
//! [[build]]                       # host commands, run in the recipe's directory,
//! run = "cc -static -Os -s -o \"$DESTDIR/bin/hello\" hello.c"   # installing into $DESTDIR
//! env = { CFLAGS = "-O2" }         # optional; with PATH, HOME and DESTDIR, the step's whole environment
//! user = "65534:65534"            # optional (host steps only): run unprivileged, into an empty
//!                                 # $DESTDIR copied into the tree as root's; default: root
//!
//! [[build]]                       # after the host steps: run as root in a VM booted
//! in = "vm"                       # from the image being built ("host": the default)
//! run = "echo built > /etc/built" # `sh -ec`, changing the image's root filesystem
//! timeout = "10m"                 # optional (VM steps only); default 10m
//!
//! [build_vm]                      # optional, only with VM steps: the build VM's size
//! vcpus = 2                       # 1 to 32; default 1
//! memory = "1G"                   # 64 MiB to 16 GiB; default 256M
//!
//! [[files]]
//! src = "motd"                    # relative to the recipe's directory
//! dst = "/etc/motd"
//! mode = "0644"                   # optional; default: the source's mode
//! owner = "0:0"                   # optional; default 0:0
//! exclude = ["__pycache__"]       # optional; names skipped anywhere below src
//!
//! [run]                           # guest-init's /etc/kiln/init.json
//! entrypoint = ["/bin/hello"]
//! args = []                       # after the entrypoint; `kiln run IMAGE -- ARG…` replaces them
//! env = { GREETING = "hi" }
//! workdir = "/"
//! user = "0:0"
//!
//! [[test]]                        # run in the built image, booted, before it is published
//! run = "/bin/hello"              # argv words split on spaces (kiln.entrypoint=), no shell
//! expect_exit = 0                 # optional; default 0
//! expect_stdout = "Hello"         # optional; a substring of the console output
//! timeout = "30s"                 # optional; default 5m
//! ```
//!
//! Top-level keys come before the first table, as TOML requires. Unknown
//! keys are errors; every error names the file, the line and the field.
use std::collections::BTreeMap;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Free space added to the content when the recipe names neither `size`
/// nor `free`: room for logs and a package or two.
pub const DEFAULT_FREE: u64 = 8 << 20;

/// Why a recipe was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("cannot read the recipe {path}")]
    Read {
        /// The recipe file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or not a recipe's shape (an unknown key, a
    /// missing table, a value of the wrong type).
    #[error("{path}: line {line}: {problem}")]
    Parse {
        /// The recipe file.
        path: PathBuf,
        /// Where the TOML parser stopped, from 1.
        line: usize,
        /// What the parser expected there, on one line.
        problem: String,
    },
    /// A field parsed but its value is not acceptable.
    #[error("{path}:{line}: `{field}`: {problem}")]
    Field {
        /// The recipe file.
        path: PathBuf,
        /// The field's line, from 1.
        line: usize,
        /// The field, dotted from its table (`files.dst`).
        field: &'static str,
        /// The value, and what was expected instead.
        problem: String,
    },
    /// `image.version` is not a semantic version.
    #[error("{path}:{line}: `image.version`: {value:?}: expected semver such as 1.0.0")]
    Version {
        /// The recipe file.
        path: PathBuf,
        /// The field's line, from 1.
        line: usize,
        /// The value found.
        value: String,
        /// Where the semver parser stopped.
        #[source]
        source: semver::Error,
    },
}

/// Where the image starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Base {
    /// An empty root.
    Scratch,
    /// A stored Kiln image: its files are the starting point.
    Image {
        /// The stored image's name.
        name: String,
        /// Its version.
        version: String,
    },
    /// An OCI image layout tar or `docker save` archive (`oci:FILE`).
    Oci(PathBuf),
    /// A root filesystem tarball (`tar:FILE`).
    Tarball(PathBuf),
}

/// A `[[files]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Absolute on the host (resolved against the recipe's directory).
    pub src: PathBuf,
    /// Absolute in the image.
    pub dst: PathBuf,
    /// Permission bits for every copied file and directory; `None` keeps
    /// each source's own.
    pub mode: Option<u32>,
    /// (uid, gid) of everything copied.
    pub owner: (u32, u32),
    /// Names skipped wherever they appear below `src` (e.g. "__pycache__").
    pub exclude: Vec<String>,
}

/// The `[run]` table: how guest-init starts the workload.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Run {
    /// `entrypoint`; empty when the recipe has no `[run]` and the base's
    /// run configuration stays.
    pub entrypoint: Vec<String>,
    /// `args`: after the entrypoint, what `kiln run IMAGE -- CMD…`
    /// replaces (Docker's Cmd).
    pub args: Vec<String>,
    /// Variables added to (or replacing) guest-init's default environment.
    pub env: BTreeMap<String, String>,
    /// The entrypoint's working directory (absolute); `None`: `/`.
    pub workdir: Option<String>,
    /// (uid, gid) the entrypoint runs as.
    pub user: (u32, u32),
}

/// How long a test may run when its recipe names no `timeout`, boot
/// included. Generous: it is there to end a hung test, not a slow one,
/// and a nested or emulated host (the e2e harness's) boots and runs a
/// guest many times slower than hardware.
pub const DEFAULT_TEST_TIMEOUT_SECS: u64 = 300;

/// A `[[test]]`: a command that must succeed in the booted image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCommand {
    /// The command, run inside the booted image as its entrypoint: words
    /// split on spaces, as `kiln.entrypoint=` splits them (no shell; a
    /// test that needs one runs `/bin/sh SCRIPT`).
    pub run: String,
    /// The exit status that counts as a pass.
    pub expect_exit: u8,
    /// Text the console output must contain (a substring) to pass.
    #[serde(default)]
    pub expect_stdout: Option<String>,
    /// Seconds after which the test's VM is killed and the test fails.
    #[serde(default = "default_test_timeout")]
    pub timeout_secs: u64,
}

fn default_test_timeout() -> u64 {
    DEFAULT_TEST_TIMEOUT_SECS
}

/// How long a `[[build]]` step in the build VM may run when its recipe
/// names no `timeout`, boot included: an end to a hung step, not a
/// limit on a slow one (a package manager's run, emulated, takes minutes).
pub const DEFAULT_BUILD_TIMEOUT_SECS: u64 = 600;

/// A `[[build]]` step: a shell command line (`sh -ec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStep {
    /// The command line.
    pub run: String,
    /// Variables the step declares: with the few its place gives it
    /// (see [`StepPlace`]), all of its environment.
    pub env: BTreeMap<String, String>,
    /// Where it runs.
    pub place: StepPlace,
    /// The unprivileged UID:GID a host step runs as (`user`), or `None`
    /// for root. A VM step always runs as root in the build VM.
    pub user: Option<(u32, u32)>,
}

/// Where a `[[build]]` step runs (`in = "host"` or `in = "vm"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPlace {
    /// On the host, in the recipe's directory, installing into
    /// `$DESTDIR` (the root tree), with PATH, HOME and DESTDIR besides
    /// its `env`: trusted code with the host's toolchain. The default.
    Host,
    /// As root inside a VM booted from the image being built, whose root
    /// filesystem it changes, with the recipe's directory read-only at
    /// /build and PATH and HOME=/root besides its `env`; no network.
    Vm {
        /// Seconds after which the VM is killed and the build fails.
        timeout_secs: u64,
    },
}

impl BuildStep {
    /// The step for people: its number (from 1) and the start of its
    /// command, `step 2 (apt-get install -y …)`.
    pub fn describe(&self, index: usize) -> String {
        const WORDS: usize = 4;
        let words: Vec<&str> = self.run.split_whitespace().collect();
        let more = if words.len() > WORDS { " …" } else { "" };
        let shown = words[..words.len().min(WORDS)].join(" ");
        format!("step {} ({shown}{more})", index + 1)
    }
}

/// A parsed, validated recipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Its directory: relative paths and build commands start here.
    pub dir: PathBuf,
    /// `image.name`: the image's name in the store.
    pub name: String,
    /// `image.version`, normalised semver.
    pub version: String,
    /// `image.description` (empty if absent).
    pub description: String,
    /// What the root tree starts from.
    pub base: Base,
    /// Host programs copied in at their own paths, with every shared
    /// library they load.
    pub binaries: Vec<PathBuf>,
    /// `[[build]]` steps, in order: the host's while the root tree is
    /// assembled, then the build VM's on the assembled image (the parser
    /// refuses a host step after a VM step).
    pub builds: Vec<BuildStep>,
    /// `[[files]]`, copied in order (a later one overwrites an earlier).
    pub files: Vec<FileEntry>,
    /// How guest-init starts the workload.
    pub run: Run,
    /// `[[test]]` commands, run in the booted image before it is
    /// published, and recorded in the manifest.
    pub tests: Vec<TestCommand>,
    /// The filesystem's size: fixed, or content plus free space.
    pub size: Size,
    /// `[build_vm]`: the size of the VM the `in = "vm"` steps run in.
    pub build_vm: BuildVmSize,
}

/// The build VM's size (`[build_vm]`): the tests' VM size by default, a
/// step that compiles or unpacks much may want more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildVmSize {
    /// `vcpus`: virtual CPUs, 1 to [`BUILD_VM_MAX_VCPUS`].
    pub vcpus: u8,
    /// `memory` (e.g. "1G"): guest memory in MiB, [`BUILD_VM_MEMORY_MIB`].
    pub memory_mib: u32,
}

/// The build VM's size when `[build_vm]` does not say: the `k1.micro`
/// instance type's (as the tests' VMs), enough for a package manager.
pub const DEFAULT_BUILD_VM: BuildVmSize = BuildVmSize {
    vcpus: 1,
    memory_mib: 256,
};

/// The most vCPUs a build VM may have (the VMM's MP table takes no more).
pub const BUILD_VM_MAX_VCPUS: u8 = 32;

/// The memory a build VM may have, in MiB: a kernel and a shell need 64,
/// and more than 16 GiB is a typo on a build host.
pub const BUILD_VM_MEMORY_MIB: RangeInclusive<u32> = 64..=16 << 10;

/// How big the filesystem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// `size`: exactly this many bytes (rounded up to 4 KiB).
    Fixed(u64),
    /// `free` (or [`DEFAULT_FREE`]): this many bytes on top of what the
    /// content needs.
    Free(u64),
}

// The TOML shape, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    base: Option<Spanned<String>>,
    #[serde(default)]
    binaries: Vec<String>,
    size: Option<Spanned<String>>,
    free: Option<Spanned<String>>,
    image: RawImage,
    #[serde(default)]
    build: Vec<RawBuild>,
    #[serde(default)]
    files: Vec<RawFile>,
    run: Option<RawRun>,
    #[serde(default)]
    test: Vec<RawTest>,
    build_vm: Option<Spanned<RawBuildVm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuildVm {
    memory: Option<Spanned<String>>,
    vcpus: Option<Spanned<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: Spanned<String>,
    version: Spanned<String>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuild {
    run: Spanned<String>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(rename = "in")]
    place: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: String,
    dst: Spanned<String>,
    #[serde(default)]
    exclude: Vec<String>,
    mode: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    entrypoint: Spanned<Vec<String>>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    run: Spanned<String>,
    expect_exit: Option<Spanned<i64>>,
    expect_stdout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

/// The line, from 1, that byte `offset` of `text` is on.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads and validates the recipe at `path` (a file, or a directory
/// holding `recipe.toml`).
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let path = if path.is_dir() {
        path.join("recipe.toml")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&path).map_err(|source| RecipeError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&text, &path)
}

/// Parses recipe `text`; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Recipe, RecipeError> {
    let raw: RawRecipe = toml::from_str(text).map_err(|err| RecipeError::Parse {
        path: path.into(),
        line: line_of(text, err.span().map_or(0, |span| span.start)),
        problem: err.message().trim().replace('\n', "; "),
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let check = Checker { text, path };
    let name = check.name(&raw.image.name)?;
    let version = check.version(&raw.image.version)?;
    let base = match &raw.base {
        None => Base::Scratch,
        Some(base) => check.base(base, &dir)?,
    };
    let size = match (&raw.size, &raw.free) {
        (Some(_), Some(free)) => {
            return Err(check.field(
                free.span(),
                "free",
                "give either `size` or `free`, not both".into(),
            ));
        }
        (Some(size), None) => Size::Fixed(check.bytes(size, "size")?),
        (None, Some(free)) => Size::Free(check.bytes(free, "free")?),
        (None, None) => Size::Free(DEFAULT_FREE),
    };
    let files = raw
        .files
        .iter()
        .map(|file| check.file(file, &dir))
        .collect::<Result<_, _>>()?;
    let run = match &raw.run {
        Some(run) => check.run(run)?,
        None => Run::default(),
    };
    let build_vm = check.build_vm(&raw)?;
    Ok(Recipe {
        path: path.into(),
        name,
        version,
        description: raw.image.description,
        base,
        binaries: raw.binaries.iter().map(|b| dir.join(b)).collect(),
        builds: check.builds(&raw.build)?,
        files,
        run,
        tests: raw
            .test
            .iter()
            .map(|test| check.test(test))
            .collect::<Result<_, _>>()?,
        size,
        build_vm,
        dir,
    })
}

/// Validation with errors that point at the recipe's lines.
struct Checker<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Checker<'_> {
    fn field(&self, span: Range<usize>, field: &'static str, problem: String) -> RecipeError {
        RecipeError::Field {
            path: self.path.into(),
            line: line_of(self.text, span.start),
            field,
            problem,
        }
    }

    fn name(&self, name: &Spanned<String>) -> Result<String, RecipeError> {
        if !is_image_name(name.get_ref()) {
            let problem = format!(
                "{:?}: expected 1-64 of a-z 0-9 - _ . starting with a letter or digit",
                name.get_ref()
            );
            return Err(self.field(name.span(), "image.name", problem));
        }
        Ok(name.get_ref().clone())
    }

    fn version(&self, version: &Spanned<String>) -> Result<String, RecipeError> {
        semver::Version::parse(version.get_ref())
            .map(|v| v.to_string())
            .map_err(|source| RecipeError::Version {
                path: self.path.into(),
                line: line_of(self.text, version.span().start),
                value: version.get_ref().clone(),
                source,
            })
    }

    fn base(&self, base: &Spanned<String>, dir: &Path) -> Result<Base, RecipeError> {
        match base.get_ref().split_once(':') {
            _ if base.get_ref() == "scratch" => return Ok(Base::Scratch),
            Some(("oci", file)) if !file.is_empty() => return Ok(Base::Oci(dir.join(file))),
            Some(("tar", file)) if !file.is_empty() => return Ok(Base::Tarball(dir.join(file))),
            _ => {}
        }
        let problem = || {
            format!(
                "{:?}: expected \"scratch\", NAME:VERSION of a stored image, oci:FILE or tar:FILE",
                base.get_ref()
            )
        };
        let (name, version) = base
            .get_ref()
            .split_once(':')
            .ok_or_else(|| self.field(base.span(), "base", problem()))?;
        let name = self
            .name(&Spanned::new(base.span(), name.to_string()))
            .map_err(|_| self.field(base.span(), "base", problem()))?;
        let version = self
            .version(&Spanned::new(base.span(), version.to_string()))
            .map_err(|_| self.field(base.span(), "base", problem()))?;
        Ok(Base::Image { name, version })
    }

    fn bytes(&self, value: &Spanned<String>, field: &'static str) -> Result<u64, RecipeError> {
        parse_bytes(value.get_ref()).ok_or_else(|| {
            self.field(
                value.span(),
                field,
                format!(
                    "{:?}: expected a size such as 64M, 512K or 1G",
                    value.get_ref()
                ),
            )
        })
    }

    fn file(&self, file: &RawFile, dir: &Path) -> Result<FileEntry, RecipeError> {
        let dst = file.dst.get_ref();
        // No `..`: the builder would refuse it anyway, but the recipe's
        // author hears it here, with the line.
        let climbs = Path::new(dst)
            .components()
            .any(|c| c == std::path::Component::ParentDir);
        if !dst.starts_with('/') || climbs {
            return Err(self.field(
                file.dst.span(),
                "files.dst",
                format!("{dst:?}: expected an absolute path in the image, without `..`"),
            ));
        }
        let mode = match &file.mode {
            None => None,
            Some(mode) => Some(
                u32::from_str_radix(mode.get_ref(), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        self.field(
                            mode.span(),
                            "files.mode",
                            format!("{:?}: expected octal such as \"0644\"", mode.get_ref()),
                        )
                    })?,
            ),
        };
        let owner = match &file.owner {
            None => (0, 0),
            Some(owner) => self.user(owner, "files.owner")?,
        };
        Ok(FileEntry {
            src: dir.join(&file.src),
            dst: PathBuf::from(file.dst.get_ref()),
            mode,
            owner,
            exclude: file.exclude.clone(),
        })
    }

    fn user(
        &self,
        value: &Spanned<String>,
        field: &'static str,
    ) -> Result<(u32, u32), RecipeError> {
        let parsed = value
            .get_ref()
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
        parsed.ok_or_else(|| {
            self.field(
                value.span(),
                field,
                format!(
                    "{:?}: expected UID:GID such as \"1000:1000\"",
                    value.get_ref()
                ),
            )
        })
    }

    /// `[build_vm]`, refused when no step would run in the VM it sizes.
    fn build_vm(&self, raw: &RawRecipe) -> Result<BuildVmSize, RecipeError> {
        let Some(table) = &raw.build_vm else {
            return Ok(DEFAULT_BUILD_VM);
        };
        let vm_steps = raw
            .build
            .iter()
            .any(|b| b.place.as_ref().is_some_and(|p| p.get_ref() == "vm"));
        if !vm_steps {
            return Err(self.field(
                table.span(),
                "build_vm",
                "no [[build]] step has in = \"vm\": expected [build_vm] only with VM steps".into(),
            ));
        }
        let mut size = DEFAULT_BUILD_VM;
        if let Some(vcpus) = &table.get_ref().vcpus {
            if !(1..=BUILD_VM_MAX_VCPUS).contains(vcpus.get_ref()) {
                return Err(self.field(
                    vcpus.span(),
                    "build_vm.vcpus",
                    format!("{}: expected 1 to {BUILD_VM_MAX_VCPUS}", vcpus.get_ref()),
                ));
            }
            size.vcpus = *vcpus.get_ref();
        }
        if let Some(memory) = &table.get_ref().memory {
            let mib = u32::try_from(self.bytes(memory, "build_vm.memory")? >> 20)
                .ok()
                .filter(|mib| BUILD_VM_MEMORY_MIB.contains(mib));
            let Some(mib) = mib else {
                return Err(self.field(
                    memory.span(),
                    "build_vm.memory",
                    format!(
                        "{:?}: expected {} MiB to {} GiB",
                        memory.get_ref(),
                        BUILD_VM_MEMORY_MIB.start(),
                        BUILD_VM_MEMORY_MIB.end() >> 10
                    ),
                ));
            };
            size.memory_mib = mib;
        }
        Ok(size)
    }

    fn builds(&self, raw: &[RawBuild]) -> Result<Vec<BuildStep>, RecipeError> {
        let mut steps: Vec<BuildStep> = Vec::with_capacity(raw.len());
        for build in raw {
            let step = self.build(build)?;
            let after_vm = steps
                .last()
                .is_some_and(|last| matches!(last.place, StepPlace::Vm { .. }));
            if step.place == StepPlace::Host && after_vm {
                return Err(self.field(
                    build.run.span(),
                    "build.in",
                    "a host step after an `in = \"vm\"` step: expected the host steps first \
                     (they run while the root tree is assembled, the VM steps on the \
                     assembled image)"
                        .into(),
                ));
            }
            steps.push(step);
        }
        Ok(steps)
    }

    /// One `[[build]]` step, checked: `run`, `env`, `in` and `timeout`, `user`.
    fn build(&self, build: &RawBuild) -> Result<BuildStep, RecipeError> {
        let run = self.build_run(build)?;
        let env = self.build_env(build)?;
        let place = self.build_place(build)?;
        let user = self.build_user(build, place)?;
        Ok(BuildStep {
            run,
            env,
            place,
            user,
        })
    }

    /// A step's `run`, refused when it has no command.
    fn build_run(&self, build: &RawBuild) -> Result<String, RecipeError> {
        if build.run.get_ref().trim().is_empty() {
            return Err(self.field(
                build.run.span(),
                "build.run",
                "\"\": expected a shell command line".into(),
            ));
        }
        Ok(build.run.get_ref().clone())
    }

    /// A step's `env` (empty if it has none), refused when a name or
    /// value cannot be exported.
    fn build_env(&self, build: &RawBuild) -> Result<BTreeMap<String, String>, RecipeError> {
        // The names become `export NAME=…` lines in a VM step's script,
        // and a host step's environment, where `=` or NUL cannot go.
        let env = build.env.as_ref();
        let bad_env = env
            .into_iter()
            .flat_map(|env| env.get_ref())
            .find(|(name, value)| !is_env_name(name) || value.contains('\0'));
        if let Some((name, value)) = bad_env {
            return Err(self.field(
                env.map_or(build.run.span(), Spanned::span),
                "build.env",
                format!(
                    "{name:?} = {value:?}: expected names of A-Z a-z 0-9 _ not starting \
                     with a digit, and values without NUL"
                ),
            ));
        }
        Ok(env.map(|env| env.get_ref().clone()).unwrap_or_default())
    }

    /// Where a step runs (`in`), with its `timeout` on VM steps only.
    fn build_place(&self, build: &RawBuild) -> Result<StepPlace, RecipeError> {
        let place = match build.place.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None => StepPlace::Host,
            Some((_, "host")) => StepPlace::Host,
            Some((_, "vm")) => StepPlace::Vm {
                timeout_secs: match &build.timeout {
                    None => DEFAULT_BUILD_TIMEOUT_SECS,
                    Some(timeout) => self.seconds(timeout, "build.timeout")?,
                },
            },
            Some((place, other)) => {
                return Err(self.field(
                    place.span(),
                    "build.in",
                    format!("{other:?}: expected \"host\" or \"vm\""),
                ));
            }
        };
        if let (StepPlace::Host, Some(timeout)) = (place, &build.timeout) {
            return Err(self.field(
                timeout.span(),
                "build.timeout",
                "a host step has no timeout: expected it on `in = \"vm\"` steps only".into(),
            ));
        }
        Ok(place)
    }

    /// The UID:GID a step runs as (`user`), on host steps only.
    fn build_user(
        &self,
        build: &RawBuild,
        place: StepPlace,
    ) -> Result<Option<(u32, u32)>, RecipeError> {
        match (&build.user, place) {
            (None, _) => Ok(None),
            (Some(user), StepPlace::Host) => Ok(Some(self.user(user, "build.user")?)),
            (Some(user), StepPlace::Vm { .. }) => Err(self.field(
                user.span(),
                "build.user",
                "a VM step runs as root in the build VM: expected `user` on host steps only".into(),
            )),
        }
    }

    /// A duration of at least a second, in seconds.
    fn seconds(&self, value: &Spanned<String>, field: &'static str) -> Result<u64, RecipeError> {
        humantime::parse_duration(value.get_ref())
            .ok()
            .map(|duration| duration.as_secs())
            .filter(|secs| *secs > 0)
            .ok_or_else(|| {
                self.field(
                    value.span(),
                    field,
                    format!(
                        "{:?}: expected a duration of at least a second, such as \"30s\" or \"2m\"",
                        value.get_ref()
                    ),
                )
            })
    }

    fn test(&self, test: &RawTest) -> Result<TestCommand, RecipeError> {
        let run = test.run.get_ref();
        // The command travels as `kiln.entrypoint="…"` on the kernel
        // command line, which has no escape for a double quote.
        if run.trim().is_empty() || run.chars().any(|c| c == '"' || c.is_control()) {
            return Err(self.field(
                test.run.span(),
                "test.run",
                format!(
                    "{run:?}: expected a program and its arguments separated by spaces, \
                     without double quotes or control characters"
                ),
            ));
        }
        let expect_exit = match &test.expect_exit {
            None => 0,
            Some(status) => u8::try_from(*status.get_ref()).map_err(|_| {
                self.field(
                    status.span(),
                    "test.expect_exit",
                    format!(
                        "{}: expected an exit status from 0 to 255",
                        status.get_ref()
                    ),
                )
            })?,
        };
        let expect_stdout = match &test.expect_stdout {
            Some(text) if text.get_ref().is_empty() => {
                return Err(self.field(
                    text.span(),
                    "test.expect_stdout",
                    "\"\": expected the text the output must contain".into(),
                ));
            }
            other => other.as_ref().map(|text| text.get_ref().clone()),
        };
        let timeout_secs = match &test.timeout {
            None => DEFAULT_TEST_TIMEOUT_SECS,
            Some(timeout) => self.seconds(timeout, "test.timeout")?,
        };
        Ok(TestCommand {
            run: run.clone(),
            expect_exit,
            expect_stdout,
            timeout_secs,
        })
    }

    fn run(&self, run: &RawRun) -> Result<Run, RecipeError> {
        if run
            .entrypoint
            .get_ref()
            .first()
            .is_none_or(|prog| prog.is_empty())
        {
            return Err(self.field(
                run.entrypoint.span(),
                "run.entrypoint",
                "expected a program and its arguments, e.g. [\"/bin/hello\"]".into(),
            ));
        }
        let workdir = match &run.workdir {
            Some(dir) if !dir.get_ref().starts_with('/') => {
                return Err(self.field(
                    dir.span(),
                    "run.workdir",
                    format!("{:?}: expected an absolute path", dir.get_ref()),
                ));
            }
            other => other.as_ref().map(|d| d.get_ref().clone()),
        };
        let user = match &run.user {
            None => (0, 0),
            Some(user) => self.user(user, "run.user")?,
        };
        Ok(Run {
            entrypoint: run.entrypoint.get_ref().clone(),
            args: run.args.clone(),
            env: run.env.clone(),
            workdir,
            user,
        })
    }
}

/// Whether `name` may name an image: 1-64 of a-z 0-9 - _ . starting with a
/// letter or digit.
pub fn is_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Whether `name` may name an environment variable: A-Z a-z 0-9 _, not
/// starting with a digit.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// `64M`, `512K`, `1G` or plain bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let (digits, shift) = match text.trim().strip_suffix(['K', 'M', 'G']) {
        Some(digits) => (
            digits,
            match text.trim().chars().last()? {
                'K' => 10,
                'M' => 20,
                _ => 30,
            },
        ),
        None => (text.trim(), 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"base = "hello:1.0.0"
binaries = ["/usr/bin/env"]
size = "64M"

[image]
name = "web"
version = "2.1.0-rc.1"
description = "a web server"

[[build]]
run = "make install"
env = { PREFIX = "/usr" }

[[files]]
src = "site/index.html"
dst = "/srv/index.html"
mode = "0644"
owner = "1000:1000"

[run]
entrypoint = ["/bin/httpd", "-f"]
args = ["-p", "80"]
env = { A = "1" }
workdir = "/srv"
user = "1000:1000"

[[test]]
run = "test -f /srv/index.html"

[[test]]
run = "/bin/httpd -h"
expect_exit = 1
expect_stdout = "Usage"
timeout = "2m"
"#;

    fn parsed(text: &str) -> Result<Recipe, RecipeError> {
        parse(text, Path::new("recipes/web/recipe.toml"))
    }

    #[test]
    fn a_full_recipe_parses() {
        let r = parsed(FULL).unwrap();
        assert_eq!((r.name.as_str(), r.version.as_str()), ("web", "2.1.0-rc.1"));
        assert_eq!(
            r.base,
            Base::Image {
                name: "hello".into(),
                version: "1.0.0".into()
            }
        );
        assert_eq!(r.size, Size::Fixed(64 << 20));
        assert_eq!(r.files[0].src, Path::new("recipes/web/site/index.html"));
        assert_eq!(
            (r.files[0].mode, r.files[0].owner),
            (Some(0o644), (1000, 1000))
        );
        assert_eq!(r.run.entrypoint, ["/bin/httpd", "-f"]);
        assert_eq!(r.run.args, ["-p", "80"]);
        assert_eq!(
            (r.run.workdir.as_deref(), r.run.user),
            (Some("/srv"), (1000, 1000))
        );
        assert_eq!(r.builds[0].run, "make install");
        assert_eq!(
            r.builds[0].env,
            BTreeMap::from([("PREFIX".into(), "/usr".into())])
        );
        assert_eq!(
            r.tests[0],
            TestCommand {
                run: "test -f /srv/index.html".into(),
                expect_exit: 0,
                expect_stdout: None,
                timeout_secs: DEFAULT_TEST_TIMEOUT_SECS,
            }
        );
        assert_eq!(
            r.tests[1],
            TestCommand {
                run: "/bin/httpd -h".into(),
                expect_exit: 1,
                expect_stdout: Some("Usage".into()),
                timeout_secs: 120,
            }
        );
    }

    #[test]
    fn archive_bases_are_relative_to_the_recipe() {
        let r = parsed(&FULL.replace("hello:1.0.0", "oci:image.tar")).unwrap();
        assert_eq!(r.base, Base::Oci(PathBuf::from("recipes/web/image.tar")));
        let r = parsed(&FULL.replace("hello:1.0.0", "tar:/srv/rootfs.tar.gz")).unwrap();
        assert_eq!(r.base, Base::Tarball(PathBuf::from("/srv/rootfs.tar.gz")));
    }

    /// Steps run on the host unless they say `in = "vm"`; a VM step has
    /// a timeout, a host step none, and host steps come first.
    #[test]
    fn build_steps_say_where_they_run() {
        let recipe = |steps: &str| {
            parsed(&format!(
                "[image]\nname = \"b\"\nversion = \"1.0.0\"\n{steps}"
            ))
        };
        let r = recipe(
            "[[build]]\nrun = \"make\"\nuser = \"65534:65534\"\n\
             [[build]]\nin = \"vm\"\nrun = \"apt-get install -y curl wget\"\nenv = { A_1 = \"it's\" }\n\
             [[build]]\nin = \"vm\"\nrun = \"true\"\ntimeout = \"90s\"\n",
        )
        .unwrap();
        let places: Vec<StepPlace> = r.builds.iter().map(|b| b.place).collect();
        assert_eq!(
            places,
            [
                StepPlace::Host,
                StepPlace::Vm {
                    timeout_secs: DEFAULT_BUILD_TIMEOUT_SECS
                },
                StepPlace::Vm { timeout_secs: 90 }
            ]
        );
        assert_eq!(r.builds[1].env["A_1"], "it's");
        assert_eq!(
            (r.builds[0].user, r.builds[1].user),
            (Some((65534, 65534)), None)
        );
        assert_eq!(
            r.builds[1].describe(1),
            "step 2 (apt-get install -y curl …)"
        );
        assert_eq!(r.builds[2].describe(2), "step 3 (true)");

        let cases = [
            (
                "[[build]]\nin = \"vm\"\nrun = \"a\"\n[[build]]\nrun = \"b\"\n",
                "recipe.toml:8: `build.in`: a host step after",
            ),
            (
                "[[build]]\nin = \"guest\"\nrun = \"a\"\n",
                "recipe.toml:5: `build.in`: \"guest\": expected \"host\" or \"vm\"",
            ),
            (
                "[[build]]\nrun = \"a\"\ntimeout = \"1m\"\n",
                "recipe.toml:6: `build.timeout`: a host step has no timeout",
            ),
            (
                "[[build]]\nin = \"vm\"\nrun = \"a\"\ntimeout = \"soon\"\n",
                "recipe.toml:7: `build.timeout`: \"soon\"",
            ),
            ("[[build]]\nrun = \" \"\n", "recipe.toml:5: `build.run`"),
            (
                "[[build]]\nin = \"vm\"\nrun = \"a\"\nuser = \"1:1\"\n",
                "recipe.toml:7: `build.user`: a VM step runs as root",
            ),
            (
                "[[build]]\nrun = \"a\"\nuser = \"nobody\"\n",
                "recipe.toml:6: `build.user`: \"nobody\": expected UID:GID",
            ),
            (
                "[[build]]\nrun = \"a\"\nenv = { \"A=B\" = \"c\" }\n",
                "recipe.toml:6: `build.env`: \"A=B\"",
            ),
            (
                "[[build]]\nrun = \"a\"\nenv = { \"1A\" = \"c\" }\n",
                "recipe.toml:6: `build.env`: \"1A\"",
            ),
        ];
        for (steps, expected) in cases {
            let err = recipe(steps).unwrap_err().to_string();
            assert!(err.contains(expected), "{steps}: {err}");
        }
    }

    /// `[build_vm]` sizes the VM steps' VM, within bounds, and only when
    /// there are VM steps to size it for.
    #[test]
    fn the_build_vm_has_the_recipes_size() {
        let recipe = |rest: &str| {
            parsed(&format!(
                "[image]\nname = \"b\"\nversion = \"1.0.0\"\n[[build]]\nin = \"vm\"\nrun = \"a\"\n{rest}"
            ))
        };
        assert_eq!(recipe("").unwrap().build_vm, DEFAULT_BUILD_VM);
        let sized = recipe("[build_vm]\nvcpus = 2\nmemory = \"1G\"\n").unwrap();
        assert_eq!(
            sized.build_vm,
            BuildVmSize {
                vcpus: 2,
                memory_mib: 1024
            }
        );
        for (rest, expected) in [
            (
                "[build_vm]\nvcpus = 0\n",
                "`build_vm.vcpus`: 0: expected 1 to 32",
            ),
            (
                "[build_vm]\nmemory = \"1M\"\n",
                "`build_vm.memory`: \"1M\": expected 64 MiB",
            ),
            ("[build_vm]\nmemory = \"1T\"\n", "`build_vm.memory`: \"1T\""),
            ("[build_vm]\ncpus = 2\n", "cpus"),
        ] {
            let err = recipe(rest).unwrap_err().to_string();
            assert!(err.contains(expected), "{rest}: {err}");
        }
        let no_vm_steps = parsed(
            "[image]\nname = \"b\"\nversion = \"1.0.0\"\n[[build]]\nrun = \"a\"\n[build_vm]\nvcpus = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            no_vm_steps.contains("`build_vm`: no [[build]] step has in = \"vm\""),
            "{no_vm_steps}"
        );
    }

    #[test]
    fn a_minimal_recipe_gets_defaults() {
        let r = parsed("[image]\nname = \"tiny\"\nversion = \"0.1.0\"\n").unwrap();
        assert_eq!((r.base, r.size), (Base::Scratch, Size::Free(DEFAULT_FREE)));
        assert!(r.run.entrypoint.is_empty() && r.files.is_empty());
    }

    /// Each bad recipe's error names the file, the line and the field.
    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            (
                FULL.replace("name = \"web\"", "name = \"Web Server\""),
                "recipe.toml:6: `image.name`",
            ),
            (
                FULL.replace("2.1.0-rc.1", "two"),
                "recipe.toml:7: `image.version`",
            ),
            (
                FULL.replace("hello:1.0.0", "hello"),
                "recipe.toml:1: `base`",
            ),
            (FULL.replace("\"64M\"", "\"lots\""), "recipe.toml:3: `size`"),
            (
                FULL.replace("\"0644\"", "\"rw-r--r--\""),
                "recipe.toml:17: `files.mode`",
            ),
            (
                FULL.replace("/srv/index.html\"\nmode", "srv/index.html\"\nmode"),
                "recipe.toml:16: `files.dst`",
            ),
            (
                FULL.replace("/srv/index.html\"\nmode", "/srv/../../etc/passwd\"\nmode"),
                "recipe.toml:16: `files.dst`",
            ),
            (
                FULL.replace("owner = \"1000:1000\"", "owner = \"www\""),
                "recipe.toml:18: `files.owner`",
            ),
            (
                FULL.replace("[\"/bin/httpd\", \"-f\"]", "[]"),
                "recipe.toml:21: `run.entrypoint`",
            ),
            (
                FULL.replace("workdir = \"/srv\"", "workdir = \"srv\""),
                "recipe.toml:24: `run.workdir`",
            ),
            (
                FULL.replace("size = \"64M\"", "size = \"64M\"\nfree = \"1M\""),
                "recipe.toml:4: `free`",
            ),
            (
                FULL.replace("test -f /srv/index.html", "test -f \\\"/srv\\\""),
                "recipe.toml:28: `test.run`",
            ),
            (
                FULL.replace("expect_exit = 1", "expect_exit = 256"),
                "recipe.toml:32: `test.expect_exit`",
            ),
            (
                FULL.replace("expect_stdout = \"Usage\"", "expect_stdout = \"\""),
                "recipe.toml:33: `test.expect_stdout`",
            ),
            (
                FULL.replace("\"2m\"", "\"soon\""),
                "recipe.toml:34: `test.timeout`",
            ),
            (
                FULL.replace("\"2m\"", "\"10ms\""),
                "recipe.toml:34: `test.timeout`",
            ),
        ];
        for (text, expected) in cases {
            let err = parsed(&text).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_syntax_errors_name_the_line() {
        let err = parsed(&FULL.replace("description =", "colour = \"red\"\ndescription ="))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("recipe.toml") && err.contains("line 8") && err.contains("colour"),
            "{err}"
        );
        let err = parsed("[image\nname = 1").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64M"), Some(64 << 20));
        assert_eq!(parse_bytes("512K"), Some(512 << 10));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("M"), None);
        assert_eq!(parse_bytes("-1M"), None);
    }
}
