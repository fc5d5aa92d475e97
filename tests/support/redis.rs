//! A throwaway `redis-server` on a loopback port, for the Redis cache tests.
//!
//! Included with `#[path = "support/redis.rs"] mod redis_support;`. The server keeps nothing on
//! disk (`--save '' --appendonly no`), runs in a temporary directory, and is killed when the
//! handle is dropped. Its methods block for at most a few seconds (starting, waiting until it
//! answers), so call them from a multi-thread runtime.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a server may take to answer `PING` after being started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Where to look for `redis-server` after `PATH`.
const FALLBACK_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/usr/sbin"];

/// A `redis-server` process of this test, on `127.0.0.1:<port>`.
pub struct RedisServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// A running server on a free port.
    ///
    /// Panics, failing the test, if `redis-server` is not installed: these tests need a real
    /// Redis and are never skipped.
    pub fn start() -> Self {
        // A free port may be taken by someone else before the server binds it; try others.
        let mut last_error = String::new();
        for _ in 0..5 {
            let server = Self::unstarted();
            match server.try_start() {
                Ok(()) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server on a free port: {last_error}");
    }

    /// A server that is not running yet, with its port chosen: start it with
    /// [`start_again`](Self::start_again).
    pub fn unstarted() -> Self {
        let binary = find_binary().unwrap_or_else(|searched| {
            panic!(
                "redis-server not found (searched PATH and {}): install the `redis-server` \
                 package (Debian/Ubuntu: `apt-get install -y redis-server`); the Redis cache \
                 tests need a real server and are not skipped",
                searched.join(", ")
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("protected-pool-redis-")
            .tempdir()
            .expect("a temporary directory for redis-server");
        Self {
            binary,
            dir,
            port: free_port(),
            child: Mutex::new(None),
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's port, the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap();
        match child.as_mut() {
            Some(process) => matches!(process.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server with SIGKILL and waits until it is gone: its port refuses
    /// connections and its clients' connections are closed.
    pub fn kill(&self) {
        if let Some(mut process) = self.child.lock().unwrap().take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// Starts the server (again) on the same port and waits until it answers. Panics if it
    /// does not.
    pub fn start_again(&self) {
        if let Err(error) = self.try_start() {
            panic!(
                "redis-server did not start again on port {}: {error}",
                self.port
            );
        }
    }

    fn try_start(&self) -> Result<(), String> {
        let mut slot = self.child.lock().unwrap();
        assert!(slot.is_none(), "redis-server is already running");
        let log = self.log_path();
        let mut process = Command::new(&self.binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot run {}: {error}", self.binary.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = process.try_wait() {
                return Err(format!("it exited ({status}); log:\n{}", self.log_tail()));
            }
            if answers_ping(self.port) {
                *slot = Some(process);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = process.kill();
                let _ = process.wait();
                return Err(format!(
                    "no answer to PING within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-server` on `PATH`, else in [`FALLBACK_DIRS`]; or the places searched.
fn find_binary() -> Result<PathBuf, Vec<String>> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(FALLBACK_DIRS.iter().map(PathBuf::from));
    dirs.iter()
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| FALLBACK_DIRS.iter().map(|dir| dir.to_string()).collect())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Whether a server on `port` answers `PING` with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0_u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
