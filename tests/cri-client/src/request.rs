//! The CRI requests, built from a step's arguments as a kubelet would
//! fill them for a plain pod: what each step sets, and nothing it was not
//! asked for.
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, DnsConfig, ExecSyncRequest,
    ImageSpec, PodSandboxConfig, PodSandboxMetadata, RunPodSandboxRequest,
};

/// The address a cluster's DNS service usually has (kube-dns's, the
/// first of the default service range 10.96.0.0/12 but one).
pub const CLUSTER_DNS: &str = "10.96.0.10";

/// A pod's configuration from its identity. The kubelet sends the same
/// one with RunPodSandbox and with each CreateContainer of the pod;
/// `create` rebuilds it from the metadata PodSandboxStatus gives back.
/// The pod's uid is its namespace and name (unique among the client's
/// pods, which is all a uid must be here); its hostname is its name; its
/// DNS is what a kubelet gives a pod of the default policy
/// (`ClusterFirst`): the cluster's nameserver, the namespace's search
/// domains, `ndots:5`.
pub fn pod_config(metadata: PodSandboxMetadata) -> PodSandboxConfig {
    let namespace = &metadata.namespace;
    PodSandboxConfig {
        hostname: metadata.name.clone(),
        dns_config: Some(DnsConfig {
            servers: vec![CLUSTER_DNS.to_string()],
            searches: vec![
                format!("{namespace}.svc.cluster.local"),
                "svc.cluster.local".to_string(),
                "cluster.local".to_string(),
            ],
            options: vec!["ndots:5".to_string()],
        }),
        metadata: Some(metadata),
        ..Default::default()
    }
}

/// The metadata of a new pod: its first attempt.
pub fn pod_metadata(name: &str, namespace: &str) -> PodSandboxMetadata {
    PodSandboxMetadata {
        name: name.to_string(),
        uid: format!("{namespace}-{name}"),
        namespace: namespace.to_string(),
        attempt: 0,
    }
}

/// RunPodSandbox of pod `name` with runtime `handler`.
pub fn run_pod(name: &str, namespace: &str, handler: &str) -> RunPodSandboxRequest {
    RunPodSandboxRequest {
        config: Some(pod_config(pod_metadata(name, namespace))),
        runtime_handler: handler.to_string(),
    }
}

/// CreateContainer of container `name` in pod `pod` (whose configuration
/// is `pod_config`): `image`, running `command` as its entrypoint (the
/// image's own entrypoint and arguments are replaced).
pub fn create(
    pod: &str,
    pod_config: PodSandboxConfig,
    name: &str,
    image: &str,
    command: Vec<String>,
) -> CreateContainerRequest {
    CreateContainerRequest {
        pod_sandbox_id: pod.to_string(),
        config: Some(ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            command,
            ..Default::default()
        }),
        sandbox_config: Some(pod_config),
    }
}

/// ExecSync of `command` in `container`, for at most `timeout` seconds.
pub fn exec(container: &str, command: Vec<String>, timeout: u32) -> ExecSyncRequest {
    ExecSyncRequest {
        container_id: container.to_string(),
        cmd: command,
        timeout: timeout.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_names_its_handler_and_identity() {
        let request = run_pod("web", "default", "kiln");
        assert_eq!(request.runtime_handler, "kiln");
        let config = request.config.unwrap();
        assert_eq!(config.hostname, "web");
        let dns = config.dns_config.unwrap();
        assert_eq!(dns.servers, [CLUSTER_DNS]);
        assert_eq!(dns.searches[0], "default.svc.cluster.local");
        assert_eq!(dns.options, ["ndots:5"]);
        let metadata = config.metadata.unwrap();
        assert_eq!(
            (metadata.name.as_str(), metadata.namespace.as_str()),
            ("web", "default")
        );
        assert_eq!(
            (metadata.uid.as_str(), metadata.attempt),
            ("default-web", 0)
        );
    }

    #[test]
    fn a_container_carries_its_pods_configuration() {
        let pod = pod_config(pod_metadata("web", "team"));
        let command = vec!["sleep".to_string(), "60".to_string()];
        let request = create("p1", pod.clone(), "sidecar", "bb:1", command.clone());
        assert_eq!(request.pod_sandbox_id, "p1");
        assert_eq!(request.sandbox_config, Some(pod));
        let config = request.config.unwrap();
        assert_eq!(config.metadata.unwrap().name, "sidecar");
        assert_eq!(config.image.unwrap().image, "bb:1");
        assert_eq!(config.command, command);
        assert!(config.args.is_empty() && config.envs.is_empty() && config.mounts.is_empty());
    }

    #[test]
    fn exec_takes_its_command_and_limit() {
        let request = exec("c1", vec!["true".to_string()], 30);
        assert_eq!(request.container_id, "c1");
        assert_eq!(request.cmd, ["true"]);
        assert_eq!(request.timeout, 30);
    }
}
