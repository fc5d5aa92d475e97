//! The proxy's port, listening or held without listening, and the counters its tasks keep.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Backlog of the listening socket.
pub(super) const BACKLOG: u32 = 1024;

/// The proxy's listening socket, swapped synchronously by `set_mode` and
/// `drop` so that the port's state is right as soon as they return.
#[derive(Debug)]
pub(super) enum Listening {
    Open(TcpListener),
    /// In [`FaultMode::Refuse`](crate::FaultMode::Refuse): the port held by a bound socket that does
    /// not listen (`None` if binding it failed; leaving `Refuse` then binds
    /// afresh).
    Refusing(Option<TcpSocket>),
    /// The proxy was dropped.
    Stopped,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) listening: Mutex<Listening>,
    pub(super) open: AtomicUsize,
    pub(super) accepted: AtomicU64,
}

impl Shared {
    pub(super) fn listening(&self) -> MutexGuard<'_, Listening> {
        self.listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts from the current listener; pending while there is none (the
    /// accept loop is woken by the mode change that reopens it).
    pub(super) fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        match &*self.listening() {
            Listening::Open(listener) => listener.poll_accept(cx).map_ok(|(stream, _)| stream),
            Listening::Refusing(_) | Listening::Stopped => Poll::Pending,
        }
    }
}

/// Counts a client connection as open while it lives.
pub(super) struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(shared)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A listener on `addr` with `SO_REUSEADDR`, so its port can be bound again
/// while connections accepted on it are still open or in `TIME_WAIT`.
pub(super) fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A socket bound to `addr` that does not listen: connecting to it is
/// refused, and the OS hands the port to no one else (a socket binding it
/// explicitly could still share it with `SO_REUSEADDR`).
pub(super) fn hold_port(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}
