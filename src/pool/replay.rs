//! `.or_enqueue()` and the replayer: keyed writes the write route could not take wait in the
//! outbox (see `crate::outbox`) and are applied from it, in order and in batches, once it
//! serves again.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::failover::Replay;
use super::keyed::{Keyed, Keys, WriteOutcome, claim, statement_of};
use super::operation::Operation;
use super::statement::{QueryFuture, Statement, execute_on};
use super::{PoolInner, ProtectedPool};
use crate::backend::Backend;
use crate::classify::ErrorClass;
use crate::durable::DurableWrite;
use crate::durable::{Value, now_ms};
use crate::error::{Error, Result};
use crate::fallback::{Served, Source};
use crate::outbox::{Outbox, QueuedWrite, Settled};
use crate::route::Route;
use sqlx::{AssertSqlSafe, SqlSafeStr};

impl<'p, DB: Backend> Keyed<'p, DB, DurableWrite> {
    /// Tries the write once; when the write route cannot take it (breakers open, no
    /// primary, the server unreachable, the outcome unknown), stores it in the pool's outbox
    /// and returns at once, with a [`Source::Queued`] receipt; the outbox applies it exactly once when the
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
                match inner.keyed_call(&parts.key, parts.statement, false).await {
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

/// A batch of queued writes as the endpoint loop runs it (see [`apply_batch`]).
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

/// Applies `writes` in order, in one transaction, each with its key: what became of each
/// write of a prefix of the batch. That is all of it, or the writes up to the first one the
/// database refused for a reason of its own (class `Query`): the transaction is rolled back,
/// the writes before it are applied again without it, and it is reported refused. The writes
/// after it stay queued for the next batch.
///
/// The keys are claimed with one statement for the whole batch. When some were claimed
/// before (a batch applied before a crash took it off the queue), the transaction is rolled
/// back and the keys are claimed one by one, so that each write knows whether it ran.
async fn apply_batch<DB: Backend>(
    keys: &Keys,
    writes: &[Prepared<DB>],
    persistent: bool,
    connection: &mut DB::Connection,
) -> Result<Vec<Settled>, sqlx::Error> {
    // A write that cannot even be rebuilt is refused where it stands.
    let mut refused = writes
        .iter()
        .enumerate()
        .find_map(|(at, write)| match write {
            Prepared::Broken(why) => Some((at, why.clone())),
            Prepared::Ready { .. } => None,
        });
    let mut one_by_one = false;
    loop {
        let upto = refused.as_ref().map_or(writes.len(), |(at, _)| *at);
        let ready: Vec<(&str, &Statement<DB>)> = writes[..upto]
            .iter()
            .filter_map(|write| match write {
                Prepared::Ready { key, statement } => Some((key.as_str(), statement)),
                Prepared::Broken(_) => None,
            })
            .collect();
        match try_batch::<DB>(keys, &ready, persistent, one_by_one, connection).await? {
            Tried::Committed(mut settled) => {
                if let Some((_, why)) = refused {
                    settled.push(Settled::Refused(why));
                }
                return Ok(settled);
            }
            Tried::KeysSeenBefore => one_by_one = true,
            Tried::Refused { at, error } => refused = Some((at, error)),
        }
    }
}

/// One try at a batch of writes that are all ready to run.
enum Tried {
    /// Committed: what became of each.
    Committed(Vec<Settled>),
    /// Rolled back: some keys were claimed before; claim them one by one.
    KeysSeenBefore,
    /// Rolled back: the database refused write `at`.
    Refused { at: usize, error: String },
}

async fn try_batch<DB: Backend>(
    keys: &Keys,
    writes: &[(&str, &Statement<DB>)],
    persistent: bool,
    one_by_one: bool,
    connection: &mut DB::Connection,
) -> Result<Tried, sqlx::Error> {
    let mut transaction = sqlx::Connection::begin(connection).await?;
    if !one_by_one && !writes.is_empty() {
        let all: Vec<&str> = writes.iter().map(|(key, _)| *key).collect();
        if claim_all::<DB>(keys, &all, &mut transaction).await? < all.len() as u64 {
            transaction.rollback().await?;
            return Ok(Tried::KeysSeenBefore);
        }
    }
    let mut settled = Vec::with_capacity(writes.len() + 1);
    for (at, (key, statement)) in writes.iter().enumerate() {
        if one_by_one && !claim::<DB>(keys, key, &mut transaction, persistent).await? {
            settled.push(Settled::AlreadyApplied);
            continue;
        }
        match execute_on(statement, &mut transaction).await {
            Ok(_) => settled.push(Settled::Applied),
            Err(error) if DB::classify(&error) == ErrorClass::Query => {
                transaction.rollback().await?;
                return Ok(Tried::Refused {
                    at,
                    error: error.to_string(),
                });
            }
            Err(error) => return Err(error),
        }
    }
    transaction.commit().await?;
    Ok(Tried::Committed(settled))
}

/// Claims every key of `keys` with one statement; how many were free.
async fn claim_all<DB: Backend>(
    table: &Keys,
    keys: &[&str],
    connection: &mut DB::Connection,
) -> Result<u64, sqlx::Error> {
    let applied_at = Value::from(i64::try_from(now_ms()).unwrap_or(i64::MAX));
    let mut values: Vec<Value> = keys.iter().map(|key| Value::from(*key)).collect();
    values.push(applied_at);
    let at = values.len();
    let rows: Vec<String> = (1..at).map(|n| format!("(${n}, ${at})")).collect();
    let sql = format!(
        "INSERT INTO {} (key, applied_at) VALUES {} ON CONFLICT (key) DO NOTHING",
        table.table(),
        rows.join(", ")
    );
    let arguments = DB::durable_arguments(&values)?;
    // Unnamed: its text changes with the batch's size.
    let claim = Statement::<DB>::new(AssertSqlSafe(sql).into_sql_str(), arguments).unnamed_if(true);
    let claimed = execute_on(&claim, connection).await?;
    Ok(DB::rows_affected(&claimed))
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

    /// Whether every endpoint that could take a write has its write breaker open (or none
    /// is the primary now): the replayer then waits rather than read a batch to be refused.
    fn write_route_refuses(&self) -> bool {
        match self.router.candidates(Route::Write, &self.endpoints) {
            Ok(candidates) => candidates
                .iter()
                .all(|endpoint| endpoint.breaker(Route::Write).state().is_open()),
            Err(_) => true,
        }
    }

    /// Applies one batch; what became of each write of it, in order (a prefix of it when
    /// the database refused one).
    async fn apply(&self, batch: &[QueuedWrite]) -> Result<Vec<Settled>> {
        self.create_key_table(self.write_deadline()).await?;
        let writes: Vec<Prepared<DB>> = batch
            .iter()
            .map(|queued| {
                let write = queued.write.as_ref().map_err(Clone::clone)?;
                let statement = statement_of::<DB>(write)
                    .map_err(|error| format!("the stored arguments do not encode: {error}"))?;
                Ok(Prepared::Ready {
                    key: queued.key.clone(),
                    statement: statement.unnamed_if(self.unnamed_statements),
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
            if pool.write_route_refuses() {
                // Nothing read from the file while the breakers refuse: a breaker closing
                // wakes this task.
                let wait = pause;
                pause = (pause * 2).min(LONGEST_PAUSE);
                drop(pool);
                let _ = tokio::time::timeout(wait, outbox.wake.notified()).await;
                continue;
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
    // A refused write ends what was settled: the writes after it wait for the next batch.
    let batch = &batch[..settled.len()];
    let now = i64::try_from(now_ms()).unwrap_or(i64::MAX);
    let (counts, dead) = store
        .settle(batch, &settled, now)
        .await
        .map_err(|source| outbox.failed("take applied writes off the queue", source))?;
    outbox.settled(batch, &settled, &dead, counts);
    Ok(true)
}

impl<DB: Backend> ProtectedPool<DB> {
    /// The pool's outbox, if it has one ([`PoolBuilder::outbox`](crate::PoolBuilder::outbox)).
    pub fn outbox(&self) -> Option<&Outbox> {
        self.inner.ensure_replayer();
        self.inner.outbox.as_deref()
    }
}
