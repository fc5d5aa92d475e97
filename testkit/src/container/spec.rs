//! What a server's container is made of (image, port, mounts, settings, `pg_hba.conf`), and
//! creating it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testcontainers::bollard::models::HostConfig;
use testcontainers::core::{IntoContainerPort, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, CopyTargetOptions, ImageExt};
use testcontainers_modules::postgres::Postgres;

use super::engine::{self, OWNER_LABEL, docker_error};
use crate::options::Options;
use crate::procs;
use crate::site::{Site, StartError};

/// Environment variable naming the image of the container backend (default
/// `postgres`, the official image).
pub const IMAGE_ENV: &str = "PGTESTKIT_IMAGE";
/// Environment variable naming the image tag of the container backend
/// (default `15`).
pub const IMAGE_TAG_ENV: &str = "PGTESTKIT_IMAGE_TAG";
/// The password of the superuser `postgres` in containers (the official
/// image wants one). The URLs ([`PgServer::url`](crate::PgServer::url)) do not need it: as on
/// the local backend, the superuser is trusted.
pub const SUPERUSER_PASSWORD: &str = "pgtestkit-superuser";

const DEFAULT_IMAGE: &str = "postgres";
const DEFAULT_TAG: &str = "15";
/// Where the harness's `pg_hba.conf` goes in the container.
const HBA_PATH: &str = "/etc/pgtestkit/pg_hba.conf";
/// Where the server's socket dir (on this machine) is mounted in the
/// container; PostgreSQL's second unix socket goes there.
const SOCKET_MOUNT: &str = "/pgtestkit-socket";
/// The port PostgreSQL listens on inside the container.
pub(super) const CONTAINER_PORT: u16 = 5432;
const LOOPBACK: &str = "127.0.0.1";

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

/// The `postgres` arguments: the settings of every server, for a container.
fn postgres_args(options: &Options) -> Vec<String> {
    let sockets = format!("/var/run/postgresql,{SOCKET_MOUNT}");
    let place = [
        ("listen_addresses", "*"),
        ("unix_socket_directories", sockets.as_str()),
        ("log_destination", "stderr"),
        ("hba_file", HBA_PATH),
    ];
    options
        .settings(&place)
        .into_iter()
        .flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")])
        .collect()
}

/// Whether a `psql` client is there to run on this machine.
pub(super) fn has_local_psql(bin_dir: &Path) -> bool {
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

/// A container to create, for a server at a [`Site`].
pub(super) struct Spec {
    image: String,
    tag: String,
    /// The container name: its host name on the network.
    pub(super) name: String,
    port: u16,
    socket_dir: String,
    args: Vec<String>,
    hba: String,
    start_timeout: Duration,
    /// The name of the container whose standby it is to be (`REPLICATE_FROM`).
    replicate_from: Option<String>,
}

impl Spec {
    /// A new container, with a name of its own, publishing PostgreSQL on the site's port.
    pub(super) fn new(site: &Site, replicate_from: Option<String>) -> Spec {
        let (image, tag) = image();
        Spec {
            image,
            tag,
            name: next_name(),
            port: site.port(),
            socket_dir: site.socket_dir().to_string_lossy().into_owned(),
            args: postgres_args(&site.options),
            hba: site.options.hba_conf("samenet"),
            start_timeout: site.options.start_timeout,
            replicate_from,
        }
    }

    /// `image:tag`.
    pub(super) fn image(&self) -> String {
        format!("{}:{}", self.image, self.tag)
    }
}

/// Creates and starts the container (without waiting for PostgreSQL).
/// Runs on the Docker runtime.
pub(super) async fn create(spec: Spec) -> Result<ContainerAsync<Postgres>, StartError> {
    let docker = engine::docker().await?;
    let network = engine::network_id(&docker).await?;
    let request = Postgres::default()
        .with_user("postgres")
        .with_password(SUPERUSER_PASSWORD)
        .with_db_name("postgres")
        .with_name(spec.image.as_str())
        .with_tag(spec.tag.as_str())
        .with_container_name(spec.name.as_str())
        .with_mapped_port(spec.port, CONTAINER_PORT.tcp())
        .with_mount(Mount::bind_mount(spec.socket_dir.as_str(), SOCKET_MOUNT))
        .with_host_config_modifier(move |host_config: &mut HostConfig| {
            // The network by id: its name may be ambiguous for a moment, when two processes
            // created it at once. Not through `with_network`, which takes a name: given an
            // id, testcontainers creates a network named after it, leaves it behind, and
            // removes (by that id) the shared network when the process's containers go.
            host_config.network_mode = Some(network.clone());
            // Publish on loopback only, as the local backend listens.
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
        .with_label(OWNER_LABEL, engine::owner_label())
        // Readiness is checked by connecting, for every image.
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
            engine::remove(spec.name.clone()).await;
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
                Err(StartError::PortInUse(err))
            } else {
                Err(StartError::Other(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_containers_settings_then_the_builders() {
        let options = Options {
            max_connections: Some(17),
            settings: vec![("work_mem".into(), "it's 7MB".into())],
            ..Options::default()
        };
        let joined = postgres_args(&options).join(" ");
        assert!(
            joined.contains("-c max_connections=17 -c work_mem=it's 7MB"),
            "{joined}"
        );
        assert!(joined.starts_with("-c listen_addresses=* "), "{joined}");
        assert!(joined.contains("-c hba_file=/etc/pgtestkit/pg_hba.conf"));
    }
}
