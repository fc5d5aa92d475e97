//! [`PgServer`] and its builder.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::bins::{self, RunAs};
use crate::container::{self, Backend, Container};
use crate::error::{HarnessError, Result};
use crate::procs;
use crate::template;

/// The login role that [`PgServerBuilder::password_auth`] creates.
pub const APP_USER: &str = "app";
/// The password of [`APP_USER`].
pub const APP_PASSWORD: &str = "app-password";

/// The only address servers listen on.
const HOST: &str = "127.0.0.1";
/// Name prefix of every directory the harness creates in the temp dir.
const DIR_PREFIX: &str = "pgtestkit-";
/// File in each such directory naming the process that owns it.
const OWNER_FILE: &str = "owner";
/// How long an admin `psql` call may take before it is abandoned.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a failed start is retried on a fresh port.
const PORT_ATTEMPTS: usize = 8;
/// Lines of server log included in errors.
const ERROR_LOG_LINES: usize = 30;

/// Options for a server; start it with [`PgServerBuilder::start`].
///
/// Every server is replication-ready: `wal_level = replica`,
/// `max_wal_senders = 10`, `hot_standby = on`, and `pg_hba.conf` lets the
/// superuser `postgres` replicate from 127.0.0.1 without a password, so
/// [`PgServer::streaming_replica`] works on any of them.
#[derive(Clone, Debug)]
pub struct PgServerBuilder {
    max_connections: Option<u32>,
    password_auth: bool,
    settings: Vec<(String, String)>,
    start_timeout: Duration,
}

impl Default for PgServerBuilder {
    fn default() -> Self {
        PgServerBuilder {
            max_connections: None,
            password_auth: false,
            settings: Vec::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

impl PgServerBuilder {
    /// The default options (same as [`PgServer::builder`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `max_connections` (PostgreSQL's default is 100).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// When on, creates the login role [`APP_USER`] with password
    /// [`APP_PASSWORD`] (allowed to create objects in database `postgres`)
    /// and requires `scram-sha-256` for TCP connections from 127.0.0.1 by
    /// every user except the superuser `postgres`, which keeps `trust` so the
    /// harness can administrate. Off by default: everything is `trust`.
    pub fn password_auth(mut self, on: bool) -> Self {
        self.password_auth = on;
        self
    }

    /// Adds a `postgresql.conf` setting, written after (so overriding) the
    /// harness's own. The value is quoted for you: `setting("work_mem",
    /// "8MB")`.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// How long to wait for the server to accept connections before giving
    /// up with an error holding the server log's tail (default 60 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// The options, for the container backend.
    pub(crate) fn options(&self) -> (Option<u32>, bool, &[(String, String)], Duration) {
        (
            self.max_connections,
            self.password_auth,
            &self.settings,
            self.start_timeout,
        )
    }

    /// Creates and starts the server, on the backend `$PGTESTKIT_BACKEND`
    /// selects (see [`Backend::selected`]).
    pub async fn start(self) -> Result<PgServer> {
        if let (Backend::Container, explicit) = container::selection()? {
            return container::start(self, explicit).await;
        }
        let password_auth = self.password_auth;
        let mut server = PgServer::prepare(self).await?;
        server.init_from_template().await?;
        server.start_fresh().await?;
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
}

/// A throwaway PostgreSQL server: its own temp dir (data dir, unix socket
/// dir, log file), listening on 127.0.0.1 at a free port.
///
/// Dropping it stops the server (immediate mode, resuming it first if it was
/// paused) and removes the temp dir, also when a test panics. Dropping never
/// panics. If the test process itself dies without unwinding (SIGKILL, Ctrl-C),
/// the next process that starts a server removes the leftovers.
///
/// All methods take `&self`, so a server can be shared (e.g. in an `Arc`)
/// between the code under test and the code injecting faults. Linux only (it
/// reads `/proc`).
#[derive(Debug)]
pub struct PgServer {
    root: TempDir,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    run_as: RunAs,
    config: PgServerBuilder,
    paused: AtomicBool,
    /// The postmaster, when this process started it: kept to reap it.
    postmaster: Mutex<Option<Child>>,
    /// The container, on the container backend (then most methods delegate).
    container: Option<Container>,
}

/// Why one attempt to start the postmaster failed.
enum LaunchError {
    /// Someone else took the port.
    PortInUse(HarnessError),
    /// Anything else.
    Other(HarnessError),
}

impl PgServer {
    /// Starts a server with the default options.
    pub async fn start() -> Result<PgServer> {
        Self::builder().start().await
    }

    /// Options for a new server.
    pub fn builder() -> PgServerBuilder {
        PgServerBuilder::default()
    }

    /// Makes a hot standby of `primary` with `pg_basebackup -R -X stream`
    /// into a new temp dir, starts it on its own port, and waits until it is
    /// in recovery, answers queries, and streams from the primary. It takes
    /// the primary's options (max_connections, settings, ...).
    pub async fn streaming_replica(primary: &PgServer) -> Result<PgServer> {
        if !primary.is_running() {
            return Err(HarnessError::NotRunning);
        }
        if let Some(c) = &primary.container {
            return container::streaming_replica(primary, c).await;
        }
        let mut replica = PgServer::prepare(primary.config.clone()).await?;
        let mut cmd = replica.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&replica.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-w"])
            .args([
                "-h",
                HOST,
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_checked(cmd, "pg_basebackup", Duration::from_secs(300)).await?;
        replica.start_fresh().await?;

        let timeout = replica.config.start_timeout;
        replica
            .wait_until_streaming(primary.port, timeout, "")
            .await?;
        Ok(replica)
    }

    /// Waits until this server is a hot standby that answers queries and streams from the
    /// primary on `primary_port`; `hint` ends the timeout message (what else to check).
    pub(crate) async fn wait_until_streaming(
        &self,
        primary_port: u16,
        timeout: Duration,
        hint: &str,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self
                .psql(
                    "SELECT pg_is_in_recovery()::text || ',' || \
                     (SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming')",
                )
                .await;
            if let Ok("true,1") = state.as_deref() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "the replica on port {} to be in recovery and streaming from port \
                         {primary_port} (last check: {state:?}{hint})",
                        self.port()
                    ),
                    after: timeout,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates the server's directory and picks its port; no data dir yet.
    async fn prepare(config: PgServerBuilder) -> Result<PgServer> {
        let bin_dir = bins::bin_dir()?;
        let run_as = bins::run_as()?;
        tokio::task::spawn_blocking(sweep_orphans)
            .await
            .map_err(|e| HarnessError::io("sweeping old servers", std::io::Error::other(e)))?;
        let root = make_root_dir(run_as, DIR_PREFIX)?;
        let base = root
            .path()
            .canonicalize()
            .map_err(|e| HarnessError::io("resolving the temp dir", e))?;
        let socket_dir = base.join("sock");
        std::fs::create_dir(&socket_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", socket_dir.display()), e))?;
        chown_to(&socket_dir, run_as)?;
        let port = reserve_port()?;
        Ok(PgServer {
            data_dir: base.join("data"),
            log_path: base.join("postgres.log"),
            socket_dir,
            root,
            port,
            bin_dir,
            run_as,
            config,
            paused: AtomicBool::new(false),
            postmaster: Mutex::new(None),
            container: None,
        })
    }

    /// A server's directory, for the container backend: `root_dir`, and in
    /// it the socket dir (created) and the log path.
    pub(crate) fn container_dirs(run_as: RunAs) -> Result<(TempDir, PathBuf, PathBuf)> {
        sweep_orphans();
        let root = make_root_dir(run_as, DIR_PREFIX)?;
        let base = root
            .path()
            .canonicalize()
            .map_err(|e| HarnessError::io("resolving the temp dir", e))?;
        let socket_dir = base.join("sock");
        std::fs::create_dir(&socket_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", socket_dir.display()), e))?;
        Ok((root, socket_dir, base.join("postgres.log")))
    }

    /// Wraps a started container (see [`crate::container`]) in a server, with
    /// the directory from [`container_dirs`](Self::container_dirs) and the
    /// published port.
    pub(crate) fn for_container(
        config: PgServerBuilder,
        root: TempDir,
        port: u16,
        bin_dir: PathBuf,
        run_as: RunAs,
        container: Container,
    ) -> PgServer {
        let base = root
            .path()
            .canonicalize()
            .unwrap_or_else(|_| root.path().to_owned());
        PgServer {
            data_dir: base.join("data"),
            log_path: base.join("postgres.log"),
            socket_dir: base.join("sock"),
            root,
            port,
            bin_dir,
            run_as,
            config,
            paused: AtomicBool::new(false),
            postmaster: Mutex::new(None),
            container: Some(container),
        }
    }

    /// The container, on the container backend.
    pub(crate) fn container_backend(&self) -> Option<&Container> {
        self.container.as_ref()
    }

    /// Where this server runs.
    pub fn backend(&self) -> Backend {
        match self.container {
            Some(_) => Backend::Container,
            None => Backend::Local,
        }
    }

    /// Creates the data dir from the process's `initdb` template.
    async fn init_from_template(&self) -> Result<()> {
        let template = template::get(&self.bin_dir, self.run_as).await?;
        let (data_dir, run_as) = (self.data_dir.clone(), self.run_as);
        tokio::task::spawn_blocking(move || template.write_to(&data_dir, run_as))
            .await
            .map_err(|e| HarnessError::io("writing the data directory", std::io::Error::other(e)))?
    }

    // ---- accessors -------------------------------------------------------

    /// The TCP port, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// A URL for the superuser `postgres` and database `postgres`, e.g.
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres", None, "postgres")
    }

    /// A URL for `user` (with `password`, if any) and database `db`;
    /// components are percent-encoded.
    pub fn url_for(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut url = format!("postgres://{}", pct_encode(user));
        if let Some(pw) = password {
            url.push(':');
            url.push_str(&pct_encode(pw));
        }
        let _ = write!(url, "@{HOST}:{}/{}", self.port, pct_encode(db));
        url
    }

    /// The URL for [`APP_USER`] with [`APP_PASSWORD`] and database `postgres`
    /// (the role exists only with [`PgServerBuilder::password_auth`]).
    pub fn app_url(&self) -> String {
        self.url_for(APP_USER, Some(APP_PASSWORD), "postgres")
    }

    /// The data directory.
    ///
    /// On the container backend it is inside the container
    /// (`/var/lib/postgresql/data`); this is then `data` in
    /// [`root_dir`](Self::root_dir), a path that does not exist.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the server's unix socket.
    ///
    /// On the container backend, a directory of this machine mounted into the
    /// container, where PostgreSQL makes a second socket: `.s.PGSQL.5432`, for
    /// the port inside the container.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The temp dir holding the data dir, the socket dir and the log.
    ///
    /// On the container backend it is on this machine and holds the socket
    /// dir and the log copy; it is removed on drop all the same.
    pub fn root_dir(&self) -> &Path {
        self.root.path()
    }

    /// The server log (the postmaster's stderr).
    ///
    /// On the container backend, a copy of the container's log (`docker
    /// logs`, stdout and stderr) that the harness appends to as it is written.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n` lines of the server log (empty if there is none yet);
    /// on the container backend, of `docker logs`.
    pub fn log_tail(&self, n: usize) -> String {
        if let Some(c) = &self.container {
            return c.log_tail(n);
        }
        let Ok(bytes) = std::fs::read(&self.log_path) else {
            return String::new();
        };
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The directory of the PostgreSQL binaries in use.
    ///
    /// On the container backend, those of this machine if found (its `psql`
    /// is the client the harness uses), else an empty path (so
    /// [`command`](Self::command) looks programs up in `PATH`).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A command for the PostgreSQL program `program` (e.g. `"psql"`) from
    /// [`bin_dir`](Self::bin_dir), run the way the harness runs its own: as
    /// the `postgres` OS user when running as root, in the server's temp dir,
    /// with an environment holding only `PATH`, `LD_LIBRARY_PATH`, `HOME` (the
    /// temp dir) and `LC_ALL=C` (so no stray `PG*` variables apply), stdin
    /// from /dev/null, and killed when dropped.
    pub fn command(&self, program: &str) -> Command {
        pg_command(&self.bin_dir, program, self.run_as, self.root.path())
    }

    /// The postmaster's pid, read from `postmaster.pid`; `None` unless the
    /// server is running (a paused server is running).
    ///
    /// On the container backend, the pid of the container's main process (the
    /// postmaster) on the Docker host, as the engine reports it.
    pub fn pid(&self) -> Option<u32> {
        if let Some(c) = &self.container {
            return c.pid();
        }
        let pid = procs::read_pid_file(&self.data_dir)?.pid?;
        self.is_our_postmaster(pid).then_some(pid)
    }

    /// Whether the postmaster is alive (paused counts as alive).
    pub fn is_running(&self) -> bool {
        if let Some(c) = &self.container {
            return c.is_running();
        }
        self.pid().is_some()
    }

    /// Whether [`pause`](Self::pause) was called without a matching
    /// [`resume`](Self::resume) (or stop, kill, restart) since.
    pub fn is_paused(&self) -> bool {
        if let Some(c) = &self.container {
            return c.is_paused();
        }
        self.paused.load(Ordering::SeqCst)
    }

    fn is_our_postmaster(&self, pid: u32) -> bool {
        // The postmaster's working directory is its data directory.
        procs::is_alive(pid)
            && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == self.data_dir)
    }

    // ---- starting ----------------------------------------------------------

    /// First start of a new data dir: on a port clash, moves to a new port.
    async fn start_fresh(&mut self) -> Result<()> {
        let mut attempt = 1;
        loop {
            self.write_config()?;
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(LaunchError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    let new_port = reserve_port()?;
                    release_port(self.port);
                    self.port = new_port;
                }
                Err(LaunchError::PortInUse(e) | LaunchError::Other(e)) => return Err(e),
            }
        }
    }

    /// Starts the server again on the same data dir and port, after
    /// [`kill9`](Self::kill9) or a stop. Crash recovery runs if it was killed;
    /// a stale `postmaster.pid` that would stop PostgreSQL from starting is
    /// removed. Fails with [`HarnessError::AlreadyRunning`] if it runs.
    pub async fn start_again(&self) -> Result<()> {
        if let Some(c) = &self.container {
            return c.start_again(self).await;
        }
        if self.is_running() {
            return Err(HarnessError::AlreadyRunning);
        }
        self.remove_stale_lock_files();
        let mut attempt = 1;
        loop {
            match self.launch().await {
                Ok(()) => return Ok(()),
                // Another process took the port meanwhile; it may let go.
                Err(LaunchError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(LaunchError::PortInUse(e) | LaunchError::Other(e)) => return Err(e),
            }
        }
    }

    /// Stops the server if it runs (fast mode), then starts it again on the
    /// same data dir and port.
    pub async fn restart(&self) -> Result<()> {
        self.stop_fast().await?;
        self.start_again().await
    }

    /// PostgreSQL refuses to start while `postmaster.pid` or the socket's
    /// lock file (`.s.PGSQL.<port>.lock`) names a live process. After a
    /// SIGKILL the pid is normally dead and PostgreSQL cleans up by itself
    /// (including the old shared memory), so the files are kept; they are
    /// removed only if the pid is a zombie not yet reaped by init (common in
    /// containers, for a few seconds) or was reused by some other process.
    fn remove_stale_lock_files(&self) {
        let stale = |pid: u32| {
            procs::is_zombie(pid) || (procs::is_alive(pid) && !self.is_our_postmaster(pid))
        };
        if let Some(pf) = procs::read_pid_file(&self.data_dir)
            && let Some(pid) = pf.pid.filter(|&pid| stale(pid))
        {
            if let Some(shmid) = pf.shmid {
                procs::remove_stale_shmem(pid, shmid);
            }
            let _ = std::fs::remove_file(self.data_dir.join("postmaster.pid"));
        }
        let socket = self.socket_dir.join(format!(".s.PGSQL.{}", self.port));
        let lock = self.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port));
        let lock_pid = std::fs::read_to_string(&lock)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
        if lock_pid.is_some_and(stale) {
            let _ = std::fs::remove_file(&lock);
            let _ = std::fs::remove_file(&socket);
        }
    }

    /// Starts the postmaster once and waits until it is ready and accepts
    /// TCP connections.
    ///
    /// This is what `pg_ctl start -w` does, minus its 100 ms polling
    /// interval, which made up half of a server's start time: `postgres`
    /// runs directly as a child of this process (in its own process group,
    /// stderr to the log), and `postmaster.pid` is polled every 5 ms until it
    /// says `ready` (or `standby`). Being the parent also means its exit is
    /// reaped at once instead of leaving a zombie.
    async fn launch(&self) -> Result<(), LaunchError> {
        let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let timeout = self.config.start_timeout;
        let io_err = |what: &str, e| {
            LaunchError::Other(HarnessError::io(
                format!("{what} {}", self.log_path.display()),
                e,
            ))
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| io_err("opening", e))?;
        let log2 = log.try_clone().map_err(|e| io_err("opening", e))?;
        chown_to(&self.log_path, self.run_as).map_err(LaunchError::Other)?;

        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            LaunchError::Other(HarnessError::io(
                format!("running {}", self.bin_dir.join("postgres").display()),
                e,
            ))
        })?;
        let pid = child.id();

        let deadline = Instant::now() + timeout;
        let failure = loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    break Some(format!("the postmaster exited while starting ({status})"));
                }
                Ok(None) => {}
                Err(e) => break Some(format!("could not watch the postmaster: {e}")),
            }
            let ready = procs::read_pid_file(&self.data_dir).is_some_and(|pf| {
                pf.pid.is_some()
                    && pf.pid == pid
                    && matches!(pf.status.as_deref(), Some("ready" | "standby"))
            });
            if ready {
                break None;
            }
            if Instant::now() >= deadline {
                break Some(format!("the postmaster was not ready after {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if let Some(message) = failure {
            if let Some(pid) = pid.filter(|&p| procs::is_alive(p)) {
                procs::shutdown_immediate_blocking(pid);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let new_log = self.log_since(log_offset);
            let port_clash = new_log.contains("Address already in use")
                || new_log.contains("could not create any TCP/IP sockets");
            let err = HarnessError::StartFailed {
                message: format!("PostgreSQL did not start on port {}: {message}", self.port),
                log_path: self.log_path.clone(),
                log_tail: self.log_tail(ERROR_LOG_LINES),
            };
            return Err(if port_clash {
                LaunchError::PortInUse(err)
            } else {
                LaunchError::Other(err)
            });
        }
        *self.postmaster.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        self.paused.store(false, Ordering::SeqCst);

        loop {
            match tokio::net::TcpStream::connect((HOST, self.port)).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    self.kill_leftover_blocking();
                    return Err(LaunchError::Other(HarnessError::Timeout {
                        what: format!("a TCP connection to {HOST}:{} (last error: {e})", self.port),
                        after: timeout,
                        log_tail: self.log_tail(ERROR_LOG_LINES),
                    }));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Reaps the postmaster if this process started it and it has exited.
    fn reap(&self) {
        let mut slot = self.postmaster.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(child) = slot.as_mut()
            && !matches!(child.try_wait(), Ok(None))
        {
            *slot = None;
        }
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn kill_leftover_blocking(&self) {
        if let Some(pid) = self.pid() {
            procs::shutdown_immediate_blocking(pid);
        }
        self.reap();
    }

    /// Writes `testkit.conf` (included from `postgresql.conf`) and
    /// `pg_hba.conf` for the current port.
    fn write_config(&self) -> Result<()> {
        let mut conf = String::from(
            "# Written by protected-pool-testkit before every first start; \
             included from postgresql.conf.\n",
        );
        let mut set = |name: &str, value: &str| {
            let value = value.replace('\\', "\\\\").replace('\'', "''");
            let _ = writeln!(conf, "{name} = '{value}'");
        };
        set("listen_addresses", HOST);
        set("port", &self.port.to_string());
        set(
            "unix_socket_directories",
            &self.socket_dir.to_string_lossy(),
        );
        set("fsync", "off");
        set("synchronous_commit", "off");
        set("shared_buffers", "16MB");
        set("wal_level", "replica");
        set("max_wal_senders", "10");
        set("wal_keep_size", "64MB");
        set("hot_standby", "on");
        set("logging_collector", "off");
        set("lc_messages", "C");
        set("password_encryption", "scram-sha-256");
        if let Some(n) = self.config.max_connections {
            set("max_connections", &n.to_string());
        }
        for (name, value) in &self.config.settings {
            set(name, value);
        }
        let conf_path = self.data_dir.join("testkit.conf");
        std::fs::write(&conf_path, conf)
            .map_err(|e| HarnessError::io(format!("writing {}", conf_path.display()), e))?;
        chown_to(&conf_path, self.run_as)?;

        let method = if self.config.password_auth {
            "scram-sha-256"
        } else {
            "trust"
        };
        let hba = format!(
            "# Written by protected-pool-testkit.\n\
             # TYPE  DATABASE     USER      ADDRESS        METHOD\n\
             local   all          all                      trust\n\
             local   replication  all                      trust\n\
             host    all          postgres  127.0.0.1/32   trust\n\
             host    replication  postgres  127.0.0.1/32   trust\n\
             host    all          all       127.0.0.1/32   {method}\n"
        );
        let hba_path = self.data_dir.join("pg_hba.conf");
        std::fs::write(&hba_path, hba)
            .map_err(|e| HarnessError::io(format!("writing {}", hba_path.display()), e))?;
        chown_to(&hba_path, self.run_as)
    }

    // ---- faults and control ------------------------------------------------

    /// SIGKILLs the postmaster and every process it forked, as in a crash,
    /// and waits until they are gone. The server stops answering; the data
    /// dir stays, so [`start_again`](Self::start_again) brings it back.
    pub async fn kill9(&self) -> Result<()> {
        if let Some(c) = &self.container {
            return c.kill9().await;
        }
        let pm = self.pid().ok_or(HarnessError::NotRunning)?;
        // Freeze it first so it cannot fork anything new while we look.
        let _ = procs::signal(pm, Signal::STOP);
        let mut all = vec![pm];
        all.extend(procs::descendants(pm));
        procs::signal_all(&all, Signal::KILL);
        self.paused.store(false, Ordering::SeqCst);
        let gone = procs::wait_gone(&all, Duration::from_secs(10)).await;
        self.reap();
        if gone {
            Ok(())
        } else {
            Err(HarnessError::Timeout {
                what: format!("the killed processes {all:?} to exit"),
                after: Duration::from_secs(10),
                log_tail: self.log_tail(ERROR_LOG_LINES),
            })
        }
    }

    /// `pg_ctl stop -m fast`: disconnects clients, checkpoints, exits. Does
    /// nothing if the server is not running; resumes it first if paused.
    pub async fn stop_fast(&self) -> Result<()> {
        self.stop("fast").await
    }

    /// `pg_ctl stop -m immediate`: exits at once, without a checkpoint (the
    /// next start runs crash recovery). Does nothing if the server is not
    /// running; resumes it first if paused.
    pub async fn stop_immediate(&self) -> Result<()> {
        self.stop("immediate").await
    }

    async fn stop(&self, mode: &str) -> Result<()> {
        if let Some(c) = &self.container {
            return c.stop(mode).await;
        }
        let Some(pm) = self.pid() else {
            return Ok(());
        };
        let mut all = vec![pm];
        all.extend(procs::descendants(pm));
        procs::signal_all(&all, Signal::CONT);
        self.paused.store(false, Ordering::SeqCst);
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-s", "-t", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        run_checked(cmd, "pg_ctl stop", Duration::from_secs(70)).await?;
        let gone = procs::wait_gone(&all, Duration::from_secs(10)).await;
        self.reap();
        if gone {
            Ok(())
        } else {
            Err(HarnessError::Timeout {
                what: format!("the server processes {all:?} to exit"),
                after: Duration::from_secs(10),
                log_tail: self.log_tail(ERROR_LOG_LINES),
            })
        }
    }

    /// SIGSTOPs the postmaster and all its children (backends included), so
    /// new connections and established ones hang. Undo with
    /// [`resume`](Self::resume); stopping, killing and dropping resume first.
    pub fn pause(&self) -> Result<()> {
        if let Some(c) = &self.container {
            return c.pause();
        }
        let pm = self.pid().ok_or(HarnessError::NotRunning)?;
        // The postmaster first: once stopped it forks no new children.
        procs::signal(pm, Signal::STOP)
            .map_err(|e| HarnessError::io(format!("SIGSTOP to postmaster {pm}"), e))?;
        let mut all = vec![pm];
        all.extend(procs::descendants(pm));
        procs::signal_all(&all, Signal::STOP);
        self.paused.store(true, Ordering::SeqCst);
        // Signals are delivered asynchronously; wait until they took effect.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline
            && !all
                .iter()
                .all(|&p| procs::stat(p).is_none_or(|s| matches!(s.state, 'T' | 't' | 'Z')))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// SIGCONTs the postmaster and all its children.
    pub fn resume(&self) -> Result<()> {
        if let Some(c) = &self.container {
            return c.resume();
        }
        let pm = self.pid().ok_or(HarnessError::NotRunning)?;
        let mut all = procs::descendants(pm);
        all.push(pm);
        procs::signal_all(&all, Signal::CONT);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    // ---- admin ---------------------------------------------------------------

    /// Runs `sql` (one or more statements) through `psql` as the superuser in
    /// database `postgres`, over the unix socket (on the container backend:
    /// the one in [`socket_dir`](Self::socket_dir), or with `docker exec` when
    /// this machine has no `psql`), and returns its stdout with
    /// the trailing newline removed: unaligned, tuples only, quiet, so
    /// `psql("SELECT 1, 2")` is `"1|2"`. Stops at the first error, which
    /// becomes [`HarnessError::CommandFailed`] holding psql's stderr.
    pub async fn psql(&self, sql: &str) -> Result<String> {
        self.psql_db("postgres", sql).await
    }

    /// Like [`psql`](Self::psql), in database `db`.
    pub async fn psql_db(&self, db: &str, sql: &str) -> Result<String> {
        let port = match &self.container {
            Some(c) if !c.local_psql() => return c.psql_exec(db, sql).await,
            Some(_) => container::CONTAINER_PORT,
            None => self.port,
        };
        let conninfo = format!(
            "host={} port={} user=postgres dbname={}",
            conninfo_quote(&self.socket_dir.to_string_lossy()),
            port,
            conninfo_quote(db)
        );
        let mut cmd = self.command("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
            "-d",
        ])
        .arg(conninfo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError::io("running psql", e))?;
        let stdin = child.stdin.take();
        let write = async move {
            if let Some(mut stdin) = stdin {
                // psql may exit early on an error; its status tells.
                let _ = stdin.write_all(sql.as_bytes()).await;
            }
        };
        let output = tokio::time::timeout(PSQL_TIMEOUT, async {
            tokio::join!(write, child.wait_with_output()).1
        })
        .await
        .map_err(|_| HarnessError::Timeout {
            what: format!("psql to run {sql:?}"),
            after: PSQL_TIMEOUT,
            log_tail: self.log_tail(ERROR_LOG_LINES),
        })?
        .map_err(|e| HarnessError::io("running psql", e))?;
        let output = check_output(output, &format!("psql -d {db} <<< {sql:?}"))?;
        let mut out = String::from_utf8_lossy(&output.stdout).into_owned();
        if out.ends_with('\n') {
            out.pop();
        }
        Ok(out)
    }

    /// `CREATE DATABASE "name"`.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        self.psql(&format!("CREATE DATABASE {}", quote_ident(name)))
            .await
            .map(drop)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Removes the container (unpausing it first), waiting for that.
        drop(self.container.take());
        if let Some(pf) = procs::read_pid_file(&self.data_dir)
            && let Some(pm) = pf.pid
        {
            if self.is_our_postmaster(pm) {
                procs::shutdown_immediate_blocking(pm);
            } else if let Some(shmid) = pf.shmid {
                // Killed with SIGKILL and not started again.
                procs::remove_stale_shmem(pm, shmid);
            }
        }
        self.reap();
        release_port(self.port);
        // `self.root` (a TempDir) is dropped next and removes everything.
    }
}

// ---- helpers shared with the template ------------------------------------

/// A command for a PostgreSQL program; see [`PgServer::command`].
pub(crate) fn pg_command(bin_dir: &Path, program: &str, run_as: RunAs, cwd: &Path) -> Command {
    let mut cmd = Command::new(bin_dir.join(program));
    cmd.env_clear();
    for var in ["PATH", "LD_LIBRARY_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.env("LC_ALL", "C")
        .env("HOME", cwd)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let RunAs::User { uid, gid } = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut s = std.get_program().to_string_lossy().into_owned();
    for arg in std.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn check_output(output: Output, command: &str) -> Result<Output> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(HarnessError::CommandFailed {
            command: command.to_owned(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs `cmd` to completion within `timeout`; a non-zero exit is an error.
pub(crate) async fn run_checked(mut cmd: Command, what: &str, timeout: Duration) -> Result<Output> {
    let command = describe(&cmd);
    let output = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| HarnessError::Timeout {
            what: format!("{what} (`{command}`)"),
            after: timeout,
            log_tail: String::new(),
        })?
        .map_err(|e| HarnessError::io(format!("running `{command}`"), e))?;
    check_output(output, &command)
}

fn chown_to(path: &Path, run_as: RunAs) -> Result<()> {
    if let RunAs::User { uid, gid } = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| HarnessError::io(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

/// Environment variable naming the directory the harness creates its
/// servers' directories in.
pub const TMPDIR_ENV: &str = "PGTESTKIT_TMPDIR";

/// Where server directories go: `$PGTESTKIT_TMPDIR`, else `/dev/shm` (tmpfs:
/// creating a data dir's ~1000 files there is several times faster than on a
/// disk), else the system temp dir.
fn base_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os(TMPDIR_ENV).filter(|d| !d.is_empty()) {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        dirs.push(shm.to_path_buf());
    }
    dirs.push(std::env::temp_dir());
    dirs
}

/// A new directory in the first usable of [`base_dirs`], owned by the server
/// user, with an owner file naming this process (see [`sweep_orphans`]).
pub(crate) fn make_root_dir(run_as: RunAs, prefix: &str) -> Result<TempDir> {
    let mut error = std::io::Error::other("no directory to create it in");
    let mut tried = PathBuf::new();
    for base in base_dirs() {
        match tempfile::Builder::new().prefix(prefix).tempdir_in(&base) {
            Ok(dir) => return claim_root_dir(dir, run_as),
            Err(e) => (error, tried) = (e, base),
        }
    }
    Err(HarnessError::io(
        format!("creating a temp dir in {}", tried.display()),
        error,
    ))
}

fn claim_root_dir(dir: TempDir, run_as: RunAs) -> Result<TempDir> {
    let me = std::process::id();
    let start = procs::stat(me).map_or(0, |s| s.starttime);
    let owner = dir.path().join(OWNER_FILE);
    std::fs::write(&owner, format!("{me} {start}\n"))
        .map_err(|e| HarnessError::io(format!("writing {}", owner.display()), e))?;
    chown_to(dir.path(), run_as)?;
    Ok(dir)
}

/// Removes what test processes that died without unwinding left behind:
/// directories of ours whose owner process is gone, stopping a postmaster
/// still running there. Once per process, best effort.
fn sweep_orphans() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let entries = base_dirs()
            .into_iter()
            .filter_map(|base| std::fs::read_dir(base).ok())
            .flatten();
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let dir = entry.path();
            let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
                continue;
            };
            let mut fields = owner.split_whitespace().map(|f| f.parse::<u64>().ok());
            let (Some(Some(pid)), Some(Some(start))) = (fields.next(), fields.next()) else {
                continue;
            };
            let owner_alive = u32::try_from(pid)
                .ok()
                .and_then(procs::stat)
                .is_some_and(|s| s.starttime == start && !matches!(s.state, 'Z' | 'X' | 'x'));
            if owner_alive {
                continue;
            }
            let Ok(dir) = dir.canonicalize() else {
                continue;
            };
            let data = dir.join("data");
            if let Some(pf) = procs::read_pid_file(&data)
                && let Some(pm) = pf.pid
            {
                let ours = procs::is_alive(pm)
                    && std::fs::read_link(format!("/proc/{pm}/cwd")).is_ok_and(|c| c == data);
                if ours {
                    procs::shutdown_immediate_blocking(pm);
                } else if let Some(shmid) = pf.shmid {
                    procs::remove_stale_shmem(pm, shmid);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}

// ---- ports -------------------------------------------------------------------

/// Ports handed to live servers of this process, so two servers started at
/// the same time never get the same one. Clashes with other processes are
/// handled by retrying on a new port.
static PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

pub(crate) fn reserve_port() -> Result<u16> {
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind((HOST, 0))
            .map_err(|e| HarnessError::io("finding a free port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| HarnessError::io("finding a free port", e))?
            .port();
        drop(listener);
        if PORTS.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return Ok(port);
        }
    }
    Err(HarnessError::io(
        "finding a free port",
        std::io::Error::other("the OS kept offering ports already in use by this process"),
    ))
}

pub(crate) fn release_port(port: u16) {
    PORTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&port);
}

// ---- quoting -----------------------------------------------------------------

fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(pct_encode("a b@c:d/é"), "a%20b%40c%3Ad%2F%C3%A9");
        assert_eq!(conninfo_quote(r"it's\x"), r"'it\'s\\x'");
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }

    #[tokio::test]
    async fn a_taken_port_moves_the_server_to_another() {
        let squatter = std::net::TcpListener::bind((HOST, 0)).unwrap();
        let taken = squatter.local_addr().unwrap().port();
        let mut server = PgServer::prepare(PgServerBuilder::default()).await.unwrap();
        release_port(server.port);
        server.port = taken;
        server.init_from_template().await.unwrap();
        server.start_fresh().await.unwrap();
        assert_ne!(server.port(), taken);
        assert_eq!(
            server.psql("SHOW port").await.unwrap(),
            server.port().to_string()
        );
        assert!(server.log_tail(50).contains("Address already in use"));
        drop(squatter);
    }

    #[test]
    fn reserved_ports_are_distinct() {
        let a = reserve_port().unwrap();
        let b = reserve_port().unwrap();
        assert_ne!(a, b);
        release_port(a);
        release_port(b);
    }
}
