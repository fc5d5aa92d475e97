//! [`FaultMode`]: what a proxy does to its traffic, and the control (mode and target) every
//! task of a proxy watches.

use std::net::SocketAddr;
use std::time::Duration;

/// What a [`FaultProxy`](super::FaultProxy) does to the traffic through it. Switch with
/// [`FaultProxy::set_mode`](super::FaultProxy::set_mode); a switch applies at once to every open
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
    /// `ECONNREFUSED` ([`std::io::ErrorKind::ConnectionRefused`]); existing
    /// connections are reset as with [`Reset`](FaultMode::Reset). The port
    /// stays bound (not listening) by the proxy meanwhile, so no other
    /// socket is handed it, and leaving `Refuse` listens on the same port
    /// again.
    Refuse,
}

/// What every task of a proxy watches.
#[derive(Debug, Clone, Copy)]
pub(super) struct Control {
    pub(super) mode: FaultMode,
    /// Where new connections go.
    pub(super) target: SocketAddr,
    /// How many times the mode was set to `Reset` or `Refuse`, or the target
    /// changed: a connection that saw a different count when it was accepted
    /// must be reset, even if the mode changed back before it noticed.
    pub(super) resets: u64,
}

impl Control {
    pub(super) fn must_reset(&self, resets_at_accept: u64) -> bool {
        self.resets != resets_at_accept || matches!(self.mode, FaultMode::Reset | FaultMode::Refuse)
    }
}
