//! guest-init: PID 1 of every Kiln image.
//!
//! Boot sequence, as PID 1 of a VM:
//! 1. block SIGCHLD/SIGTERM/SIGINT (the supervisor takes them synchronously);
//! 2. mount /dev (devtmpfs), /dev/shm, /proc, /sys, /tmp, /run;
//! 3. if the kernel command line has `kiln.vmm=1`, gain the guest-init port
//!    and report `InitStarted` (the VMM's boot timer stops here);
//! 4. publish the instance metadata under /run/kiln (`metadata`); set the
//!    hostname, bring up `lo`; configure eth0 from the command line's
//!    `kiln.net.ip=IPV4/PREFIX` (address and netmask, then up),
//!    `kiln.net.gateway=IPV4` (the default route), `kiln.net.mtu` and
//!    `kiln.net.dns=IPV4[,IPV4…]` with `kiln.net.search` and
//!    `kiln.net.options` (/etc/resolv.conf, replaced atomically, or on a
//!    read-only root a copy in /run mounted over it), see
//!    `guest_init::network`; without
//!    `kiln.net.ip` eth0 stays down, and a malformed word or a missing eth0
//!    is said on the console and the boot goes on without the network;
//!    run executable user-data at first boot;
//! 5. read /etc/kiln/init.json with the command line's `kiln.*` overrides
//!    (see `guest_init::config`); an unusable configuration is reported on
//!    the console and ends the VM with status 127;
//! 6. run the entrypoint, reaping orphans and forwarding SIGTERM/SIGINT,
//!    and serve `kiln exec` on vsock port 5001 meanwhile
//!    (`guest_init::exec_server`);
//!    or, in function mode (`kiln.function=1` on the command line), serve
//!    invocations instead (`guest_init::function_mode`): listen on vsock
//!    port 5000, say `guest-init: function ready on vsock port 5000`, and
//!    for each request run the entrypoint afresh as the handler (payload
//!    on stdin, output captured, killed at its timeout) after reseeding
//!    the kernel's random pool with the request's seed; only SIGTERM or
//!    SIGINT ends it (status 128 + the signal), never a bad request; with
//!    `kiln.function=runtime-api` instead, start the entrypoint once as a
//!    Lambda runtime and serve it the Runtime API on 127.0.0.1:9001
//!    (`guest_init::function_runtime`);
//!    or, in a container's VM (`kiln.container=1`, the containerd shim's),
//!    run no entrypoint: serve the exec port, through which the shim runs
//!    the container's processes, and reap until SIGTERM or SIGINT;
//! 7. report `EntrypointExit(status)`, kill what is left, sync, remount /
//!    read-only (so ext4's journal is clean for the next boot) and reboot:
//!    Kiln's VMM treats the guest's reset as the end of the VM and exits
//!    with the status.
//!
//! Not PID 1 (run by hand), it only runs the entrypoint from the file and
//! exits with its status: no mounts, no port, no reboot.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use guest_init::config::{CONFIG_PATH, ConfigError, RunConfig};
use guest_init::exec::EXEC_PORT;
use guest_init::function_mode::{Mode, ServeError};
use guest_init::mounts::MountPoint;
use guest_init::network::{GUEST_RESOLV_CONF, NetConfig, RESOLV_CONF};
use guest_init::protocol::InitEvent;
use guest_init::{
    exec_server, function_mode, function_runtime, mounts, network, one_line, supervisor, user,
};

mod metadata;
mod port;

fn main() -> ExitCode {
    let signals = match supervisor::Signals::block() {
        Ok(signals) => signals,
        Err(err) => return fail(format!("cannot block signals: {err}")),
    };
    if std::process::id() != 1 {
        return run_by_hand(&signals);
    }
    let port = boot();
    let cmdline = read_cmdline();
    let user_data = publish_metadata(&cmdline);
    let role = Role::of(&cmdline);
    let status = match role.load_config(&cmdline) {
        Ok(config) => run_configured(role, &config, &cmdline, user_data.as_deref(), &signals),
        Err(err) => {
            eprintln!("guest-init: {}", one_line(&err));
            supervisor::STATUS_NOT_FOUND
        }
    };
    eprintln!("guest-init: {} with status {status}", role.ended());
    if let Some(port) = &port {
        port.report(InitEvent::EntrypointExit(status));
    }
    power_off();
    ExitCode::from(status)
}

/// Not PID 1: only the entrypoint from the file, exiting with its status.
fn run_by_hand(signals: &supervisor::Signals) -> ExitCode {
    match load_config("") {
        Ok(config) => ExitCode::from(supervisor::run(&config, signals)),
        Err(err) => fail(one_line(&err)),
    }
}

/// Publishes the instance metadata under /run/kiln (a failure is said and
/// the boot goes on); the user-data file, if there is one.
fn publish_metadata(cmdline: &str) -> Option<PathBuf> {
    metadata::publish(cmdline).unwrap_or_else(|err| {
        eprintln!("guest-init: instance metadata: {}", one_line(&err));
        None
    })
}

/// What this VM is for, from the kernel command line.
#[derive(Clone, Copy)]
struct Role {
    /// Function mode, if the VM serves invocations.
    functions: Option<Mode>,
    /// A container's VM: no entrypoint, only the exec port.
    container: bool,
}

impl Role {
    /// The role the kernel command line `cmdline` gives this VM.
    fn of(cmdline: &str) -> Role {
        Role {
            functions: function_mode::enabled(cmdline),
            container: supervisor::container_mode(cmdline),
        }
    }

    /// The run configuration: a container's from the command line alone,
    /// otherwise the file's with the command line's overrides.
    fn load_config(self, cmdline: &str) -> Result<RunConfig, LoadError> {
        if self.container {
            RunConfig::for_container(cmdline).map_err(LoadError::Invalid)
        } else {
            load_config(cmdline)
        }
    }

    /// Runs what the VM is for to its end: function mode, or the
    /// entrypoint (none in a container's VM) with `kiln exec` served.
    fn serve(self, config: &RunConfig, signals: &supervisor::Signals) -> Result<u8, ServeError> {
        match self.functions {
            None => {
                if let Err(err) = exec_server::start(config.clone()) {
                    eprintln!(
                        "guest-init: no `kiln exec` in this VM: vsock port {EXEC_PORT}: {err}"
                    );
                }
                Ok(if self.container {
                    supervisor::reap_until_stopped(signals)
                } else {
                    supervisor::run(config, signals)
                })
            }
            Some(Mode::Handler) => function_mode::serve(config, signals),
            Some(Mode::RuntimeApi) => function_runtime::serve(config, signals),
        }
    }

    /// What ended, for the last line on the console.
    fn ended(self) -> &'static str {
        if self.functions.is_some() {
            "function mode ended"
        } else if self.container {
            "container VM stopped"
        } else {
            "entrypoint exited"
        }
    }
}

/// Sets up the host (hostname, network), runs executable user-data at
/// first boot, then what the VM is for; its status.
fn run_configured(
    role: Role,
    config: &RunConfig,
    cmdline: &str,
    user_data: Option<&Path>,
    signals: &supervisor::Signals,
) -> u8 {
    configure_host(config, cmdline);
    if let Some(path) = user_data {
        metadata::run_user_data_once(path, config, signals);
    }
    role.serve(config, signals).unwrap_or_else(|err| {
        eprintln!("guest-init: function mode: {}", one_line(&err));
        supervisor::STATUS_NOT_EXECUTABLE
    })
}

/// Mounts the basic filesystems and reports that init started.
fn boot() -> Option<port::InitPort> {
    if let Err(err) = mounts::mount_all() {
        eprintln!("guest-init: {}", one_line(&err));
    }
    let port = port::InitPort::open(&read_cmdline());
    if let Some(port) = &port {
        port.report(InitEvent::InitStarted);
    }
    port
}

fn configure_host(config: &RunConfig, cmdline: &str) {
    if let Err(err) = network::set_hostname(&config.hostname) {
        eprintln!(
            "guest-init: cannot set the hostname to {:?}: {err}",
            config.hostname
        );
    }
    if let Err(err) = network::loopback_up() {
        eprintln!("guest-init: cannot bring up lo: {err}");
    }
    configure_network(cmdline);
}

/// eth0 and /etc/resolv.conf from `kiln.net.*`; any failure is said and
/// leaves the guest without the network, never without its entrypoint.
fn configure_network(cmdline: &str) {
    let net = match NetConfig::from_cmdline(cmdline) {
        Ok(Some(net)) => net,
        Ok(None) => return,
        Err(err) => {
            return eprintln!(
                "guest-init: {}; booting without the network",
                one_line(&err)
            );
        }
    };
    if let Err(err) = network::configure_interface(&net) {
        return eprintln!(
            "guest-init: {}; booting without the network",
            one_line(&err)
        );
    }
    let route = net.gateway.map(|gw| format!(", default route via {gw}"));
    let mtu = net.mtu.map(|mtu| format!(", MTU {mtu}"));
    eprintln!(
        "guest-init: {} is {}/{}{}{}",
        network::INTERFACE,
        net.address,
        net.prefix_len,
        route.unwrap_or_default(),
        mtu.unwrap_or_default()
    );
    if !net.nameservers.is_empty() {
        write_resolv_conf(&net);
    }
}

/// Writes the resolv.conf into memory ([`GUEST_RESOLV_CONF`], for a pod's
/// containers too), then into the root: replaced there when it can be;
/// otherwise (a read-only root, `kiln run --read-only`, or a root without
/// /etc) bind-mounted over the root's file, which is made if missing.
fn write_resolv_conf(net: &NetConfig) {
    let text = net.resolv_conf();
    let kept = Path::new(GUEST_RESOLV_CONF);
    let written = kept
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| network::replace_file(kept, &text));
    if let Err(err) = written {
        return eprintln!("guest-init: cannot write {GUEST_RESOLV_CONF}: {err}");
    }
    let Err(err) = network::replace_file(Path::new(RESOLV_CONF), &text) else {
        return;
    };
    if let Err(bind) = mounts::bind_into(kept, Path::new("/"), RESOLV_CONF, MountPoint::File, false)
    {
        eprintln!(
            "guest-init: cannot write {RESOLV_CONF} ({err}) nor mount {GUEST_RESOLV_CONF} on it ({bind}): the guest keeps the image's nameservers"
        );
    }
}

fn read_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// Why there is no run configuration to start the entrypoint with.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    /// The file exists but could not be read.
    #[error("cannot read {CONFIG_PATH}")]
    Read(#[source] std::io::Error),
    /// The file, or the command line's overrides, are not usable.
    #[error("{CONFIG_PATH}")]
    Invalid(#[source] ConfigError),
    /// Its user or group is not in the image's /etc/passwd or /etc/group.
    #[error("{CONFIG_PATH}: the entrypoint's user")]
    User(#[source] user::UserError),
}

fn load_config(cmdline: &str) -> Result<RunConfig, LoadError> {
    let file = match std::fs::read(CONFIG_PATH) {
        Ok(bytes) => Some(bytes),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(LoadError::Read(err)),
    };
    let mut config = RunConfig::resolve(file.as_deref(), cmdline).map_err(LoadError::Invalid)?;
    let identity = user::resolve(&config, Path::new("/")).map_err(LoadError::User)?;
    user::apply(&mut config, identity);
    Ok(config)
}

/// Ends every remaining process, leaves the root filesystem clean
/// (read-only, journal flushed), and resets the machine. Returns only if
/// the kernel refuses the reboot.
fn power_off() {
    // SAFETY: kill(-1) signals every process except PID 1 (of this PID
    // namespace); it takes no pointers.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: a null status pointer is allowed; each call reaps one child
    // and fails with ECHILD once none is left.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    if let Err(err) = mounts::remount_root_read_only() {
        eprintln!("guest-init: cannot remount / read-only: {err}");
    }
    // SAFETY: reboot takes no pointers; RB_AUTOBOOT restarts the machine
    // (in a PID namespace it ends the namespace's init instead).
    if unsafe { libc::reboot(libc::RB_AUTOBOOT) } != 0 {
        eprintln!(
            "guest-init: reboot failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("guest-init: {message}");
    ExitCode::from(supervisor::STATUS_NOT_FOUND)
}
