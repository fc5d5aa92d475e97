//! The container backend: [`PgServer`]s whose PostgreSQL runs in a Docker
//! container started through testcontainers (the `postgres` module of
//! testcontainers-modules, with the image name and tag from
//! [`IMAGE_ENV`] / [`IMAGE_TAG_ENV`]).
//!
//! Every container
//! - publishes 5432 on a fixed port of 127.0.0.1 picked before it is created,
//!   so a container started again after a stop or a kill keeps its URL;
//! - joins the Docker network `pgtestkit` (created when missing, never
//!   removed), where a streaming replica reaches its primary by container name;
//! - mounts the server's socket dir, where PostgreSQL makes a second unix
//!   socket, so that the harness's `psql` connects as on the local backend
//!   (over a unix socket: `client_addr` is null, the client is not counted
//!   among the TCP clients tests look at);
//! - gets the harness's settings as `-c name=value` arguments of `postgres`,
//!   and its own `pg_hba.conf` (`hba_file`), copied into the container, with
//!   the rules of the local backend for the container's network (`samenet`:
//!   the Docker bridge the host's connections arrive from): `postgres` and
//!   replication trusted, everyone else `trust`, or `scram-sha-256` with
//!   [`password_auth`](crate::PgServerBuilder::password_auth). The superuser
//!   also has the password [`SUPERUSER_PASSWORD`] (the official image wants
//!   one);
//! - is labelled with the test process that owns it; the next process that
//!   starts a container removes those of processes that died without
//!   unwinding.
//!
//! Fault injection maps onto the Docker API: `kill9` is `docker kill -s KILL`,
//! `stop_fast` / `stop_immediate` send the postmaster SIGINT / SIGQUIT (what
//! `pg_ctl stop -m fast|immediate` sends; `docker stop` sends the image's stop
//! signal, which is SIGINT for the official image but SIGTERM, a smart
//! shutdown that waits for clients, for an imported one) and wait until the
//! container exited, `pause` / `resume` are `docker pause` / `docker unpause`
//! (the cgroup freezer), `start_again` is `docker start`.
//!
//! Docker calls run on a small runtime of their own, so that the synchronous
//! methods (`pause`, `is_running`, `Drop`, ...) can wait for them from inside
//! any test's runtime without deadlocking it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use testcontainers::bollard::Docker;
use testcontainers::bollard::container::LogOutput;
use testcontainers::bollard::exec::StartExecResults;
use testcontainers::bollard::models::{ExecConfig, HostConfig, NetworkCreateRequest};
use testcontainers::bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use testcontainers::core::{IntoContainerPort, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, CopyTargetOptions, ImageExt};
use testcontainers_modules::postgres::Postgres;
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;

use crate::bins::{self, RunAs};
use crate::error::{HarnessError, Result};
use crate::procs;
use crate::server::{self, APP_PASSWORD, APP_USER, PgServer, PgServerBuilder};

/// Environment variable choosing the backend of new servers: `local` or
/// `container`. Unset or empty: `local` when the local PostgreSQL binaries
/// are found (see [`BIN_DIR_ENV`](crate::BIN_DIR_ENV)), else `container`.
pub const BACKEND_ENV: &str = "PGTESTKIT_BACKEND";
/// Environment variable naming the image of the container backend (default
/// `postgres`, the official image).
pub const IMAGE_ENV: &str = "PGTESTKIT_IMAGE";
/// Environment variable naming the image tag of the container backend
/// (default `15`).
pub const IMAGE_TAG_ENV: &str = "PGTESTKIT_IMAGE_TAG";
/// The password of the superuser `postgres` in containers (the official
/// image wants one). The URLs ([`PgServer::url`]) do not need it: as on the
/// local backend, the superuser is trusted.
pub const SUPERUSER_PASSWORD: &str = "pgtestkit-superuser";

const DEFAULT_IMAGE: &str = "postgres";
const DEFAULT_TAG: &str = "15";
/// The Docker network every container joins.
const NETWORK: &str = "pgtestkit";
/// Where the harness's `pg_hba.conf` goes in the container.
const HBA_PATH: &str = "/etc/pgtestkit/pg_hba.conf";
/// Where the server's socket dir (on this machine) is mounted in the
/// container; PostgreSQL's second unix socket goes there.
const SOCKET_MOUNT: &str = "/pgtestkit-socket";
/// The port PostgreSQL listens on inside the container.
pub(crate) const CONTAINER_PORT: u16 = 5432;
/// Label naming the process that owns a container: `host/pid/starttime`.
const OWNER_LABEL: &str = "org.protected-pool.pgtestkit.owner";
const LOOPBACK: &str = "127.0.0.1";
const PORT_ATTEMPTS: usize = 8;
const ERROR_LOG_LINES: usize = 30;
/// How long a stop or kill may take before the harness gives up.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dropping a server waits for its container's removal.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a [`PgServer`]'s PostgreSQL runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// A postmaster started from this machine's PostgreSQL binaries, as a
    /// child of the test process.
    Local,
    /// A Docker container, started through testcontainers.
    Container,
}

impl Backend {
    /// The backend new servers get: `$PGTESTKIT_BACKEND` if set (`local` or
    /// `container`), else [`Local`](Backend::Local) when the local binaries are
    /// found and [`Container`](Backend::Container) otherwise. An unknown value
    /// is an error.
    pub fn selected() -> Result<Backend> {
        selection().map(|(backend, _)| backend)
    }
}

/// The backend, and whether `$PGTESTKIT_BACKEND` chose it.
pub(crate) fn selection() -> Result<(Backend, bool)> {
    let value = std::env::var_os(BACKEND_ENV).unwrap_or_default();
    let value = value.to_string_lossy();
    match value.trim().to_ascii_lowercase().as_str() {
        "" => Ok(match bins::bin_dir() {
            Ok(_) => (Backend::Local, false),
            Err(_) => (Backend::Container, false),
        }),
        "local" => Ok((Backend::Local, true)),
        "container" | "docker" | "testcontainers" => Ok((Backend::Container, true)),
        other => Err(HarnessError::io(
            format!("reading ${BACKEND_ENV}"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{other}` is neither `local` nor `container`"),
            ),
        )),
    }
}

// ---- the runtime of Docker calls -----------------------------------------------

fn runtime() -> &'static tokio::runtime::Runtime {
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
async fn run<F>(fut: F) -> F::Output
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
fn block<F>(timeout: Duration, fut: F) -> Option<F::Output>
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

fn docker_error(context: impl Into<String>, e: impl fmt::Display) -> HarnessError {
    HarnessError::io(context, std::io::Error::other(e.to_string()))
}

/// The Docker client (testcontainers' configuration: `DOCKER_HOST`, ...),
/// checked once to answer. Call on the Docker runtime only.
async fn docker() -> Result<Docker> {
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

fn owner_label() -> String {
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

fn force_remove() -> testcontainers::bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build()
}

/// The id of the network `pgtestkit`, created if missing; sweeps leftovers
/// first. Once per process.
async fn network_id(docker: &Docker) -> Result<String> {
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

// ---- what a container is made of -----------------------------------------------------

/// The image to run: `$PGTESTKIT_IMAGE:$PGTESTKIT_IMAGE_TAG`.
fn image() -> (String, String) {
    let get = |var: &str, default: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    (
        get(IMAGE_ENV, DEFAULT_IMAGE),
        get(IMAGE_TAG_ENV, DEFAULT_TAG),
    )
}

/// The `postgres` arguments: the local backend's settings, then the
/// builder's (which win, coming later).
fn postgres_args(max_connections: Option<u32>, settings: &[(String, String)]) -> Vec<String> {
    let sockets = format!("/var/run/postgresql,{SOCKET_MOUNT}");
    let mut all: Vec<(String, String)> = [
        ("listen_addresses", "*"),
        ("unix_socket_directories", sockets.as_str()),
        ("fsync", "off"),
        ("synchronous_commit", "off"),
        ("shared_buffers", "16MB"),
        ("wal_level", "replica"),
        ("max_wal_senders", "10"),
        ("wal_keep_size", "64MB"),
        ("hot_standby", "on"),
        ("logging_collector", "off"),
        ("log_destination", "stderr"),
        ("lc_messages", "C"),
        ("password_encryption", "scram-sha-256"),
        ("hba_file", HBA_PATH),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if let Some(n) = max_connections {
        all.push(("max_connections".to_owned(), n.to_string()));
    }
    all.extend(settings.iter().cloned());
    all.into_iter()
        .flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")])
        .collect()
}

/// The local backend's `pg_hba.conf`, for the container's network.
fn hba_conf(password_auth: bool) -> String {
    let method = if password_auth {
        "scram-sha-256"
    } else {
        "trust"
    };
    format!(
        "# Written by protected-pool-testkit (container backend).\n\
         # TYPE  DATABASE     USER      ADDRESS   METHOD\n\
         local   all          all                 trust\n\
         local   replication  all                 trust\n\
         host    all          postgres  samenet   trust\n\
         host    replication  all       samenet   trust\n\
         host    all          all       samenet   {method}\n"
    )
}

/// Whether a `psql` client is there to run on this machine.
fn has_local_psql(bin_dir: &Path) -> bool {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if bin_dir.as_os_str().is_empty() {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join("psql"))))
    } else {
        executable(&bin_dir.join("psql"))
    }
}

fn next_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let me = std::process::id();
    let start = procs::stat(me).map_or(0, |s| s.starttime);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("pgtestkit-{me}-{start}-{n}")
}

struct Spec {
    image: String,
    tag: String,
    name: String,
    port: u16,
    socket_dir: String,
    args: Vec<String>,
    hba: String,
    start_timeout: Duration,
    replicate_from: Option<String>,
}

enum CreateError {
    PortInUse(HarnessError),
    Other(HarnessError),
}

/// Creates and starts the container (without waiting for PostgreSQL).
/// Runs on the Docker runtime.
async fn create(spec: Spec) -> Result<ContainerAsync<Postgres>, CreateError> {
    let docker = docker().await.map_err(CreateError::Other)?;
    let network = network_id(&docker).await.map_err(CreateError::Other)?;
    let request = Postgres::default()
        .with_user("postgres")
        .with_password(SUPERUSER_PASSWORD)
        .with_db_name("postgres")
        .with_name(spec.image.as_str())
        .with_tag(spec.tag.as_str())
        .with_container_name(spec.name.as_str())
        .with_network(network)
        .with_mapped_port(spec.port, CONTAINER_PORT.tcp())
        .with_mount(Mount::bind_mount(spec.socket_dir.as_str(), SOCKET_MOUNT))
        // Publish on loopback only, as the local backend listens.
        .with_host_config_modifier(|host_config: &mut HostConfig| {
            for binding in host_config
                .port_bindings
                .iter_mut()
                .flat_map(|b| b.values_mut())
                .flatten()
                .flatten()
            {
                binding.host_ip = Some(LOOPBACK.to_owned());
            }
        })
        .with_copy_to(
            CopyTargetOptions::new(HBA_PATH).with_mode(0o644),
            spec.hba.into_bytes(),
        )
        .with_cmd(spec.args)
        .with_env_var("POSTGRES_INITDB_ARGS", "--locale=C --encoding=UTF8")
        .with_label(OWNER_LABEL, owner_label())
        // Readiness is checked by connecting (`wait_ready`), for every image.
        .with_ready_conditions(Vec::new())
        .with_startup_timeout(spec.start_timeout);
    let request = match &spec.replicate_from {
        Some(primary) => {
            request.with_env_var("REPLICATE_FROM", format!("{primary}:{CONTAINER_PORT}"))
        }
        None => request,
    };
    match request.start().await {
        Ok(container) => Ok(container),
        Err(e) => {
            // It may have been created but not started: remove it.
            let _ = docker
                .remove_container(&spec.name, Some(force_remove()))
                .await;
            let message = format!("{e}");
            let err = docker_error(
                format!(
                    "starting a container of {}:{} (set {IMAGE_ENV} / {IMAGE_TAG_ENV}; \
                     .ci/postgres-image.sh builds a local image)",
                    spec.image, spec.tag
                ),
                e,
            );
            if message.contains("port is already allocated")
                || message.contains("address already in use")
            {
                Err(CreateError::PortInUse(err))
            } else {
                Err(CreateError::Other(err))
            }
        }
    }
}

// ---- the container of a server -------------------------------------------------------

/// A server's container; see the [module docs](self).
pub(crate) struct Container {
    /// `None` once removed.
    handle: Option<Arc<ContainerAsync<Postgres>>>,
    id: String,
    /// The container name: its host name on the network.
    name: String,
    image: String,
    config: PgServerBuilder,
    start_timeout: Duration,
    paused: AtomicBool,
    local_psql: bool,
    /// Log frames copied to the server's log file so far.
    log_frames: Arc<AtomicUsize>,
    log_copier: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

/// What `docker inspect` says.
#[derive(Debug, Default)]
struct State {
    running: bool,
    paused: bool,
    pid: Option<u32>,
    exit_code: Option<i64>,
}

async fn inspect(id: String) -> Result<State> {
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

async fn docker_log_tail(id: String, n: usize) -> String {
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

impl Container {
    fn handle(&self) -> Result<Arc<ContainerAsync<Postgres>>> {
        self.handle.clone().ok_or(HarnessError::NotRunning)
    }

    async fn state(&self) -> Result<State> {
        run(inspect(self.id.clone())).await
    }

    fn state_blocking(&self) -> Option<State> {
        block(STOP_TIMEOUT, inspect(self.id.clone()))?.ok()
    }

    async fn wait_exited(&self, what: &str) -> Result<()> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if !self.state().await?.running {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("container {} to exit after {what}", self.name),
                    after: STOP_TIMEOUT,
                    log_tail: self.docker_log_tail(ERROR_LOG_LINES).await,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn signal(&self, signal: &'static str) -> Result<()> {
        let id = self.id.clone();
        run(async move {
            let docker = docker().await?;
            let options = KillContainerOptionsBuilder::new().signal(signal).build();
            docker
                .kill_container(&id, Some(options))
                .await
                .map_err(|e| docker_error(format!("docker kill -s {signal} {id}"), e))
        })
        .await
    }

    async fn docker_log_tail(&self, n: usize) -> String {
        run(docker_log_tail(self.id.clone(), n)).await
    }

    /// Copies the container's log (stdout and stderr) to `path` as it is
    /// written, from where the last copy stopped; again after each start.
    pub(crate) fn copy_logs_to(&self, path: &Path) {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        let (id, frames, path) = (self.id.clone(), self.log_frames.clone(), path.to_owned());
        let task = runtime().spawn(async move {
            let Ok(docker) = docker().await else {
                return;
            };
            let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(&path) else {
                return;
            };
            let skip = frames.load(Ordering::SeqCst);
            let options = LogsOptionsBuilder::new()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .tail("all")
                .build();
            let mut stream = docker.logs(&id, Some(options));
            let mut seen = 0;
            while let Some(Ok(frame)) = stream.next().await {
                seen += 1;
                if seen > skip {
                    let _ = file.write_all(frame.as_ref());
                    frames.store(seen, Ordering::SeqCst);
                }
            }
        });
        let mut slot = self.log_copier.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = slot.replace(task) {
            old.abort();
        }
    }

    // ---- what PgServer delegates ----------------------------------------------------

    /// Whether `psql` runs on this machine (else `psql` runs in the container
    /// through `docker exec`).
    pub(crate) fn local_psql(&self) -> bool {
        self.local_psql
    }

    pub(crate) fn is_running(&self) -> bool {
        self.state_blocking().is_some_and(|s| s.running)
    }

    /// The host pid of the container's main process, which is the postmaster
    /// (the entrypoints `exec` it).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.state_blocking().and_then(|s| s.pid)
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The last `n` lines of `docker logs`.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        block(STOP_TIMEOUT, docker_log_tail(self.id.clone(), n)).unwrap_or_default()
    }

    pub(crate) async fn kill9(&self) -> Result<()> {
        if !self.state().await?.running {
            return Err(HarnessError::NotRunning);
        }
        // Docker kills a paused container too (and thaws it to let it die).
        self.signal("SIGKILL").await?;
        self.paused.store(false, Ordering::SeqCst);
        self.wait_exited("SIGKILL").await
    }

    /// `mode` is `fast` (SIGINT) or `immediate` (SIGQUIT), as for `pg_ctl`.
    pub(crate) async fn stop(&self, mode: &str) -> Result<()> {
        let state = self.state().await?;
        if !state.running {
            self.paused.store(false, Ordering::SeqCst);
            return Ok(());
        }
        if state.paused {
            let handle = self.handle()?;
            run(async move { handle.unpause().await })
                .await
                .map_err(|e| docker_error(format!("docker unpause {}", self.id), e))?;
        }
        self.paused.store(false, Ordering::SeqCst);
        let signal = if mode == "immediate" {
            "SIGQUIT"
        } else {
            "SIGINT"
        };
        self.signal(signal).await?;
        self.wait_exited(signal).await
    }

    pub(crate) fn pause(&self) -> Result<()> {
        let handle = self.handle()?;
        let id = self.id.clone();
        block(STOP_TIMEOUT, async move {
            if !inspect(id.clone()).await?.running {
                return Err(HarnessError::NotRunning);
            }
            handle
                .pause()
                .await
                .map_err(|e| docker_error(format!("docker pause {id}"), e))
        })
        .unwrap_or_else(|| Err(self.timeout("docker pause")))?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(crate) fn resume(&self) -> Result<()> {
        let handle = self.handle()?;
        let id = self.id.clone();
        block(STOP_TIMEOUT, async move {
            let state = inspect(id.clone()).await?;
            if !state.running {
                return Err(HarnessError::NotRunning);
            }
            if state.paused {
                handle
                    .unpause()
                    .await
                    .map_err(|e| docker_error(format!("docker unpause {id}"), e))?;
            }
            Ok(())
        })
        .unwrap_or_else(|| Err(self.timeout("docker unpause")))?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn timeout(&self, what: &str) -> HarnessError {
        HarnessError::Timeout {
            what: format!("`{what}` of container {}", self.name),
            after: STOP_TIMEOUT,
            log_tail: String::new(),
        }
    }

    /// `docker start` on the same port, then waits until PostgreSQL answers.
    pub(crate) async fn start_again(&self, server: &PgServer) -> Result<()> {
        if self.state().await?.running {
            return Err(HarnessError::AlreadyRunning);
        }
        let mut attempt = 1;
        loop {
            let handle = self.handle()?;
            match run(async move { handle.start().await }).await {
                Ok(()) => break,
                Err(e) => {
                    let message = e.to_string();
                    let port_clash = message.contains("port is already allocated")
                        || message.contains("address already in use");
                    if port_clash && attempt < PORT_ATTEMPTS {
                        // Another process took the port meanwhile; it may let go.
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                    return Err(HarnessError::StartFailed {
                        message: format!(
                            "PostgreSQL did not start again: `docker start {}` failed: {message}",
                            self.name
                        ),
                        log_path: server.log_path().to_owned(),
                        log_tail: self.docker_log_tail(ERROR_LOG_LINES).await,
                    });
                }
            }
        }
        self.paused.store(false, Ordering::SeqCst);
        self.copy_logs_to(server.log_path());
        self.wait_ready(server).await
    }

    /// Waits until PostgreSQL in the container answers a query; fails at
    /// once when the container exited.
    async fn wait_ready(&self, server: &PgServer) -> Result<()> {
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let state = self.state().await?;
            if !state.running {
                let code = state
                    .exit_code
                    .map_or_else(|| "?".to_owned(), |c| c.to_string());
                return Err(HarnessError::StartFailed {
                    message: format!(
                        "PostgreSQL did not start in container {} ({}): it exited with code {code}",
                        self.name, self.image
                    ),
                    log_path: server.log_path().to_owned(),
                    log_tail: self.docker_log_tail(ERROR_LOG_LINES).await,
                });
            }
            let last = match server.psql("SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::StartFailed {
                    message: format!(
                        "PostgreSQL did not start in container {} ({}): no answer on port {} \
                         after {:?} (last try: {last})",
                        self.name,
                        self.image,
                        server.port(),
                        self.start_timeout
                    ),
                    log_path: server.log_path().to_owned(),
                    log_tail: self.docker_log_tail(ERROR_LOG_LINES).await,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `psql` in the container (`docker exec`), for machines without a local
    /// client; same output and errors as the local one.
    pub(crate) async fn psql_exec(&self, db: &str, sql: &str) -> Result<String> {
        let command = format!("docker exec {} psql -d {db} <<< {sql:?}", self.name);
        let cmd: Vec<String> = [
            "sh",
            "-c",
            "printf '%s' \"$1\" | psql -X -A -t -q -v ON_ERROR_STOP=1 -U postgres -d \"$2\" -f -",
            "sh",
            sql,
            db,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let id = self.id.clone();
        let result = run(async move {
            let docker = docker().await.map_err(|e| e.to_string())?;
            let config = ExecConfig {
                cmd: Some(cmd),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            };
            let exec = docker
                .create_exec(&id, config)
                .await
                .map_err(|e| e.to_string())?;
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            if let StartExecResults::Attached { mut output, .. } = docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| e.to_string())?
            {
                while let Some(frame) = output.next().await {
                    match frame.map_err(|e| e.to_string())? {
                        LogOutput::StdErr { message } => stderr.extend_from_slice(&message),
                        other => stdout.extend_from_slice(other.as_ref()),
                    }
                }
            }
            let code = docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| e.to_string())?
                .exit_code;
            Ok::<_, String>((code, stdout, stderr))
        })
        .await;
        let (code, stdout, stderr) = result.map_err(|e| HarnessError::CommandFailed {
            command: command.clone(),
            code: None,
            stdout: String::new(),
            stderr: e,
        })?;
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        if code != Some(0) {
            return Err(HarnessError::CommandFailed {
                command,
                code: code.and_then(|c| i32::try_from(c).ok()),
                stdout,
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
            });
        }
        Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let copier = self
            .log_copier
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = copier {
            task.abort();
        }
        let Some(handle) = self.handle.take() else {
            return;
        };
        let id = self.id.clone();
        // Thaw a paused container first, so nothing waits on a frozen process.
        let _ = block(REMOVE_TIMEOUT, async move {
            if inspect(id.clone()).await.is_ok_and(|s| s.paused) {
                let _ = handle.unpause().await;
            }
            match Arc::try_unwrap(handle) {
                Ok(container) => {
                    // `rm` is `docker rm -f -v`.
                    if container.rm().await.is_ok() {
                        return;
                    }
                }
                Err(shared) => drop(shared),
            }
            if let Ok(docker) = docker().await {
                let _ = docker.remove_container(&id, Some(force_remove())).await;
            }
        });
    }
}

// ---- starting servers -------------------------------------------------------------------

/// Starts a server in a container with `config`; what
/// [`PgServerBuilder::start`] does on this backend.
/// `explicit`: `$PGTESTKIT_BACKEND` chose this backend (else it was chosen
/// because there are no local binaries, and no Docker engine either is
/// reported as [`HarnessError::BinariesNotFound`]).
pub(crate) async fn start(config: PgServerBuilder, explicit: bool) -> Result<PgServer> {
    if !explicit && let Err(e) = run(docker()).await {
        return Err(match bins::bin_dir() {
            Err(HarnessError::BinariesNotFound { mut searched }) => {
                searched.push(format!(
                    "the container backend, tried for want of binaries (set {BACKEND_ENV} \
                         to `local` or `container` to choose): {e}"
                ));
                HarnessError::BinariesNotFound { searched }
            }
            _ => e,
        });
    }
    let (_, password_auth, _, _) = config.options();
    let server = launch(config, None).await?;
    if password_auth {
        server
            .psql(&format!(
                "CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}';\n\
                 GRANT CREATE ON DATABASE postgres TO {APP_USER};\n\
                 GRANT ALL ON SCHEMA public TO {APP_USER};"
            ))
            .await?;
    }
    Ok(server)
}

/// A hot standby of the container server `primary`: a container of the same
/// image and options whose entrypoint runs `pg_basebackup -R -X stream` from
/// the primary (`REPLICATE_FROM`), then waits until it is in recovery,
/// answers queries, and streams.
pub(crate) async fn streaming_replica(primary: &PgServer, of: &Container) -> Result<PgServer> {
    let replica = launch(of.config.clone(), Some(of.name.clone())).await?;
    let hint = "; the image's entrypoint must honour REPLICATE_FROM, as the one \
                .ci/postgres-image.sh builds does";
    replica
        .wait_until_streaming(primary.port(), of.start_timeout, hint)
        .await?;
    Ok(replica)
}

/// Creates the container on a free port (moving to another on a clash),
/// wraps it in a [`PgServer`] and waits until PostgreSQL answers.
async fn launch(config: PgServerBuilder, replicate_from: Option<String>) -> Result<PgServer> {
    let (max_connections, password_auth, settings, start_timeout) = config.options();
    let (image, tag) = image();
    let args = postgres_args(max_connections, settings);
    let hba = hba_conf(password_auth);
    let bin_dir = bins::bin_dir().unwrap_or_default();
    let run_as = bins::run_as().unwrap_or(RunAs::Current);
    let local_psql = has_local_psql(&bin_dir);
    let (root, socket_dir, log_path) = PgServer::container_dirs(run_as)?;
    // Whatever uid PostgreSQL runs as in the container makes its socket here.
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| HarnessError::io(format!("chmod {}", socket_dir.display()), e))?;

    let mut attempt = 1;
    let (container, port, name) = loop {
        let port = server::reserve_port()?;
        let name = next_name();
        let spec = Spec {
            image: image.clone(),
            tag: tag.clone(),
            name: name.clone(),
            port,
            socket_dir: socket_dir.to_string_lossy().into_owned(),
            args: args.clone(),
            hba: hba.clone(),
            start_timeout,
            replicate_from: replicate_from.clone(),
        };
        match run(create(spec)).await {
            Ok(container) => break (container, port, name),
            Err(CreateError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {
                server::release_port(port);
                attempt += 1;
            }
            Err(CreateError::PortInUse(e) | CreateError::Other(e)) => {
                server::release_port(port);
                return Err(e);
            }
        }
    };
    let container = Container {
        id: container.id().to_owned(),
        name,
        handle: Some(Arc::new(container)),
        image: format!("{image}:{tag}"),
        config: config.clone(),
        start_timeout,
        paused: AtomicBool::new(false),
        local_psql,
        log_frames: Arc::new(AtomicUsize::new(0)),
        log_copier: Mutex::new(None),
    };
    container.copy_logs_to(&log_path);
    let server = PgServer::for_container(config, root, port, bin_dir, run_as, container);
    let c = server
        .container_backend()
        .expect("a container server has a container");
    c.wait_ready(&server).await?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_hba() {
        let args = postgres_args(Some(17), &[("work_mem".into(), "it's 7MB".into())]);
        let joined = args.join(" ");
        assert!(
            joined.contains("-c max_connections=17 -c work_mem=it's 7MB"),
            "{joined}"
        );
        assert!(joined.starts_with("-c listen_addresses=* "), "{joined}");
        assert!(hba_conf(true).contains("samenet   scram-sha-256"));
        assert!(hba_conf(false).contains("all       samenet   trust"));
    }
}
