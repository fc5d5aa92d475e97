//! A throwaway PgBouncer in front of a [`PgServer`]: the real `pgbouncer` program, on a free
//! port of 127.0.0.1, with its own ini file, user list and log in a temp dir of its own.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::bins::{self, RunAs};
use crate::error::{HarnessError, Result};
use crate::run::ERROR_LOG_LINES;
use crate::server::{APP_PASSWORD, APP_USER, PgServer};
use crate::site::{self, HOST};

/// Environment variable naming the `pgbouncer` program to run; nothing else is searched then.
pub const PGBOUNCER_ENV: &str = "PGTESTKIT_PGBOUNCER";

/// Where Debian installs it, looked at after every `PATH` entry.
const SYSTEM_PROGRAM: &str = "/usr/sbin/pgbouncer";

/// How often starting is tried while another process takes the port first.
const PORT_ATTEMPTS: usize = 8;

/// Options for a [`PgBouncer`]; start it with [`start`](Self::start).
///
/// The defaults: `pool_mode = transaction`, `default_pool_size = 5`, `auth_type = trust`
/// (the user list holds `postgres` and [`APP_USER`] with its password, so servers with
/// [`password_auth`](crate::PgServerBuilder::password_auth) work), every database name
/// forwarded to the server, `server_login_retry = 1` (seconds; 15 by default, which would
/// make a restarted server look unreachable for that long) and `query_wait_timeout = 5`
/// (seconds; a client waiting for a server connection gets an error instead of waiting
/// 120 s).
#[derive(Clone, Debug)]
pub struct PgBouncerBuilder {
    settings: Vec<(String, String)>,
}

impl Default for PgBouncerBuilder {
    fn default() -> Self {
        let settings = [
            ("pool_mode", "transaction"),
            ("default_pool_size", "5"),
            ("max_client_conn", "200"),
            ("server_login_retry", "1"),
            ("query_wait_timeout", "5"),
            // sqlx sends it at startup; PgBouncer refuses a parameter it does not know.
            ("ignore_startup_parameters", "extra_float_digits"),
        ];
        Self {
            settings: settings
                .into_iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect(),
        }
    }
}

impl PgBouncerBuilder {
    /// `pool_mode`: `session`, `transaction` (the default) or `statement`.
    pub fn pool_mode(self, mode: &str) -> Self {
        self.setting("pool_mode", mode)
    }

    /// `default_pool_size`: server connections per database and user (default 5).
    pub fn default_pool_size(self, size: u32) -> Self {
        self.setting("default_pool_size", size.to_string())
    }

    /// Any `[pgbouncer]` setting, replacing the harness's value of the same name.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value) = (name.into(), value.into());
        self.settings.retain(|(known, _)| *known != name);
        self.settings.push((name, value));
        self
    }

    /// Starts PgBouncer in front of `server` and waits until it accepts connections.
    pub async fn start(self, server: &PgServer) -> Result<PgBouncer> {
        let program = locate()?;
        let run_as = bins::run_as()?;
        let dir = site::make_root_dir(run_as, "pgtestkit-pgbouncer-")?;
        let users = dir.path().join("userlist.txt");
        std::fs::write(
            &users,
            format!("\"postgres\" \"\"\n\"{APP_USER}\" \"{APP_PASSWORD}\"\n"),
        )
        .map_err(|e| HarnessError::io(format!("writing {}", users.display()), e))?;
        let log_path = dir.path().join("pgbouncer.log");
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = site::reserve_port()?;
            let ini = dir.path().join("pgbouncer.ini");
            std::fs::write(&ini, self.ini(server, port, &users))
                .map_err(|e| HarnessError::io(format!("writing {}", ini.display()), e))?;
            match launch(&program, run_as, &ini, &log_path, dir.path(), port).await {
                Ok(child) => {
                    return Ok(PgBouncer {
                        child,
                        port,
                        log_path,
                        _dir: dir,
                    });
                }
                Err(Launch::PortInUse(error)) => {
                    site::release_port(port);
                    last_error = Some(error);
                }
                Err(Launch::Failed(error)) => {
                    site::release_port(port);
                    return Err(error);
                }
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn ini(&self, server: &PgServer, port: u16, users: &Path) -> String {
        let mut ini = format!(
            "[databases]\n* = host={HOST} port={}\n\n[pgbouncer]\n\
             listen_addr = {HOST}\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}\nadmin_users = postgres\n",
            server.port(),
            users.display(),
        );
        for (name, value) in &self.settings {
            let _ = writeln!(ini, "{name} = {value}");
        }
        ini
    }
}

/// A running PgBouncer; see [`PgBouncerBuilder`] for its settings. Dropping it kills the
/// process and removes its directory.
///
/// ```no_run
/// use protected_pool_testkit::{HarnessError, PgBouncer, PgServer};
///
/// # async fn demo() -> Result<(), HarnessError> {
/// let pg = PgServer::start().await?;
/// let bouncer = PgBouncer::builder().default_pool_size(1).start(&pg).await?;
/// let url = bouncer.url(); // postgres://postgres@127.0.0.1:PORT/postgres
/// # let _ = url; Ok(()) }
/// ```
#[derive(Debug)]
pub struct PgBouncer {
    child: Child,
    port: u16,
    log_path: PathBuf,
    _dir: TempDir,
}

impl PgBouncer {
    /// Options for a new PgBouncer.
    pub fn builder() -> PgBouncerBuilder {
        PgBouncerBuilder::default()
    }

    /// Starts a PgBouncer in transaction mode with the default options in front of `server`.
    pub async fn in_front_of(server: &PgServer) -> Result<PgBouncer> {
        Self::builder().start(server).await
    }

    /// Its TCP port, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A URL for the superuser `postgres` and the database `postgres`, through PgBouncer.
    pub fn url(&self) -> String {
        format!("postgres://postgres@{HOST}:{}/postgres", self.port)
    }

    /// A URL for `user` (with `password`, if any) and `db`, through PgBouncer.
    pub fn url_for(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let auth = password.map_or_else(|| user.to_owned(), |p| format!("{user}:{p}"));
        format!("postgres://{auth}@{HOST}:{}/{db}", self.port)
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path, n)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
        site::release_port(self.port);
    }
}

enum Launch {
    PortInUse(HarnessError),
    Failed(HarnessError),
}

async fn launch(
    program: &Path,
    run_as: RunAs,
    ini: &Path,
    log_path: &Path,
    dir: &Path,
    port: u16,
) -> Result<Child, Launch> {
    let offset = std::fs::metadata(log_path).map_or(0, |m| m.len());
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| {
                Launch::Failed(HarnessError::io(
                    format!("opening {}", log_path.display()),
                    e,
                ))
            })
    };
    let mut command = Command::new(program);
    command
        .arg(ini)
        .env_clear()
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(open()?)
        .stderr(open()?)
        .kill_on_drop(true);
    // PgBouncer refuses to run as root, as PostgreSQL does.
    if let RunAs::User { uid, gid } = run_as {
        command.uid(uid).gid(gid);
    }
    let mut child = command.spawn().map_err(|e| {
        Launch::Failed(HarnessError::io(
            format!("running {}", program.display()),
            e,
        ))
    })?;
    let timeout = Duration::from_secs(30);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            let error = HarnessError::StartFailed {
                message: format!("pgbouncer exited while starting on port {port} ({status})"),
                log_path: log_path.to_owned(),
                log_tail: log_tail(log_path, ERROR_LOG_LINES),
            };
            let new = log
                .get(usize::try_from(offset).unwrap_or(0)..)
                .unwrap_or("");
            return Err(if new.contains("Address already in use") {
                Launch::PortInUse(error)
            } else {
                Launch::Failed(error)
            });
        }
        if tokio::net::TcpStream::connect((HOST, port)).await.is_ok() {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill().await;
            return Err(Launch::Failed(HarnessError::Timeout {
                what: format!("pgbouncer to accept connections on port {port}"),
                after: timeout,
                log_tail: log_tail(log_path, ERROR_LOG_LINES),
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `pgbouncer` program: `$PGTESTKIT_PGBOUNCER` if set, else the first on `PATH`, else
/// Debian's `/usr/sbin/pgbouncer`.
fn locate() -> Result<PathBuf> {
    let mut searched = Vec::new();
    if let Some(program) = std::env::var_os(PGBOUNCER_ENV).filter(|p| !p.is_empty()) {
        let program = PathBuf::from(program);
        if bins::is_executable(&program) {
            return Ok(program);
        }
        searched.push(format!(
            "${PGBOUNCER_ENV} = {} (not an executable file)",
            program.display()
        ));
        return Err(HarnessError::PgBouncerNotFound { searched });
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    for candidate in path_dirs
        .iter()
        .map(|dir| dir.join("pgbouncer"))
        .chain([PathBuf::from(SYSTEM_PROGRAM)])
    {
        if bins::is_executable(&candidate) {
            return Ok(candidate);
        }
        searched.push(candidate.display().to_string());
    }
    Err(HarnessError::PgBouncerNotFound { searched })
}

fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
