//! [`FaultProxy`]: a TCP proxy on loopback that injects network faults
//! between a client and a server, switchable at run time.

use std::fmt;
use std::future::{pending, poll_fn};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::error::{HarnessError, Result};
use crate::server::PgServer;

/// Backlog of the listening socket.
const BACKLOG: u32 = 1024;
/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction (bounds memory under
/// [`FaultMode::Latency`]: at most `QUEUE_CHUNKS * CHUNK` = 4 MiB).
const QUEUE_CHUNKS: usize = 256;

/// What a [`FaultProxy`] does to the traffic through it. Switch with
/// [`FaultProxy::set_mode`]; a switch applies at once to every open
/// connection, not only to new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Bytes flow both ways unchanged (the initial mode).
    ///
    /// Switching to `Pass` from `Latency` delivers what is still queued at
    /// once; from `Blackhole` it resumes forwarding on the connections that
    /// were kept open (what arrived during the blackhole is lost, as on a
    /// real network), and a connection accepted during the blackhole only
    /// now connects to the target.
    Pass,
    /// Every chunk, in either direction, is delivered this long after the
    /// proxy received it, in order. Reading goes on meanwhile (a queue per
    /// direction), so throughput is not throttled, up to 4 MiB in flight per
    /// direction. A close (FIN) or a reset from one side is delayed the same
    /// way. A round trip takes at least twice this.
    Latency(Duration),
    /// Nothing is delivered in either direction and nothing is closed:
    /// existing connections hang, new connections are accepted and hang
    /// (like a hung server or a dropped network path; they connect to the
    /// target only once the blackhole ends). Data arriving meanwhile is
    /// discarded; a close (FIN) or a reset arriving meanwhile is held and
    /// passed on when the blackhole ends.
    Blackhole,
    /// Every existing connection is closed abruptly: a TCP RST (`SO_LINGER`
    /// 0) to the client, a normal close to the target. New connections are
    /// accepted and reset at once.
    Reset,
    /// The listening socket is closed, so connecting fails with
    /// `ECONNREFUSED` ([`io::ErrorKind::ConnectionRefused`]); existing
    /// connections are reset as with [`Reset`](FaultMode::Reset). The port
    /// stays bound (not listening) by the proxy meanwhile, so no other
    /// socket is handed it, and leaving `Refuse` listens on the same port
    /// again.
    Refuse,
}

/// What every task of a proxy watches.
#[derive(Debug, Clone, Copy)]
struct Control {
    mode: FaultMode,
    /// How many times the mode was set to `Reset` or `Refuse`: a connection
    /// that saw a different count when it was accepted must be reset, even
    /// if the mode changed back before it noticed.
    resets: u64,
}

impl Control {
    fn must_reset(&self, resets_at_accept: u64) -> bool {
        self.resets != resets_at_accept || matches!(self.mode, FaultMode::Reset | FaultMode::Refuse)
    }
}

/// The proxy's listening socket, swapped synchronously by `set_mode` and
/// `drop` so that the port's state is right as soon as they return.
#[derive(Debug)]
enum Listening {
    Open(TcpListener),
    /// In [`FaultMode::Refuse`]: the port held by a bound socket that does
    /// not listen (`None` if binding it failed; leaving `Refuse` then binds
    /// afresh).
    Refusing(Option<TcpSocket>),
    /// The proxy was dropped.
    Stopped,
}

#[derive(Debug)]
struct Shared {
    listening: Mutex<Listening>,
    open: AtomicUsize,
    accepted: AtomicU64,
}

impl Shared {
    fn listening(&self) -> MutexGuard<'_, Listening> {
        self.listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts from the current listener; pending while there is none (the
    /// accept loop is woken by the mode change that reopens it).
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        match &*self.listening() {
            Listening::Open(listener) => listener.poll_accept(cx).map_ok(|(stream, _)| stream),
            Listening::Refusing(_) | Listening::Stopped => Poll::Pending,
        }
    }
}

/// Counts a client connection as open while it lives.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP proxy on 127.0.0.1 that forwards to a target (typically a
/// [`PgServer`]) and injects network faults, switchable at run time with
/// [`set_mode`](Self::set_mode); see [`FaultMode`] for what each mode does.
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
/// # let _ = url; Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    control: watch::Sender<Control>,
    shared: Arc<Shared>,
    acceptor: JoinHandle<()>,
    runtime: Handle,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
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
            resets: 0,
        });
        let shared = Arc::new(Shared {
            listening: Mutex::new(Listening::Open(listener)),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(Arc::clone(&shared), watcher, target));
        Ok(FaultProxy {
            addr,
            target,
            control,
            shared,
            acceptor,
            runtime: Handle::current(),
        })
    }

    /// Starts a proxy to `server`'s TCP address (`127.0.0.1:port`). Use
    /// [`PgServer::url_via`] for a URL through it.
    pub async fn to_server(server: &PgServer) -> Result<FaultProxy> {
        let ip: IpAddr = server.host().parse().map_err(|e| {
            HarnessError::io(
                "starting a fault proxy",
                io::Error::new(io::ErrorKind::InvalidInput, e),
            )
        })?;
        let target = SocketAddr::new(ip, server.port());
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

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
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

/// A listener on `addr` with `SO_REUSEADDR`, so its port can be bound again
/// while connections accepted on it are still open or in `TIME_WAIT`.
fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A socket bound to `addr` that does not listen: connecting to it is
/// refused, and the OS hands the port to no one else (a socket binding it
/// explicitly could still share it with `SO_REUSEADDR`).
fn hold_port(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

async fn accept_loop(
    shared: Arc<Shared>,
    mut control: watch::Receiver<Control>,
    target: SocketAddr,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = poll_fn(|cx| shared.poll_accept(cx)) => match accepted {
                Ok(client) => {
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    let open = OpenGuard::new(Arc::clone(&shared));
                    let resets = control.borrow().resets;
                    let control = control.clone();
                    connections.spawn(async move {
                        let _open = open;
                        serve(client, control, resets, target).await;
                    });
                }
                // E.g. out of file descriptors: do not spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            // A mode change may have replaced the listener; the proxy was
            // dropped if the sender is gone.
            changed = control.changed() => if changed.is_err() {
                return;
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// How a connection ends.
enum Ending {
    /// Close normally (FIN).
    Close,
    /// Close the client side with a RST.
    ResetClient,
}

async fn serve(
    mut client: TcpStream,
    control: watch::Receiver<Control>,
    resets: u64,
    target: SocketAddr,
) {
    let _ = client.set_nodelay(true);
    if let Ending::ResetClient = relay(&mut client, control, resets, target).await {
        let _ = client.set_zero_linger();
    }
}

/// Resolves when the connection must be reset ([`Ending::ResetClient`]) or
/// the proxy was dropped ([`Ending::Close`]).
async fn until_reset(mut control: watch::Receiver<Control>, resets: u64) -> Ending {
    loop {
        if control.borrow_and_update().must_reset(resets) {
            return Ending::ResetClient;
        }
        if control.changed().await.is_err() {
            return Ending::Close;
        }
    }
}

async fn relay(
    client: &mut TcpStream,
    mut control: watch::Receiver<Control>,
    resets: u64,
    target: SocketAddr,
) -> Ending {
    // Until the first mode other than Blackhole, there is no connection to
    // the target: what the client sends is discarded.
    let mut client_done = false;
    let mut buf = vec![0; CHUNK];
    let mut server = loop {
        let now = *control.borrow_and_update();
        if now.must_reset(resets) {
            return Ending::ResetClient;
        }
        if now.mode != FaultMode::Blackhole {
            if client_done {
                // The client closed (or failed) while blackholed.
                return Ending::Close;
            }
            tokio::select! {
                connected = TcpStream::connect(target) => match connected {
                    Ok(server) => break server,
                    // As if the server had refused the client.
                    Err(_) => return Ending::ResetClient,
                },
                ending = until_reset(control.clone(), resets) => return ending,
            }
        }
        tokio::select! {
            changed = control.changed() => if changed.is_err() {
                return Ending::Close;
            },
            read = client.read(&mut buf), if !client_done => {
                client_done = !matches!(read, Ok(n) if n > 0);
            }
        }
    };
    drop(buf);
    let _ = server.set_nodelay(true);

    let mut failed = false;
    let ending = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, control.clone());
        let down = pump(server_read, client_write, control.clone());
        let both = async move { tokio::try_join!(up, down) };
        tokio::select! {
            done = both => match done {
                Ok(_) => Ending::Close,
                Err(_) => {
                    failed = true;
                    Ending::ResetClient
                }
            },
            ending = until_reset(control, resets) => ending,
        }
    };
    if failed {
        // One side failed (e.g. was reset): reset the other side too.
        let _ = server.set_zero_linger();
    }
    ending
}

/// A piece of one direction's stream, stamped with when it arrived.
enum Chunk {
    Data(Instant, Vec<u8>),
    /// End of the stream: EOF (`None`) or a read error.
    End(Instant, Option<io::Error>),
}

/// Copies `from` to `to` as the mode says, until EOF (passed on as a
/// shutdown) or an error (returned). Reading goes on while delivery waits,
/// through a queue of stamped chunks.
async fn pump<R, W>(mut from: R, mut to: W, control: watch::Receiver<Control>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (queue, mut queued) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let reader_control = control.clone();
    let reading = async move {
        let mut buf = vec![0; CHUNK];
        loop {
            let read = from.read(&mut buf).await;
            let arrived = Instant::now();
            let chunk = match read {
                Ok(0) => Chunk::End(arrived, None),
                Ok(n) => {
                    if reader_control.borrow().mode == FaultMode::Blackhole {
                        continue;
                    }
                    Chunk::Data(arrived, buf[..n].to_vec())
                }
                Err(e) => Chunk::End(arrived, Some(e)),
            };
            let end = matches!(chunk, Chunk::End(..));
            if queue.send(chunk).await.is_err() || end {
                break;
            }
        }
        // Keep `queue` alive: the writer stops at the end chunk.
        pending::<()>().await;
    };
    let mut control = control;
    let writing = async move {
        while let Some(chunk) = queued.recv().await {
            match chunk {
                Chunk::Data(arrived, bytes) => {
                    if due(&mut control, arrived, false).await {
                        to.write_all(&bytes).await?;
                    }
                }
                Chunk::End(arrived, error) => {
                    due(&mut control, arrived, true).await;
                    return match error {
                        None => to.shutdown().await,
                        Some(e) => Err(e),
                    };
                }
            }
        }
        Ok(())
    };
    tokio::select! {
        written = writing => written,
        () = reading => Ok(()),
    }
}

/// Waits until a chunk that arrived at `arrived` may be delivered; false if
/// it is to be discarded (data in a blackhole). An end of stream is never
/// discarded: it waits for the blackhole to end. Never returns once the
/// connection is being reset or the proxy is gone (the caller is dropped).
async fn due(control: &mut watch::Receiver<Control>, arrived: Instant, end: bool) -> bool {
    loop {
        let deadline = match control.borrow_and_update().mode {
            FaultMode::Pass => return true,
            FaultMode::Latency(delay) => match arrived.checked_add(delay) {
                Some(at) if at <= Instant::now() => return true,
                at => at,
            },
            FaultMode::Blackhole if !end => return false,
            FaultMode::Blackhole | FaultMode::Reset | FaultMode::Refuse => None,
        };
        let changed = match deadline {
            Some(at) => tokio::select! {
                () = tokio::time::sleep_until(at) => return true,
                changed = control.changed() => changed,
            },
            None => control.changed().await,
        };
        if changed.is_err() {
            return pending().await;
        }
    }
}
