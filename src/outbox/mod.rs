//! The outbox: keyed writes the write route could not take, stored durably in an embedded
//! SQLite file and applied in order, exactly once through their keys, once it serves again.
//!
//! Enabled with [`PoolBuilder::outbox`](crate::PoolBuilder::outbox); used with
//! [`Keyed::or_enqueue`](crate::Keyed::or_enqueue).
//!
//! What it guarantees:
//! - A write the call reports [`Queued`](crate::Source::Queued) is in the file, synced to
//!   disk, before the call returns. It survives the process being killed and the machine
//!   losing power.
//! - Queued writes are applied in the order they were queued, each exactly once: the
//!   replayer applies a batch in one transaction that also records each write's key, and
//!   takes the batch off the queue only after that committed. A crash between the two
//!   replays the batch, and the keys make the replay a no-op for writes already applied.
//! - A write the database refuses for a reason of its own (a constraint, bad data: class
//!   [`Query`](crate::ErrorClass::Query)) goes to the dead letters, with the error, and the
//!   writes after it go on. Nothing is dropped: a dead letter stays until retried or
//!   discarded.
//! - The queue is bounded by count and bytes; past the bound, `or_enqueue` fails with
//!   [`Error::OutboxFull`] and the write is neither applied nor
//!   queued.
//!
//! What it does not: order a queued write against writes made without the outbox; apply a
//! write sooner than the write route serves again; keep one file safe for two processes at
//! once (give each process its own file).

mod store;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, OnceCell};

pub use store::DeadLetter;
pub(crate) use store::{NotQueued, QueuedWrite, Settled, Store};

use crate::error::{Error, Result};
use crate::problem::ConfigProblem;
use crate::telemetry;
use store::Counts;

/// Where the outbox keeps its file, and how much it may hold.
///
/// In the configuration file (only `path` is required):
///
/// ```toml
/// [outbox]
/// path = "/var/lib/app/outbox.sqlite"
/// max_writes = 100000
/// max_bytes = 67108864
/// batch = 200
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// The SQLite file; created, with its directory, if missing.
    pub path: PathBuf,
    /// The most writes it holds. Default 100,000.
    #[serde(default = "defaults::max_writes")]
    pub max_writes: u64,
    /// The most bytes of SQL, arguments and keys it holds. Default 64 MiB.
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: u64,
    /// How many writes the replayer applies in one transaction. Default 200.
    #[serde(default = "defaults::batch")]
    pub batch: usize,
}

mod defaults {
    pub(super) fn max_writes() -> u64 {
        100_000
    }

    pub(super) fn max_bytes() -> u64 {
        64 << 20
    }

    pub(super) fn batch() -> usize {
        200
    }
}

impl OutboxConfig {
    /// An outbox in the file at `path`, with the default bounds.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_writes: defaults::max_writes(),
            max_bytes: defaults::max_bytes(),
            batch: defaults::batch(),
        }
    }

    /// At most `max` writes.
    #[must_use]
    pub fn max_writes(mut self, max: u64) -> Self {
        self.max_writes = max;
        self
    }

    /// At most `max` bytes.
    #[must_use]
    pub fn max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max;
        self
    }

    /// `size` writes per replay transaction.
    #[must_use]
    pub fn batch(mut self, size: usize) -> Self {
        self.batch = size;
        self
    }

    pub(crate) fn problems(&self, path: &str) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if self.path.as_os_str().is_empty() {
            problems.push(ConfigProblem::new(
                format!("{path}.path"),
                "the outbox needs a file path".to_owned(),
            ));
        }
        if self.max_writes == 0 {
            problems.push(ConfigProblem::new(
                format!("{path}.max_writes"),
                "must be at least 1".to_owned(),
            ));
        }
        if self.max_bytes == 0 {
            problems.push(ConfigProblem::new(
                format!("{path}.max_bytes"),
                "must be at least 1".to_owned(),
            ));
        }
        if self.batch == 0 || self.batch > 10_000 {
            problems.push(ConfigProblem::new(
                format!("{path}.batch"),
                format!("{} is not between 1 and 10000", self.batch),
            ));
        }
        problems
    }
}

/// Something that happened to the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutboxEvent {
    /// A write was queued.
    Queued {
        /// Its key.
        key: String,
        /// Its place in the queue, 1 for the next to be applied.
        position: u64,
    },
    /// A queued write was applied (or found applied already, `already` true).
    Applied {
        /// Its key.
        key: String,
        /// Whether its key was recorded already (applied before a crash, say).
        already: bool,
    },
    /// The database refused a queued write (class `Query`); it is now a dead letter.
    DeadLettered {
        /// Its id among the dead letters.
        id: i64,
        /// Its key.
        key: String,
        /// The database's error.
        error: String,
    },
    /// A write was not queued: the outbox is full.
    Rejected {
        /// Its key.
        key: String,
    },
    /// The queue is empty again.
    Drained,
}

type OutboxListener = Arc<dyn Fn(&OutboxEvent) + Send + Sync>;

/// What the outbox holds, for [`HealthReport`](crate::HealthReport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OutboxHealth {
    /// Writes waiting.
    pub depth: u64,
    /// Their size, as the byte bound counts it.
    pub bytes: u64,
    /// How long the oldest has waited.
    #[serde(with = "humantime_serde")]
    pub oldest_age: Option<Duration>,
    /// Writes applied from the queue since the pool was built.
    pub replayed: u64,
    /// Writes moved to the dead letters since the pool was built.
    pub dead_lettered: u64,
    /// Dead letters kept now.
    pub dead_letters: u64,
}

/// A pool's outbox: what it holds, its dead letters, and its events. From
/// [`ProtectedPool::outbox`](crate::ProtectedPool::outbox).
pub struct Outbox {
    config: OutboxConfig,
    store: OnceCell<Store>,
    /// Wakes the replayer: a write was queued, or the write route serves again.
    pub(crate) wake: Notify,
    /// Wakes those waiting for the queue to empty.
    drained: Notify,
    depth: AtomicU64,
    bytes: AtomicU64,
    /// Milliseconds since the epoch; 0 when empty.
    oldest_ms: AtomicU64,
    dead_letters: AtomicU64,
    replayed: AtomicU64,
    dead_lettered: AtomicU64,
    listeners: RwLock<Vec<OutboxListener>>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.config.path)
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    pub(crate) fn new(config: OutboxConfig) -> Self {
        Self {
            config,
            store: OnceCell::new(),
            wake: Notify::new(),
            drained: Notify::new(),
            depth: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            oldest_ms: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            listeners: RwLock::new(Vec::new()),
        }
    }

    pub(crate) fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// The file, opened on first use.
    pub(crate) async fn store(&self) -> Result<&Store> {
        self.store
            .get_or_try_init(|| async {
                let store = Store::open(&self.config.path)
                    .await
                    .map_err(|source| self.failed("open", source))?;
                self.publish(store.counts().await);
                Ok(store)
            })
            .await
    }

    pub(crate) fn failed(&self, operation: &'static str, source: sqlx::Error) -> Error {
        Error::Outbox {
            path: self.config.path.clone(),
            operation,
            source,
        }
    }

    /// The file it keeps its queue in.
    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// Writes waiting.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Acquire)
    }

    /// What it holds, and what it has done since the pool was built.
    pub fn health(&self) -> OutboxHealth {
        let oldest = self.oldest_ms.load(Ordering::Relaxed);
        let oldest_age = (oldest != 0)
            .then(|| Duration::from_millis(crate::durable::now_ms().saturating_sub(oldest)));
        OutboxHealth {
            depth: self.depth(),
            bytes: self.bytes.load(Ordering::Relaxed),
            oldest_age,
            replayed: self.replayed.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
        }
    }

    /// Calls `listener` on every [`OutboxEvent`]. One that panics does not keep the others
    /// from hearing the event.
    pub fn on_event(&self, listener: impl Fn(&OutboxEvent) + Send + Sync + 'static) {
        self.listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(listener));
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        let store = self.store().await?;
        store
            .dead_letters()
            .await
            .map_err(|source| self.failed("read the dead letters", source))
    }

    /// Queues dead letter `id` again, at the back (after fixing what made the database
    /// refuse it); `false` if there is no such dead letter or its key is queued already.
    pub async fn retry_dead_letter(&self, id: i64) -> Result<bool> {
        let store = self.store().await?;
        let (moved, counts) = store
            .retry_dead_letter(id, now_ms_i64())
            .await
            .map_err(|source| self.failed("queue a dead letter again", source))?;
        self.publish(counts);
        if moved {
            self.wake.notify_one();
        }
        Ok(moved)
    }

    /// Deletes dead letter `id`: the write is given up. `false` if there is none.
    pub async fn discard_dead_letter(&self, id: i64) -> Result<bool> {
        let store = self.store().await?;
        let (deleted, counts) = store
            .discard_dead_letter(id)
            .await
            .map_err(|source| self.failed("discard a dead letter", source))?;
        self.publish(counts);
        Ok(deleted)
    }

    /// Waits until the queue is empty, at most `timeout`; whether it is. `false` if the file
    /// cannot be opened.
    pub async fn wait_until_empty(&self, timeout: Duration) -> bool {
        let wait = async {
            // Until the file is open the depth is not known (0): a pool built on a file still
            // holding writes from before a restart would look empty.
            if self.store().await.is_err() {
                return false;
            }
            loop {
                let drained = self.drained.notified();
                if self.depth() == 0 {
                    return true;
                }
                drained.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Queues `write` under `key`.
    pub(crate) async fn enqueue(
        &self,
        key: &str,
        write: &crate::DurableWrite,
        cause: Option<Error>,
    ) -> Result<(u64, Option<Error>)> {
        let store = self.store().await?;
        let queued = store
            .enqueue(
                key,
                write,
                now_ms_i64(),
                self.config.max_writes,
                self.config.max_bytes,
            )
            .await;
        match queued {
            Ok((position, counts)) => {
                self.publish(counts);
                metrics::counter!(telemetry::OUTBOX_QUEUED).increment(1);
                self.emit(&OutboxEvent::Queued {
                    key: key.to_owned(),
                    position,
                });
                self.wake.notify_one();
                Ok((position, cause))
            }
            Err(NotQueued::Full(counts)) => {
                metrics::counter!(telemetry::OUTBOX_REJECTED).increment(1);
                self.emit(&OutboxEvent::Rejected {
                    key: key.to_owned(),
                });
                Err(Error::OutboxFull {
                    writes: counts.depth,
                    bytes: counts.bytes,
                    max_writes: self.config.max_writes,
                    max_bytes: self.config.max_bytes,
                    cause: cause.map(Box::new),
                })
            }
            Err(NotQueued::Failed(source)) => Err(self.failed("queue a write", source)),
        }
    }

    /// A batch taken off the queue: counts, metrics and events.
    pub(crate) fn settled(
        &self,
        batch: &[QueuedWrite],
        settled: &[Settled],
        dead_ids: &[i64],
        counts: Counts,
    ) {
        let mut dead_ids = dead_ids.iter();
        for (write, settled) in batch.iter().zip(settled) {
            match settled {
                Settled::Applied | Settled::AlreadyApplied => {
                    let already = matches!(settled, Settled::AlreadyApplied);
                    self.replayed.fetch_add(1, Ordering::Relaxed);
                    let outcome = if already {
                        "already_applied"
                    } else {
                        "applied"
                    };
                    metrics::counter!(telemetry::OUTBOX_REPLAYED, "outcome" => outcome)
                        .increment(1);
                    self.emit(&OutboxEvent::Applied {
                        key: write.key.clone(),
                        already,
                    });
                }
                Settled::Refused(error) => {
                    self.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(telemetry::OUTBOX_DEAD_LETTERED).increment(1);
                    tracing::warn!(key = %write.key, %error, "queued write refused by the database; kept as a dead letter");
                    self.emit(&OutboxEvent::DeadLettered {
                        id: dead_ids.next().copied().unwrap_or_default(),
                        key: write.key.clone(),
                        error: error.clone(),
                    });
                }
            }
        }
        // The new depth last: whoever sees it (`depth()`, `wait_until_empty`) sees the
        // batch's counts and has had its events.
        self.publish(counts);
        if counts.depth == 0 {
            self.emit(&OutboxEvent::Drained);
        }
    }

    fn publish(&self, counts: Counts) {
        self.depth.store(counts.depth, Ordering::Release);
        self.bytes.store(counts.bytes, Ordering::Relaxed);
        let oldest = counts
            .oldest_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .unwrap_or(0);
        self.oldest_ms.store(oldest, Ordering::Relaxed);
        self.dead_letters
            .store(counts.dead_letters, Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(telemetry::OUTBOX_DEPTH).set(counts.depth as f64);
            metrics::gauge!(telemetry::OUTBOX_BYTES).set(counts.bytes as f64);
            metrics::gauge!(telemetry::OUTBOX_DEAD_LETTERS).set(counts.dead_letters as f64);
        }
        let age = self.health().oldest_age.unwrap_or_default();
        metrics::gauge!(telemetry::OUTBOX_OLDEST_AGE).set(age.as_secs_f64());
        if counts.depth == 0 {
            self.drained.notify_waiters();
        }
    }

    fn emit(&self, event: &OutboxEvent) {
        let listeners = self
            .listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for listener in listeners {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener(event)));
        }
    }
}

fn now_ms_i64() -> i64 {
    i64::try_from(crate::durable::now_ms()).unwrap_or(i64::MAX)
}
