//! The Docker engine as the container backend uses it: a runtime of its own for Docker
//! calls, the client, the `pgtestkit` network, leftovers of dead processes, and what
//! `docker inspect` and `docker logs` say.
//!
//! Docker calls run on a small runtime of their own, so that the synchronous
//! methods (`pause`, `is_running`, `Drop`, ...) can wait for them from inside
//! any test's runtime without deadlocking it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::StreamExt;
use testcontainers::bollard::Docker;
use testcontainers::bollard::models::NetworkCreateRequest;
use testcontainers::bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptions, RemoveContainerOptionsBuilder,
};
use tokio::sync::OnceCell;

use crate::error::{HarnessError, Result};
use crate::procs;

/// The Docker network every container joins.
pub(super) const NETWORK: &str = "pgtestkit";
/// Label naming the process that owns a container: `host/pid/starttime`.
pub(super) const OWNER_LABEL: &str = "org.protected-pool.pgtestkit.owner";

pub(super) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgtestkit-docker")
            .enable_all()
            .build()
            .expect("building the runtime of the container backend")
    })
}

/// Runs `fut` on the Docker runtime and awaits it from any runtime.
pub(super) async fn run<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime().spawn(fut).await {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("a Docker task of the container backend was cancelled: {e}"),
    }
}

/// Runs `fut` on the Docker runtime and blocks this thread until it is done
/// or `timeout` passed (then `None`; the task goes on).
pub(super) fn block<F>(timeout: Duration, fut: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv_timeout(timeout).ok()
}

pub(super) fn docker_error(context: impl Into<String>, e: impl fmt::Display) -> HarnessError {
    HarnessError::io(context, std::io::Error::other(e.to_string()))
}

/// The Docker client (testcontainers' configuration: `DOCKER_HOST`, ...),
/// checked once to answer. Call on the Docker runtime only.
pub(super) async fn docker() -> Result<Docker> {
    static DOCKER: OnceCell<Docker> = OnceCell::const_new();
    DOCKER
        .get_or_try_init(|| async {
            let docker = testcontainers::core::client::docker_client_instance()
                .await
                .map_err(|e| docker_error("connecting to the Docker engine", e))?;
            docker
                .version()
                .await
                .map_err(|e| docker_error("asking the Docker engine for its version", e))?;
            Ok(docker)
        })
        .await
        .cloned()
}

// ---- per-process set-up: leftovers, the network ------------------------------------

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

pub(super) fn owner_label() -> String {
    let me = std::process::id();
    let start = procs::stat(me).map_or(0, |s| s.starttime);
    format!("{}/{me}/{start}", hostname())
}

/// Removes containers whose owner process, on this host, is gone.
async fn sweep_leftovers(docker: &Docker) {
    let filters = HashMap::from([("label", vec![OWNER_LABEL])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let Ok(containers) = docker.list_containers(Some(options)).await else {
        return;
    };
    let host = hostname();
    for c in containers {
        let (Some(id), Some(owner)) = (c.id, c.labels.and_then(|l| l.get(OWNER_LABEL).cloned()))
        else {
            continue;
        };
        let mut parts = owner.rsplitn(3, '/');
        let (Some(start), Some(pid), Some(owner_host)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
            continue;
        };
        let alive = procs::stat(pid)
            .is_some_and(|s| s.starttime == start && !matches!(s.state, 'Z' | 'X' | 'x'));
        if owner_host == host && !alive {
            let _ = docker.unpause_container(&id).await;
            let _ = docker.remove_container(&id, Some(force_remove())).await;
        }
    }
}

pub(super) fn force_remove() -> RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build()
}

/// The id of the network `pgtestkit`, created if missing; sweeps leftovers
/// first. Once per process.
pub(super) async fn network_id(docker: &Docker) -> Result<String> {
    static NETWORK_ID: OnceCell<String> = OnceCell::const_new();
    NETWORK_ID
        .get_or_try_init(|| async {
            sweep_leftovers(docker).await;
            if let Some(id) = find_network(docker).await? {
                return Ok(id);
            }
            let request = NetworkCreateRequest {
                name: NETWORK.to_owned(),
                driver: Some("bridge".to_owned()),
                labels: Some(HashMap::from([(
                    OWNER_LABEL.to_owned(),
                    "shared".to_owned(),
                )])),
                ..Default::default()
            };
            let created = docker.create_network(request).await;
            // Another process may have created it meanwhile: take the one
            // every process picks (the smallest id).
            match find_network(docker).await? {
                Some(id) => Ok(id),
                None => Err(docker_error(
                    format!("creating the Docker network {NETWORK}"),
                    created
                        .err()
                        .map_or("it vanished".to_owned(), |e| e.to_string()),
                )),
            }
        })
        .await
        .cloned()
}

async fn find_network(docker: &Docker) -> Result<Option<String>> {
    let filters = HashMap::from([("name", vec![NETWORK])]);
    let options = ListNetworksOptionsBuilder::new().filters(&filters).build();
    let networks = docker
        .list_networks(Some(options))
        .await
        .map_err(|e| docker_error("listing Docker networks", e))?;
    Ok(networks
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(NETWORK))
        .filter_map(|n| n.id)
        .min())
}

/// What `docker inspect` says.
#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) running: bool,
    pub(super) paused: bool,
    pub(super) pid: Option<u32>,
    pub(super) exit_code: Option<i64>,
}

pub(super) async fn inspect(id: String) -> Result<State> {
    let docker = docker().await?;
    let info = docker
        .inspect_container(&id, None::<InspectContainerOptions>)
        .await
        .map_err(|e| docker_error(format!("inspecting container {id}"), e))?;
    let state = info.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    Ok(State {
        running,
        paused: state.paused.unwrap_or(false),
        pid: state
            .pid
            .filter(|&p| running && p > 0)
            .and_then(|p| u32::try_from(p).ok()),
        exit_code: state.exit_code,
    })
}

pub(super) async fn docker_log_tail(id: String, n: usize) -> String {
    let Ok(docker) = docker().await else {
        return String::new();
    };
    let options = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .tail(&n.to_string())
        .build();
    let mut stream = docker.logs(&id, Some(options));
    let mut bytes = Vec::new();
    while let Some(Ok(frame)) = stream.next().await {
        bytes.extend_from_slice(frame.as_ref());
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `docker rm -f -v`, by id; a container already gone is no error.
pub(super) async fn remove(id: String) {
    if let Ok(docker) = docker().await {
        let _ = docker.remove_container(&id, Some(force_remove())).await;
    }
}
