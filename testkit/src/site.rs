//! Where a server lives on this machine, whatever runs it: a temp dir of its own (unix
//! socket dir, log, and the data dir on the local backend), a port on 127.0.0.1, the
//! PostgreSQL programs that administer it, and its options. Directories and ports are
//! handed out so that servers started at the same time never clash, and what processes that
//! died without unwinding left behind is swept.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::Command;

use crate::bins::RunAs;
use crate::error::{HarnessError, Result};
use crate::options::Options;
use crate::procs;
use crate::programs;

/// The only address servers listen on.
pub(crate) const HOST: &str = "127.0.0.1";
/// Name prefix of every directory the harness creates in the temp dir.
const DIR_PREFIX: &str = "pgtestkit-";
/// File in each such directory naming the process that owns it.
const OWNER_FILE: &str = "owner";

/// How often starting a server is tried while someone else holds its port.
const PORT_ATTEMPTS: usize = 8;
/// How long a server that keeps its port waits for it between tries.
const PORT_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Environment variable naming the directory the harness creates its
/// servers' directories in.
pub const TMPDIR_ENV: &str = "PGTESTKIT_TMPDIR";

/// A server's place on this machine; see the [module docs](self). Dropping it gives the port
/// back and removes the directory.
#[derive(Debug)]
pub(crate) struct Site {
    root: TempDir,
    /// In `root`, by their resolved paths (those PostgreSQL sees).
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    pub(crate) bin_dir: PathBuf,
    pub(crate) run_as: RunAs,
    pub(crate) options: Options,
}

impl Site {
    /// A new directory holding an empty socket dir, and a free port; no data dir yet.
    pub(crate) async fn new(options: Options, bin_dir: PathBuf, run_as: RunAs) -> Result<Site> {
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
        Ok(Site {
            root,
            data_dir: base.join("data"),
            socket_dir,
            log_path: base.join("postgres.log"),
            port: reserve_port()?,
            bin_dir,
            run_as,
            options,
        })
    }

    /// The TCP port, on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Runs `start` until it gets past the port, moving to a new free port after each clash:
    /// for a new server, which nobody knows by its port yet.
    pub(crate) async fn start_on_a_free_port<T>(
        &mut self,
        mut start: impl for<'a> FnMut(&'a Site) -> StartTry<'a, T>,
    ) -> Result<T> {
        let mut attempt = 1;
        loop {
            match start(self).await {
                Ok(started) => return Ok(started),
                Err(StartError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    let new_port = reserve_port()?;
                    release_port(self.port);
                    self.port = new_port;
                }
                Err(StartError::PortInUse(e) | StartError::Other(e)) => return Err(e),
            }
        }
    }

    /// Runs `start` until it gets past the port, waiting a moment after each clash: for a
    /// server known by its port, which someone else took meanwhile and may let go.
    pub(crate) async fn start_on_its_port<T>(
        &self,
        mut start: impl for<'a> FnMut(&'a Site) -> StartTry<'a, T>,
    ) -> Result<T> {
        let mut attempt = 1;
        loop {
            match start(self).await {
                Ok(started) => return Ok(started),
                Err(StartError::PortInUse(_)) if attempt < PORT_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(PORT_RETRY_PAUSE).await;
                }
                Err(StartError::PortInUse(e) | StartError::Other(e)) => return Err(e),
            }
        }
    }

    pub(crate) fn root(&self) -> &Path {
        self.root.path()
    }

    /// Where the data dir is on the local backend (on the container backend, a path that
    /// does not exist).
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub(crate) fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A command for the PostgreSQL program `program`; see
    /// [`PgServer::command`](crate::PgServer::command).
    pub(crate) fn command(&self, program: &str) -> Command {
        programs::pg_command(&self.bin_dir, program, self.run_as, self.root.path())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        release_port(self.port);
        // `self.root` (a TempDir) is dropped next and removes everything.
    }
}

/// One try at starting a server on its site's port. (Boxed: the future of an async closure
/// borrowing the site is not known to be `Send`, and the servers' futures must be.)
pub(crate) type StartTry<'a, T> = Pin<Box<dyn Future<Output = Result<T, StartError>> + Send + 'a>>;

/// Why one try at starting a server on its site's port failed.
pub(crate) enum StartError {
    /// Someone else holds the port.
    PortInUse(HarnessError),
    /// Anything else.
    Other(HarnessError),
}

impl From<HarnessError> for StartError {
    fn from(e: HarnessError) -> Self {
        StartError::Other(e)
    }
}

pub(crate) fn chown_to(path: &Path, run_as: RunAs) -> Result<()> {
    if let RunAs::User { uid, gid } = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| HarnessError::io(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

// ---- directories -------------------------------------------------------------------------

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

// ---- ports -------------------------------------------------------------------------------

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

#[cfg(test)]
impl Site {
    /// Puts the site on `port`, which someone else holds, to test what a clash does.
    pub(crate) fn clash_on(&mut self, port: u16) {
        release_port(self.port);
        self.port = port;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct() {
        let a = reserve_port().unwrap();
        let b = reserve_port().unwrap();
        assert_ne!(a, b);
        release_port(a);
        release_port(b);
    }
}
