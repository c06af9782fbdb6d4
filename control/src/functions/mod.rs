//! Functions, Lambda-style: an image, a handler and a configuration,
//! started for each invocation from a snapshot of a VM that has already
//! booted and is waiting for work, instead of booting.
//!
//! `$KILN_HOME/functions/<name>/` holds `function.json` (the
//! [`FunctionConfig`]) and `template/`, a snapshot ([`kiln_vmm::snapshot`])
//! of an instance of the image whose guest-init runs in function mode
//! (`guest_init::function`), taken once that guest answered a ping. An
//! invocation restores the template as a clone ([`clone_vm`]: a lone VM
//! process of the invoking process, its memory mapped copy-on-write from
//! the template, its own copy of the root volume's writes, its own vsock
//! socket and CID), connects to guest-init's function port through that
//! socket, sends the payload with fresh host randomness (the clone
//! reseeds its kernel's random pool with it), reads the outcome and kills
//! the clone.
//!
//! That is the `command` mode, where guest-init starts the handler's
//! process afresh for each invocation. The default, `runtime-api` mode,
//! works as AWS Lambda SnapStart does: the template VM starts the image's
//! entrypoint once as a Lambda runtime (served Lambda's Runtime API by
//! guest-init, `guest_init::function_runtime`), and is snapshot when that
//! runtime's init is done and it waits for its first event; a clone is
//! reseeded and released from `restore/next`, and its runtime, already
//! initialized, takes the event ([`runtime::Environment`]).
pub mod clone_vm;
pub mod invoke_api;
pub mod pool;
pub mod runtime;
pub mod serve;
pub mod vsock;
pub mod working_set;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use guest_init::function::{EventResult, EventStatus, Outcome};
use guest_init::function::{
    FUNCTION_CMDLINE_FLAG, FUNCTION_PORT, Invocation, Ping, Pong, RUNTIME_API_CMDLINE_FLAG,
    SEED_BYTES,
};
use serde::{Deserialize, Serialize};

use crate::api::{self, Request, Response};
use crate::instance::lifecycle::{self, LifecycleError};
use crate::instance::snapshots::SnapshotsError;
use crate::instance::{Instance, InstanceError, Network, Registry, Spec};
use crate::jail::JailError;
use clone_vm::{CloneVm, Template};
use kiln_builder::store::StoreError;
use kiln_vmm::devices::lock;
use kiln_vmm::durable;
use kiln_vmm::report::one_line;

const CONFIG_FILE: &str = "function.json";
const TEMPLATE_DIR: &str = "template";
/// How long a new function's template VM may take to answer its first ping.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long an instance may take to start or stop.
const INSTANCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clone's guest may take to accept the connection after its
/// VMM is up (the vsock socket appears as the VM process starts).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Slack over the handler's timeout for the answer to come back.
const ANSWER_SLACK: Duration = Duration::from_secs(30);
/// The longest line read from a clone's guest-init (an `Outcome` or a
/// `Pong`), without its newline. guest-init keeps at most 1 MiB of each of
/// the handler's stdout and stderr (`OUTPUT_MAX` in its function mode), and
/// JSON makes one byte at most 6 (a control byte becomes `\u0001`), so an
/// honest outcome is under 12 MiB plus its small envelope (status, error,
/// truncation notes); 16 MiB covers that. Lambda itself caps a response at
/// 6 MB, so no real handler comes near it.
const MAX_LINE: u64 = 16 << 20;

/// How a function's VMs run it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The image's entrypoint is a Lambda runtime, started and initialized
    /// once in the template and served Lambda's Runtime API.
    RuntimeApi,
    /// The handler is a command, started afresh for each invocation with
    /// the payload on its stdin (functions made before modes existed).
    #[default]
    Command,
}

/// `LAMBDA_TASK_ROOT`: where Lambda runtimes find the function's code.
pub const TASK_ROOT: &str = "/var/task";

/// A function, as `kiln fn create` made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// What `kiln fn invoke` calls it by, and its directory's name: 1 to
    /// 64 letters, digits, '-' or '_'.
    pub name: String,
    /// NAME:VERSION of the image.
    pub image: String,
    /// How its VMs run it.
    #[serde(default)]
    pub mode: Mode,
    /// In `command` mode, the handler's command line (program and
    /// arguments, split on spaces); in `runtime-api` mode, Lambda's
    /// handler setting (`_HANDLER`, e.g. `app.handler`), or empty.
    pub handler: String,
    /// In `runtime-api` mode, the runtime's command line instead of the
    /// image's entrypoint (empty: the image's).
    #[serde(default)]
    pub entrypoint: String,
    /// The memory of the template VM, and so of every clone of it.
    pub memory_mib: u32,
    /// Each invocation's limit, in seconds: guest-init kills a handler
    /// that runs longer and answers that it timed out.
    pub timeout_s: u64,
    /// KEY=VALUE pairs for the handler's environment.
    pub env: Vec<String>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// In `runtime-api` mode, the runtime's init time in the template, in
    /// microseconds (from its start to its first wait for work).
    #[serde(default)]
    pub init_us: u64,
}

/// What can go wrong with functions.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// A file or directory of the functions could not be read or written.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the call on it said.
        #[source]
        source: io::Error,
    },
    /// A clone's scratch directory cannot be made.
    #[error(transparent)]
    Scratch(#[from] kiln_vmm::durable::ScratchError),
    /// A clone's VM definition cannot be written.
    #[error(transparent)]
    Definition(#[from] kiln_vmm::config::ConfigError),
    /// The name could not be a directory's, or is too long to list.
    #[error("function name {0:?}: expected 1 to 64 letters, digits, '-' or '_'")]
    BadName(String),
    /// An environment pair the kernel command line cannot carry.
    #[error("--env {0:?}: expected KEY=VALUE with no spaces")]
    BadEnv(String),
    /// A handler the kernel command line cannot carry.
    #[error("--handler {0:?}: expected a program (and arguments) without quotes")]
    BadHandler(String),
    /// `kiln fn create` of a name that is taken.
    #[error("a function named {0:?} exists already (`kiln fn rm` it first)")]
    Exists(String),
    /// No function has that name.
    #[error("no function named {0:?} (`kiln fn ls` lists them)")]
    NotFound(String),
    /// `function.json` is not JSON of a [`FunctionConfig`].
    #[error("{path}: not a function configuration")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// An `--entrypoint` the kernel command line cannot carry.
    #[error("--entrypoint {0:?}: expected a program (and arguments) without quotes")]
    BadEntrypoint(String),
    /// The runtime's init failed in the template VM.
    #[error(
        "function {name}: the runtime's init failed: {message}{}",
        log_end(log)
    )]
    InitFailed {
        /// The function being created.
        name: String,
        /// What guest-init saw, with the runtime's own error when it posted one.
        message: String,
        /// The end of the runtime's log.
        log: String,
    },
    /// guest-init refused a session request.
    #[error("instance {id}: guest-init refused the request: {error}")]
    Refused {
        /// The VM.
        id: String,
        /// What guest-init said.
        error: String,
    },
    /// guest-init answered a session request with the wrong kind of reply.
    #[error("instance {id}: guest-init answered {request} with {reply}")]
    Unexpected {
        /// The VM.
        id: String,
        /// The request's kind.
        request: &'static str,
        /// The reply, as debug text.
        reply: String,
    },
    /// `kiln fn serve` of a `command` function with pool options, or
    /// another use of a runtime's environments on one.
    #[error("function {0:?} runs in command mode: it has no runtime to keep warm")]
    NotRuntimeApi(String),
    /// A serve of the function runs already.
    #[error("{}: a kiln fn serve of this function is running", .0.display())]
    AlreadyServed(PathBuf),
    /// The template VM's guest-init never answered a ping: the image may
    /// not have guest-init, or its guest did not boot.
    #[error(
        "function {name}: its VM did not answer on vsock port {FUNCTION_PORT} within {waited:?}"
    )]
    NotReady {
        /// The function being created.
        name: String,
        /// How long its VM was given.
        waited: Duration,
        /// Why the last ping failed.
        #[source]
        last: io::Error,
    },
    /// The invocation could not be sent, or its outcome not read.
    #[error("instance {id}: talking to its function")]
    Invoke {
        /// The clone that ran it.
        id: String,
        /// What the vsock stream said.
        #[source]
        source: io::Error,
    },
    /// The outcome guest-init sent is not JSON of an [`Outcome`].
    #[error("instance {id}: guest-init answered nonsense")]
    Answer {
        /// The clone that ran it.
        id: String,
        /// Why the outcome does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// `kiln fn serve --listen` was not given an address that resolves.
    #[error("--listen {listen}: expected HOST:PORT")]
    Listen {
        /// The address as given.
        listen: String,
        /// Why it does not resolve.
        #[source]
        source: io::Error,
    },
    /// A function URL would be served beyond this host without
    /// `--allow-remote`.
    #[error(
        "--listen {listen}: {address} is not a loopback address, and a function URL has no authentication: anyone on that network could invoke it (pass --allow-remote to serve it there anyway)"
    )]
    Remote {
        /// The address as given.
        listen: String,
        /// The first address it resolves to that is not loopback.
        address: SocketAddr,
    },
    /// A clone's VM process could not be started.
    #[error("clone {id}: cannot start its VM process")]
    Spawn {
        /// The clone.
        id: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The template's image is not in the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The template snapshot is damaged or missing.
    #[error(transparent)]
    Snapshot(#[from] SnapshotsError),
    /// The template VM could not be launched, snapshot or terminated.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// The template VM's record could not be had or forgotten.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// A clone's jail cannot be set up.
    #[error("clone {id}: cannot jail its VM process")]
    Jail {
        /// The clone.
        id: String,
        /// Why not.
        #[source]
        source: JailError,
    },
    /// The jail's settings (`KILN_JAIL`, `KILN_JAIL_UIDS`) are not valid.
    #[error(transparent)]
    JailSettings(#[from] JailError),
}

/// The runtime's log, for an error message: said after the message, or
/// nothing when the runtime wrote nothing.
fn log_end(log: &str) -> String {
    let log = log.trim_end();
    if log.is_empty() {
        String::new()
    } else {
        format!("; the runtime's log ends:\n{log}")
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FunctionError + '_ {
    move |source| FunctionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The functions of one `$KILN_HOME`.
pub struct Functions {
    /// `$KILN_HOME`.
    home: PathBuf,
    root: PathBuf,
    registry: Registry,
    /// The `kiln` binary, which instances' VMM processes run.
    kiln: PathBuf,
}

/// What an invocation answered, by the function's mode.
#[derive(Clone, Debug)]
pub enum Reply {
    /// A `command` handler's run.
    Command(Outcome),
    /// A runtime's answer to the event.
    Runtime(EventResult),
}

impl Reply {
    /// The function answered without an error, a failure or a timeout.
    pub fn succeeded(&self) -> bool {
        match self {
            Reply::Command(outcome) => outcome.error.is_none() && outcome.status == 0,
            Reply::Runtime(result) => result.status == EventStatus::Response,
        }
    }
}

/// One invocation's result and what it cost.
#[derive(Clone, Debug)]
pub struct Invoked {
    /// What the function answered.
    pub reply: Reply,
    /// From asking for the clone to the outcome's arrival.
    pub latency: Duration,
    /// The clone that ran it (killed by now).
    pub instance_id: String,
}

fn check_name(name: &str) -> Result<(), FunctionError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_');
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err(FunctionError::BadName(name.to_string()));
    }
    Ok(())
}

impl FunctionConfig {
    /// The template VM's kernel command line: function mode, the handler
    /// as the entrypoint (`command`) or the runtime's entrypoint and
    /// Lambda's environment (`runtime-api`), and the user's environment.
    fn cmdline(&self) -> Result<String, FunctionError> {
        let mut words = match self.mode {
            Mode::Command => {
                if self.handler.trim().is_empty() || self.handler.contains('"') {
                    return Err(FunctionError::BadHandler(self.handler.clone()));
                }
                vec![
                    FUNCTION_CMDLINE_FLAG.to_string(),
                    format!("kiln.entrypoint=\"{}\"", self.handler.trim()),
                ]
            }
            Mode::RuntimeApi => self.runtime_words()?,
        };
        for pair in &self.env {
            if !pair.contains('=') || pair.contains(char::is_whitespace) || pair.contains('"') {
                return Err(FunctionError::BadEnv(pair.clone()));
            }
            words.push(format!("kiln.env={pair}"));
        }
        Ok(words.join(" "))
    }
}

impl FunctionConfig {
    /// `runtime-api` mode's words: the flag, the entrypoint if given, and
    /// the environment Lambda gives a runtime.
    fn runtime_words(&self) -> Result<Vec<String>, FunctionError> {
        if self.handler.contains(char::is_whitespace) || self.handler.contains('"') {
            return Err(FunctionError::BadHandler(self.handler.clone()));
        }
        if self.entrypoint.contains('"') {
            return Err(FunctionError::BadEntrypoint(self.entrypoint.clone()));
        }
        let mut words = vec![RUNTIME_API_CMDLINE_FLAG.to_string()];
        if !self.entrypoint.trim().is_empty() {
            words.push(format!("kiln.entrypoint=\"{}\"", self.entrypoint.trim()));
        }
        let mut env = vec![
            ("AWS_LAMBDA_FUNCTION_NAME", self.name.clone()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                self.memory_mib.to_string(),
            ),
            ("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start".into()),
            ("LAMBDA_TASK_ROOT", TASK_ROOT.into()),
            ("AWS_REGION", runtime::REGION.into()),
            ("AWS_DEFAULT_REGION", runtime::REGION.into()),
        ];
        if !self.handler.is_empty() {
            env.push(("_HANDLER", self.handler.clone()));
        }
        words.extend(env.into_iter().map(|(k, v)| format!("kiln.env={k}={v}")));
        Ok(words)
    }
}

impl Functions {
    /// The functions of `home` (`$KILN_HOME`), whose instances' VMM
    /// processes run the `kiln` binary at `kiln`.
    pub fn new(home: &Path, kiln: &Path) -> Self {
        Functions {
            home: home.to_path_buf(),
            root: home.join("functions"),
            registry: Registry::new(home),
            kiln: kiln.to_path_buf(),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `kiln fn create`: boots the image once in function mode, waits until
    /// guest-init answers a ping (`command`) or the runtime's init is done
    /// (`runtime-api`), takes the template snapshot and ends the VM. The
    /// function appears whole (staged, then renamed) or not at all; its
    /// configuration as stored (with the init time) is returned.
    pub fn create(&self, config: &FunctionConfig) -> Result<FunctionConfig, FunctionError> {
        check_name(&config.name)?;
        let dir = self.dir(&config.name);
        if dir.exists() {
            return Err(FunctionError::Exists(config.name.clone()));
        }
        let spec = Spec {
            name: None,
            image: config.image.clone(),
            instance_type: "custom".into(),
            vcpus: 1,
            memory_mib: config.memory_mib,
            cmdline: config.cmdline()?,
            // A function is reached through vsock; its clones share the
            // template's guest, which could hold only one address.
            network: Network::None,
            private_ip: None,
            ports: Vec::new(),
        };
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.new-", config.name))
            .tempdir_in(&self.root)
            .map_err(io_err(&self.root))?;
        let instance = lifecycle::launch(&self.registry, spec, None, &self.kiln, INSTANCE_TIMEOUT)?;
        let made = self.make_template(&instance, config, staging.path());
        // The template VM's work is done either way.
        lifecycle::terminate(instance, INSTANCE_TIMEOUT)?.forget()?;
        let made = made?;
        durable::rename_dir(&staging.keep(), &dir).map_err(io_err(&dir))?;
        Ok(made)
    }

    fn make_template(
        &self,
        instance: &Instance,
        config: &FunctionConfig,
        staging: &Path,
    ) -> Result<FunctionConfig, FunctionError> {
        let mut config = config.clone();
        match config.mode {
            Mode::Command => wait_ready(instance, &config.name)?,
            Mode::RuntimeApi => {
                let init = wait_init(instance, &config.name)?;
                log::info!(
                    "function {}: init done in {} us, the runtime waits in {:?}",
                    config.name,
                    init.init_us,
                    init.phase
                );
                config.init_us = init.init_us;
            }
        }
        lifecycle::snapshot(instance, &staging.join(TEMPLATE_DIR))?;
        let path = staging.join(CONFIG_FILE);
        let json = serde_json::to_vec_pretty(&config).expect("a config serializes");
        fs::write(&path, json)
            .and_then(|()| fs::File::open(&path)?.sync_all())
            .map_err(io_err(&path))?;
        Ok(config)
    }

    /// The function `name`.
    pub fn get(&self, name: &str) -> Result<FunctionConfig, FunctionError> {
        check_name(name)?;
        let path = self.dir(name).join(CONFIG_FILE);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(FunctionError::NotFound(name.to_string()));
            }
            Err(err) => return Err(io_err(&path)(err)),
        };
        serde_json::from_slice(&bytes).map_err(|source| FunctionError::Config { path, source })
    }

    /// Every function, by name.
    pub fn list(&self) -> Result<Vec<FunctionConfig>, FunctionError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io_err(&self.root)(err)),
        };
        let mut functions = Vec::new();
        for entry in entries {
            let name = entry.map_err(io_err(&self.root))?.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with('.') {
                functions.push(self.get(&name)?);
            }
        }
        functions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(functions)
    }

    /// `kiln fn rm`: the function and its template.
    pub fn remove(&self, name: &str) -> Result<(), FunctionError> {
        self.get(name)?;
        let dir = self.dir(name);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// One invocation in a fresh clone of the template, killed after.
    pub fn invoke(&self, name: &str, payload: &str) -> Result<Invoked, FunctionError> {
        self.invoke_then(name, payload, |_| {})
    }

    /// `count` invocations of `name`, `concurrency` at a time (each
    /// thread takes the next until all are taken), each in a fresh clone;
    /// the results in the order they finished. `kiln fn invoke --count`
    /// times these.
    pub fn invoke_many(
        &self,
        name: &str,
        payload: &str,
        count: usize,
        concurrency: usize,
    ) -> Result<Vec<Result<Invoked, FunctionError>>, FunctionError> {
        let config = self.get(name)?;
        let template = self.template(name)?;
        let next = Mutex::new(0usize);
        let results = Mutex::new(Vec::with_capacity(count));
        std::thread::scope(|scope| {
            for _ in 0..concurrency.min(count) {
                scope.spawn(|| {
                    while take_one(&next, count) {
                        let result = invoke_clone(&config, &template, payload, |_| {});
                        lock(&results).push(result);
                    }
                });
            }
        });
        Ok(results.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// [`invoke`](Self::invoke), handing the outcome to `answered` as
    /// soon as it arrives, before the clone is killed: `kiln fn invoke`
    /// prints the response without waiting for the teardown.
    pub fn invoke_then(
        &self,
        name: &str,
        payload: &str,
        answered: impl FnOnce(&Reply),
    ) -> Result<Invoked, FunctionError> {
        let config = self.get(name)?;
        invoke_clone(&config, &self.template(name)?, payload, answered)
    }

    /// The template of function `name`, from which its clones are
    /// restored.
    pub fn template(&self, name: &str) -> Result<Template, FunctionError> {
        Template::open(&self.home, &self.dir(name).join(TEMPLATE_DIR), &self.kiln)
    }
}

/// One invocation of the function `config` in a fresh clone of its
/// `template`, the outcome handed to `answered` before the clone is
/// killed.
fn invoke_clone(
    config: &FunctionConfig,
    template: &Template,
    payload: &str,
    answered: impl FnOnce(&Reply),
) -> Result<Invoked, FunctionError> {
    let started = Instant::now();
    let (clone, reply) = match config.mode {
        Mode::Command => {
            let clone = template.restore()?;
            let reply = call(&clone, config, payload).map(Reply::Command);
            (clone, reply)
        }
        Mode::RuntimeApi => {
            let (clone, mut session) = restore_clone(template)?;
            let input = invoke_api::Input {
                payload: payload.to_string(),
                client_context: None,
            };
            let reply = session.invoke(config, &input).map(Reply::Runtime);
            kiln_vmm::trace::mark("answered");
            (clone, reply)
        }
    };
    let latency = started.elapsed();
    if let Ok(reply) = &reply {
        answered(reply);
        template.learn_working_set(&clone);
    }
    Ok(Invoked {
        reply: reply?,
        latency,
        // The clone is killed as it goes, after this.
        instance_id: clone.id().to_string(),
    })
}

/// A new clone of a `runtime-api` function's `template`, made a machine
/// of its own and its runtime released from `restore/next`; killed again
/// if that fails.
pub fn restore_clone(template: &Template) -> Result<(CloneVm, runtime::Session), FunctionError> {
    let clone = template.restore()?;
    let mut session =
        runtime::Session::connect(clone.id(), &clone.vsock_socket(), CONNECT_TIMEOUT)?;
    kiln_vmm::trace::mark("guest-connected");
    session.restore()?;
    kiln_vmm::trace::mark("guest-restored");
    Ok((clone, session))
}

/// Takes one of `count` invocations if any is left.
fn take_one(taken: &Mutex<usize>, count: usize) -> bool {
    let mut taken = lock(taken);
    let left = *taken < count;
    *taken += usize::from(left);
    left
}

impl Functions {
    /// `kiln fn serve`: a function URL. Each HTTP request's body is one
    /// invocation's payload; the answer is the handler's stdout (as JSON
    /// when it is JSON, else a JSON string) with 200, or 502 with the
    /// handler's status and stderr when it failed. Requests are served one
    /// at a time; `max_requests` ends the server after that many.
    pub fn serve(
        &self,
        name: &str,
        listener: &TcpListener,
        max_requests: Option<usize>,
    ) -> Result<(), FunctionError> {
        self.get(name)?;
        let mut served = 0;
        while max_requests.is_none_or(|max| served < max) {
            let (stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(err) => {
                    log::warn!("fn serve: cannot accept a connection: {}", one_line(&err));
                    continue;
                }
            };
            served += 1;
            let answered = api::serve_one(stream, |request| self.answer(name, request));
            if let Err(err) = answered {
                log::warn!("fn serve: cannot answer a request: {}", one_line(&err));
            }
        }
        Ok(())
    }

    fn answer(&self, name: &str, request: Request) -> Response {
        if request.method != "POST" && request.method != "PUT" {
            return Response::error(405, "send the payload with POST");
        }
        let payload = String::from_utf8_lossy(&request.body);
        match self.invoke(name, &payload) {
            Ok(Invoked {
                reply: Reply::Command(outcome),
                ..
            }) => command_response(outcome),
            Ok(Invoked {
                reply: Reply::Runtime(result),
                ..
            }) => runtime_response(result),
            Err(err) => Response::error(500, one_line(&err)),
        }
    }
}

/// A function URL's answer to a `command` handler's run: its stdout (as
/// JSON when it is JSON, else a JSON string) with 200, or 502 with its
/// status and stderr when it failed.
fn command_response(outcome: Outcome) -> Response {
    if outcome.error.is_none() && outcome.status == 0 {
        return Response::json(200, json_or_string(outcome.stdout));
    }
    Response::json(
        502,
        serde_json::json!({
            "error": outcome.error.unwrap_or_else(|| "the handler failed".into()),
            "status": outcome.status,
            "timed_out": outcome.timed_out,
            "stderr": outcome.stderr,
        }),
    )
}

/// A function URL's answer to a runtime's: its response with 200, or its
/// error JSON with 502.
fn runtime_response(result: EventResult) -> Response {
    let status = if result.status == EventStatus::Response {
        200
    } else {
        502
    };
    Response::json(status, json_or_string(result.body))
}

fn json_or_string(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

/// Whether `address` is on this host only: 127.0.0.0/8, ::1, or ::1's
/// IPv4-mapped form of a 127 address.
pub fn is_loopback(address: &SocketAddr) -> bool {
    address.ip().to_canonical().is_loopback()
}

/// The addresses `kiln fn serve --listen LISTEN` binds: those LISTEN
/// resolves to, all of them loopback unless `allow_remote`, since a
/// function URL answers anyone who reaches it (it has no authentication).
/// Checked before binding, so a refused address is never listened on.
pub fn listen_addresses(
    listen: &str,
    allow_remote: bool,
) -> Result<Vec<SocketAddr>, FunctionError> {
    let addresses: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|source| FunctionError::Listen {
            listen: listen.to_string(),
            source,
        })?
        .collect();
    if !allow_remote && let Some(address) = addresses.iter().find(|a| !is_loopback(a)) {
        return Err(FunctionError::Remote {
            listen: listen.to_string(),
            address: *address,
        });
    }
    Ok(addresses)
}

/// Pings guest-init in `instance` until it answers.
fn wait_ready(instance: &Instance, name: &str) -> Result<(), FunctionError> {
    let started = Instant::now();
    loop {
        let answered =
            vsock::connect(&instance.vsock_socket(), FUNCTION_PORT, CONNECT_TIMEOUT).and_then(ping);
        match answered {
            Ok(()) => return Ok(()),
            Err(err) if started.elapsed() > READY_TIMEOUT => {
                return Err(FunctionError::NotReady {
                    name: name.to_string(),
                    waited: READY_TIMEOUT,
                    last: err,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Sends guest-init's function port a ping on `stream` and reads the pong.
pub fn ping(mut stream: std::os::unix::net::UnixStream) -> io::Result<()> {
    write_line(&mut stream, &Ping { ping: true })?;
    let answer = read_line(&mut stream)?;
    match serde_json::from_str::<Pong>(&answer) {
        Ok(Pong { pong: true }) => Ok(()),
        _ => Err(io::Error::other(format!("not a pong: {answer:?}"))),
    }
}

/// Waits until the runtime in the template VM `instance` has initialized.
fn wait_init(instance: &Instance, name: &str) -> Result<runtime::Initialized, FunctionError> {
    // The template boots a fresh guest before guest-init listens: that
    // is part of its init's time, and slow under nested emulation.
    runtime::Session::connect(&instance.record.id, &instance.vsock_socket(), READY_TIMEOUT)?
        .wait_init(name, READY_TIMEOUT)
}

/// Sends one invocation to the function in `clone` and reads its outcome.
fn call(clone: &CloneVm, config: &FunctionConfig, payload: &str) -> Result<Outcome, FunctionError> {
    let id = &clone.id().to_string();
    let invoke_err = |source| FunctionError::Invoke {
        id: id.clone(),
        source,
    };
    let invocation = Invocation {
        payload: payload.to_string(),
        timeout_ms: config.timeout_s * 1000,
        seed: random_seed().map_err(invoke_err)?,
        // Each clone is a host of its own, as it is an instance of its own.
        hostname: Some(id.clone()),
    };
    let mut stream = vsock::connect(&clone.vsock_socket(), FUNCTION_PORT, CONNECT_TIMEOUT)
        .map_err(invoke_err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(config.timeout_s) + ANSWER_SLACK))
        .map_err(invoke_err)?;
    write_line(&mut stream, &invocation).map_err(invoke_err)?;
    let answer = read_line(&mut stream).map_err(invoke_err)?;
    serde_json::from_str(&answer).map_err(|source| FunctionError::Answer {
        id: id.clone(),
        source,
    })
}

fn write_line(stream: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// One line, without its newline, of at most [`MAX_LINE`] bytes; the
/// stream's end before a newline, or no newline within the limit, is an
/// error.
fn read_line(stream: &mut impl Read) -> io::Result<String> {
    let mut line = String::new();
    // The clone's guest is not trusted to keep its line short: reading is
    // cut off one byte past the limit, so memory stays bounded.
    BufReader::new(stream.take(MAX_LINE + 1)).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(if line.len() as u64 > MAX_LINE {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the function's answer has no newline within {MAX_LINE} bytes"),
            )
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the function closed the stream without an answer",
            )
        });
    }
    line.pop();
    Ok(line)
}

/// [`SEED_BYTES`] from the host's random source, as hex.
fn random_seed() -> io::Result<String> {
    let mut bytes = [0u8; SEED_BYTES];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_taking_invocations_take_each_exactly_once() {
        let taken = std::sync::Mutex::new(0);
        let runs = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    while super::take_one(&taken, 1000) {
                        runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(runs.into_inner(), 1000);
        assert!(!super::take_one(&taken, 1000));
    }

    use super::*;

    fn config(handler: &str, env: &[&str]) -> FunctionConfig {
        FunctionConfig {
            name: "echo".into(),
            image: "python:3.11".into(),
            mode: Mode::Command,
            handler: handler.into(),
            entrypoint: String::new(),
            memory_mib: 256,
            timeout_s: 5,
            env: env.iter().map(|e| e.to_string()).collect(),
            created_at: 0,
            init_us: 0,
        }
    }

    #[test]
    fn a_runtime_gets_lambdas_environment_and_its_entrypoint() {
        let mut runtime = config("app.handler", &["A=1"]);
        runtime.mode = Mode::RuntimeApi;
        assert_eq!(
            runtime.cmdline().unwrap(),
            "kiln.function=runtime-api kiln.env=AWS_LAMBDA_FUNCTION_NAME=echo \
             kiln.env=AWS_LAMBDA_FUNCTION_VERSION=$LATEST kiln.env=AWS_LAMBDA_FUNCTION_MEMORY_SIZE=256 \
             kiln.env=AWS_LAMBDA_INITIALIZATION_TYPE=snap-start kiln.env=LAMBDA_TASK_ROOT=/var/task \
             kiln.env=AWS_REGION=us-east-1 kiln.env=AWS_DEFAULT_REGION=us-east-1 \
             kiln.env=_HANDLER=app.handler kiln.env=A=1"
        );
        runtime.entrypoint = "/usr/bin/python3 /app/runtime.py".into();
        runtime.handler = String::new();
        let line = runtime.cmdline().unwrap();
        assert!(
            line.starts_with(
                "kiln.function=runtime-api kiln.entrypoint=\"/usr/bin/python3 /app/runtime.py\" "
            ),
            "{line}"
        );
        assert!(!line.contains("_HANDLER"), "{line}");
        runtime.handler = "two words".into();
        assert!(matches!(
            runtime.cmdline(),
            Err(FunctionError::BadHandler(_))
        ));
        runtime.handler = String::new();
        runtime.entrypoint = "say \"hi\"".into();
        assert!(matches!(
            runtime.cmdline(),
            Err(FunctionError::BadEntrypoint(_))
        ));
    }

    #[test]
    fn configs_from_before_modes_are_command_functions() {
        let old = r#"{"name":"echo","image":"python-echo:1.0.0","handler":"cat",
            "memory_mib":128,"timeout_s":30,"env":[],"created_at":1}"#;
        let config: FunctionConfig = serde_json::from_str(old).unwrap();
        assert_eq!((config.mode, config.init_us), (Mode::Command, 0));
    }

    #[test]
    fn the_template_runs_guest_init_in_function_mode_with_the_handler() {
        let line = config("python3 /app/echo.py", &["A=1", "B=x=y"])
            .cmdline()
            .unwrap();
        assert_eq!(
            line,
            "kiln.function=1 kiln.entrypoint=\"python3 /app/echo.py\" kiln.env=A=1 kiln.env=B=x=y"
        );
    }

    #[test]
    fn bad_names_handlers_and_env_are_refused_by_value() {
        assert!(matches!(check_name("a/b"), Err(FunctionError::BadName(_))));
        assert!(check_name("echo-2_x").is_ok());
        let err = config("say \"hi\"", &[]).cmdline().unwrap_err();
        assert!(err.to_string().contains("say"), "{err}");
        let err = config("cat", &["NOEQUALS"]).cmdline().unwrap_err();
        assert!(err.to_string().contains("NOEQUALS"), "{err}");
        assert!(config("cat", &["A=has space"]).cmdline().is_err());
    }

    #[test]
    fn seeds_are_fresh_hex_of_the_agreed_length() {
        let (a, b) = (random_seed().unwrap(), random_seed().unwrap());
        assert_eq!(a.len(), SEED_BYTES * 2);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_line_is_read_whole_or_the_stream_ended_early() {
        assert_eq!(
            read_line(&mut &b"{\"pong\":true}\nrest"[..]).unwrap(),
            "{\"pong\":true}"
        );
        let err = read_line(&mut &b"{\"pong\""[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_endless_line_is_cut_off_at_the_limit() {
        let mut endless = io::repeat(b'x');
        let err = read_line(&mut endless).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&MAX_LINE.to_string()), "{err}");
        // A line of exactly the limit is still an answer.
        let mut longest = io::repeat(b'x').take(MAX_LINE).chain(&b"\nrest"[..]);
        assert_eq!(read_line(&mut longest).unwrap().len() as u64, MAX_LINE);
    }

    #[test]
    fn a_function_url_listens_on_loopback_unless_remote_is_allowed() {
        for local in [
            "127.0.0.1:8080",
            "127.1.2.3:80",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            let addresses = listen_addresses(local, false).unwrap();
            assert_eq!(addresses, vec![local.parse().unwrap()], "{local}");
        }
        for remote in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.1.2.3:80",
            "[::ffff:10.0.0.1]:80",
        ] {
            let err = listen_addresses(remote, false).unwrap_err();
            assert!(
                matches!(err, FunctionError::Remote { .. }),
                "{remote}: {err}"
            );
            assert!(err.to_string().contains(remote), "{err}");
            assert!(err.to_string().contains("--allow-remote"), "{err}");
            let allowed = listen_addresses(remote, true).unwrap();
            assert!(!is_loopback(&allowed[0]), "{remote}");
        }
        let err = listen_addresses("8080", false).unwrap_err();
        assert!(matches!(err, FunctionError::Listen { .. }), "{err}");
    }

    #[test]
    fn an_unknown_function_is_named() {
        let home = tempfile::tempdir().unwrap();
        let functions = Functions::new(home.path(), Path::new("kiln"));
        assert!(functions.list().unwrap().is_empty());
        let err = functions.get("nope").unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
