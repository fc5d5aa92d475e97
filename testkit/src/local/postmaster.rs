//! Starting a local postmaster and waiting until it is ready, faster than `pg_ctl start -w`;
//! and reading its log.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::process::Child;

use crate::error::HarnessError;
use crate::procs;
use crate::run::ERROR_LOG_LINES;
use crate::site::{HOST, Site, StartError, chown_to};

/// Starts the postmaster of `site` once and waits until it is ready and accepts TCP
/// connections; returns it.
///
/// This is what `pg_ctl start -w` does, minus its 100 ms polling
/// interval, which made up half of a server's start time: `postgres`
/// runs directly as a child of this process (in its own process group,
/// stderr to the log), and `postmaster.pid` is polled every 5 ms until it
/// says `ready` (or `standby`). Being the parent also means its exit is
/// reaped at once instead of leaving a zombie.
pub(super) async fn launch(site: &Site) -> Result<Child, StartError> {
    let log_path = site.log_path();
    let log_offset = std::fs::metadata(log_path).map_or(0, |m| m.len());
    let timeout = site.options.start_timeout;
    let io_err = |what: &str, e| HarnessError::io(format!("{what} {}", log_path.display()), e);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| io_err("opening", e))?;
    let log2 = log.try_clone().map_err(|e| io_err("opening", e))?;
    chown_to(log_path, site.run_as)?;

    let mut cmd = site.command("postgres");
    cmd.arg("-D")
        .arg(site.data_dir())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| {
        HarnessError::io(
            format!("running {}", site.bin_dir.join("postgres").display()),
            e,
        )
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
        let ready = procs::read_pid_file(site.data_dir()).is_some_and(|pf| {
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
        stop_child(&mut child).await;
        let new_log = log_since(log_path, log_offset);
        let port_clash = new_log.contains("Address already in use")
            || new_log.contains("could not create any TCP/IP sockets");
        let err = HarnessError::StartFailed {
            message: format!(
                "PostgreSQL did not start on port {}: {message}",
                site.port()
            ),
            log_path: log_path.to_owned(),
            log_tail: log_tail(log_path, ERROR_LOG_LINES),
        };
        return Err(if port_clash {
            StartError::PortInUse(err)
        } else {
            StartError::Other(err)
        });
    }

    loop {
        match tokio::net::TcpStream::connect((HOST, site.port())).await {
            Ok(_) => return Ok(child),
            Err(e) if Instant::now() >= deadline => {
                stop_child(&mut child).await;
                return Err(StartError::Other(HarnessError::Timeout {
                    what: format!(
                        "a TCP connection to {HOST}:{} (last error: {e})",
                        site.port()
                    ),
                    after: timeout,
                    log_tail: log_tail(log_path, ERROR_LOG_LINES),
                }));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Stops a postmaster that failed to start, and reaps it.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id().filter(|&p| procs::is_alive(p)) {
        procs::shutdown_immediate_blocking(pid);
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}

/// The last `n` lines of the log at `path` (empty if there is none yet).
pub(super) fn log_tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn log_since(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
