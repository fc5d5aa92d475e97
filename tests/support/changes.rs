//! A recorder of a pool's breaker transitions, shared by the PostgreSQL scenario tests.
#![allow(dead_code)] // each test file uses its own part

use std::sync::{Arc, Mutex};
use std::time::Duration;

use protected_pool::breaker::State;
use protected_pool::{PoolStateChange, Route};
use tokio::sync::watch;

/// Every state change of every breaker of a pool, in order.
#[derive(Clone)]
pub struct Changes {
    seen: Arc<Mutex<Vec<PoolStateChange>>>,
    /// Bumped on every change, to wait for one without polling.
    count: watch::Sender<usize>,
}

impl Default for Changes {
    fn default() -> Self {
        Self {
            seen: Arc::default(),
            count: watch::Sender::new(0),
        }
    }
}

impl Changes {
    pub fn listener(&self) -> impl Fn(&PoolStateChange) + Send + Sync + 'static {
        let (seen, count) = (self.seen.clone(), self.count.clone());
        move |change| {
            seen.lock().unwrap().push(change.clone());
            count.send_modify(|n| *n += 1);
        }
    }

    pub fn all(&self) -> Vec<PoolStateChange> {
        self.seen.lock().unwrap().clone()
    }

    pub fn describe(&self) -> Vec<String> {
        self.all().iter().map(ToString::to_string).collect()
    }

    /// The changes of the breaker of `route` on `endpoint`.
    pub fn on(&self, endpoint: &str, route: Route) -> Vec<PoolStateChange> {
        self.all()
            .into_iter()
            .filter(|c| &*c.endpoint == endpoint && c.route == route)
            .inspect(|c| assert_eq!(&*c.change.breaker, format!("{endpoint}/{route}"), "{c}"))
            .collect()
    }

    /// (from, to) of the transitions of the breaker of `route` on `endpoint`.
    pub fn of(&self, endpoint: &str, route: Route) -> Vec<(State, State)> {
        self.on(endpoint, route)
            .iter()
            .map(|c| (c.change.from, c.change.to))
            .collect()
    }

    /// Waits until `done` holds for the changes seen so far, failing after `limit`.
    pub async fn wait_until(&self, limit: Duration, what: &str, done: impl Fn(&Changes) -> bool) {
        let mut count = self.count.subscribe();
        let waited = tokio::time::timeout(limit, async {
            while !done(self) {
                count.changed().await.expect("the sender lives in self");
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "after {limit:?}, still not {what}; changes: {:#?}",
            self.describe()
        );
    }
}
