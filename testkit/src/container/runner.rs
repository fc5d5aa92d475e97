//! [`ContainerServer`]: a server run by a Docker container, which a rejoin replaces by a new
//! one on the same port.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::engine::{self, run};
use super::handle::Container;
use super::spec::{self, CONTAINER_PORT, Spec};
use crate::backend::BACKEND_ENV;
use crate::bins::{self, RunAs};
use crate::error::{HarnessError, Result};
use crate::options::Options;
use crate::programs;
use crate::run::{ERROR_LOG_LINES, Run, StopMode};
use crate::site::{Site, StartError};

/// A server run by a container. Dropping it removes the container, then its [`Site`] goes.
#[derive(Debug)]
pub(crate) struct ContainerServer {
    /// `None` only while a rejoin replaces it (or after one failed).
    container: Mutex<Option<Arc<Container>>>,
    /// Whether `psql` runs on this machine, over the socket mounted into the container (else
    /// in the container, through `docker exec`).
    local_psql: bool,
    site: Site,
}

impl ContainerServer {
    /// Starts a server in a container with `options`. `explicit`: `$PGTESTKIT_BACKEND`
    /// chose this backend (else it was chosen because there are no local binaries, and no
    /// Docker engine either is reported as [`HarnessError::BinariesNotFound`]).
    pub(crate) async fn start(options: Options, explicit: bool) -> Result<ContainerServer> {
        if !explicit && let Err(e) = run(engine::docker()).await {
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
        let bin_dir = bins::bin_dir().unwrap_or_default();
        let run_as = bins::run_as().unwrap_or(RunAs::Current);
        let local_psql = spec::has_local_psql(&bin_dir);
        Self::launch(Site::new(options, bin_dir, run_as).await?, local_psql, None).await
    }

    /// Creates the container on the site's port (moving to another on a clash), and waits
    /// until PostgreSQL answers.
    async fn launch(
        mut site: Site,
        local_psql: bool,
        replicate_from: Option<String>,
    ) -> Result<ContainerServer> {
        let socket_dir = site.socket_dir();
        // Whatever uid PostgreSQL runs as in the container makes its socket here.
        std::fs::set_permissions(socket_dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| HarnessError::io(format!("chmod {}", socket_dir.display()), e))?;
        let container = site
            .start_on_a_free_port(|site| Box::pin(create(site, replicate_from.clone())))
            .await?;
        let server = ContainerServer {
            container: Mutex::new(Some(Arc::new(container))),
            local_psql,
            site,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    fn container(&self) -> Result<Arc<Container>> {
        let slot = self.container.lock().unwrap_or_else(|p| p.into_inner());
        slot.clone().ok_or(HarnessError::NotRunning)
    }

    /// Waits until PostgreSQL in the container answers a query; fails at
    /// once when the container exited.
    async fn wait_ready(&self) -> Result<()> {
        let container = self.container()?;
        let timeout = self.site.options.start_timeout;
        let deadline = Instant::now() + timeout;
        let failed = |message: String, log_tail| HarnessError::StartFailed {
            message: format!(
                "PostgreSQL did not start in container {} ({}): {message}",
                container.name(),
                container.image()
            ),
            log_path: self.site.log_path().to_owned(),
            log_tail,
        };
        loop {
            let state = container.state().await?;
            if !state.running {
                let code = state
                    .exit_code
                    .map_or_else(|| "?".to_owned(), |c| c.to_string());
                return Err(failed(
                    format!("it exited with code {code}"),
                    container.docker_log_tail(ERROR_LOG_LINES).await,
                ));
            }
            let last = match self.psql("postgres", "SELECT 1").await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(failed(
                    format!(
                        "no answer on port {} after {timeout:?} (last try: {last})",
                        self.site.port()
                    ),
                    container.docker_log_tail(ERROR_LOG_LINES).await,
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Creates a container for `site`, on its port.
async fn create(site: &Site, replicate_from: Option<String>) -> Result<Container, StartError> {
    let spec = Spec::new(site, replicate_from);
    let (name, image) = (spec.name.clone(), spec.image());
    let created = run(spec::create(spec)).await?;
    Ok(Container::new(created, name, image, site.log_path()))
}

impl Run for ContainerServer {
    fn site(&self) -> &Site {
        &self.site
    }

    fn pid(&self) -> Option<u32> {
        self.container().ok()?.pid()
    }

    fn is_running(&self) -> bool {
        self.container().is_ok_and(|c| c.is_running())
    }

    fn is_paused(&self) -> bool {
        self.container().is_ok_and(|c| c.is_paused())
    }

    fn log_tail(&self, n: usize) -> String {
        self.container().map(|c| c.log_tail(n)).unwrap_or_default()
    }

    fn address_for_standbys(&self) -> (String, u16) {
        let name = self.container().map(|c| c.name().to_owned());
        (name.unwrap_or_default(), CONTAINER_PORT)
    }

    async fn psql(&self, db: &str, sql: &str) -> Result<String> {
        if !self.local_psql {
            return self.container()?.psql_exec(db, sql).await;
        }
        let site = &self.site;
        programs::psql(
            site.command("psql"),
            site.socket_dir(),
            CONTAINER_PORT,
            db,
            sql,
            || self.log_tail(ERROR_LOG_LINES),
        )
        .await
    }

    async fn kill9(&self) -> Result<()> {
        self.container()?.kill9().await
    }

    async fn stop(&self, mode: StopMode) -> Result<()> {
        self.container()?.stop(mode).await
    }

    fn pause(&self) -> Result<()> {
        self.container()?.pause()
    }

    fn resume(&self) -> Result<()> {
        self.container()?.resume()
    }

    async fn start_again(&self) -> Result<()> {
        let container = self.container()?;
        if container.state().await?.running {
            return Err(HarnessError::AlreadyRunning);
        }
        self.site
            .start_on_its_port(|site| {
                let container = Arc::clone(&container);
                Box::pin(async move { container.start(site.log_path()).await })
            })
            .await?;
        self.wait_ready().await
    }

    /// A container of the same image and options whose entrypoint runs `pg_basebackup -R -X
    /// stream` from this one (`REPLICATE_FROM`).
    async fn replica(&self) -> Result<ContainerServer> {
        let site = &self.site;
        let replica = Site::new(site.options.clone(), site.bin_dir.clone(), site.run_as).await?;
        let primary = self.container()?.name().to_owned();
        Self::launch(replica, self.local_psql, Some(primary)).await
    }

    /// Replaces the container by a new one on the same port, which the entrypoint makes from
    /// a base backup of `primary` (`REPLICATE_FROM`). The postmaster is the container's main
    /// process: once it is stopped, so is the container, and nothing (`pg_rewind`, say) can
    /// run on the data dir inside it any more.
    async fn rejoin(&self, primary: &ContainerServer) -> Result<()> {
        let primary = primary.container()?.name().to_owned();
        let old = self
            .container
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(old) = old {
            let id = old.id().to_owned();
            // Dropping the last handle removes the container, blocking while it does.
            tokio::task::spawn_blocking(move || drop(old))
                .await
                .map_err(|e| HarnessError::io("removing a container", std::io::Error::other(e)))?;
            // Also when a call in flight still holds a handle: the port must be free.
            run(engine::remove(id)).await;
        }
        // The engine may take a moment to let go of the old container's port.
        let container = self
            .site
            .start_on_its_port(|site| Box::pin(create(site, Some(primary.clone()))))
            .await?;
        *self.container.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(container));
        self.wait_ready().await
    }
}
