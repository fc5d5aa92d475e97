//! Which endpoints a call may use, in the order it tries them.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::backend::Backend;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::role::Role;
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

/// The endpoints a call may try, in order. Held inline: a pool rarely has more than four
/// endpoints, and this is worked out on every call.
pub(crate) type Candidates<'e, DB> = SmallVec<[&'e Endpoint<DB>; 4]>;

#[derive(Debug)]
pub(crate) struct Router {
    preference: ReadPreference,
    selection: ReplicaSelection,
    turn: AtomicUsize,
}

impl Router {
    /// Whether calls of a pool of `endpoints` endpoints must be counted per endpoint: only
    /// when replicas are chosen by their count, between more than one endpoint.
    pub(crate) fn counts_outstanding(&self, endpoints: usize) -> bool {
        self.selection == ReplicaSelection::LeastOutstanding && endpoints > 1
    }

    pub(crate) fn new(preference: ReadPreference, selection: ReplicaSelection) -> Self {
        Self {
            preference,
            selection,
            turn: AtomicUsize::new(0),
        }
    }

    /// Endpoints for a call on `route`, best first, by the roles their servers last
    /// reported (the declared ones until then).
    ///
    /// Writes and auth calls go to the primary only: the one endpoint that says it is; else,
    /// while no endpoint says so, those that could not be asked (the declared primary
    /// first). Two that say they are the primary get nothing (split brain).
    pub(crate) fn candidates<'e, DB: Backend>(
        &self,
        route: Route,
        endpoints: &'e [Endpoint<DB>],
    ) -> Result<Candidates<'e, DB>, Error> {
        if route != Route::Read {
            return primary_of(route, endpoints);
        }
        // A pool of one endpoint reads from it whatever its role: nothing to order.
        if let [only] = endpoints {
            return Ok(SmallVec::from_elem(only, 1));
        }
        // One vector, the preferred group first: a stable partition in place, each
        // endpoint's role read once (it may change meanwhile).
        let replicas_first = self.preference == ReadPreference::PreferReplica;
        let mut order: Candidates<'e, DB> = endpoints.iter().collect();
        let mut split = 0;
        for at in 0..order.len() {
            let primary = order[at].likely_role() == Role::Primary;
            if primary != replicas_first {
                order[split..=at].rotate_right(1);
                split += 1;
            }
        }
        let (first, second) = order.split_at_mut(split);
        let (primaries, replicas) = if replicas_first {
            (second, first)
        } else {
            (first, second)
        };
        // The declared primary first among equals.
        primaries.sort_by_key(|endpoint| endpoint.hint != Role::Primary);
        if !replicas.is_empty() {
            // Rotate the starting replica so that ties (and round-robin) spread the load.
            let turn = self.turn.fetch_add(1, Ordering::Relaxed) % replicas.len();
            replicas.rotate_left(turn);
            if self.selection == ReplicaSelection::LeastOutstanding {
                // Stable: among equals the rotation above decides.
                replicas.sort_by_key(|endpoint| endpoint.outstanding());
            }
        }
        Ok(order)
    }
}

fn primary_of<DB: Backend>(
    route: Route,
    endpoints: &[Endpoint<DB>],
) -> Result<Candidates<'_, DB>, Error> {
    let mut primaries: Candidates<'_, DB> = endpoints
        .iter()
        .filter(|endpoint| endpoint.role() == Some(Role::Primary))
        .collect();
    // Two endpoints that reach one server (a moved address and the server's own) are one
    // primary: keep the declared primary, else the first.
    primaries.sort_by_key(|endpoint| endpoint.hint != Role::Primary);
    let first_server = primaries.first().and_then(|endpoint| endpoint.server());
    if first_server.is_some() && primaries.iter().all(|e| e.server() == first_server) {
        primaries.truncate(1);
    }
    match primaries.len() {
        1 => return Ok(primaries),
        0 => {}
        _ => {
            return Err(Error::SplitBrain {
                route,
                primaries: primaries.iter().map(|e| e.name.clone()).collect(),
            });
        }
    }
    let mut unknown: Candidates<'_, DB> = endpoints
        .iter()
        .filter(|endpoint| endpoint.role().is_none())
        .collect();
    unknown.sort_by_key(|endpoint| endpoint.hint != Role::Primary);
    if unknown.is_empty() {
        return Err(Error::NoPrimary {
            route,
            endpoints: endpoints
                .iter()
                .map(|endpoint| (endpoint.name.clone(), endpoint.role()))
                .collect(),
        });
    }
    Ok(unknown)
}
