//! Which endpoint is the primary now, as their servers say: role changes reported to
//! listeners, logs and metrics, and two primaries at once (split brain) told apart.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};

use serde::Serialize;

use crate::endpoint::{RoleChange, RoleState};
use crate::role::Role;
use crate::telemetry;

/// A change in what the pool knows of its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClusterEvent {
    /// An endpoint's server said it is something else now (promoted, demoted, moved), or
    /// could not be asked.
    RoleChanged(RoleChange),
    /// Two or more endpoints say they are the primary: no write goes to any of them until
    /// one steps down.
    SplitBrain {
        /// The endpoints that say they are the primary.
        primaries: Vec<Arc<str>>,
    },
    /// At most one endpoint says it is the primary again: writes go to it.
    SplitBrainOver {
        /// The primary now, if one is known.
        primary: Option<Arc<str>>,
    },
}

impl fmt::Display for ClusterEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RoleChanged(change) => change.fmt(f),
            Self::SplitBrain { primaries } => write!(
                f,
                "split brain: {} all say they are the primary; writes go to none of them",
                primaries.join(", ")
            ),
            Self::SplitBrainOver {
                primary: Some(primary),
            } => {
                write!(f, "split brain over: {primary} is the one primary")
            }
            Self::SplitBrainOver { primary: None } => {
                f.write_str("split brain over: no endpoint says it is the primary")
            }
        }
    }
}

pub(crate) type ClusterListener = Arc<dyn Fn(&ClusterEvent) + Send + Sync>;

/// Called with an endpoint's index when its server says it is the primary now.
pub(crate) type PromotionHook = Box<dyn Fn(usize) + Send + Sync>;

/// The endpoints' roles and who hears about them.
pub(crate) struct Topology {
    roles: Vec<(Arc<str>, Arc<RoleState>)>,
    listeners: RwLock<Vec<ClusterListener>>,
    /// The primaries of a split brain under way; empty when there is none.
    split: Mutex<Vec<Arc<str>>>,
    on_promotion: OnceLock<PromotionHook>,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topology")
            .field("split", &self.split_brain())
            .finish_non_exhaustive()
    }
}

impl Topology {
    /// Watches `roles` (name and state of each endpoint) from now on.
    pub(crate) fn watch(
        roles: Vec<(Arc<str>, Arc<RoleState>)>,
        listeners: Vec<ClusterListener>,
    ) -> Arc<Self> {
        let topology = Arc::new(Self {
            roles,
            listeners: RwLock::new(listeners),
            split: Mutex::new(Vec::new()),
            on_promotion: OnceLock::new(),
        });
        for (_, state) in &topology.roles {
            // Weak: the topology holds the states, which must not keep it alive.
            let weak: Weak<Self> = Arc::downgrade(&topology);
            state.set_sink(Arc::new(move |change: &RoleChange| {
                if let Some(topology) = weak.upgrade() {
                    topology.changed(change);
                }
            }));
        }
        topology
    }

    /// What to do when an endpoint becomes the primary (set once, when the pool is built).
    pub(crate) fn on_promotion(&self, hook: PromotionHook) {
        let _ = self.on_promotion.set(hook);
    }

    pub(crate) fn add_listener(&self, listener: ClusterListener) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    /// The endpoints of a split brain under way (empty when there is none).
    pub(crate) fn split_brain(&self) -> Vec<Arc<str>> {
        self.split
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn changed(&self, change: &RoleChange) {
        let (from, to) = (label(change.from), label(change.to));
        tracing::warn!(
            endpoint = &*change.endpoint,
            from,
            to,
            "endpoint role changed"
        );
        telemetry::role_change(&change.endpoint, from, to);
        // A standby promoted: not a server back from an outage, which earns its way back
        // through half-open trials like any other.
        if change.from == Some(Role::Replica) && change.to == Some(Role::Primary) {
            let index = self
                .roles
                .iter()
                .position(|(name, _)| *name == change.endpoint);
            if let (Some(index), Some(hook)) = (index, self.on_promotion.get()) {
                hook(index);
            }
        }
        self.emit(&ClusterEvent::RoleChanged(change.clone()));
        let primary_states: Vec<&(Arc<str>, Arc<RoleState>)> = self
            .roles
            .iter()
            .filter(|(_, state)| state.get() == Some(Role::Primary))
            .collect();
        // One server reached by two endpoints is one primary.
        let first_server = primary_states.first().and_then(|(_, state)| state.server());
        let one_server = first_server.is_some()
            && primary_states
                .iter()
                .all(|(_, state)| state.server() == first_server);
        let primaries: Vec<Arc<str>> = if one_server {
            primary_states
                .iter()
                .take(1)
                .map(|(name, _)| name.clone())
                .collect()
        } else {
            primary_states
                .iter()
                .map(|(name, _)| name.clone())
                .collect()
        };
        let event = {
            let mut split = self.split.lock().unwrap_or_else(PoisonError::into_inner);
            match (primaries.len() >= 2, split.is_empty()) {
                (true, _) if *split != primaries => {
                    split.clone_from(&primaries);
                    Some(ClusterEvent::SplitBrain { primaries })
                }
                (false, false) => {
                    split.clear();
                    Some(ClusterEvent::SplitBrainOver {
                        primary: primaries.into_iter().next(),
                    })
                }
                _ => None,
            }
        };
        if let Some(event) = event {
            match &event {
                ClusterEvent::SplitBrain { .. } => tracing::error!(%event, "split brain"),
                _ => tracing::warn!(%event, "split brain over"),
            }
            self.emit(&event);
        }
    }

    fn emit(&self, event: &ClusterEvent) {
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for listener in listeners {
            // One panicking listener must not silence the others.
            let _ = catch_unwind(AssertUnwindSafe(|| listener(event)));
        }
    }
}

fn label(role: Option<Role>) -> &'static str {
    role.map_or("unknown", Role::as_str)
}
