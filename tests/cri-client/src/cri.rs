//! The runtime's CRI service over its unix socket, one call per step, and
//! what each step prints of the answer.
use std::collections::HashMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerState, ContainerStatus, ContainerStatusRequest, ExecSyncResponse, PodSandboxState,
    PodSandboxStatus, PodSandboxStatusRequest, RemovePodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest, VersionRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::request;

/// How long any call may take, an ExecSync's command included (its
/// `--timeout` is at most [`EXEC_LIMIT`]): a socket that accepts and
/// never answers fails the step instead of hanging it.
const CALL_LIMIT: Duration = Duration::from_secs(EXEC_LIMIT as u64 + 60);
/// The longest an ExecSync's command may run, in seconds.
pub const EXEC_LIMIT: u32 = 600;

/// The CRI version this client speaks: the `version` the runtime is asked
/// for (containerd answers with the one it serves).
const CRI_VERSION: &str = "v1";

/// What failed in a step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client's own single-threaded async runtime could not start.
    #[error("cannot start the async runtime")]
    Tokio(#[source] std::io::Error),
    /// containerd's socket does not answer.
    #[error("cannot connect to {}", socket.display())]
    Connect {
        /// The socket asked for (`--socket`).
        socket: PathBuf,
        /// Why: no such socket, or nobody listening.
        #[source]
        source: std::io::Error,
    },
    /// What answers on the socket does not speak gRPC (HTTP/2).
    #[error("{} does not answer as a gRPC server", socket.display())]
    Handshake {
        /// The socket asked for (`--socket`).
        socket: PathBuf,
        /// Where the handshake failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The runtime refused a call.
    #[error("{rpc} of {target}")]
    Call {
        /// The CRI method.
        rpc: &'static str,
        /// What it was about: a pod's name or id, a container's id.
        target: String,
        /// The runtime's status.
        #[source]
        source: Refused,
    },
    /// The runtime answered without a part every answer of that call has.
    #[error("{rpc} of {target}: the answer has no {field}")]
    Incomplete {
        /// The CRI method.
        rpc: &'static str,
        /// What it was about.
        target: String,
        /// The missing field of the answer.
        field: &'static str,
    },
    /// The runtime's verbose `info` (containerd's JSON) is not JSON.
    #[error("{rpc} of {target}: its info is not JSON")]
    Info {
        /// The CRI method.
        rpc: &'static str,
        /// What it was about.
        target: String,
        /// Where the text stopped being JSON.
        #[source]
        source: serde_json::Error,
    },
}

/// A call's gRPC status: the runtime's message, which says why.
#[derive(Debug, thiserror::Error)]
#[error("{message} (gRPC {code:?})")]
pub struct Refused {
    code: tonic::Code,
    message: String,
}

impl From<tonic::Status> for Refused {
    fn from(status: tonic::Status) -> Self {
        Refused {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// A connection to the runtime's CRI service.
pub struct Runtime {
    client: RuntimeServiceClient<Channel>,
}

impl Runtime {
    /// Connects to the gRPC server on unix socket `socket`.
    pub async fn connect(socket: &Path) -> Result<Self, Error> {
        // Connected here, not in tonic's connector, so that a socket that
        // is not there fails with the OS's reason alone (tonic's transport
        // error repeats its cause). The channel then has this one
        // connection, which is all one step needs.
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        let mut stream = Some(TokioIo::new(stream));
        // The URI is tonic's placeholder: the connector ignores it.
        let channel = Endpoint::from_static("http://[::]:0")
            .timeout(CALL_LIMIT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let taken = stream.take().ok_or_else(|| {
                    std::io::Error::other("the runtime closed the step's one connection")
                });
                std::future::ready(taken)
            }))
            .await
            .map_err(|source| Error::Handshake {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Runtime {
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// Version: the runtime's name and version and its CRI version.
    pub async fn version(&mut self) -> Result<String, Error> {
        let request = VersionRequest {
            version: CRI_VERSION.to_string(),
        };
        let answer = self.client.version(request).await;
        let answer = refused("Version", "the runtime", answer)?;
        Ok(format!(
            "runtime {}\nversion {}\napi {}\n",
            answer.runtime_name, answer.runtime_version, answer.runtime_api_version
        ))
    }

    /// RunPodSandbox; prints the pod's id.
    pub async fn run_pod(
        &mut self,
        name: &str,
        namespace: &str,
        handler: &str,
    ) -> Result<String, Error> {
        let answer = self
            .client
            .run_pod_sandbox(request::run_pod(name, namespace, handler))
            .await;
        let answer = refused("RunPodSandbox", name, answer)?;
        Ok(format!("{}\n", answer.pod_sandbox_id))
    }

    /// PodSandboxStatus; prints its state, IP and pid.
    pub async fn pod_status(&mut self, pod: &str) -> Result<String, Error> {
        let (status, info) = self.pod_sandbox_status(pod).await?;
        let pid = pid("PodSandboxStatus", pod, &info)?;
        Ok(describe_pod(&status, pid))
    }

    /// StopPodSandbox.
    pub async fn stop_pod(&mut self, pod: &str) -> Result<String, Error> {
        let request = StopPodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        let answer = self.client.stop_pod_sandbox(request).await;
        refused("StopPodSandbox", pod, answer)?;
        Ok(String::new())
    }

    /// RemovePodSandbox.
    pub async fn remove_pod(&mut self, pod: &str) -> Result<String, Error> {
        let request = RemovePodSandboxRequest {
            pod_sandbox_id: pod.to_string(),
        };
        let answer = self.client.remove_pod_sandbox(request).await;
        refused("RemovePodSandbox", pod, answer)?;
        Ok(String::new())
    }

    /// CreateContainer in `pod`, with the pod's configuration rebuilt from
    /// its status (as the kubelet resends it); prints the container's id.
    pub async fn create(
        &mut self,
        pod: &str,
        name: &str,
        image: &str,
        command: Vec<String>,
    ) -> Result<String, Error> {
        let (status, _) = self.pod_sandbox_status(pod).await?;
        let metadata = status.metadata.ok_or_else(|| Error::Incomplete {
            rpc: "PodSandboxStatus",
            target: pod.to_string(),
            field: "metadata",
        })?;
        let config = request::pod_config(metadata);
        let answer = self
            .client
            .create_container(request::create(pod, config, name, image, command))
            .await;
        let answer = refused("CreateContainer", name, answer)?;
        Ok(format!("{}\n", answer.container_id))
    }

    /// StartContainer.
    pub async fn start(&mut self, container: &str) -> Result<String, Error> {
        let request = StartContainerRequest {
            container_id: container.to_string(),
        };
        let answer = self.client.start_container(request).await;
        refused("StartContainer", container, answer)?;
        Ok(String::new())
    }

    /// ContainerStatus; prints its state, exit code, reason and pid.
    pub async fn status(&mut self, container: &str) -> Result<String, Error> {
        const RPC: &str = "ContainerStatus";
        let request = ContainerStatusRequest {
            container_id: container.to_string(),
            verbose: true,
        };
        let answer = self.client.container_status(request).await;
        let answer = refused(RPC, container, answer)?;
        let pid = pid(RPC, container, &answer.info)?;
        let status = answer
            .status
            .ok_or_else(|| incomplete(RPC, container, "status"))?;
        Ok(describe_container(&status, pid))
    }

    /// ExecSync of `command` in `container`.
    pub async fn exec(
        &mut self,
        container: &str,
        command: Vec<String>,
        timeout: u32,
    ) -> Result<ExecSyncResponse, Error> {
        let answer = self
            .client
            .exec_sync(request::exec(container, command, timeout))
            .await;
        refused("ExecSync", container, answer)
    }

    /// PodSandboxStatus, verbose: the status and containerd's info.
    async fn pod_sandbox_status(
        &mut self,
        pod: &str,
    ) -> Result<(PodSandboxStatus, HashMap<String, String>), Error> {
        const RPC: &str = "PodSandboxStatus";
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: pod.to_string(),
            verbose: true,
        };
        let answer = self.client.pod_sandbox_status(request).await;
        let answer = refused(RPC, pod, answer)?;
        let status = answer
            .status
            .ok_or_else(|| incomplete(RPC, pod, "status"))?;
        Ok((status, answer.info))
    }
}

/// A call's answer, or the runtime's refusal as [`Error::Call`].
fn refused<T>(
    rpc: &'static str,
    target: &str,
    answer: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, Error> {
    answer
        .map(tonic::Response::into_inner)
        .map_err(|status| Error::Call {
            rpc,
            target: target.to_string(),
            source: status.into(),
        })
}

fn incomplete(rpc: &'static str, target: &str, field: &'static str) -> Error {
    Error::Incomplete {
        rpc,
        target: target.to_string(),
        field,
    }
}

/// The pid containerd's verbose `info` gives (its JSON's `pid`: the
/// sandbox's or container's task, the VMM process under the Kiln shim);
/// `None` when the runtime gives no info or no pid.
fn pid(
    rpc: &'static str,
    target: &str,
    info: &HashMap<String, String>,
) -> Result<Option<u64>, Error> {
    let Some(text) = info.get("info") else {
        return Ok(None);
    };
    let info: serde_json::Value = serde_json::from_str(text).map_err(|source| Error::Info {
        rpc,
        target: target.to_string(),
        source,
    })?;
    Ok(info.get("pid").and_then(serde_json::Value::as_u64))
}

/// A pod's status as `pod-status` prints it: one `key value` line each.
fn describe_pod(status: &PodSandboxStatus, pid: Option<u64>) -> String {
    let state = PodSandboxState::try_from(status.state).map_or_else(
        |_| status.state.to_string(),
        |s| s.as_str_name().to_string(),
    );
    let ip = status.network.as_ref().map_or("", |network| &network.ip);
    let mut text = format!("id {}\nstate {state}\nip {ip}\n", status.id);
    push_pid(&mut text, pid);
    text
}

/// A container's status as `status` prints it: one `key value` line each.
fn describe_container(status: &ContainerStatus, pid: Option<u64>) -> String {
    let state = ContainerState::try_from(status.state).map_or_else(
        |_| status.state.to_string(),
        |s| s.as_str_name().to_string(),
    );
    let mut text = format!(
        "id {}\nstate {state}\nexit_code {}\nreason {}\n",
        status.id, status.exit_code, status.reason
    );
    push_pid(&mut text, pid);
    text
}

fn push_pid(text: &mut String, pid: Option<u64>) {
    if let Some(pid) = pid {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "pid {pid}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(json: &str) -> HashMap<String, String> {
        HashMap::from([("info".to_string(), json.to_string())])
    }

    #[test]
    fn the_pid_is_containerds_infos() {
        let pid = pid("X", "c1", &info(r#"{"pid": 42, "sandboxID": "p"}"#)).unwrap();
        assert_eq!(pid, Some(42));
        assert_eq!(pid_of(&info(r#"{"sandboxID": "p"}"#)), None);
        assert_eq!(pid_of(&HashMap::new()), None);
        let err = super::pid("ContainerStatus", "c1", &info("{pid")).unwrap_err();
        let line = guest_init::one_line(&err);
        assert!(
            line.starts_with("ContainerStatus of c1: its info is not JSON: "),
            "{line}"
        );
    }

    fn pid_of(info: &HashMap<String, String>) -> Option<u64> {
        pid("X", "c1", info).unwrap()
    }

    #[test]
    fn a_container_is_described_by_state_exit_code_and_reason() {
        let status = ContainerStatus {
            id: "c1".to_string(),
            state: ContainerState::ContainerExited as i32,
            exit_code: 3,
            reason: "Error".to_string(),
            ..Default::default()
        };
        assert_eq!(
            describe_container(&status, Some(7)),
            "id c1\nstate CONTAINER_EXITED\nexit_code 3\nreason Error\npid 7\n"
        );
    }

    #[test]
    fn a_pod_is_described_by_state_and_ip() {
        let status = PodSandboxStatus {
            id: "p1".to_string(),
            metadata: Some(request::pod_metadata("web", "default")),
            state: PodSandboxState::SandboxReady as i32,
            network: Some(k8s_cri::v1::PodSandboxNetworkStatus {
                ip: "10.88.0.2".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            describe_pod(&status, None),
            "id p1\nstate SANDBOX_READY\nip 10.88.0.2\n"
        );
    }

    #[test]
    fn a_missing_socket_is_named_with_why() {
        let executor = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join("kiln-cri-client-no-such-dir");
        let Err(err) = executor.block_on(Runtime::connect(&dir.join("containerd.sock"))) else {
            panic!("connected to a socket that does not exist");
        };
        let line = guest_init::one_line(&err);
        let expected = format!(
            "cannot connect to {}: ",
            dir.join("containerd.sock").display()
        );
        assert_eq!(
            line,
            format!("{expected}No such file or directory (os error 2)")
        );
    }

    #[test]
    fn a_refusal_is_its_message_and_code() {
        let answer: Result<tonic::Response<()>, _> = Err(tonic::Status::not_found(
            "an error occurred when try to find container \"c9\"",
        ));
        let err = refused("StartContainer", "c9", answer).unwrap_err();
        assert_eq!(
            guest_init::one_line(&err),
            "StartContainer of c9: an error occurred when try to find container \"c9\" (gRPC NotFound)"
        );
    }
}
