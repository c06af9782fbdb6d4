//! `kiln-cri-client`: the CRI path without a kubelet. A small crictl-like
//! client of containerd's CRI socket (the `runtime.v1` gRPC API), which
//! tests/vm/cri.sh calls one step at a time: each step prints what a check
//! needs (ids, states, exec output) and fails with one line, the runtime's
//! gRPC status message, and exit status [`FAILED`].
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cri;
mod request;

use cri::Runtime;

/// The exit status of a step that failed in the client or the runtime,
/// as docker's and podman's: `exec` exits with its command's own status,
/// which this one is unlikely to be.
const FAILED: u8 = 125;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A CRI client for tests: containerd's runtime.v1 API, one step at a time"
)]
struct Cli {
    /// containerd's gRPC socket (its `[grpc] address`).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    step: Step,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// Prints the runtime's name, its version and the CRI version it serves.
    Version,
    /// RunPodSandbox: starts pod NAME (its pause container and network
    /// namespace); prints the pod's id.
    PodRun {
        name: String,
        /// The runtime handler: containerd's `runtimes.<handler>`.
        #[arg(long)]
        handler: String,
        /// The pod's Kubernetes namespace, part of its identity.
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// PodSandboxStatus: prints the pod's state, IP and pid (of its sandbox
    /// task, when the runtime says).
    PodStatus { pod: String },
    /// StopPodSandbox: stops the pod's containers and its sandbox.
    PodStop { pod: String },
    /// RemovePodSandbox: removes the pod, its containers with it.
    PodRm { pod: String },
    /// CreateContainer: container NAME of IMAGE in POD running COMMAND;
    /// prints its id.
    Create {
        pod: String,
        name: String,
        image: String,
        /// The process: its entrypoint and arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// StartContainer.
    Start { container: String },
    /// ContainerStatus: prints its state, exit code, reason and pid (when
    /// the runtime says).
    Status { container: String },
    /// ExecSync: runs COMMAND in the container; prints its stdout and
    /// stderr and exits with its status.
    Exec {
        container: String,
        /// How long the command may run, in seconds (1 to 600).
        #[arg(
            long,
            default_value_t = 60,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(cri::EXEC_LIMIT)),
        )]
        timeout: u32,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let executor = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(executor) => executor,
        Err(err) => return fail(&cri::Error::Tokio(err)),
    };
    match executor.block_on(run(cli)) {
        Ok(status) => status,
        Err(err) => fail(&err),
    }
}

fn fail(err: &cri::Error) -> ExitCode {
    eprintln!("kiln-cri-client: {}", guest_init::one_line(err));
    ExitCode::from(FAILED)
}

/// Runs one step, printing its result on stdout.
async fn run(cli: Cli) -> Result<ExitCode, cri::Error> {
    let mut runtime = Runtime::connect(&cli.socket).await?;
    let printed = match cli.step {
        Step::Version => runtime.version().await?,
        Step::PodRun {
            name,
            handler,
            namespace,
        } => runtime.run_pod(&name, &namespace, &handler).await?,
        Step::PodStatus { pod } => runtime.pod_status(&pod).await?,
        Step::PodStop { pod } => runtime.stop_pod(&pod).await?,
        Step::PodRm { pod } => runtime.remove_pod(&pod).await?,
        Step::Create {
            pod,
            name,
            image,
            command,
        } => runtime.create(&pod, &name, &image, command).await?,
        Step::Start { container } => runtime.start(&container).await?,
        Step::Status { container } => runtime.status(&container).await?,
        Step::Exec {
            container,
            timeout,
            command,
        } => {
            let done = runtime.exec(&container, command, timeout).await?;
            // Best effort: a reader that has gone cannot be told anything.
            let _ = std::io::stdout().write_all(&done.stdout);
            let _ = std::io::stderr().write_all(&done.stderr);
            return Ok(exit_status(done.exit_code));
        }
    };
    print!("{printed}");
    Ok(ExitCode::SUCCESS)
}

/// A process's exit code as this one's: the codes a shell sees, 0-255
/// (containerd reports a killed process as 128 + its signal).
fn exit_status(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(FAILED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kiln-cri-client").chain(words.iter().copied()))
    }

    #[test]
    fn a_pod_needs_its_handler() {
        let cli = parse(&["--socket", "/s", "pod-run", "web", "--handler", "kiln"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/s"));
        let Step::PodRun {
            name,
            handler,
            namespace,
        } = cli.step
        else {
            panic!("not pod-run: {:?}", cli.step);
        };
        assert_eq!((name.as_str(), handler.as_str()), ("web", "kiln"));
        assert_eq!(namespace, "default");
        assert!(parse(&["pod-run", "web"]).is_err());
    }

    #[test]
    fn a_command_comes_after_two_dashes_with_its_own_options() {
        let cli = parse(&["create", "p1", "c1", "bb:1", "--", "sh", "-c", "echo --x"]).unwrap();
        let Step::Create { command, .. } = cli.step else {
            panic!("not create: {:?}", cli.step);
        };
        assert_eq!(command, ["sh", "-c", "echo --x"]);
        let cli = parse(&["exec", "c1", "--timeout", "5", "--", "cat", "-n"]).unwrap();
        let Step::Exec {
            timeout, command, ..
        } = cli.step
        else {
            panic!("not exec: {:?}", cli.step);
        };
        assert_eq!(timeout, 5);
        assert_eq!(command, ["cat", "-n"]);
    }

    #[test]
    fn an_exec_limit_is_one_second_to_ten_minutes() {
        assert!(parse(&["exec", "c1", "--timeout", "600", "--", "true"]).is_ok());
        for limit in ["0", "601"] {
            let err = parse(&["exec", "c1", "--timeout", limit, "--", "true"]).unwrap_err();
            assert!(err.to_string().contains("1..=600"), "{err}");
        }
    }

    #[test]
    fn a_command_is_required() {
        assert!(parse(&["create", "p1", "c1", "bb:1"]).is_err());
        assert!(parse(&["exec", "c1", "--"]).is_err());
    }

    #[test]
    fn exit_codes_outside_a_byte_are_failures() {
        assert_eq!(exit_status(3), ExitCode::from(3));
        assert_eq!(exit_status(137), ExitCode::from(137));
        assert_eq!(exit_status(-1), ExitCode::from(FAILED));
        assert_eq!(exit_status(256), ExitCode::from(FAILED));
    }
}
