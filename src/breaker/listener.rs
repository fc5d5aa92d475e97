//! State-change events: synchronous callbacks and async subscriptions, delivered once each, in
//! the order the transitions happened.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use super::state::{State, TransitionReason};

/// One transition of one breaker.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct StateChange {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// State before.
    pub from: State,
    /// State after.
    pub to: State,
    /// Why.
    pub reason: TransitionReason,
    /// Wall-clock time of the transition.
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    /// The breaker clock's reading at the transition (exact under a manual clock).
    #[serde(with = "humantime_serde")]
    pub clock_time: Duration,
    /// Position of this transition in the breaker's history, starting at 1.
    pub sequence: u64,
}

impl fmt::Display for StateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "breaker {} {} -> {}: {}",
            self.breaker, self.from, self.to, self.reason
        )
    }
}

/// Identifies a registered listener, for [`remove_listener`](super::CircuitBreaker::remove_listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

type Callback = Arc<dyn Fn(&StateChange) + Send + Sync>;

enum Sink {
    Callback(Callback),
    Channel(mpsc::UnboundedSender<StateChange>),
}

/// One registration: a sink, and whether it is still registered.
struct Registered {
    id: ListenerId,
    sink: Sink,
    /// Cleared on removal, so that a delivery already holding a snapshot that lists this sink
    /// skips it from then on: a listener removed by another listener hears nothing more.
    live: AtomicBool,
}

/// Registered listeners and the queue of transitions not yet delivered.
///
/// Transitions are queued while the breaker's state lock is held, so the queue is in
/// transition order. Delivery happens after that lock is released (a listener may call back
/// into the breaker) by whichever thread gets the delivery lock; the others leave their events
/// to it.
///
/// The sink list is copied on write and shared: each delivery takes a snapshot (one reference
/// count) and calls the listeners with no lock held, so a listener may add or remove listeners
/// on its own breaker. Registrations are rare; transitions are delivered far more often.
pub(crate) struct Listeners {
    sinks: RwLock<Arc<[Arc<Registered>]>>,
    next_id: AtomicU64,
    queue: Mutex<VecDeque<StateChange>>,
    delivering: Mutex<()>,
}

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.sinks.read().map_or(0, |sinks| sinks.len());
        f.debug_struct("Listeners").field("count", &count).finish()
    }
}

impl Listeners {
    pub(crate) fn new() -> Self {
        Self {
            sinks: RwLock::new(Arc::new([])),
            next_id: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            delivering: Mutex::new(()),
        }
    }

    fn add(&self, sink: Sink) -> ListenerId {
        let id = ListenerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let registered = Arc::new(Registered {
            id,
            sink,
            live: AtomicBool::new(true),
        });
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        *sinks = sinks.iter().cloned().chain([registered]).collect();
        id
    }

    pub(crate) fn add_callback(&self, callback: Callback) -> ListenerId {
        self.add(Sink::Callback(callback))
    }

    pub(crate) fn subscribe(&self) -> Subscription {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.add(Sink::Channel(sender));
        Subscription { receiver }
    }

    pub(crate) fn remove(&self, id: ListenerId) -> bool {
        self.remove_where(|registered| registered.id == id)
    }

    /// Unregisters every sink `matches` picks; returns whether there was one.
    fn remove_where(&self, matches: impl Fn(&Registered) -> bool) -> bool {
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        let mut found = false;
        for registered in sinks.iter().filter(|registered| matches(registered)) {
            registered.live.store(false, Ordering::Relaxed);
            found = true;
        }
        if found {
            *sinks = sinks
                .iter()
                .filter(|registered| registered.live.load(Ordering::Relaxed))
                .cloned()
                .collect();
        }
        found
    }

    /// Queues a transition. Call with the breaker's state lock held.
    pub(crate) fn enqueue(&self, change: StateChange) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(change);
    }

    /// Delivers queued transitions. Call without the breaker's state lock.
    pub(crate) fn deliver(&self) {
        loop {
            let Ok(_delivering) = self.delivering.try_lock() else {
                // Another thread (or this one, from inside a listener) is delivering and will
                // pick up what is queued.
                return;
            };
            while let Some(change) = self.pop() {
                self.send(&change);
            }
            drop(_delivering);
            // An event queued after the last pop but before the unlock found the lock taken;
            // look again so it is not left behind.
            if self.is_queue_empty() {
                return;
            }
        }
    }

    fn pop(&self) -> Option<StateChange> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    fn is_queue_empty(&self) -> bool {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn send(&self, change: &StateChange) {
        // Taken per transition, so a listener added while one transition is delivered hears
        // the next.
        let sinks = Arc::clone(&self.sinks.read().unwrap_or_else(PoisonError::into_inner));
        let mut closed = false;
        for registered in sinks.iter() {
            if !registered.live.load(Ordering::Relaxed) {
                continue;
            }
            match &registered.sink {
                Sink::Callback(callback) => {
                    // A panicking listener must not take the breaker down with it.
                    let _ = catch_unwind(AssertUnwindSafe(|| callback(change)));
                }
                Sink::Channel(sender) => closed |= sender.send(change.clone()).is_err(),
            }
        }
        if closed {
            self.remove_where(|registered| {
                matches!(&registered.sink, Sink::Channel(sender) if sender.is_closed())
            });
        }
    }
}

/// An async stream of a breaker's transitions, from the moment of subscribing.
///
/// Unbounded, so a slow reader never makes the breaker wait or drop an event; drop the
/// subscription to stop receiving.
#[derive(Debug)]
pub struct Subscription {
    receiver: mpsc::UnboundedReceiver<StateChange>,
}

impl Subscription {
    /// The next transition; `None` once the breaker is gone.
    pub async fn recv(&mut self) -> Option<StateChange> {
        self.receiver.recv().await
    }

    /// The next transition if one is waiting.
    pub fn try_recv(&mut self) -> Option<StateChange> {
        self.receiver.try_recv().ok()
    }
}
