//! An instance's VMM process: the one supervisor of its VMs, for detached
//! instances (`kiln run --detach`, `kiln start`: `kiln __vmm ID`) and
//! foreground ones (`kiln run --name`) alike. It lives as long as the
//! instance runs: it owns the instance's VMM lock, its API socket
//! ([`super::actions`]) and its published ports, defines each VM
//! ([`crate::definition`]) and runs it as a child VM process
//! (`kiln __vm --config FILE`, which alone has KVM), and keeps the
//! record's state true. Every thread but one runs under a seccomp filter
//! of its own ([`kiln_vmm::seccomp`]): the API thread (the socket only),
//! the actions thread (what a request asks), the proxy, and the main
//! thread (waits for each VM process, copies its console, writes the
//! record). The exception is the launcher thread ([`Launcher`]), which
//! starts each VM process and tears its tap filter and jail down: a
//! filter is inherited by every process forked under it. A detached instance's
//! console goes through a pipe into `console.log` (rotated at a size,
//! [`super::console`]) and comes from `console.in`; a foreground one's is
//! the terminal.
//!
//! Running the VM in a child is what makes reboot possible: a VM process
//! cannot build a fresh VM once its seccomp filter is in place, so a reboot
//! ends the child (its disks flush as it stops) and starts another, in the
//! same VMM process, with the same ids and the same root volume.
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::{Arc, Mutex, mpsc};
use std::{io, thread};

use kiln_builder::store::Store;
use kiln_vmm::config::Boot;
use kiln_vmm::config::ConfigError;
use kiln_vmm::devices::lock;
use kiln_vmm::rpc::{self, ControlClient};
use kiln_vmm::seccomp::{self, SeccompError, ThreadKind};
use kiln_vmm::supervised;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use super::actions;
use super::console::{CONSOLE_LOG_LIMIT, ConsoleLogError, RotatingLog, copy_into};
use super::{FileLock, Instance, InstanceError};
use crate::definition::{self, DefinitionError, RunOptions};
use crate::jail::{self, Jail, JailError, JailSettings};
use crate::network::proxy::{Proxy, ProxyError, ProxyHandle};
use crate::network::{self, NetworkError};

pub use super::actions::SNAPSHOT_TIMEOUT;

/// The hidden `kiln` subcommand that is one VM process.
pub const VM_SUBCOMMAND: &str = "__vm";
/// The VM definition the supervisor hands each VM process, in the
/// instance's directory.
const VM_DEFINITION_FILE: &str = "vm.json";

/// What the supervisor should do when the VM process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wanted {
    /// Nothing was asked: the guest ended by itself, so the instance stops.
    Nothing,
    Stop,
    Reboot,
    /// The VM has written its hibernation snapshot and is ending.
    Hibernate,
}

/// The VM process and what is wanted of it, under one lock so a request
/// never misses a process that is just starting.
pub(super) struct Control {
    /// The running VM process, by a pidfd: a signal sent through it
    /// reaches that process or none, never one that reused its pid; and
    /// the actions thread's filter allows signals through pidfds only.
    pub(super) child: Option<OwnedFd>,
    /// The VM process's control channel.
    pub(super) channel: Option<ControlClient>,
    pub(super) wanted: Wanted,
}

/// What the supervisor's threads share.
pub(super) struct Shared {
    pub(super) instance: Mutex<Instance>,
    pub(super) control: Mutex<Control>,
    /// The VM processes are jailed: they see only the instance's
    /// directory, and write snapshots into its exchange directory.
    pub(super) jailed: bool,
    /// Held by the API thread from a request's read to its answer's
    /// write. The process ends only once it can take it, so that the
    /// answer to a stop (or a hibernation), whose VM's end lets this
    /// process end, is never cut short.
    pub(super) answering: Mutex<()>,
}

/// Where an instance's serial console goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// `console.log` (rotated), with input from `console.in`: a detached
    /// instance, read with `kiln logs` and `kiln attach`.
    Log,
    /// The supervisor's own terminal (stdin, stdout, stderr): a
    /// foreground instance.
    Terminal,
}

/// How the supervisor starts each VM process of its instance.
pub struct VmProcess {
    /// The `kiln` binary, whose `__vm` subcommand is a VM process.
    pub kiln: PathBuf,
    /// The image store the instance's image is in.
    pub store: Store,
    /// What every VM of this supervisor adds to the instance's definition.
    pub options: RunOptions,
    /// Where the VMs' console goes.
    pub console: Console,
}

/// How the supervisor starts one VM process.
pub(super) struct VmStart<'a> {
    /// The VM process's end of the control channel (to be inherited).
    control_fd: i32,
    /// A snapshot to restore instead of booting, and whether the restore
    /// consumes it (a hibernation).
    restore: Option<(&'a Path, bool)>,
}

/// What can go wrong running an instance.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The instance's record cannot be read or written.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// A system call of the supervisor's own failed.
    #[error("{what}")]
    Io {
        /// What the supervisor was doing.
        what: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The control channel to the VM process cannot be made.
    #[error(transparent)]
    Control(#[from] rpc::ControlError),
    /// A published port cannot be bound or proxied.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The console log cannot be opened.
    #[error(transparent)]
    Console(#[from] ConsoleLogError),
    /// The instance's VM cannot be defined (its image, disks or NIC).
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// The VM definition cannot be handed to the VM process.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM's tap cannot be created or attached to the bridge.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The VM process's jail cannot be set up.
    #[error(transparent)]
    Jail(#[from] JailError),
    /// The main thread's seccomp filter cannot be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// A VM process to spawn: its command, the descriptors it inherits (its
/// tap), which the supervisor holds open until it is spawned, and its
/// jail, which the supervisor ends once it has.
pub(super) struct VmSpawn {
    command: Command,
    inherited: Vec<OwnedFd>,
    jail: Option<Arc<Jail>>,
}

impl From<Command> for VmSpawn {
    fn from(command: Command) -> Self {
        VmSpawn {
            command,
            inherited: Vec::new(),
            jail: None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Runs `instance` until it stops, holding its VMM lock `vmm`, with its VM
/// processes made as `vm` says; returns how the last one ended. The first
/// VM goes on from the instance's hibernation if it has one, else from
/// `restore` (a snapshot it was launched from) if given, else it boots.
/// `started`, the write end of the launcher's pipe, is closed once the
/// instance runs (or the supervisor ends): the launcher's word to return.
pub fn run(
    instance: Instance,
    vmm: FileLock,
    restore: Option<PathBuf>,
    vm: &VmProcess,
    started: Option<OwnedFd>,
) -> Result<ExitStatus, SupervisorError> {
    kiln_vmm::trace::mark("supervisor");
    let jail = JailSettings::for_vm_processes()?;
    let launch = Launch {
        restore,
        console: vm.console,
        started,
        jailed: jail.is_some(),
    };
    supervise(instance, vmm, launch, |instance, start| {
        vm_command(instance, vm, jail.as_ref(), start)
    })
}

/// How a supervisor begins: where its first VM starts from, where the
/// console goes, and whom to tell once it runs.
struct Launch {
    restore: Option<PathBuf>,
    console: Console,
    started: Option<OwnedFd>,
    /// The VM processes are jailed ([`crate::jail`]).
    jailed: bool,
}

/// The command of one VM process: `kiln __vm` with the instance's VM
/// definition in a file, the control channel and the NIC's tap (made
/// here, in the host's namespaces) inherited, and this process as the
/// supervisor it ends with; jailed when `jail` says so.
fn vm_command(
    instance: &Instance,
    vm: &VmProcess,
    jail: Option<&JailSettings>,
    start: VmStart<'_>,
) -> Result<VmSpawn, SupervisorError> {
    let boot = match start.restore {
        Some((dir, consume)) => Boot::Snapshot {
            dir: dir.to_path_buf(),
            consume,
        },
        None => Boot::Kernel(vm.options.kernel.clone()),
    };
    let mut config = definition::for_instance(&vm.store, instance, &vm.options, boot)?;
    let id = &instance.record.id;
    let jail = jail
        .map(|settings| Jail::create(settings, id, instance.dir(), &mut config))
        .transpose()?
        .map(Arc::new);
    let file = instance.dir().join(VM_DEFINITION_FILE);
    config.save(&file)?;
    if let Some(jail) = &jail {
        jail.hand_over(&file)?;
    }
    let mut command = Command::new(&vm.kiln);
    command
        .arg(VM_SUBCOMMAND)
        .arg("--config")
        .arg(&file)
        .arg("--control-fd")
        .arg(start.control_fd.to_string())
        .arg("--supervisor")
        .arg(std::process::id().to_string());
    let mut inherited = Vec::new();
    if let Some(nic) = &config.net {
        let tap: OwnedFd = network::open_tap(nic, instance.record.address)?.into();
        supervised::inherit(&mut command, tap.as_fd());
        command.arg("--tap-fd").arg(tap.as_raw_fd().to_string());
        inherited.push(tap);
    }
    if let Some(jail) = &jail {
        jail.confine(&mut command);
    }
    Ok(VmSpawn {
        command,
        inherited,
        jail,
    })
}

/// [`run`], with the VM processes' commands made by `vm_command`.
fn supervise(
    instance: Instance,
    _vmm: FileLock,
    launch: Launch,
    vm_command: impl Fn(&Instance, VmStart<'_>) -> Result<VmSpawn, SupervisorError> + Sync,
) -> Result<ExitStatus, SupervisorError> {
    let socket = instance.api_socket();
    let log = match launch.console {
        Console::Log => Some(open_console_log(&instance)?),
        Console::Terminal => None,
    };
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(io_err(format!("cannot listen on {}", socket.display())))?;
    let shared = Arc::new(Shared {
        instance: Mutex::new(instance),
        control: Mutex::new(Control {
            child: None,
            channel: None,
            wanted: Wanted::Nothing,
        }),
        jailed: launch.jailed,
        answering: Mutex::new(()),
    });
    // Published ports serve for the whole life of this VMM process,
    // across reboots; a port that cannot be bound stops the instance.
    // (The record's lock is let go before the match: its error arm takes it.)
    let published = publish_ports(&lock(&shared.instance));
    let _proxy = match published {
        Ok(proxy) => proxy,
        Err(err) => {
            lock(&shared.instance).mark_stopped(kiln_vmm::report::one_line(&err))?;
            return Err(err);
        }
    };
    actions::spawn(listener, &shared);
    let status = thread::scope(|scope| {
        let launcher = Launcher::spawn(scope);
        // Every other thread runs: from here on this one waits, copies the
        // console and writes the record, under a filter of its own.
        seccomp::install(ThreadKind::Supervisor)?;
        run_vms(&shared, &launcher, launch, log, &vm_command)
    })?;
    let _ = fs::remove_file(&socket);
    // An answer being written (say, to the stop that ended the VM)
    // reaches its caller before the process ends.
    drop(lock(&shared.answering));
    Ok(status)
}

/// Runs the instance's VM processes one after another (a reboot starts the
/// next) until one ends for good, and records why; returns how it ended.
fn run_vms<'scope, F>(
    shared: &Arc<Shared>,
    launcher: &Launcher<'scope>,
    mut launch: Launch,
    mut log: Option<RotatingLog>,
    vm_command: &'scope F,
) -> Result<ExitStatus, SupervisorError>
where
    F: Fn(&Instance, VmStart<'_>) -> Result<VmSpawn, SupervisorError> + Sync,
{
    let mut restore = first_restore(shared, &mut launch);
    let logged = log.is_some();
    let (status, reason) = loop {
        let Started {
            mut child,
            console_out,
            jail,
        } = launch_vm(shared, launcher, restore.take(), logged, vm_command)?;
        // Running: the launcher may return.
        drop(launch.started.take());
        if let (Some(out), Some(log)) = (console_out, log.as_mut()) {
            copy_into(out, log);
        }
        let status = child
            .wait()
            .map_err(io_err("cannot wait for the VM process"))?;
        tear_down_vm(shared, launcher, jail);
        if let Some(reason) = stop_reason(forget_vm(shared), status) {
            break (status, reason);
        }
    };
    lock(&shared.instance).mark_stopped(reason)?;
    Ok(status)
}

/// Where the first VM process goes on from: the instance's hibernation
/// (consumed as it resumes), else the launch's snapshot (kept).
fn first_restore(shared: &Shared, launch: &mut Launch) -> Option<(PathBuf, bool)> {
    let hibernation = lock(&shared.instance).hibernation();
    hibernation
        .map(|dir| (dir, true))
        .or(launch.restore.take().map(|dir| (dir, false)))
}

/// Starts one VM process on the launcher thread; if it cannot start, its
/// tap is closed and the instance recorded as stopped with the reason.
fn launch_vm<'scope, F>(
    shared: &Arc<Shared>,
    launcher: &Launcher<'scope>,
    restore: Option<(PathBuf, bool)>,
    logged: bool,
    vm_command: &'scope F,
) -> Result<Started, SupervisorError>
where
    F: Fn(&Instance, VmStart<'_>) -> Result<VmSpawn, SupervisorError> + Sync,
{
    let on_launcher = shared.clone();
    let started = launcher.run(move || {
        let started = start_vm(&on_launcher, restore.as_ref(), logged, vm_command);
        if started.is_err() {
            close_tap(&on_launcher);
        }
        started
    });
    if let Err(err) = &started {
        lock(&shared.instance).mark_stopped(kiln_vmm::report::one_line(err))?;
    }
    started
}

/// Tears down, on the launcher thread, the tap filter and the jail of the
/// VM process that ended.
fn tear_down_vm(shared: &Arc<Shared>, launcher: &Launcher<'_>, jail: Option<Arc<Jail>>) {
    let on_launcher = shared.clone();
    launcher.run(move || {
        close_tap(&on_launcher);
        if let Some(jail) = jail.and_then(Arc::into_inner) {
            jail.remove();
        }
    });
}

/// Forgets the VM process that ended (its pidfd and channel) and takes
/// what was wanted of it, leaving nothing wanted of the next.
fn forget_vm(shared: &Shared) -> Wanted {
    let mut control = lock(&shared.control);
    control.child = None;
    control.channel = None;
    std::mem::replace(&mut control.wanted, Wanted::Nothing)
}

/// Why the instance stops, its VM process having ended with `status` as
/// `wanted`; `None` for a reboot, which starts the next VM process.
fn stop_reason(wanted: Wanted, status: ExitStatus) -> Option<String> {
    match wanted {
        Wanted::Reboot => None,
        Wanted::Stop => Some("stopped on request".to_string()),
        Wanted::Hibernate => {
            let reason = "hibernated on request: RAM saved, `kiln start` resumes it";
            Some(reason.to_string())
        }
        Wanted::Nothing => Some(describe(status)),
    }
}

/// A boxed job for the launcher thread.
type Job<'scope> = Box<dyn FnOnce() + Send + 'scope>;

/// The supervisor's one unfiltered thread, which does the work that needs
/// the whole system on the main thread's behalf: starting a VM process
/// (its definition, its tap, its jail's namespaces, mounts, cgroup and
/// uid, the exec) and tearing its tap filter (`nft`) and jail down once it
/// ends. A seccomp filter is inherited by every process forked under it
/// and can never be lifted, so a filtered thread cannot start a VM
/// process; and a filter that allowed this path would allow nearly
/// everything. This thread takes jobs from the main thread only, never
/// from the API or the guest, and outlives every VM process it starts
/// (each dies with the thread that forked it: `PR_SET_PDEATHSIG`).
struct Launcher<'scope> {
    jobs: mpsc::Sender<Job<'scope>>,
}

impl<'scope> Launcher<'scope> {
    /// Starts the thread, which ends once the launcher is dropped.
    fn spawn<'env>(scope: &'scope thread::Scope<'scope, 'env>) -> Self {
        let (jobs, queue) = mpsc::channel::<Job<'scope>>();
        scope.spawn(move || queue.into_iter().for_each(|job| job()));
        Launcher { jobs }
    }

    /// Runs `job` on the launcher thread and returns what it returns.
    fn run<T: Send + 'scope>(&self, job: impl FnOnce() -> T + Send + 'scope) -> T {
        let (answer, answered) = mpsc::sync_channel(1);
        let job = Box::new(move || {
            let _ = answer.send(job());
        });
        // The thread ends only when `jobs` is dropped, and it catches no
        // panic: a job that panicked is this thread's panic too.
        self.jobs.send(job).expect("the launcher thread runs");
        answered.recv().expect("the launcher thread's job panicked")
    }
}

/// Removes what outlives the tap of the VM process that ended (its filter).
fn close_tap(shared: &Shared) {
    let instance = lock(&shared.instance);
    network::close_tap(&instance.record.id, instance.record.address);
}

/// The rotating console log, which this process's own messages join too.
fn open_console_log(instance: &Instance) -> Result<RotatingLog, SupervisorError> {
    let mut log = RotatingLog::open(
        &instance.console_log(),
        &instance.console_log_rotated(),
        CONSOLE_LOG_LIMIT,
    )?;
    // SAFETY: descriptor 2 is open for the whole life of the process:
    // std opens /dev/null on it at startup if it came closed, and nothing
    // here closes it.
    let stderr = unsafe { BorrowedFd::borrow_raw(libc::STDERR_FILENO) };
    log.carry(stderr)
        .map_err(io_err("cannot check where stderr goes"))?;
    Ok(log)
}

/// A VM process just started: the child, the read end of its console
/// pipe (a logged console), and its jail.
struct Started {
    child: std::process::Child,
    console_out: Option<io::PipeReader>,
    jail: Option<Arc<Jail>>,
}

/// Starts one VM process, going on from `restore` if given, and records
/// it as running. With `logged` console, its console (and its own
/// messages) go into a pipe whose read end is returned; its input comes
/// from `console.in`. Otherwise it has this process's terminal.
fn start_vm(
    shared: &Shared,
    restore: Option<&(PathBuf, bool)>,
    logged: bool,
    vm_command: &impl Fn(&Instance, VmStart<'_>) -> Result<VmSpawn, SupervisorError>,
) -> Result<Started, SupervisorError> {
    let (client, vm_end) = rpc::channel()?;
    let start = VmStart {
        control_fd: vm_end.as_raw_fd(),
        restore: restore.map(|(dir, consume)| (dir.as_path(), *consume)),
    };
    let VmSpawn {
        mut command,
        inherited,
        jail,
    } = {
        let mut instance = lock(&shared.instance);
        let mut spawn = vm_command(&instance, start)?;
        supervised::inherit(&mut spawn.command, vm_end.as_fd());
        let jail = spawn.jail.as_deref().map(Jail::info);
        instance.mark_running(restore.is_some(), jail)?;
        spawn
    };
    let console_out = if logged {
        let (out, vm_console) = io::pipe().map_err(io_err("console pipe"))?;
        let vm_messages = vm_console.try_clone().map_err(io_err("console pipe"))?;
        let input = lock(&shared.instance)
            .console_input_reader()
            .map_err(io_err("cannot open the console input"))?;
        command.stdin(input).stdout(vm_console).stderr(vm_messages);
        Some(out)
    } else {
        None
    };
    // The command, and with it our copies of the pipe's write end, is
    // dropped once the child is spawned: the copy into the log ends when
    // the VM process does.
    kiln_vmm::trace::mark("vm-spawn");
    let child =
        jail::spawn(&mut command, jail.is_some()).map_err(io_err("cannot start the VM process"))?;
    drop(command);
    // Only the VM process keeps its end of the channel open, and its tap.
    drop(vm_end);
    drop(inherited);
    // The child is not reaped before this: its pid is still its own.
    let pidfd = pidfd_open(Pid::from_child(&child), PidfdFlags::empty())
        .map_err(|err| io_err("cannot open a pidfd for the VM process")(err.into()))?;
    let mut control = lock(&shared.control);
    if control.wanted != Wanted::Nothing {
        end_vm(&pidfd);
    }
    control.child = Some(pidfd);
    control.channel = Some(client);
    Ok(Started {
        child,
        console_out,
        jail,
    })
}

/// Starts the proxy of the instance's published ports, to its address
/// on the bridge, under the proxy thread's seccomp filter; `None` when it
/// publishes none. The VMM process may then hold two descriptors per
/// proxied connection: its soft descriptor limit goes up to the hard one.
fn publish_ports(instance: &Instance) -> Result<Option<ProxyHandle>, SupervisorError> {
    let record = &instance.record;
    let (Some(address), false) = (record.address, record.spec.ports.is_empty()) else {
        return Ok(None);
    };
    raise_descriptor_limit().map_err(io_err("cannot raise the descriptor limit"))?;
    let proxy = Proxy::bind(&record.spec.ports)?;
    Ok(Some(proxy.spawn(address, true)?))
}

fn raise_descriptor_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit only reads the struct passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Why the VM process ended, for the record.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    let vmm_error = i32::from(kiln_vmm::machine::VMM_ERROR_STATUS);
    let violation = i32::from(kiln_vmm::sigsys::VIOLATION_STATUS);
    match (status.code(), status.signal()) {
        (Some(code), _) if code == vmm_error => {
            "the VMM failed (exit status 125; see the console log)".into()
        }
        (Some(code), _) if code == violation => format!(
            "the VMM made a forbidden system call (exit status {code}; \
             the console log's \"seccomp:\" line names it)"
        ),
        (Some(code), _) => format!("the guest shut down (entrypoint exit status {code})"),
        // The kernel kills instead of trapping when SIGSYS is blocked, as
        // it is while a thread ends.
        (None, Some(libc::SIGSYS)) => {
            "the VM process was killed by SIGSYS: a forbidden system call made \
             while signals were blocked, so unreported"
                .into()
        }
        (None, Some(signal)) => format!("the VM process was killed by signal {signal}"),
        (None, None) => format!("the VM process ended ({status})"),
    }
}

/// Asks the VM process `pidfd` refers to to end: SIGTERM (it stops the
/// VM and flushes its disks), then SIGCONT in case it was paused, so it
/// can act on it. A process that has already ended is left alone.
pub(super) fn end_vm(pidfd: &OwnedFd) {
    for signal in [Signal::TERM, Signal::CONT] {
        let _ = pidfd_send_signal(pidfd, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::Registry;
    use crate::instance::tests::spec;

    /// Runs `supervise`, which filters the thread it runs on, on a thread
    /// of its own that then parks for good: a supervisor's main thread
    /// never ends alone (the process ends with it), so its filter has no
    /// `exit`.
    fn on_a_main_thread<T: Send + 'static>(supervise: impl FnOnce() -> T + Send + 'static) -> T {
        let (result, returned) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = result.send(supervise());
            loop {
                thread::park();
            }
        });
        returned.recv().unwrap()
    }

    #[test]
    fn the_vm_process_console_goes_through_the_rotating_log() {
        let home = tempfile::tempdir().unwrap();
        let registry = Registry::new(home.path());
        let (instance, vmm) = registry.create(spec(None), None, None).unwrap();
        let id = instance.record.id.clone();
        let limit = CONSOLE_LOG_LIMIT.get();
        // A VM process whose console passes the limit, then complains on
        // stderr and ends as a guest exiting 3 would.
        let script = format!("head -c {} /dev/zero; echo done >&2; exit 3", limit + 10);
        let launch = Launch {
            restore: None,
            console: Console::Log,
            started: None,
            jailed: false,
        };
        let status = on_a_main_thread(move || {
            supervise(instance, vmm, launch, |_, _| {
                let mut command = Command::new("sh");
                command.args(["-c", &script]);
                Ok(command.into())
            })
        })
        .unwrap();
        assert_eq!(status.code(), Some(3));
        let instance = registry.find(&id).unwrap();
        assert_eq!(
            instance.record.reason.as_deref(),
            Some("the guest shut down (entrypoint exit status 3)")
        );
        assert_eq!(
            fs::metadata(instance.console_log_rotated()).unwrap().len(),
            limit
        );
        assert_eq!(
            fs::read(instance.console_log()).unwrap(),
            b"\0\0\0\0\0\0\0\0\0\0done\n"
        );
    }

    /// Waits (up to 10 s) for the instance `id`'s record to satisfy `done`.
    fn until(registry: &crate::instance::Registry, id: &str, done: impl Fn(&Instance) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done(&registry.find(id).unwrap()) {
            assert!(std::time::Instant::now() < deadline, "{id}: timed out");
            thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_reboot_then_a_stop_through_the_api_pass_every_thread_filter() {
        use std::os::unix::process::ExitStatusExt;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let home = tempfile::tempdir().unwrap();
        let registry = Registry::new(home.path());
        let (instance, vmm) = registry.create(spec(None), None, None).unwrap();
        let (id, socket) = (instance.record.id.clone(), instance.api_socket());
        let launch = Launch {
            restore: None,
            console: Console::Log,
            started: None,
            jailed: false,
        };
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        // The API, actions, launcher and main threads under their filters
        // (the launcher's unfiltered): each VM process sleeps until the
        // actions thread signals it through its pidfd.
        let supervisor = thread::spawn(move || {
            on_a_main_thread(move || {
                supervise(instance, vmm, launch, move |_, _| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let mut command = Command::new("sleep");
                    command.arg("60");
                    Ok(command.into())
                })
            })
        });
        let act = |action: &str| {
            let body = serde_json::json!({ "action": action });
            let answer = crate::api::call(&socket, "PUT", "/actions", Some(&body)).unwrap();
            assert_eq!(answer.status, 204, "{action}: {:?}", answer.body);
        };
        let running = |i: &Instance| i.record.state == super::super::State::Running;
        until(&registry, &id, running);
        act("reboot");
        until(&registry, &id, |i| {
            starts.load(Ordering::SeqCst) == 2 && running(i)
        });
        let answer = crate::api::call(&socket, "GET", "/instance", None).unwrap();
        assert_eq!(answer.status, 200);
        act("stop");
        let status = supervisor.join().unwrap().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        let record = registry.find(&id).unwrap().record;
        assert_eq!(record.state, super::super::State::Stopped);
        assert_eq!(record.reason.as_deref(), Some("stopped on request"));
    }

    #[test]
    fn a_vm_that_cannot_be_defined_stops_the_instance_with_the_reason() {
        let home = tempfile::tempdir().unwrap();
        let registry = Registry::new(home.path());
        let (instance, vmm) = registry.create(spec(Some("web")), None, None).unwrap();
        let id = instance.record.id.clone();
        let vm = VmProcess {
            kiln: "/bin/false".into(),
            store: Store::new(home.path()),
            options: RunOptions::new("vmlinux".into()),
            console: Console::Terminal,
        };
        let err = on_a_main_thread(move || run(instance, vmm, None, &vm, None)).unwrap_err();
        assert!(matches!(err, SupervisorError::Definition(_)), "{err}");
        let record = registry.find(&id).unwrap().record;
        assert_eq!(record.state, super::super::State::Stopped);
        let reason = record.reason.unwrap();
        assert!(reason.contains("hello:1.0.0"), "{reason}");
    }

    #[test]
    fn a_forbidden_system_call_is_its_own_stop_reason() {
        use std::os::unix::process::ExitStatusExt;
        let status = ExitStatus::from_raw(i32::from(kiln_vmm::sigsys::VIOLATION_STATUS) << 8);
        let reason = describe(status);
        assert!(
            reason.starts_with("the VMM made a forbidden system call (exit status 159;"),
            "{reason}"
        );
    }
}
