//! [`Container`]: one Docker container of a server, and the Docker operations the faults map
//! onto. Dropping it removes the container.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use testcontainers::ContainerAsync;
use testcontainers::bollard::container::LogOutput;
use testcontainers::bollard::exec::StartExecResults;
use testcontainers::bollard::models::ExecConfig;
use testcontainers::bollard::query_parameters::{KillContainerOptionsBuilder, LogsOptionsBuilder};
use testcontainers_modules::postgres::Postgres;
use tokio::task::JoinHandle;

use super::engine::{self, State, block, docker, docker_error, run};
use crate::error::{HarnessError, Result};
use crate::run::{ERROR_LOG_LINES, StopMode};
use crate::site::StartError;

/// How long a stop or kill may take before the harness gives up.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dropping a container waits for its removal.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A server's container.
pub(super) struct Container {
    /// `None` once removed.
    handle: Option<Arc<ContainerAsync<Postgres>>>,
    id: String,
    /// The container name: its host name on the network.
    name: String,
    image: String,
    paused: AtomicBool,
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

impl Container {
    /// The container `created` (named `name`, of `image`), copying its log to `log_path`.
    pub(super) fn new(
        created: ContainerAsync<Postgres>,
        name: String,
        image: String,
        log_path: &Path,
    ) -> Container {
        let container = Container {
            id: created.id().to_owned(),
            handle: Some(Arc::new(created)),
            name,
            image,
            paused: AtomicBool::new(false),
            log_frames: Arc::new(AtomicUsize::new(0)),
            log_copier: Mutex::new(None),
        };
        container.copy_logs_to(log_path);
        container
    }

    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Its host name on the network.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn image(&self) -> &str {
        &self.image
    }

    fn handle(&self) -> Result<Arc<ContainerAsync<Postgres>>> {
        self.handle.clone().ok_or(HarnessError::NotRunning)
    }

    pub(super) async fn state(&self) -> Result<State> {
        run(engine::inspect(self.id.clone())).await
    }

    fn state_blocking(&self) -> Option<State> {
        block(STOP_TIMEOUT, engine::inspect(self.id.clone()))?.ok()
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

    pub(super) async fn docker_log_tail(&self, n: usize) -> String {
        run(engine::docker_log_tail(self.id.clone(), n)).await
    }

    /// Copies the container's log (stdout and stderr) to `path` as it is
    /// written, from where the last copy stopped; again after each start.
    fn copy_logs_to(&self, path: &Path) {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        let (id, frames, path) = (self.id.clone(), self.log_frames.clone(), path.to_owned());
        let task = engine::runtime().spawn(async move {
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

    pub(super) fn is_running(&self) -> bool {
        self.state_blocking().is_some_and(|s| s.running)
    }

    /// The host pid of the container's main process, which is the postmaster
    /// (the entrypoints `exec` it).
    pub(super) fn pid(&self) -> Option<u32> {
        self.state_blocking().and_then(|s| s.pid)
    }

    pub(super) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// The last `n` lines of `docker logs`.
    pub(super) fn log_tail(&self, n: usize) -> String {
        block(STOP_TIMEOUT, engine::docker_log_tail(self.id.clone(), n)).unwrap_or_default()
    }

    /// `docker kill -s KILL`.
    pub(super) async fn kill9(&self) -> Result<()> {
        if !self.state().await?.running {
            return Err(HarnessError::NotRunning);
        }
        // Docker kills a paused container too (and thaws it to let it die).
        self.signal("SIGKILL").await?;
        self.paused.store(false, Ordering::SeqCst);
        self.wait_exited("SIGKILL").await
    }

    /// Sends the postmaster SIGINT (fast) or SIGQUIT (immediate), what `pg_ctl stop` sends,
    /// and waits until the container exited. (`docker stop` sends the image's stop signal,
    /// which is SIGINT for the official image but SIGTERM, a smart shutdown that waits for
    /// clients, for an imported one.)
    pub(super) async fn stop(&self, mode: StopMode) -> Result<()> {
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
        let signal = match mode {
            StopMode::Fast => "SIGINT",
            StopMode::Immediate => "SIGQUIT",
        };
        self.signal(signal).await?;
        self.wait_exited(signal).await
    }

    /// `docker pause` (the cgroup freezer).
    pub(super) fn pause(&self) -> Result<()> {
        let handle = self.handle()?;
        let id = self.id.clone();
        block(STOP_TIMEOUT, async move {
            if !engine::inspect(id.clone()).await?.running {
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

    /// `docker unpause`.
    pub(super) fn resume(&self) -> Result<()> {
        let handle = self.handle()?;
        let id = self.id.clone();
        block(STOP_TIMEOUT, async move {
            let state = engine::inspect(id.clone()).await?;
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

    /// `docker start` (its port published again), copying its log on to `log_path`; does
    /// not wait for PostgreSQL.
    pub(super) async fn start(&self, log_path: &Path) -> Result<(), StartError> {
        let handle = self.handle()?;
        if let Err(e) = run(async move { handle.start().await }).await {
            let message = e.to_string();
            let error = HarnessError::StartFailed {
                message: format!(
                    "PostgreSQL did not start again: `docker start {}` failed: {message}",
                    self.name
                ),
                log_path: log_path.to_owned(),
                log_tail: self.docker_log_tail(ERROR_LOG_LINES).await,
            };
            let port_clash = message.contains("port is already allocated")
                || message.contains("address already in use");
            return Err(if port_clash {
                StartError::PortInUse(error)
            } else {
                StartError::Other(error)
            });
        }
        self.paused.store(false, Ordering::SeqCst);
        self.copy_logs_to(log_path);
        Ok(())
    }

    /// `psql` in the container (`docker exec`), for machines without a local
    /// client; same output and errors as the local one.
    pub(super) async fn psql_exec(&self, db: &str, sql: &str) -> Result<String> {
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
            if engine::inspect(id.clone()).await.is_ok_and(|s| s.paused) {
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
            engine::remove(id).await;
        });
    }
}
