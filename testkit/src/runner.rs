//! [`Runner`]: the runner a [`PgServer`](crate::PgServer) holds, a local postmaster
//! ([`LocalServer`]) or a Docker container ([`ContainerServer`]), both doing all that
//! [`Run`] says. Each operation is dispatched here, once; what both backends do the same way
//! on top (waiting for a standby to stream, promoting) is written once here too.

use std::time::{Duration, Instant};

use crate::backend::{self, Backend};
use crate::container::ContainerServer;
use crate::error::{HarnessError, Result};
use crate::local::LocalServer;
use crate::options::Options;
use crate::run::{ERROR_LOG_LINES, Run, StopMode};
use crate::site::Site;

/// The runner of a server.
#[derive(Debug)]
pub(crate) enum Runner {
    Local(LocalServer),
    Container(ContainerServer),
}

/// `$body` with `$r` bound to whichever runner `$runner` holds.
macro_rules! each {
    ($runner:expr, $r:ident => $body:expr) => {
        match $runner {
            Runner::Local($r) => $body,
            Runner::Container($r) => $body,
        }
    };
}

impl Runner {
    /// Starts a server with `options` on the backend `$PGTESTKIT_BACKEND` selects.
    pub(crate) async fn start(options: Options) -> Result<Runner> {
        Ok(match backend::selection()? {
            (Backend::Local, _) => Runner::Local(LocalServer::start(options).await?),
            (Backend::Container, explicit) => {
                Runner::Container(ContainerServer::start(options, explicit).await?)
            }
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Runner::Local(_) => Backend::Local,
            Runner::Container(_) => Backend::Container,
        }
    }

    pub(crate) fn site(&self) -> &Site {
        each!(self, r => r.site())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        each!(self, r => r.pid())
    }

    pub(crate) fn is_running(&self) -> bool {
        each!(self, r => r.is_running())
    }

    pub(crate) fn is_paused(&self) -> bool {
        each!(self, r => r.is_paused())
    }

    pub(crate) fn log_tail(&self, n: usize) -> String {
        each!(self, r => r.log_tail(n))
    }

    fn address_for_standbys(&self) -> (String, u16) {
        each!(self, r => r.address_for_standbys())
    }

    pub(crate) async fn psql(&self, db: &str, sql: &str) -> Result<String> {
        each!(self, r => r.psql(db, sql).await)
    }

    pub(crate) async fn kill9(&self) -> Result<()> {
        each!(self, r => r.kill9().await)
    }

    pub(crate) async fn stop(&self, mode: StopMode) -> Result<()> {
        each!(self, r => r.stop(mode).await)
    }

    pub(crate) fn pause(&self) -> Result<()> {
        each!(self, r => r.pause())
    }

    pub(crate) fn resume(&self) -> Result<()> {
        each!(self, r => r.resume())
    }

    pub(crate) async fn start_again(&self) -> Result<()> {
        each!(self, r => r.start_again().await)
    }

    /// A new standby of this server, streaming from it.
    pub(crate) async fn replica(&self) -> Result<Runner> {
        if !self.is_running() {
            return Err(HarnessError::NotRunning);
        }
        let replica = match self {
            Runner::Local(r) => Runner::Local(r.replica().await?),
            Runner::Container(r) => Runner::Container(r.replica().await?),
        };
        replica.wait_until_streaming(self).await?;
        Ok(replica)
    }

    /// Makes this server a standby of `primary`, on its own port, streaming from it.
    pub(crate) async fn rejoin(&self, primary: &Runner) -> Result<()> {
        let refuse = |why: String| HarnessError::Refused {
            what: format!(
                "rejoining the server on port {} as a standby of the one on port {}",
                self.site().port(),
                primary.site().port()
            ),
            why,
        };
        if self.site().port() == primary.site().port() {
            return Err(refuse("a server cannot follow itself".to_owned()));
        }
        if primary.in_recovery().await? {
            return Err(refuse(
                "the new primary is in recovery: promote it first".to_owned(),
            ));
        }
        match (self, primary) {
            (Runner::Local(me), Runner::Local(p)) => me.rejoin(p).await?,
            (Runner::Container(me), Runner::Container(p)) => me.rejoin(p).await?,
            _ => {
                return Err(refuse(format!(
                    "they run on different backends ({:?}, {:?})",
                    self.backend(),
                    primary.backend()
                )));
            }
        }
        self.wait_until_streaming(primary).await
    }

    async fn in_recovery(&self) -> Result<bool> {
        Ok(self.psql("postgres", "SELECT pg_is_in_recovery()").await? == "t")
    }

    /// Promotes this standby with `pg_promote()`, and waits until it is out of recovery.
    pub(crate) async fn promote(&self) -> Result<()> {
        if !self.in_recovery().await? {
            return Err(HarnessError::Refused {
                what: format!("promoting the server on port {}", self.site().port()),
                why: "it is not a standby (pg_is_in_recovery() is false)".to_owned(),
            });
        }
        let timeout = self.site().options.start_timeout;
        let seconds = timeout.as_secs().max(1);
        // pg_promote waits (up to `wait_seconds`) for the end of recovery and tells if it came.
        let promoted = self
            .psql(
                "postgres",
                &format!("SELECT pg_promote(wait => true, wait_seconds => {seconds})"),
            )
            .await?;
        let deadline = Instant::now() + timeout;
        while self.in_recovery().await? {
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!(
                        "the server on port {} to leave recovery after pg_promote() \
                         (which returned {promoted:?})",
                        self.site().port()
                    ),
                    after: timeout,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until this server is a hot standby that answers queries and streams from
    /// `primary` (not from a server it followed before).
    async fn wait_until_streaming(&self, primary: &Runner) -> Result<()> {
        let timeout = self.site().options.start_timeout;
        let deadline = Instant::now() + timeout;
        let (host, port) = primary.address_for_standbys();
        let check = format!(
            "SELECT pg_is_in_recovery()::text || ',' || \
             (SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming' \
              AND sender_host = '{}' AND sender_port = {port})",
            host.replace('\'', "''")
        );
        loop {
            let state = self.psql("postgres", &check).await;
            if let Ok("true,1") = state.as_deref() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let hint = match self {
                    Runner::Local(_) => "",
                    Runner::Container(_) => {
                        "; the image's entrypoint must honour REPLICATE_FROM, as the one \
                         .ci/postgres-image.sh builds does"
                    }
                };
                return Err(HarnessError::Timeout {
                    what: format!(
                        "the server on port {} to be in recovery and streaming from port {} \
                         (last check: {state:?}{hint})",
                        self.site().port(),
                        primary.site().port()
                    ),
                    after: timeout,
                    log_tail: self.log_tail(ERROR_LOG_LINES),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
