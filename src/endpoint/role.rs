//! What an endpoint is now, as its server last said: primary or standby. Roles are
//! discovered, not declared: a promotion, a demotion or an address that moved to another
//! server changes them while the pool runs.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::role::{Observed, Role};

const UNKNOWN: u8 = 0;
const PRIMARY: u8 = 1;
const REPLICA: u8 = 2;

fn encode(role: Option<Role>) -> u8 {
    match role {
        None => UNKNOWN,
        Some(Role::Primary) => PRIMARY,
        Some(Role::Replica) => REPLICA,
    }
}

fn decode(value: u8) -> Option<Role> {
    match value {
        PRIMARY => Some(Role::Primary),
        REPLICA => Some(Role::Replica),
        _ => None,
    }
}

/// A change of an endpoint's discovered role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RoleChange {
    /// The endpoint.
    pub endpoint: Arc<str>,
    /// What it was (`None`: not known, e.g. before its first connection or while unreachable).
    pub from: Option<Role>,
    /// What it is now.
    pub to: Option<Role>,
    /// Wall-clock time of the change.
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
}

impl fmt::Display for RoleChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |role: Option<Role>| role.map_or("unknown", Role::as_str);
        write!(
            f,
            "endpoint {} is now {} (was {})",
            self.endpoint,
            name(self.to),
            name(self.from)
        )
    }
}

pub(crate) type RoleSink = Arc<dyn Fn(&RoleChange) + Send + Sync>;

/// An endpoint's discovered role, shared by the endpoint and its connection manager (which
/// learns it on every new connection).
pub(crate) struct RoleState {
    endpoint: Arc<str>,
    role: AtomicU8,
    /// Unix milliseconds of the last change; 0 before any.
    changed_at: AtomicU64,
    /// Where changes are reported: set once, when the pool is wired.
    sink: OnceLock<RoleSink>,
    /// Which server answered last.
    server: Mutex<Option<Arc<str>>>,
}

impl fmt::Debug for RoleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleState")
            .field("role", &self.get())
            .finish_non_exhaustive()
    }
}

impl RoleState {
    pub(crate) fn new(endpoint: Arc<str>) -> Self {
        Self {
            endpoint,
            role: AtomicU8::new(UNKNOWN),
            changed_at: AtomicU64::new(0),
            sink: OnceLock::new(),
            server: Mutex::new(None),
        }
    }

    pub(crate) fn set_sink(&self, sink: RoleSink) {
        let _ = self.sink.set(sink);
    }

    /// The role as last seen; `None` when not known.
    pub(crate) fn get(&self) -> Option<Role> {
        decode(self.role.load(Ordering::Acquire))
    }

    /// When the role last changed.
    pub(crate) fn changed_at(&self) -> Option<SystemTime> {
        match self.changed_at.load(Ordering::Acquire) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// Which server answered last, when the role is known.
    pub(crate) fn server(&self) -> Option<Arc<str>> {
        self.get()?;
        self.server
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records what the server said about itself; reports a change of role.
    pub(crate) fn observe_server(&self, observed: Observed) {
        *self.server.lock().unwrap_or_else(PoisonError::into_inner) =
            observed.server.map(Arc::from);
        self.observe(Some(observed.role));
    }

    /// Records what the server said (or `None`: it could not be asked); reports a change.
    pub(crate) fn observe(&self, role: Option<Role>) {
        let previous = decode(self.role.swap(encode(role), Ordering::AcqRel));
        if previous == role {
            return;
        }
        let at = SystemTime::now();
        let ms = at.duration_since(UNIX_EPOCH).map_or(1, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
        self.changed_at.store(ms.max(1), Ordering::Release);
        let change = RoleChange {
            endpoint: self.endpoint.clone(),
            from: previous,
            to: role,
            at,
        };
        if let Some(sink) = self.sink.get() {
            sink(&change);
        }
    }
}
