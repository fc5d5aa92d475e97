//! `.or_enqueue()` and the replayer: keyed writes the write route could not take wait in the
//! outbox (see `crate::outbox`) and are applied from it, in order and in batches, once it
//! serves again.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::failover::Replay;
use super::keyed::{Keyed, Keys, WriteOutcome, claim};
use super::operation::Operation;
use super::statement::{QueryFuture, Statement, execute_on};
use super::{PoolInner, ProtectedPool};
use crate::backend::Backend;
use crate::classify::ErrorClass;
use crate::durable::DurableWrite;
use crate::durable::now_ms;
use crate::error::{Error, Result};
use crate::fallback::{Served, Source};
use crate::outbox::{Outbox, QueuedWrite, Settled};
use crate::route::Route;

impl<'p, DB: Backend> Keyed<'p, DB, DurableWrite> {
    /// When the write route cannot take the write (breakers open, no primary, the outcome
    /// unknown after the route's timeout), stores it in the pool's outbox and returns at
    /// once, with a [`Source::Queued`] receipt; the outbox applies it exactly once when the
    /// write route serves again. While earlier writes wait in the outbox, a new one joins
    /// them at the back rather than overtake them. Needs [`PoolBuilder::outbox`](crate::PoolBuilder::outbox).
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use protected_pool::{DurableWrite, Source};
    ///
    /// let receipt = pool
    ///     .write(DurableWrite::new("INSERT INTO payments (order_id, cents) VALUES ($1, $2)").bind(42_i64).bind(1999_i64))
    ///     .idempotent("payment:order-42")
    ///     .or_enqueue()
    ///     .execute()
    ///     .await?;
    /// if let Source::Queued { position, .. } = receipt.source() {
    ///     println!("payment queued for processing (number {position} in line)");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn or_enqueue(self) -> Enqueueing<'p, DB> {
        Enqueueing { keyed: self }
    }
}

/// A keyed [`DurableWrite`] that goes to the outbox when the write route cannot take it
/// (see [`Keyed::or_enqueue`]).
#[must_use = "a write does nothing until executed"]
#[derive(Debug)]
pub struct Enqueueing<'p, DB: Backend> {
    keyed: Keyed<'p, DB, DurableWrite>,
}

/// Whether a keyed write that failed so goes to the outbox: the write route could not take
/// it, or its outcome is still unknown (the key makes the replay safe either way).
fn belongs_in_outbox(error: &Error) -> bool {
    error.is_unavailable() || error.is_outcome_unknown()
}

impl<'p, DB: Backend> Enqueueing<'p, DB> {
    /// Applies the write, finds it applied, or queues it.
    pub fn execute(self) -> impl Future<Output = Result<Served<WriteOutcome>>> + Send + 'p {
        let (pool, parts) = self.keyed.into_durable();
        async move {
            let parts = parts?;
            let inner = &pool.inner;
            let outbox = inner.outbox.as_ref().ok_or_else(|| {
                Error::Config(
                    crate::problem::ConfigProblem::new(
                        "outbox",
                        "or_enqueue() needs an outbox: PoolBuilder::outbox(OutboxConfig::new(path))",
                    )
                    .into(),
                )
            })?;
            inner.ensure_replayer();
            outbox.store().await?;
            let cause = if outbox.depth() > 0 {
                // Earlier writes wait: this one must not overtake them.
                None
            } else {
                match inner.keyed_call(&parts.key, parts.statement).await {
                    Ok(served) => return Ok(served),
                    Err(error) if belongs_in_outbox(&error) => Some(error),
                    Err(error) => return Err(error),
                }
            };
            let (position, cause) = outbox.enqueue(&parts.key, &parts.durable, cause).await?;
            tracing::debug!(key = %parts.key, position, "write queued in the outbox");
            Ok(Served::new(
                WriteOutcome::Queued { position },
                Source::Queued {
                    key: parts.key,
                    position,
                    cause,
                },
            ))
        }
    }
}

/// A batch of queued writes as the endpoint loop runs it: one transaction, a savepoint per
/// write, each write's key claimed with it.
struct Batch<'a, DB: Backend> {
    keys: &'a Keys,
    writes: &'a [Prepared<DB>],
    persistent: bool,
}

/// A queued write made ready to run, or why it cannot be.
enum Prepared<DB: Backend> {
    Ready {
        key: String,
        statement: Statement<DB>,
    },
    Broken(String),
}

impl<DB: Backend> Operation<DB::Connection> for Batch<'_, DB> {
    type Output = Vec<Settled>;

    fn run<'c>(
        &'c mut self,
        connection: &'c mut DB::Connection,
    ) -> impl Future<Output = Result<Vec<Settled>, sqlx::Error>> + 'c {
        let future: QueryFuture<'c, Vec<Settled>> = Box::pin(apply_batch::<DB>(
            self.keys,
            self.writes,
            self.persistent,
            connection,
        ));
        future
    }
}

async fn apply_batch<DB: Backend>(
    keys: &Keys,
    writes: &[Prepared<DB>],
    persistent: bool,
    connection: &mut DB::Connection,
) -> Result<Vec<Settled>, sqlx::Error> {
    let mut transaction = sqlx::Connection::begin(connection).await?;
    let mut settled = Vec::with_capacity(writes.len());
    for write in writes {
        let (key, statement) = match write {
            Prepared::Ready { key, statement } => (key, statement),
            Prepared::Broken(why) => {
                settled.push(Settled::Refused(why.clone()));
                continue;
            }
        };
        sqlx::raw_sql("SAVEPOINT protected_pool_outbox")
            .execute(DB::executor(&mut transaction))
            .await?;
        if !claim::<DB>(keys, key, &mut transaction, persistent).await? {
            sqlx::raw_sql("RELEASE SAVEPOINT protected_pool_outbox")
                .execute(DB::executor(&mut transaction))
                .await?;
            settled.push(Settled::AlreadyApplied);
            continue;
        }
        match execute_on(statement, &mut transaction).await {
            Ok(_) => {
                sqlx::raw_sql("RELEASE SAVEPOINT protected_pool_outbox")
                    .execute(DB::executor(&mut transaction))
                    .await?;
                settled.push(Settled::Applied);
            }
            Err(error) if DB::classify(&error) == ErrorClass::Query => {
                sqlx::raw_sql(
                    "ROLLBACK TO SAVEPOINT protected_pool_outbox; RELEASE SAVEPOINT protected_pool_outbox",
                )
                .execute(DB::executor(&mut transaction))
                .await?;
                settled.push(Settled::Refused(error.to_string()));
            }
            Err(error) => return Err(error),
        }
    }
    transaction.commit().await?;
    Ok(settled)
}

impl<DB: Backend> PoolInner<DB> {
    /// Starts the replayer if the pool has an outbox and its task is not running (never
    /// started, or its runtime is gone).
    pub(crate) fn ensure_replayer(&self) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        let mut replayer = self
            .replayer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if replayer.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        *replayer = Some(runtime.spawn(replay(self.me.clone(), outbox.clone())));
    }

    /// Applies one batch; what became of each write, in order.
    async fn apply(&self, batch: &[QueuedWrite]) -> Result<Vec<Settled>> {
        self.create_key_table(self.write_deadline()).await?;
        let writes: Vec<Prepared<DB>> = batch
            .iter()
            .map(|queued| {
                let write = queued.write.as_ref().map_err(Clone::clone)?;
                let arguments = DB::durable_arguments(write.values())
                    .map_err(|error| format!("the stored arguments do not encode: {error}"))?;
                Ok(Prepared::Ready {
                    key: queued.key.clone(),
                    statement: Statement::new(write.sql_str(), arguments)
                        .unnamed_if(self.unnamed_statements),
                })
            })
            .map(|prepared: Result<Prepared<DB>, String>| prepared.unwrap_or_else(Prepared::Broken))
            .collect();
        let operation = Batch {
            keys: &self.keys,
            writes: &writes,
            persistent: !self.unnamed_statements,
        };
        let done = self
            .failover(Route::Write, Replay::AfterRefusal, operation)
            .await?;
        Ok(done.value)
    }
}

/// The replayer: applies the queue's writes in order, a batch at a time, while the write
/// route serves; waits (holding no reference to the pool) while it does not or while the
/// queue is empty. Ends when the pool is dropped or closed.
async fn replay<DB: Backend>(pool: Weak<PoolInner<DB>>, outbox: Arc<Outbox>) {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    const LONGEST_PAUSE: Duration = Duration::from_secs(5);
    let mut pause = FIRST_PAUSE;
    loop {
        let wait = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            if pool.probes.stopped() {
                return;
            }
            match replay_one_batch(&pool, &outbox).await {
                Ok(true) => {
                    pause = FIRST_PAUSE;
                    continue;
                }
                Ok(false) => None,
                Err(error) => {
                    let wait = error
                        .retry_after()
                        .unwrap_or(pause)
                        .clamp(FIRST_PAUSE, LONGEST_PAUSE);
                    pause = (pause * 2).min(LONGEST_PAUSE);
                    tracing::debug!(%error, ?wait, "outbox replay waits for the write route");
                    Some(wait)
                }
            }
        };
        // Woken by a new write or the write route serving again; else looks again after
        // the pause (or a second, when idle, to notice a closed pool).
        let _ = tokio::time::timeout(
            wait.unwrap_or(Duration::from_secs(1)),
            outbox.wake.notified(),
        )
        .await;
    }
}

/// Applies the next batch; `false` if the queue was empty.
async fn replay_one_batch<DB: Backend>(pool: &PoolInner<DB>, outbox: &Outbox) -> Result<bool> {
    let store = outbox.store().await?;
    let batch = store
        .next(outbox.config().batch)
        .await
        .map_err(|source| outbox.failed("read the queue", source))?;
    if batch.is_empty() {
        return Ok(false);
    }
    let settled = pool.apply(&batch).await?;
    let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
    let (counts, dead) = store
        .settle(&batch, &settled, now)
        .await
        .map_err(|source| outbox.failed("take applied writes off the queue", source))?;
    outbox.settled(&batch, &settled, &dead, counts);
    Ok(true)
}

impl<DB: Backend> ProtectedPool<DB> {
    /// The pool's outbox, if it has one ([`PoolBuilder::outbox`](crate::PoolBuilder::outbox)).
    pub fn outbox(&self) -> Option<&Outbox> {
        self.inner.ensure_replayer();
        self.inner.outbox.as_deref()
    }
}
