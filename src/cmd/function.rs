//! `kiln fn create|ls|rm|invoke|serve`: Lambda-style functions, each
//! invocation a fresh clone of a snapshot of the booted function VM.
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use kiln_bench::stats::Stats;
use kiln_bench::timing::millis;
use kiln_control::functions::invoke_api::PoolStatus;
use kiln_control::functions::serve::ServeOptions;
use kiln_control::functions::{
    EventStatus, FunctionConfig, Functions, Invoked, Mode, Reply, is_loopback, listen_addresses,
};

use crate::assets::kiln_home;
use crate::cmd::format::Output;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a function: boot IMAGE once, let its Lambda runtime
    /// initialize (or, with --mode command, guest-init wait for
    /// invocations), and keep a snapshot of it as the function's template.
    Create(CreateArgs),
    /// List the functions.
    Ls {
        #[command(flatten)]
        output: Output,
    },
    /// Remove a function and its template.
    Rm { name: String },
    /// Invoke a function: its stdout is printed, and kiln exits with its status.
    Invoke(InvokeArgs),
    /// Serve a function: Lambda's Invoke API for a runtime-api function
    /// (boto3, the AWS CLI: point their endpoint URL here), with warm
    /// environments; a function URL for a command one (each HTTP request
    /// body is a payload, the response the handler's stdout). Ends on
    /// SIGINT or SIGTERM, terminating every environment.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
pub struct CreateArgs {
    name: String,
    /// NAME:VERSION from the local store.
    #[arg(long)]
    image: String,
    /// runtime-api: the image's entrypoint is a Lambda runtime, served
    /// Lambda's Runtime API, initialized once and snapshot waiting for
    /// its first event. command: --handler is a command run afresh for
    /// each invocation, the payload on its stdin.
    #[arg(long, value_enum, default_value_t = ModeArg::RuntimeApi)]
    mode: ModeArg,
    /// runtime-api: Lambda's handler setting (`_HANDLER`, e.g.
    /// app.handler). command: the program (and arguments) each
    /// invocation runs.
    #[arg(long, default_value = "")]
    handler: String,
    /// runtime-api: the runtime's command line instead of the image's
    /// entrypoint.
    #[arg(long, default_value = "")]
    entrypoint: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Seconds an invocation may run before it is killed.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// KEY=VALUE for the handler's environment (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
}

#[derive(clap::Args)]
pub struct InvokeArgs {
    name: String,
    /// The payload: text (usually JSON), or @FILE.
    #[arg(long, default_value = "")]
    payload: String,
    /// Invocations to run (then latency percentiles are printed instead).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Invocations in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    name: String,
    /// Where to listen (HOST:PORT). The URL has no authentication, so
    /// only loopback addresses are accepted without --allow-remote.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Listen on a non-loopback address too: anyone who can reach it
    /// can invoke the function.
    #[arg(long)]
    allow_remote: bool,
    /// Stop after this many requests (default: serve forever).
    #[arg(long)]
    max_requests: Option<usize>,
    /// runtime-api: the most environments (clones) at once; more
    /// concurrent events wait for one to come free.
    #[arg(long, default_value_t = 4)]
    max_concurrency: usize,
    /// runtime-api: seconds an idle environment stays warm (its
    /// runtime waiting for the next event) before it is terminated.
    #[arg(long, default_value_t = 300)]
    keep_warm: u64,
}

/// `--mode`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ModeArg {
    /// A Lambda runtime, served the Runtime API, initialized once.
    RuntimeApi,
    /// A command per invocation.
    Command,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    let kiln = std::env::current_exe().context("cannot find the kiln binary")?;
    let functions = Functions::new(&kiln_home(), &kiln);
    match command {
        Command::Create(args) => create(&functions, args)?,
        Command::Ls { output } => ls(&functions, output)?,
        Command::Rm { name } => functions.remove(&name)?,
        Command::Invoke(args) => return invoke(&functions, args),
        Command::Serve(args) => serve(&functions, args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn create(functions: &Functions, args: CreateArgs) -> anyhow::Result<()> {
    let made = functions.create(&args.config()?)?;
    match made.mode {
        Mode::RuntimeApi => println!(
            "function {} ready (init {:.1} ms)",
            made.name,
            made.init_us as f64 / 1000.0
        ),
        Mode::Command => println!("function {} ready", made.name),
    }
    Ok(())
}

impl CreateArgs {
    /// The function's configuration; flags its mode has no use for are
    /// refused rather than silently ignored.
    fn config(self) -> anyhow::Result<FunctionConfig> {
        let mode = match self.mode {
            ModeArg::RuntimeApi => Mode::RuntimeApi,
            ModeArg::Command if self.handler.is_empty() => {
                anyhow::bail!("--mode command: expected --handler CMD, the command to run")
            }
            ModeArg::Command if !self.entrypoint.is_empty() => {
                anyhow::bail!("--entrypoint: only --mode runtime-api has a runtime to start")
            }
            ModeArg::Command => Mode::Command,
        };
        Ok(FunctionConfig {
            name: self.name,
            image: self.image,
            mode,
            handler: self.handler,
            entrypoint: self.entrypoint,
            memory_mib: self.memory,
            timeout_s: self.timeout,
            env: self.env,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            init_us: 0,
        })
    }
}

fn ls(functions: &Functions, output: Output) -> anyhow::Result<()> {
    // Environments exist only while a serve runs.
    let listed: Vec<Listed> = functions
        .list()?
        .into_iter()
        .map(|config| Listed {
            pool: functions.served_status(&config.name),
            config,
        })
        .collect();
    if !output.json(&listed)? {
        print_functions(&listed);
    }
    Ok(())
}

fn invoke(functions: &Functions, args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let InvokeArgs {
        name,
        payload,
        count,
        concurrency,
    } = args;
    let payload = match payload.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("--payload @{path}"))?
        }
        None => payload,
    };
    if count == 1 {
        return invoke_once(functions, &name, &payload);
    }
    invoke_many(functions, &name, &payload, count, concurrency)?;
    Ok(ExitCode::SUCCESS)
}

fn serve(functions: &Functions, args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        name,
        listen,
        allow_remote,
        max_requests,
        max_concurrency,
        keep_warm,
    } = args;
    if max_concurrency == 0 {
        anyhow::bail!("--max-concurrency 0: expected at least 1");
    }
    let (listener, bound) = bind(&listen, allow_remote, &name)?;
    if functions.get(&name)?.mode == Mode::Command {
        eprintln!("kiln: serving function {name} on http://{bound}/");
        functions.serve(&name, &listener, max_requests)?;
        return Ok(());
    }
    let options = ServeOptions {
        max_concurrency,
        keep_warm: Duration::from_secs(keep_warm),
        max_requests,
    };
    let stop = stop_on_signals()?;
    eprintln!(
        "kiln: serving function {name}: Lambda's Invoke API on http://{bound}/ \
         (up to {max_concurrency} environments, warm for {keep_warm} s)"
    );
    functions.serve_runtime(&name, &listener, options, stop)?;
    Ok(())
}

/// A listener on `--listen` and the address it got (the port may have
/// been 0), warning when that address is not loopback: the URL has no
/// authentication, so anyone who reaches it can invoke function `name`.
fn bind(listen: &str, allow_remote: bool, name: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let addresses = listen_addresses(listen, allow_remote)?;
    let listener =
        TcpListener::bind(&addresses[..]).with_context(|| format!("--listen {listen}"))?;
    let bound = listener
        .local_addr()
        .with_context(|| format!("--listen {listen}"))?;
    if !is_loopback(&bound) {
        eprintln!(
            "kiln: warning: http://{bound}/ has no authentication: anyone who can reach this host there can invoke function {name}"
        );
    }
    Ok((listener, bound))
}

/// Set by [`on_stop_signal`].
static STOP: AtomicBool = AtomicBool::new(false);

/// A flag set once SIGINT, SIGTERM or SIGHUP arrives, so the serve can end
/// cleanly and terminate its environments. A handler, not a blocked mask:
/// the VMM processes the serve starts must not inherit blocked signals.
fn stop_on_signals() -> anyhow::Result<&'static AtomicBool> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is plain data; all zeroes is a valid value
        // (empty mask, no flags), the handler is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
        // SAFETY: `action` is initialized and outlives the call; the old
        // action is not asked for; the handler only stores to an atomic,
        // which is async-signal-safe.
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
            anyhow::bail!(
                "cannot take signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(&STOP)
}

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn invoke_once(functions: &Functions, name: &str, payload: &str) -> anyhow::Result<ExitCode> {
    if let Some(served) = functions.invoke_served(name, payload) {
        let result =
            served.with_context(|| format!("function {name}: through its kiln fn serve"))?;
        let reply = Reply::Runtime(result);
        print_reply(&reply);
        return Ok(exit_code(name, reply));
    }
    // The response is printed as it arrives, before the clone is killed.
    let Invoked { reply, .. } = functions.invoke_then(name, payload, print_reply)?;
    Ok(exit_code(name, reply))
}

/// The status `kiln fn invoke` exits with: a command's own, or 0 for a
/// runtime's response and 1 for its error.
fn exit_code(name: &str, reply: Reply) -> ExitCode {
    match reply {
        Reply::Command(outcome) => {
            if let Some(error) = &outcome.error {
                eprintln!("kiln: function {name}: {error}");
                return ExitCode::FAILURE;
            }
            if outcome.timed_out {
                eprintln!("kiln: function {name}: timed out");
            }
            ExitCode::from(u8::try_from(outcome.status).unwrap_or(1))
        }
        Reply::Runtime(result) if result.status == EventStatus::Response => ExitCode::SUCCESS,
        Reply::Runtime(result) => {
            let kind = result.error_type.as_deref().unwrap_or("Unhandled");
            eprintln!("kiln: function {name}: {kind} ({:?})", result.status);
            ExitCode::FAILURE
        }
    }
}

/// A command's stdout (its stderr on stderr); a runtime's response or
/// error JSON (its log on stderr).
fn print_reply(reply: &Reply) {
    let (body, log) = match reply {
        Reply::Command(outcome) => (&outcome.stdout, &outcome.stderr),
        Reply::Runtime(result) => (&result.body, &result.log),
    };
    eprint!("{log}");
    let mut out = std::io::stdout().lock();
    let mut text = body.clone();
    if matches!(reply, Reply::Runtime(_)) && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// `count` invocations, `concurrency` at a time; prints latency percentiles.
fn invoke_many(
    functions: &Functions,
    name: &str,
    payload: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    if count == 0 || concurrency == 0 {
        anyhow::bail!("--count and --concurrency: expected at least 1");
    }
    let started = std::time::Instant::now();
    let results = functions.invoke_many(name, payload, count, concurrency)?;
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    let mut failed = 0;
    for result in &results {
        match result {
            Ok(invoked) if invoked.reply.succeeded() => latencies.push(invoked.latency),
            Ok(invoked) => {
                failed += 1;
                let why = match &invoked.reply {
                    Reply::Command(outcome) => format!(
                        "status {} {}",
                        outcome.status,
                        outcome.error.as_deref().unwrap_or("")
                    ),
                    Reply::Runtime(result) => format!("{:?} {}", result.status, result.body),
                };
                eprintln!("kiln: {}: {why}", invoked.instance_id);
            }
            Err(err) => {
                failed += 1;
                eprintln!("kiln: {}", kiln_vmm::report::one_line(err));
            }
        }
    }
    print_latencies(&latencies, count, failed, concurrency, elapsed);
    if failed > 0 {
        anyhow::bail!("{failed} of {count} invocations failed");
    }
    Ok(())
}

fn print_latencies(
    latencies: &[Duration],
    count: usize,
    failed: usize,
    concurrency: usize,
    elapsed: Duration,
) {
    println!(
        "{} ok, {failed} failed, {count} invocations at concurrency {concurrency} in {:.1} s ({:.2}/s)",
        latencies.len(),
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    let ms: Vec<f64> = latencies.iter().map(|&d| millis(d)).collect();
    if let Some(s) = Stats::of(&ms) {
        println!(
            "latency ms: min {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            s.min, s.p50, s.p90, s.p99, s.max
        );
    }
}

/// A function as `kiln fn ls` lists it: its configuration, and its
/// environments when a serve runs.
#[derive(serde::Serialize)]
struct Listed {
    #[serde(flatten)]
    config: FunctionConfig,
    /// Warm and busy environments; `null` when no serve runs.
    pool: Option<PoolStatus>,
}

fn print_functions(listed: &[Listed]) {
    println!(
        "{:<20}  {:<20}  {:<11}  {:>7}  {:>7}  {:>9}  {:>4}  {:>4}  HANDLER",
        "NAME", "IMAGE", "MODE", "MEMORY", "TIMEOUT", "INIT", "WARM", "BUSY"
    );
    for Listed { config: f, pool } in listed {
        let (mode, init) = match f.mode {
            Mode::RuntimeApi => ("runtime-api", format!("{:.0}ms", f.init_us as f64 / 1e3)),
            Mode::Command => ("command", "-".to_string()),
        };
        let (warm, busy) = pool.as_ref().map_or(("-".into(), "-".into()), |s| {
            (s.warm.to_string(), s.busy.to_string())
        });
        println!(
            "{:<20}  {:<20}  {:<11}  {:>7}  {:>6}s  {:>9}  {:>4}  {:>4}  {}",
            f.name,
            f.image,
            mode,
            format!("{}M", f.memory_mib),
            f.timeout_s,
            init,
            warm,
            busy,
            f.handler
        );
    }
}
