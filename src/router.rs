//! Which endpoints a call may use, in the order it tries them.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::endpoint::Endpoint;
use crate::route::Route;

/// Where reads go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadPreference {
    /// The primary serves reads; replicas take over when its read breaker is open or its
    /// connection fails.
    #[default]
    Primary,
    /// Replicas serve reads, spread among those whose breakers permit; the primary is the
    /// fallback.
    PreferReplica,
}

/// How a read picks among replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaSelection {
    /// The replica with the fewest calls in flight (ties taken in turn).
    #[default]
    LeastOutstanding,
    /// Each replica in turn.
    RoundRobin,
}

#[derive(Debug)]
pub(crate) struct Router {
    preference: ReadPreference,
    selection: ReplicaSelection,
    turn: AtomicUsize,
}

impl Router {
    pub(crate) fn new(preference: ReadPreference, selection: ReplicaSelection) -> Self {
        Self {
            preference,
            selection,
            turn: AtomicUsize::new(0),
        }
    }

    /// Endpoints for a call on `route`, best first. `endpoints[0]` is the primary. Writes and
    /// auth calls only ever go to the primary.
    pub(crate) fn candidates<'e, DB: Backend>(
        &self,
        route: Route,
        endpoints: &'e [Endpoint<DB>],
    ) -> Vec<&'e Endpoint<DB>> {
        let (primary, replicas) = endpoints.split_first().expect("a pool has a primary");
        if route != Route::Read || replicas.is_empty() {
            return vec![primary];
        }
        let mut order: Vec<&Endpoint<DB>> = Vec::with_capacity(endpoints.len());
        if self.preference == ReadPreference::Primary {
            order.push(primary);
        }
        // Rotate the starting replica so that ties (and round-robin) spread the load.
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) % replicas.len();
        let start = order.len();
        order.extend(replicas[turn..].iter().chain(&replicas[..turn]));
        if self.selection == ReplicaSelection::LeastOutstanding {
            // Stable: among equals the rotation above decides.
            order[start..].sort_by_key(|endpoint| endpoint.outstanding());
        }
        if self.preference == ReadPreference::PreferReplica {
            order.push(primary);
        }
        order
    }
}
