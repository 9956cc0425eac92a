//! The container runtime of the node, as the agent uses it: the CRI (version, container and sandbox
//! status, image pull, `CheckpointContainer`) and containerd's Tasks API for what the CRI lacks
//! (pause, resume, kill, task state). Both are served on the same unix socket by containerd.

use std::{path::Path, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::{
    Request,
    transport::{Channel, Endpoint, Uri},
};

/// The CRI v1 API (`proto/cri/api.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

/// The part of containerd's Tasks API the agent uses (`proto/containerd/tasks.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod tasks {
    tonic::include_proto!("containerd.services.tasks.v1");
}

/// The runc shim's checkpoint options (`proto/containerd/runc.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod runc {
    tonic::include_proto!("containerd.runc.v1");
}

use cri::{image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient};
pub use tasks::Status as TaskStatus;
use tasks::tasks_client::TasksClient;

/// Errors of runtime calls, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("runtime endpoint {0}: {1}")]
    Endpoint(String, String),
    #[error("{what}: {status}", status = .source.message())]
    Call {
        what: String,
        #[source]
        source: tonic::Status,
    },
    #[error("{0}")]
    Unexpected(String),
}

impl Error {
    /// The runtime does not know the object (e.g. a task that already ended).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Call { source, .. } if source.code() == tonic::Code::NotFound)
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn call(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Error {
    let what = what.into();
    move |source| Error::Call { what, source }
}

/// A client of the node's containerd (CRI and Tasks on one socket).
#[derive(Debug, Clone)]
pub struct Runtime {
    channel: Channel,
    /// containerd namespace of the CRI's containers (`k8s.io`).
    namespace: String,
}

/// The runtime's container ID from a pod status's `containerID` (`containerd://<id>`), or the ID
/// itself.
pub fn container_id(reference: &str) -> &str {
    reference.split_once("://").map_or(reference, |(_, id)| id)
}

/// A gRPC channel to the unix socket `socket` (the runtime's, the kubelet's); it connects
/// lazily, at the first call, so a server that starts later is found once it is up.
pub fn unix_channel(socket: &Path) -> Channel {
    let path = socket.to_path_buf();
    // The URI is required by the API and ignored by the connector.
    Endpoint::from_static("http://unix.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
}

impl Runtime {
    /// A client of the runtime on `socket`; connects lazily, so a runtime that starts later is
    /// found once it is up.
    pub fn new(socket: &Path, namespace: &str) -> Result<Self> {
        Ok(Self {
            channel: unix_channel(socket),
            namespace: namespace.into(),
        })
    }

    fn cri(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// A Tasks request in the CRI's containerd namespace.
    fn namespaced<T>(&self, message: T) -> Result<Request<T>> {
        let mut request = Request::new(message);
        let value = self
            .namespace
            .parse()
            .map_err(|_| Error::Unexpected(format!("bad namespace {:?}", self.namespace)))?;
        request.metadata_mut().insert("containerd-namespace", value);
        Ok(request)
    }

    /// The runtime's namespace of the node's containers (`k8s.io` for the CRI's).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Runtime name and version, as the CRI reports them.
    pub async fn version(&self) -> Result<(String, String)> {
        let v = self
            .cri()
            .version(cri::VersionRequest::default())
            .await
            .map_err(call("asking the runtime for its version"))?
            .into_inner();
        Ok((v.runtime_name, v.runtime_version))
    }

    /// The runtime handlers (RuntimeClass handlers) the runtime has.
    pub async fn handlers(&self) -> Result<Vec<String>> {
        let status = self
            .cri()
            .status(cri::StatusRequest { verbose: false })
            .await
            .map_err(call("asking the runtime for its status"))?
            .into_inner();
        Ok(status
            .runtime_handlers
            .into_iter()
            .map(|h| h.name)
            .collect())
    }

    /// The task of a container, as containerd's Tasks API reports it.
    async fn task(&self, id: &str) -> Result<tasks::Process> {
        let request = self.namespaced(tasks::GetRequest {
            container_id: id.into(),
            exec_id: String::new(),
        })?;
        self.tasks()
            .get(request)
            .await
            .map_err(call(format!("reading the task of container {id}")))?
            .into_inner()
            .process
            .ok_or_else(|| Error::Unexpected(format!("container {id} has no task")))
    }

    /// The state of a container's task (paused, running, stopped, ...).
    pub async fn task_status(&self, id: &str) -> Result<TaskStatus> {
        Ok(self.task(id).await?.status())
    }

    /// Pauses the container's task (cgroup freezer, through the runtime).
    pub async fn pause(&self, id: &str) -> Result<()> {
        let request = self.namespaced(tasks::PauseTaskRequest {
            container_id: id.into(),
        })?;
        self.tasks()
            .pause(request)
            .await
            .map_err(call(format!("pausing container {id}")))?;
        Ok(())
    }

    /// Resumes a paused task.
    pub async fn resume(&self, id: &str) -> Result<()> {
        let request = self.namespaced(tasks::ResumeTaskRequest {
            container_id: id.into(),
        })?;
        self.tasks()
            .resume(request)
            .await
            .map_err(call(format!("resuming container {id}")))?;
        Ok(())
    }

    /// Sends SIGKILL to every process of the container.
    pub async fn kill(&self, id: &str) -> Result<()> {
        let request = self.namespaced(tasks::KillRequest {
            container_id: id.into(),
            exec_id: String::new(),
            signal: 9,
            all: true,
        })?;
        self.tasks()
            .kill(request)
            .await
            .map_err(call(format!("killing container {id}")))?;
        Ok(())
    }

    /// Checkpoints a container's task with CRIU straight into `images` (containerd's Tasks API,
    /// the runc shim): no archive, no content store. The task is left as it was (a paused one
    /// stays paused); CRIU's log goes to `work`.
    pub async fn checkpoint_task(&self, id: &str, images: &Path, work: &Path) -> Result<()> {
        use prost::Message;
        let options = runc::CheckpointOptions {
            exit: false,
            open_tcp: true,
            file_locks: true,
            image_path: images.display().to_string(),
            work_path: work.display().to_string(),
            ..Default::default()
        };
        let request = self.namespaced(tasks::CheckpointTaskRequest {
            container_id: id.into(),
            parent_checkpoint: String::new(),
            options: Some(tasks::AnyOptions {
                type_url: "containerd.runc.v1.CheckpointOptions".into(),
                value: options.encode_to_vec(),
            }),
        })?;
        self.tasks()
            .checkpoint(request)
            .await
            .map_err(call(format!("checkpointing the task of container {id}")))?;
        Ok(())
    }

    /// The process ID of a container's task (in the runtime's PID namespace).
    pub async fn task_pid(&self, id: &str) -> Result<u32> {
        Ok(self.task(id).await?.pid)
    }

    /// Checkpoints a container through the CRI into the archive `location` (a tar file).
    pub async fn checkpoint(&self, id: &str, location: &Path, timeout: Duration) -> Result<()> {
        self.cri()
            .checkpoint_container(cri::CheckpointContainerRequest {
                container_id: id.into(),
                location: location.display().to_string(),
                timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            })
            .await
            .map_err(call(format!("checkpointing container {id}")))?;
        Ok(())
    }

    /// The CRI state of a container.
    pub async fn container_state(&self, id: &str) -> Result<cri::ContainerState> {
        let status = self
            .cri()
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .map_err(call(format!("reading the status of container {id}")))?
            .into_inner()
            .status
            .ok_or_else(|| Error::Unexpected(format!("container {id} has no status")))?;
        Ok(status.state())
    }

    /// The ID of the ready sandbox of the pod with this namespace, name and UID, if any.
    pub async fn find_sandbox(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
    ) -> Result<Option<String>> {
        Ok(self
            .ready_sandbox(namespace, pod, pod_uid)
            .await?
            .map(|s| s.id))
    }

    /// The UID of pod `namespace/pod` as its ready sandbox names it.
    pub async fn pod_uid(&self, namespace: &str, pod: &str) -> Result<Option<String>> {
        Ok(self
            .ready_sandbox(namespace, pod, "")
            .await?
            .and_then(|s| s.metadata)
            .map(|m| m.uid))
    }

    async fn ready_sandbox(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
    ) -> Result<Option<cri::PodSandbox>> {
        let ready = cri::PodSandboxStateValue {
            state: cri::PodSandboxState::SandboxReady.into(),
        };
        let sandboxes = self
            .cri()
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    state: Some(ready),
                    ..Default::default()
                }),
            })
            .await
            .map_err(call("listing pod sandboxes"))?
            .into_inner()
            .items;
        // The newest: a pod replaced under its name may leave its former sandbox for a moment.
        Ok(sandboxes
            .into_iter()
            .filter(|s| {
                s.metadata.as_ref().is_some_and(|m| {
                    m.namespace == namespace
                        && m.name == pod
                        && (pod_uid.is_empty() || m.uid == pod_uid)
                })
            })
            .max_by_key(|s| s.created_at))
    }

    /// Whether container `container` of the pod was started in a container created at `since_ns`
    /// (nanoseconds since the epoch) or later: the start that followed a given moment. It runs,
    /// or it ran and exited already.
    pub async fn runs_since(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        container: &str,
        since_ns: i64,
    ) -> Result<bool> {
        let containers = self.pod_containers(namespace, pod, pod_uid).await?;
        Ok(containers.iter().any(|c| {
            (c.state == cri::ContainerState::ContainerRunning as i32
                || c.state == cri::ContainerState::ContainerExited as i32)
                && c.created_at >= since_ns
                && c.metadata.as_ref().is_some_and(|m| m.name == container)
        }))
    }

    /// The network namespace of a sandbox: containerd's `NetNSPath` where the agent sees it, else
    /// `/proc/<sandbox pid>/ns/net` (both from the verbose status).
    /// The network namespace of a pod's ready sandbox, when it has one and the runtime names it.
    pub async fn pod_netns(&self, namespace: &str, pod: &str, pod_uid: &str) -> Option<String> {
        let sandbox = self.find_sandbox(namespace, pod, pod_uid).await.ok()??;
        self.sandbox_netns(&sandbox).await.ok().flatten()
    }

    pub async fn sandbox_netns(&self, sandbox_id: &str) -> Result<Option<String>> {
        let status = self
            .cri()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.into(),
                verbose: true,
            })
            .await
            .map_err(call(format!("reading sandbox {sandbox_id}")))?
            .into_inner();
        let info: serde_json::Value = status
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        // The path is in the runtime's mount namespace; an agent in a pod of its own (host PID
        // namespace) reaches the same namespace through the sandbox process.
        let path = info["NetNSPath"]
            .as_str()
            .filter(|p| !p.is_empty() && std::path::Path::new(p).exists());
        let through_pid = info["pid"]
            .as_u64()
            .filter(|pid| *pid > 0)
            .map(|pid| format!("/proc/{pid}/ns/net"));
        Ok(path.map(String::from).or(through_pid))
    }

    /// The running container `container` of the pod with this namespace, name and UID (the
    /// sandbox metadata the kubelet, or any CRI client, created it with); `None` if there is none.
    pub async fn find_container(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        container: &str,
    ) -> Result<Option<String>> {
        self.find_container_in(
            namespace,
            pod,
            pod_uid,
            container,
            &[cri::ContainerState::ContainerRunning],
        )
        .await
    }

    /// The ID of a container of the pod that was created or runs: a restore runs the container's
    /// processes while the CRI still reports it created.
    pub async fn find_live_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<Option<String>> {
        self.find_container_in(
            namespace,
            pod,
            "",
            container,
            &[
                cri::ContainerState::ContainerCreated,
                cri::ContainerState::ContainerRunning,
            ],
        )
        .await
    }

    /// The containers of the pod's ready sandbox (none without one).
    async fn pod_containers(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
    ) -> Result<Vec<cri::Container>> {
        let Some(sandbox_id) = self.find_sandbox(namespace, pod, pod_uid).await? else {
            return Ok(Vec::new());
        };
        Ok(self
            .cri()
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: sandbox_id,
                    ..Default::default()
                }),
            })
            .await
            .map_err(call("listing containers"))?
            .into_inner()
            .containers)
    }

    async fn find_container_in(
        &self,
        namespace: &str,
        pod: &str,
        pod_uid: &str,
        container: &str,
        states: &[cri::ContainerState],
    ) -> Result<Option<String>> {
        let containers = self.pod_containers(namespace, pod, pod_uid).await?;
        Ok(containers
            .into_iter()
            .filter(|c| states.iter().any(|s| *s as i32 == c.state))
            .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == container))
            .map(|c| c.id))
    }

    /// Pulls an image (the base image a checkpoint is restored onto).
    pub async fn pull(&self, image: &str) -> Result<String> {
        let reply = ImageServiceClient::new(self.channel.clone())
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map_err(call(format!("pulling image {image}")))?;
        Ok(reply.into_inner().image_ref)
    }

    /// Removes an image from the runtime's store (a checkpoint image this node staged); one that
    /// is not there is removed already.
    pub async fn remove_image(&self, image: &str) -> Result<()> {
        let removed = ImageServiceClient::new(self.channel.clone())
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(call(format!("removing image {image}")));
        match removed {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }
}
