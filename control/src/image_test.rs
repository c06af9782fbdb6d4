//! Running an image's tests (its recipe's `[[test]]`s): `kiln build`
//! runs them on the staged image before publishing it, `kiln image test`
//! on a stored one.
//!
//! Each test boots the image in a VM of its own, with the test's command
//! as the entrypoint (`kiln.entrypoint=` on the kernel command line) and a
//! throwaway overlay, rather than all tests in one VM: a test then starts
//! from the image exactly as published, and what one test writes, starts
//! or breaks cannot make another pass or fail. A boot costs well under a
//! second, small next to what a test checks, and as many tests run at once
//! as the host has CPUs.
//!
//! The VM is a child process, `kiln __vm` (the VM process an instance's
//! supervisor starts too), not a VM in this process: a VM process's
//! threads end under seccomp filters and its console is its stdout, which
//! is captured here, and a test that hangs is ended by killing it. It is
//! jailed as an instance's is ([`crate::jail`]), unless the jail is off.
//! The build VM (`crate::image_build`) is run the same way
//! ([`TestRunner::run_vm`]), and so is a plain `kiln run`'s ([`VmChild`]).
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_builder::recipe::TestCommand;
use kiln_builder::store::{Store, StoreError, TestResult};
use kiln_vmm::config::{CacheAccess, ConfigError, DiskConfig, DiskSource, VmConfig};
use kiln_vmm::volume::{Volume, VolumeError};

use crate::definition::{self, DEFAULT_CACHE_MIB, DefinitionError, RunOptions};
use crate::instance::supervisor::VM_SUBCOMMAND;
use crate::instance::types::InstanceType;
use crate::jail::{self, Jail, JailError, JailSettings};

/// The size of every test's VM. The catalog's smallest (128 MiB) is too
/// little for an interpreter such as Python (`recipes/python` runs in 256).
const TEST_INSTANCE_TYPE: &str = "k1.micro";

/// How often a running test's VM is checked for its end.
const POLL: Duration = Duration::from_millis(20);

/// Why a test could not be run (a test that runs and fails is no error:
/// see [`TestRun`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageTestError {
    /// The scratch directory for the test's overlay and definition
    /// cannot be made.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image's overlay cannot be created.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The test's VM cannot be defined.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// The test's VM process could not be run.
    #[error("test `{test}`")]
    Process {
        /// The test's command.
        test: String,
        /// What failed.
        #[source]
        source: VmProcessError,
    },
}

/// Why a VM process ([`VmChild`]) could not be run to its end.
#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    /// The process could not be started or waited for.
    #[error("cannot {what} the VM process ({kiln})")]
    Process {
        /// What was being done ("start", "wait for").
        what: &'static str,
        /// The `kiln` binary run as the VM process.
        kiln: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Its jail could not be set up.
    #[error("cannot jail the VM process")]
    Jail(#[from] JailError),
    /// Its definition could not be written.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// How a VM process ended.
#[derive(Debug)]
pub(crate) struct VmEnd {
    /// Its exit status (the guest entrypoint's); `None` if it could not
    /// be had.
    pub status: Option<ExitStatus>,
    /// Whether it was killed at its timeout.
    pub timed_out: bool,
    /// How long it ran.
    pub duration: Duration,
}

/// What the tests' VMs boot, and where their scratch files go.
#[derive(Clone, Debug)]
pub struct TestRunner {
    /// The `kiln` binary, whose hidden `__vm` subcommand is one VM process.
    pub kiln: PathBuf,
    /// The guest kernel, an uncompressed vmlinux.
    pub kernel: PathBuf,
    /// The store, whose scratch space holds each test's overlay.
    pub store: Store,
    /// How each VM process is jailed; none when unjailed (`--no-jail`,
    /// or a host that cannot jail: [`JailSettings::for_vm_processes`]).
    pub jail: Option<JailSettings>,
}

/// One test, run: its result as the manifest records it, and what its
/// VM printed.
#[derive(Clone, Debug)]
pub struct TestRun {
    /// Pass or fail, the exit status and the duration.
    pub result: TestResult,
    /// The console output of the VM, then the VM process's own messages
    /// (a VMM error), as one text.
    pub output: String,
    /// Whether the VM was killed at the test's timeout.
    pub timed_out: bool,
}

impl TestRun {
    /// Why `test` failed, for a person; `None` if it passed.
    pub fn failure(&self, test: &TestCommand) -> Option<String> {
        if self.result.passed {
            return None;
        }
        Some(match self.result.exit_status {
            _ if self.timed_out => format!("timed out after {} s", test.timeout_secs),
            None => "the VM ended without an exit status".to_string(),
            Some(status) if status != test.expect_exit => {
                format!("exit status {status}, expected {}", test.expect_exit)
            }
            Some(_) => format!(
                "the output does not contain {:?}",
                test.expect_stdout.as_deref().unwrap_or_default()
            ),
        })
    }

    /// The last `count` lines of the output, without the serial
    /// console's carriage returns.
    pub fn last_lines(&self, count: usize) -> Vec<&str> {
        let lines: Vec<&str> = self
            .output
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .collect();
        lines[lines.len().saturating_sub(count)..].to_vec()
    }
}

impl TestRunner {
    /// Runs each of `tests` on the image file `image` (stored or staged),
    /// as many at once as this host has CPUs, telling `each` about every
    /// one in the recipe's order; all of them run, so that one report
    /// names every failure. The tests are independent (a VM and an
    /// overlay each), so running them side by side changes no result.
    pub fn run_all(
        &self,
        image: &Path,
        tests: &[TestCommand],
        each: &mut dyn FnMut(&TestCommand, &TestRun),
    ) -> Result<Vec<TestRun>, ImageTestError> {
        let at_once = thread::available_parallelism().map_or(1, |n| n.get());
        let mut runs = Vec::with_capacity(tests.len());
        for wave in tests.chunks(at_once) {
            let ended: Vec<_> = thread::scope(|scope| {
                let running: Vec<_> = (wave.iter())
                    .map(|test| scope.spawn(move || self.run(image, test)))
                    .collect();
                running.into_iter().map(join_test).collect()
            });
            for (test, run) in wave.iter().zip(ended) {
                let run = run?;
                each(test, &run);
                runs.push(run);
            }
        }
        Ok(runs)
    }

    /// Boots `image` with `test`'s command as its entrypoint, and checks
    /// its exit status and output; the VM is killed at the timeout.
    pub fn run(&self, image: &Path, test: &TestCommand) -> Result<TestRun, ImageTestError> {
        let scratch = self.store.scratch_dir()?;
        let overlay = scratch.path().join("overlay");
        let cache_bytes = DEFAULT_CACHE_MIB << 20;
        Volume::create(image, &overlay, cache_bytes)?;
        let disk = DiskConfig {
            source: DiskSource::Volume {
                image: image.to_path_buf(),
                overlay: Some(overlay),
                cache_bytes,
                // The image may be a build's, not yet stored: its cache
                // would outlive a failed build.
                hydration: None,
                hydration_access: CacheAccess::Fill,
            },
            read_only: false,
            // The VM process deletes the overlay once open.
            ephemeral: true,
        };
        let size = InstanceType::find(TEST_INSTANCE_TYPE).expect("the test type is in the catalog");
        let config = self.define(vec![disk], &test.run, (size.vcpus, size.memory_mib))?;
        let mut output = Vec::new();
        let timeout = Duration::from_secs(test.timeout_secs);
        let end = self
            .run_vm(scratch.path(), config, timeout, &mut |line| {
                output.extend_from_slice(line)
            })
            .map_err(|source| ImageTestError::Process {
                test: test.run.clone(),
                source,
            })?;
        let (output, timed_out) = (String::from_utf8_lossy(&output).into_owned(), end.timed_out);
        let exit_status = end.status.and_then(|s| s.code()).map(|code| code as u8);
        let passed = !timed_out
            && exit_status == Some(test.expect_exit)
            && test
                .expect_stdout
                .as_ref()
                .is_none_or(|text| output.contains(text.as_str()));
        Ok(TestRun {
            result: TestResult {
                run: test.run.clone(),
                passed,
                exit_status,
                duration_ms: end.duration.as_millis() as u64,
            },
            output,
            timed_out,
        })
    }

    /// A VM of `size` (vCPUs, MiB) with `disks` (the first is the root),
    /// no NIC and `command` (words split on spaces) as the entrypoint: a
    /// test's VM ([`TEST_INSTANCE_TYPE`]'s size), or a build step's
    /// (`crate::image_build`, the recipe's `[build_vm]`).
    pub(crate) fn define(
        &self,
        disks: Vec<DiskConfig>,
        command: &str,
        size: (u8, u32),
    ) -> Result<kiln_vmm::config::VmConfig, DefinitionError> {
        let mut options = RunOptions::new(self.kernel.clone());
        options.disks = disks;
        // The recipe parser refuses a double quote in a test's command,
        // and a build step's is its script's path: this quoting is whole.
        options.cmdline = format!("kiln.entrypoint=\"{command}\"");
        definition::for_plain_run(&self.store, None, &options, size, None)
    }

    /// Runs the VM `config` defines to its end, as a `kiln __vm` child
    /// whose definition and jail are in the scratch directory `dir`,
    /// handing each line of its output (the guest's console, then the VM
    /// process's own messages) to `on_line` as it comes; the VM process
    /// is killed at `timeout`, and its jail removed once it has ended.
    pub(crate) fn run_vm(
        &self,
        dir: &Path,
        config: VmConfig,
        timeout: Duration,
        on_line: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<VmEnd, VmProcessError> {
        let (reader, writer) = io::pipe().map_err(process_err("start", &self.kiln))?;
        let started = Instant::now();
        let mut child = VmChild::start(&self.kiln, dir, config, self.jail.as_ref(), |command| {
            command.stdout(writer.try_clone()?).stderr(writer);
            Ok(())
        })?;
        thread::scope(|scope| {
            // The pipe's last writer goes with the VM process: this ends.
            scope.spawn(|| read_lines(reader, on_line));
            let ended = wait_until(&mut child.child, started + timeout);
            let duration = started.elapsed();
            let (status, timed_out) = ended.map_err(process_err("wait for", &self.kiln))?;
            Ok(VmEnd {
                status,
                timed_out,
                duration,
            })
        })
    }
}

/// A test's thread's result; a panic in it is the caller's panic.
fn join_test(
    running: thread::ScopedJoinHandle<'_, Result<TestRun, ImageTestError>>,
) -> Result<TestRun, ImageTestError> {
    running
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A running `kiln __vm` child of this process, the VM process of no
/// instance (a test's, a build step's, a plain `kiln run`'s), in its
/// jail unless the jail is off. Dropped, it kills the VM process if it
/// still runs, waits for it, and removes the jail: also when what
/// started it fails or times out.
#[derive(Debug)]
pub struct VmChild {
    child: Child,
    /// The only holder of the jail once the command that entered it
    /// has been dropped.
    jail: Option<Arc<Jail>>,
}

impl VmChild {
    /// Starts the VM `config` defines: its definition is written into
    /// the scratch directory `dir`, which becomes its jail's writable
    /// directory when `jail` is given ([`Jail::create`], the jail's id
    /// being the directory's name); `stdio` gives the command its
    /// standard streams.
    pub fn start(
        kiln: &Path,
        dir: &Path,
        mut config: VmConfig,
        jail: Option<&JailSettings>,
        stdio: impl FnOnce(&mut Command) -> io::Result<()>,
    ) -> Result<VmChild, VmProcessError> {
        let id = dir.file_name().unwrap_or_default().to_string_lossy();
        let jail = jail
            .map(|settings| Jail::create(settings, &id, dir, &mut config))
            .transpose()?
            .map(Arc::new);
        let definition = dir.join(DEFINITION_FILE);
        config.save(&definition)?;
        let mut command = vm_process(kiln, &definition);
        stdio(&mut command).map_err(process_err("start", kiln))?;
        if let Some(jail) = &jail {
            jail.hand_over(&definition)?;
            jail.confine(&mut command);
        }
        let child =
            jail::spawn(&mut command, jail.is_some()).map_err(process_err("start", kiln))?;
        Ok(VmChild { child, jail })
    }

    /// The VM process.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The uid its jail runs it as; none when unjailed.
    pub fn jail_uid(&self) -> Option<u32> {
        self.jail.as_deref().map(Jail::uid)
    }
}

impl Drop for VmChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(jail) = self.jail.take().and_then(Arc::into_inner) {
            jail.remove();
        }
    }
}

/// The name of a VM child's definition in its scratch directory.
const DEFINITION_FILE: &str = "vm.json";

fn process_err(what: &'static str, kiln: &Path) -> impl FnOnce(io::Error) -> VmProcessError {
    let kiln = kiln.to_path_buf();
    move |source| VmProcessError::Process { what, kiln, source }
}

/// `kiln __vm --config DEFINITION` (the binary `kiln`), with this
/// process as its supervisor: it ends (SIGTERM) when the thread that
/// spawns it does. Its stdin is /dev/null.
pub(crate) fn vm_process(kiln: &Path, definition: &Path) -> Command {
    let mut command = Command::new(kiln);
    command
        .arg(VM_SUBCOMMAND)
        .arg("--config")
        .arg(definition)
        .arg("--supervisor")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null());
    command
}

/// Waits for `child` until `deadline`, then kills it. Returns its status
/// (`None` if it could not be had) and whether it was killed. It is
/// killed on an error too: nothing of it outlives the wait.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<(Option<ExitStatus>, bool)> {
    loop {
        let status = child.try_wait().inspect_err(|_| {
            let _ = child.kill();
            let _ = child.wait();
        })?;
        if let Some(status) = status {
            return Ok((Some(status), false));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            return Ok((child.wait().ok(), true));
        }
        thread::sleep(POLL);
    }
}

/// Hands each line `reader` yields (with its newline; the last one may
/// have none) to `on_line`, until its end. A read error ends it: what
/// came before is handed on.
fn read_lines(reader: io::PipeReader, on_line: &mut (dyn FnMut(&[u8]) + Send)) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
        on_line(&line);
        line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test(expect_stdout: Option<&str>) -> TestCommand {
        TestCommand {
            run: "/bin/hello".into(),
            expect_exit: 0,
            expect_stdout: expect_stdout.map(String::from),
            timeout_secs: 5,
        }
    }

    fn ran(exit_status: Option<u8>, passed: bool, timed_out: bool) -> TestRun {
        TestRun {
            result: TestResult {
                run: "/bin/hello".into(),
                passed,
                exit_status,
                duration_ms: 1,
            },
            output: "boot\r\none\r\ntwo\r\nthree\r\n".into(),
            timed_out,
        }
    }

    #[test]
    fn a_failure_says_what_was_expected() {
        assert_eq!(ran(Some(0), true, false).failure(&test(None)), None);
        let failure = |run: TestRun, test| run.failure(&test).unwrap();
        assert_eq!(
            failure(ran(Some(3), false, false), test(None)),
            "exit status 3, expected 0"
        );
        assert_eq!(
            failure(ran(None, false, true), test(None)),
            "timed out after 5 s"
        );
        assert_eq!(
            failure(ran(Some(0), false, false), test(Some("Hello"))),
            "the output does not contain \"Hello\""
        );
        assert_eq!(
            failure(ran(None, false, false), test(None)),
            "the VM ended without an exit status"
        );
    }

    #[test]
    fn the_last_lines_lose_their_carriage_returns() {
        let run = ran(Some(0), true, false);
        assert_eq!(run.last_lines(2), ["two", "three"]);
        assert_eq!(run.last_lines(9).len(), 4);
    }

    /// A runner whose "kiln" is a script standing in for `kiln __vm`: it
    /// checks that it was handed a definition whose command line carries
    /// the test's command, then acts on the command's first word.
    fn fake_runner(dir: &Path) -> TestRunner {
        let kiln = dir.join("kiln");
        crate::test_support::write_script(
            &kiln,
            "#!/bin/sh\n\
             [ \"$1 $2 $4 $5\" = \"__vm --config --supervisor $PPID\" ] || exit 97\n\
             grep -q 'kiln.entrypoint=\\\\\"/bin/' \"$3\" || exit 98\n\
             grep -q '/bin/sleepy' \"$3\" && exec sleep 30\n\
             # Two tests that each wait for the other: they pass only side by side.\n\
             meet() { touch \"${0%/*}/$1\"; while [ ! -e \"${0%/*}/$2\" ]; do sleep 0.05; done; }\n\
             grep -q '/bin/meet-a' \"$3\" && meet a b\n\
             grep -q '/bin/meet-b' \"$3\" && meet b a\n\
             printf 'booted\\r\\nHello from a fake VM\\r\\n'\n\
             echo 'kiln: a VMM message' >&2\n",
        );
        TestRunner {
            kiln,
            kernel: "vmlinux".into(),
            store: Store::new(&dir.join("home")),
            // A script cannot run in a jail, which holds only `kiln`.
            jail: None,
        }
    }

    /// An image of 128 KiB in `dir`, for fake VMs that never read it.
    fn small_image(dir: &Path) -> PathBuf {
        let raw = dir.join("raw");
        std::fs::write(&raw, vec![7u8; 128 * 1024]).unwrap();
        let image = dir.join("image.kiln");
        kiln_image::write(&raw, &image, kiln_image::DEFAULT_CHUNK_SIZE).unwrap();
        image
    }

    /// Tests run side by side, as many as there are CPUs, and are
    /// reported in the recipe's order: two tests that each wait for the
    /// other both pass on two CPUs; on one, the first times out.
    #[test]
    fn tests_run_side_by_side_and_are_reported_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let runner = fake_runner(dir.path());
        let image = small_image(dir.path());
        let meet = |who: &str| TestCommand {
            run: format!("/bin/meet-{who}"),
            timeout_secs: 3,
            ..test(None)
        };
        let mut reported = Vec::new();
        let runs = runner
            .run_all(&image, &[meet("a"), meet("b")], &mut |test, _| {
                reported.push(test.run.clone())
            })
            .unwrap();
        assert_eq!(reported, ["/bin/meet-a", "/bin/meet-b"]);
        let side_by_side = thread::available_parallelism().unwrap().get() >= 2;
        assert_eq!(runs[0].timed_out, !side_by_side, "{:?}", runs[0]);
        assert!(runs[1].result.passed, "{:?}", runs[1]);
    }

    /// A jailed VM child runs in its jail, with its definition handed to
    /// the jail's uid and a disk outside its directory shared with the
    /// jails' group; dropped, it removes the jail: the disk, ephemeral,
    /// is deleted and the uid's lease ends. Needs what a jail needs (root,
    /// /dev/kvm); the test binary stands in for `kiln`, since a jail holds
    /// only the program that made it.
    #[test]
    fn a_jailed_vm_child_is_handed_its_files_and_leaves_nothing() {
        use std::os::unix::fs::MetadataExt;
        if let Some(why) = jail::unavailable() {
            panic!("a jail cannot be made here: {why}");
        }
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("scratch-jailed");
        std::fs::create_dir(&dir).unwrap();
        let (kernel, disk) = (home.path().join("vmlinux"), home.path().join("disk.img"));
        for file in [&kernel, &disk] {
            std::fs::write(file, b"").unwrap();
        }
        let settings = JailSettings {
            uids: jail::UidRange {
                first: 5000,
                count: 10,
            },
            leases: home.path().join("leases"),
            warn: jail::warn_on_stderr,
        };
        let runner = TestRunner {
            kiln: std::env::current_exe().unwrap(),
            kernel,
            store: Store::new(&home.path().join("home")),
            jail: Some(settings.clone()),
        };
        let disk_config = DiskConfig {
            source: DiskSource::Raw(disk.clone()),
            read_only: false,
            ephemeral: true,
        };
        let config = runner
            .define(vec![disk_config], "/bin/true", (1, 128))
            .unwrap();
        let mut vm = VmChild::start(&runner.kiln, &dir, config, Some(&settings), |command| {
            command.stdout(Stdio::null()).stderr(Stdio::null());
            Ok(())
        })
        .unwrap();
        let uid = vm.jail_uid().unwrap();
        let definition = std::fs::metadata(dir.join(DEFINITION_FILE)).unwrap();
        assert_eq!((definition.uid(), definition.gid()), (uid, uid));
        let shared = std::fs::metadata(&disk).unwrap();
        assert_eq!((shared.gid(), shared.mode() & 0o060), (5000, 0o060));
        // The test binary, run as `kiln __vm --config …`, refuses the
        // unknown flag with libtest's status: it was run, in the jail.
        assert_eq!(vm.child().wait().unwrap().code(), Some(101));
        drop(vm);
        assert!(!disk.exists(), "the ephemeral disk is left");
        let again = settings.uids.lease(&settings.leases, "scratch-jailed");
        assert_eq!(again.unwrap().uid(), uid, "the uid is still leased");
    }

    /// Each test runs in a VM process of its own, whose output is
    /// captured and checked, and which is killed at the timeout; no
    /// scratch file outlives the run.
    #[test]
    fn tests_run_in_vm_processes_that_are_checked_and_killed_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let runner = fake_runner(dir.path());
        let image = small_image(dir.path());

        let greets = test(Some("Hello from a fake VM"));
        let runs = runner
            .run_all(
                &image,
                &[greets.clone(), test(Some("Goodbye"))],
                &mut |_, _| {},
            )
            .unwrap();
        assert!(runs[0].result.passed, "{:?}", runs[0]);
        assert_eq!(runs[0].result.exit_status, Some(0));
        assert_eq!(
            runs[0].last_lines(2),
            ["Hello from a fake VM", "kiln: a VMM message"]
        );
        assert_eq!(
            runs[1].failure(&test(Some("Goodbye"))).unwrap(),
            "the output does not contain \"Goodbye\""
        );

        let wrong_status = TestCommand {
            expect_exit: 3,
            ..greets
        };
        let run = runner.run(&image, &wrong_status).unwrap();
        assert_eq!(
            run.failure(&wrong_status).unwrap(),
            "exit status 0, expected 3"
        );

        let hangs = TestCommand {
            run: "/bin/sleepy".into(),
            timeout_secs: 1,
            ..test(None)
        };
        let started = Instant::now();
        let run = runner.run(&image, &hangs).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed in time"
        );
        assert!(run.timed_out && !run.result.passed && run.result.exit_status.is_none());
        assert_eq!(run.failure(&hangs).unwrap(), "timed out after 1 s");

        let tmp = dir.path().join("home/tmp");
        assert!(
            std::fs::read_dir(tmp).unwrap().next().is_none(),
            "scratch left"
        );
    }
}
