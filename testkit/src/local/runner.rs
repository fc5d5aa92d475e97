//! [`LocalServer`]: a postmaster of this machine's binaries, controlled by signals.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::process::Child;

use super::data_dir;
use super::postmaster;
use crate::bins;
use crate::error::{HarnessError, Result};
use crate::options::Options;
use crate::procs;
use crate::programs;
use crate::run::{ERROR_LOG_LINES, Run, StopMode};
use crate::site::{HOST, Site};

/// How long the processes of a stopped or killed server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server run by a local postmaster. Dropping it stops the postmaster (immediate mode),
/// then its [`Site`] goes.
#[derive(Debug)]
pub(crate) struct LocalServer {
    paused: AtomicBool,
    /// The postmaster, when this process started it: kept to reap it.
    postmaster: Mutex<Option<Child>>,
    site: Site,
}

impl LocalServer {
    /// A new server with `options`, from the template.
    pub(crate) async fn start(options: Options) -> Result<LocalServer> {
        let site = Site::new(options, bins::bin_dir()?, bins::run_as()?).await?;
        data_dir::from_template(&site).await?;
        Self::start_fresh(site).await
    }

    /// First start of a new data dir: on a port clash, moves to a new port.
    async fn start_fresh(mut site: Site) -> Result<LocalServer> {
        let postmaster = site
            .start_on_a_free_port(|site| {
                Box::pin(async move {
                    data_dir::write_config(site)?;
                    postmaster::launch(site).await
                })
            })
            .await?;
        Ok(LocalServer {
            paused: AtomicBool::new(false),
            postmaster: Mutex::new(Some(postmaster)),
            site,
        })
    }

    fn is_our_postmaster(&self, pid: u32) -> bool {
        // The postmaster's working directory is its data directory.
        procs::is_alive(pid)
            && std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd == self.site.data_dir())
    }

    /// The postmaster and every process it forked.
    fn processes(&self) -> Option<Vec<u32>> {
        let pm = self.pid()?;
        let mut all = vec![pm];
        all.extend(procs::descendants(pm));
        Some(all)
    }

    /// Waits until `pids` are gone after `what`, and reaps the postmaster.
    async fn wait_gone(&self, pids: &[u32], what: &str) -> Result<()> {
        let gone = procs::wait_gone(pids, EXIT_TIMEOUT).await;
        self.reap();
        if gone {
            Ok(())
        } else {
            Err(HarnessError::Timeout {
                what: format!("the {what} processes {pids:?} to exit"),
                after: EXIT_TIMEOUT,
                log_tail: self.log_tail(ERROR_LOG_LINES),
            })
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
        let data_dir = self.site.data_dir();
        if let Some(pf) = procs::read_pid_file(data_dir)
            && let Some(pid) = pf.pid.filter(|&pid| stale(pid))
        {
            if let Some(shmid) = pf.shmid {
                procs::remove_stale_shmem(pid, shmid);
            }
            let _ = std::fs::remove_file(data_dir.join("postmaster.pid"));
        }
        let port = self.site.port();
        let socket = self.site.socket_dir().join(format!(".s.PGSQL.{port}"));
        let lock = self.site.socket_dir().join(format!(".s.PGSQL.{port}.lock"));
        let lock_pid = std::fs::read_to_string(&lock)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
        if lock_pid.is_some_and(stale) {
            let _ = std::fs::remove_file(&lock);
            let _ = std::fs::remove_file(&socket);
        }
    }
}

impl Run for LocalServer {
    fn site(&self) -> &Site {
        &self.site
    }

    fn pid(&self) -> Option<u32> {
        let pid = procs::read_pid_file(self.site.data_dir())?.pid?;
        self.is_our_postmaster(pid).then_some(pid)
    }

    fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn log_tail(&self, n: usize) -> String {
        postmaster::log_tail(self.site.log_path(), n)
    }

    fn address_for_standbys(&self) -> (String, u16) {
        (HOST.to_owned(), self.site.port())
    }

    async fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let site = &self.site;
        programs::psql(
            site.command("psql"),
            site.socket_dir(),
            site.port(),
            db,
            sql,
            || self.log_tail(ERROR_LOG_LINES),
        )
        .await
    }

    async fn kill9(&self) -> Result<()> {
        let pm = self.pid().ok_or(HarnessError::NotRunning)?;
        // Freeze it first so it cannot fork anything new while we look.
        let _ = procs::signal(pm, Signal::STOP);
        let mut all = vec![pm];
        all.extend(procs::descendants(pm));
        procs::signal_all(&all, Signal::KILL);
        self.paused.store(false, Ordering::SeqCst);
        self.wait_gone(&all, "killed").await
    }

    async fn stop(&self, mode: StopMode) -> Result<()> {
        let Some(all) = self.processes() else {
            return Ok(());
        };
        procs::signal_all(&all, Signal::CONT);
        self.paused.store(false, Ordering::SeqCst);
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let mut cmd = self.site.command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(self.site.data_dir())
            .args(["-m", mode, "-w", "-s", "-t", "60"]);
        programs::run_checked(cmd, "pg_ctl stop", Duration::from_secs(70)).await?;
        self.wait_gone(&all, "server").await
    }

    fn pause(&self) -> Result<()> {
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

    fn resume(&self) -> Result<()> {
        let pm = self.pid().ok_or(HarnessError::NotRunning)?;
        let mut all = procs::descendants(pm);
        all.push(pm);
        procs::signal_all(&all, Signal::CONT);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn start_again(&self) -> Result<()> {
        if self.is_running() {
            return Err(HarnessError::AlreadyRunning);
        }
        self.remove_stale_lock_files();
        let postmaster = self
            .site
            .start_on_its_port(|site| Box::pin(postmaster::launch(site)))
            .await?;
        *self.postmaster.lock().unwrap_or_else(|p| p.into_inner()) = Some(postmaster);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    async fn replica(&self) -> Result<LocalServer> {
        let site = &self.site;
        let replica = Site::new(site.options.clone(), site.bin_dir.clone(), site.run_as).await?;
        data_dir::base_backup(&replica, site.port()).await?;
        Self::start_fresh(replica).await
    }

    async fn rejoin(&self, primary: &LocalServer) -> Result<()> {
        // PostgreSQL 15's pg_rewind reads the primary's timeline from its control file, which
        // the checkpoint that follows a promotion updates when it is done, asynchronously:
        // right after a promotion it would see the old timeline and find nothing to rewind.
        primary.psql("postgres", "CHECKPOINT").await?;
        self.stop(StopMode::Fast).await?;
        self.remove_stale_lock_files();
        data_dir::rewind(&self.site, primary.site.port()).await?;
        self.start_again().await
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        if let Some(pf) = procs::read_pid_file(self.site.data_dir())
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_moves_the_server_to_another() {
        let squatter = std::net::TcpListener::bind((HOST, 0)).unwrap();
        let taken = squatter.local_addr().unwrap().port();
        let mut site = Site::new(
            Options::default(),
            bins::bin_dir().unwrap(),
            bins::run_as().unwrap(),
        )
        .await
        .unwrap();
        site.clash_on(taken);
        data_dir::from_template(&site).await.unwrap();
        let server = LocalServer::start_fresh(site).await.unwrap();
        assert_ne!(server.site.port(), taken);
        assert_eq!(
            server.psql("postgres", "SHOW port").await.unwrap(),
            server.site.port().to_string()
        );
        assert!(server.log_tail(50).contains("Address already in use"));
        drop(squatter);
    }
}
