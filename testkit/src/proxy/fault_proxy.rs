//! [`FaultProxy`]: the handle tests hold, switching modes and targets.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::listener::{BACKLOG, Listening, Shared, hold_port, listen_on};
use super::mode::{Control, FaultMode};
use super::relay::accept_loop;
use crate::error::{HarnessError, Result};
use crate::server::PgServer;

/// A TCP proxy on 127.0.0.1 that forwards to a target (typically a
/// [`PgServer`]) and injects network faults, switchable at run time with
/// [`set_mode`](Self::set_mode); see [`FaultMode`] for what each mode does.
/// The target can be switched too, with [`retarget`](Self::retarget) or
/// [`point_to`](Self::point_to): the proxy's address is then what a DNS
/// name or a virtual IP is to a cluster, moving from server to server.
///
/// It runs as tasks on the tokio runtime it was started on. Dropping it
/// closes its port before `drop` returns and closes every connection through
/// it as soon as the runtime runs its (aborted) tasks.
///
/// ```no_run
/// use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};
///
/// # async fn demo() -> protected_pool_testkit::Result<()> {
/// let pg = PgServer::start().await?;
/// let proxy = FaultProxy::to_server(&pg).await?;
/// let url = pg.url_via(&proxy); // postgres://postgres@127.0.0.1:PROXY_PORT/postgres
///
/// proxy.set_mode(FaultMode::Blackhole); // every connection hangs
/// proxy.set_mode(FaultMode::Pass);
/// proxy.set_mode(FaultMode::Reset); // every connection gets a RST
/// proxy.set_mode(FaultMode::Pass);
///
/// let other = PgServer::start().await?;
/// proxy.point_to(&other); // the same URL now reaches the other server
/// # let _ = url; Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    control: watch::Sender<Control>,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
    runtime: Handle,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target())
            .field("mode", &self.mode())
            .field("connections", &self.connections())
            .field("accepted", &self.accepted())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy to `target`, listening on `127.0.0.1` at a free port,
    /// in [`FaultMode::Pass`]. Needs a tokio runtime with the IO and time
    /// drivers.
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = listen_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let (control, watcher) = watch::channel(Control {
            mode: FaultMode::Pass,
            target,
            resets: 0,
        });
        let shared = Arc::new(Shared {
            listening: Mutex::new(Listening::Open(listener)),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(Arc::clone(&shared), watcher));
        Ok(FaultProxy {
            addr,
            control,
            shared,
            acceptor,
            runtime: Handle::current(),
        })
    }

    /// Starts a proxy to `server`'s TCP address (`127.0.0.1:port`). Use
    /// [`PgServer::url_via`] for a URL through it.
    pub async fn to_server(server: &PgServer) -> Result<FaultProxy> {
        let target = server.addr();
        FaultProxy::start(target)
            .await
            .map_err(|e| HarnessError::io(format!("starting a fault proxy to {target}"), e))
    }

    /// The address clients connect to: `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port on 127.0.0.1 (the same in every mode).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address the proxy forwards new connections to.
    pub fn target(&self) -> SocketAddr {
        self.control.borrow().target
    }

    /// Forwards new connections to `target` from now on, and cuts every open
    /// connection (a TCP RST to the client, as in [`FaultMode::Reset`]),
    /// including those that hang in a blackhole: what clients of a DNS name
    /// or a virtual IP see when it moves to another server. The mode stays
    /// as it is.
    pub fn retarget(&self, target: SocketAddr) {
        self.control.send_modify(|c| {
            c.target = target;
            c.resets += 1;
        });
    }

    /// [`retarget`](Self::retarget) to `server`'s TCP address, e.g. to the
    /// standby just promoted, or back to an old primary now rejoined as a
    /// standby.
    pub fn point_to(&self, server: &PgServer) {
        self.retarget(server.addr());
    }

    /// Switches to `mode`; existing connections follow at once. The port's
    /// state (listening or refusing) is changed before this returns.
    ///
    /// Leaving [`FaultMode::Refuse`] listens on the proxy's port again; if
    /// that fails (only if someone else managed to listen on it meanwhile),
    /// the error is printed to stderr and the proxy stays in `Refuse`; use
    /// [`try_set_mode`](Self::try_set_mode) to get the error instead.
    pub fn set_mode(&self, mode: FaultMode) {
        if let Err(e) = self.try_set_mode(mode) {
            eprintln!("protected-pool-testkit: {e}");
        }
    }

    /// Like [`set_mode`](Self::set_mode), but returns the error if the port
    /// cannot be listened on again when leaving [`FaultMode::Refuse`] (the
    /// proxy then stays in `Refuse`).
    pub fn try_set_mode(&self, mode: FaultMode) -> io::Result<()> {
        let _runtime = self.runtime.enter();
        let mut listening = self.shared.listening();
        match (&mut *listening, mode) {
            (Listening::Open(_), FaultMode::Refuse) => {
                // Close the listener first: only then can the port be bound
                // by a socket that does not listen.
                *listening = Listening::Refusing(None);
                *listening = Listening::Refusing(hold_port(self.addr).ok());
            }
            (Listening::Refusing(held), mode) if mode != FaultMode::Refuse => {
                let relisten = match held.take() {
                    Some(socket) => socket.listen(BACKLOG),
                    None => listen_on(self.addr),
                };
                match relisten {
                    Ok(listener) => *listening = Listening::Open(listener),
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "fault proxy: cannot listen on {} again to leave \
                                 FaultMode::Refuse for {mode:?} (was the port taken by another \
                                 socket meanwhile?): {e}; the proxy stays in Refuse",
                                self.addr
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
        drop(listening);
        self.control.send_modify(|c| {
            c.mode = mode;
            if matches!(mode, FaultMode::Reset | FaultMode::Refuse) {
                c.resets += 1;
            }
        });
        Ok(())
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        self.control.borrow().mode
    }

    /// How many client connections are open now (including ones hanging in
    /// a blackhole).
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// How many client connections were accepted so far (including ones
    /// reset at once in [`FaultMode::Reset`]).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Closes the port now; aborting the accept loop drops its JoinSet,
        // which aborts every connection task.
        *self.shared.listening() = Listening::Stopped;
        self.acceptor.abort();
    }
}

impl PgServer {
    /// Same as [`url`](Self::url), but with the host and port of `proxy`:
    /// `postgres://postgres@127.0.0.1:PROXY_PORT/postgres`.
    pub fn url_via(&self, proxy: &FaultProxy) -> String {
        self.url_for_via(proxy, "postgres", None, "postgres")
    }

    /// Same as [`url_for`](Self::url_for), but with the host and port of
    /// `proxy`.
    pub fn url_for_via(
        &self,
        proxy: &FaultProxy,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> String {
        // User and password are percent-encoded, so the only `@` is the one
        // before the host.
        let direct = format!("@{}:{}/", self.host(), self.port());
        let via = format!("@{}/", proxy.addr());
        self.url_for(user, password, db).replacen(&direct, &via, 1)
    }
}
