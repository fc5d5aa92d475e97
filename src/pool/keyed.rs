//! Writes applied exactly once per key: `pool.write(q).idempotent(key)`.
//!
//! The statement runs in a transaction that first records its key in the pool's key table on
//! the primary (`INSERT .. ON CONFLICT DO NOTHING`). A key already there means an earlier try
//! committed: nothing runs again. So a try whose outcome is unknown (the connection cut after
//! the statement was sent, a timeout, a failover under way) can be, and is, tried again on the
//! primary of the moment until the write route's timeout runs out.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::query::Query;
use sqlx::{AssertSqlSafe, IntoArguments, SqlSafeStr, SqlStr};
use tokio::sync::OnceCell;

use super::degrade::Plan;
use super::failover::Replay;
use super::operation::Operation;
use super::routed::Routed;
use super::statement::{QueryFuture, Statement, execute_on};
use super::{PoolInner, ProtectedPool};
use crate::backend::Backend;
use crate::classify::ErrorClass;
use crate::durable::{DurableWrite, Value, now_ms};
use crate::error::{Error, Result};
use crate::fallback::Served;
use crate::problem::ConfigProblem;
use crate::route::Route;
use crate::telemetry;

use super::attempt::Done;

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 200;

/// Where the pool records the keys of keyed writes, and for how long.
///
/// The table is created (`CREATE TABLE IF NOT EXISTS`) on the primary before the first keyed
/// write; [`ProtectedPool::idempotency_migration`] gives its SQL for schema tools.
///
/// In the configuration file:
///
/// ```toml
/// [idempotency]
/// table = "app.idempotency_keys"
/// retention = "30days"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct IdempotencyConfig {
    /// The table: `name` or `schema.name`, letters, digits and `_`.
    /// Default `protected_pool_idempotency_keys`.
    pub table: String,
    /// How long a key is kept after its write. A key swept away no longer stops a repeat:
    /// keep it longer than a write can wait in the outbox plus a restart. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            table: "protected_pool_idempotency_keys".to_owned(),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl IdempotencyConfig {
    /// Keys in table `name` (`name` or `schema.name`).
    #[must_use]
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Keys kept for `retention` after their write.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// What is wrong with it, by field.
    pub(crate) fn problems(&self, path: &str) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let valid_part = |part: &str| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && part.len() <= 63
        };
        let parts: Vec<&str> = self.table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|part| valid_part(part)) {
            problems.push(ConfigProblem::new(
                format!("{path}.table"),
                format!(
                    "{:?} is not a table name: use `name` or `schema.name`, each a letter or `_` \
                     then letters, digits or `_`, at most 63 characters",
                    self.table
                ),
            ));
        }
        if self.retention < Duration::from_secs(1) {
            problems.push(ConfigProblem::new(
                format!("{path}.retention"),
                format!(
                    "{:?} is too short: keys must outlive a retry",
                    self.retention
                ),
            ));
        }
        problems
    }
}

/// What a keyed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOutcome {
    /// The statement ran now, and its key was recorded with it.
    Applied {
        /// What the statement reported.
        rows_affected: u64,
    },
    /// The key was already recorded: an earlier call, or an earlier try of this one whose
    /// answer was lost, applied the write. Nothing ran now.
    AlreadyApplied,
    /// The write route could not take it; it waits in the outbox, which applies it once
    /// the write route serves again (see [`Keyed::or_enqueue`]).
    Queued {
        /// Its place in the queue, 1 for the next to be applied, as of when it was queued.
        position: u64,
    },
}

/// The key table's statements, made once from its name.
pub(crate) struct Keys {
    config: IdempotencyConfig,
    create: Vec<String>,
    claim: SqlStr,
    sweep: SqlStr,
    created: OnceCell<()>,
    /// When keys were last swept, in milliseconds since the epoch.
    swept_at: AtomicU64,
}

impl Keys {
    pub(crate) fn new(config: IdempotencyConfig, system: &str) -> Self {
        let table = &config.table;
        let bare = table.rsplit('.').next().unwrap_or(table);
        let index = if system == "sqlite" {
            let schema = table
                .rsplit_once('.')
                .map_or(String::new(), |(schema, _)| format!("{schema}."));
            format!("CREATE INDEX IF NOT EXISTS {schema}{bare}_applied_at ON {bare} (applied_at)")
        } else {
            format!("CREATE INDEX IF NOT EXISTS {bare}_applied_at ON {table} (applied_at)")
        };
        Self {
            create: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} \
                     (key TEXT PRIMARY KEY, applied_at BIGINT NOT NULL)"
                ),
                index,
            ],
            claim: AssertSqlSafe(format!(
                "INSERT INTO {table} (key, applied_at) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
            ))
            .into_sql_str(),
            sweep: AssertSqlSafe(format!("DELETE FROM {table} WHERE applied_at < $1"))
                .into_sql_str(),
            created: OnceCell::new(),
            swept_at: AtomicU64::new(now_ms()),
            config,
        }
    }

    /// The table's name.
    #[cfg(feature = "outbox")]
    pub(crate) fn table(&self) -> &str {
        &self.config.table
    }

    /// The statements that create the table.
    pub(crate) fn migration(&self) -> &[String] {
        &self.create
    }
}

/// Checks a key before anything is sent.
pub(crate) fn check_key(key: &str) -> Result<(), sqlx::Error> {
    if key.is_empty() {
        return Err(sqlx::Error::Encode(
            "an idempotency key must not be empty".into(),
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(sqlx::Error::Encode(
            format!(
                "an idempotency key is at most {MAX_KEY_LEN} bytes; this one has {}",
                key.len()
            )
            .into(),
        ));
    }
    Ok(())
}

/// Claims `key` in the open transaction on `connection`: `false` if it was claimed before.
pub(crate) async fn claim<DB: Backend>(
    keys: &Keys,
    key: &str,
    connection: &mut DB::Connection,
    persistent: bool,
) -> Result<bool, sqlx::Error> {
    let applied_at = i64::try_from(now_ms()).unwrap_or(i64::MAX);
    let arguments = DB::durable_arguments(&[Value::from(key), Value::from(applied_at)])?;
    let claim = Statement::<DB>::new(keys.claim.clone(), arguments).unnamed_if(!persistent);
    let claimed = execute_on(&claim, connection).await?;
    Ok(DB::rows_affected(&claimed) == 1)
}

/// One try: `BEGIN`, claim the key, run the statement, `COMMIT`.
async fn apply_once<DB: Backend>(
    keys: &Keys,
    key: &str,
    statement: &Statement<DB>,
    persistent: bool,
    connection: &mut DB::Connection,
) -> Result<WriteOutcome, sqlx::Error> {
    let mut transaction = sqlx::Connection::begin(connection).await?;
    if !claim::<DB>(keys, key, &mut transaction, persistent).await? {
        transaction.rollback().await?;
        return Ok(WriteOutcome::AlreadyApplied);
    }
    let result = execute_on(statement, &mut transaction).await?;
    transaction.commit().await?;
    Ok(WriteOutcome::Applied {
        rows_affected: DB::rows_affected(&result),
    })
}

/// A keyed write as the endpoint loop runs it, as often as asked.
struct KeyedOperation<'a, DB: Backend> {
    keys: &'a Keys,
    key: &'a str,
    statement: &'a Statement<DB>,
    persistent: bool,
}

impl<DB: Backend> Operation<DB::Connection> for KeyedOperation<'_, DB> {
    type Output = WriteOutcome;

    fn run<'c>(
        &'c mut self,
        connection: &'c mut DB::Connection,
    ) -> impl Future<Output = Result<WriteOutcome, sqlx::Error>> + 'c {
        let future: QueryFuture<'c, WriteOutcome> = Box::pin(apply_once(
            self.keys,
            self.key,
            self.statement,
            self.persistent,
            connection,
        ));
        future
    }
}

/// Whether a keyed write that failed so is worth another try: it is safe (the key stops a
/// second application), and this failure may pass (not a refusal by an open breaker, which
/// will not close within the call).
pub(crate) fn worth_retrying(error: &Error) -> bool {
    (error.is_unavailable() && !error.is_circuit_open())
        || error.class() == Some(ErrorClass::Transient)
}

impl<DB: Backend> PoolInner<DB> {
    /// Creates the key table if this pool has not yet, by `deadline`.
    pub(crate) async fn create_key_table(&self, deadline: tokio::time::Instant) -> Result<()> {
        let keys = &self.keys;
        keys.created
            .get_or_try_init(|| async {
                let statements = keys.create.clone();
                let create =
                    super::operation::Once::new(async move |connection: &mut DB::Connection| {
                        for statement in &statements {
                            sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                                .execute(DB::executor(connection))
                                .await?;
                        }
                        Ok(())
                    });
                self.failover_until(Route::Write, Replay::Never, create, deadline)
                    .await
                    .map(|_| ())
            })
            .await
            .map(|_| ())
    }

    /// A keyed write, tried on the primary of the moment until it is applied, found applied,
    /// fails for good, or the write route's timeout runs out.
    ///
    /// `retry` false: one try only, for a write that goes to the outbox when it fails (it
    /// is to return at once, and the outbox applies it exactly once in any case).
    pub(crate) async fn keyed(
        &self,
        key: &str,
        statement: &Statement<DB>,
        retry: bool,
    ) -> Result<Done<WriteOutcome>> {
        let deadline = self.write_deadline();
        let mut pause = Duration::from_millis(20);
        loop {
            let operation = KeyedOperation {
                keys: &self.keys,
                key,
                statement,
                persistent: !self.unnamed_statements,
            };
            let tried = match self.create_key_table(deadline).await {
                Ok(()) => {
                    self.failover_until(Route::Write, Replay::AfterRefusal, operation, deadline)
                        .await
                }
                Err(error) => Err(error),
            };
            let error = match tried {
                Ok(done) => {
                    self.sweep_keys_if_due();
                    return Ok(done);
                }
                Err(error) => error,
            };
            if !retry || !worth_retrying(&error) || tokio::time::Instant::now() + pause >= deadline
            {
                return Err(error);
            }
            telemetry::keyed_write_retry();
            tracing::debug!(%error, ?pause, "keyed write tried again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// When a write call starting now must be done.
    pub(crate) fn write_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.routes[Route::Write.index()].timeout
    }

    /// Deletes keys older than the retention, at most every tenth of it (between a second and
    /// an hour), in a task of its own.
    fn sweep_keys_if_due(&self) {
        let keys = &self.keys;
        let every = (keys.config.retention / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600))
            .as_millis();
        let now = now_ms();
        let last = keys.swept_at.load(Ordering::Relaxed);
        if u128::from(now.saturating_sub(last)) < every
            || keys
                .swept_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (Some(pool), Ok(runtime)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let retention = u64::try_from(keys.config.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff = i64::try_from(now.saturating_sub(retention)).unwrap_or(0);
        runtime.spawn(async move {
            let delete = match DB::durable_arguments(&[Value::from(cutoff)]) {
                Ok(arguments) => Statement::<DB>::new(pool.keys.sweep.clone(), arguments)
                    .unnamed_if(pool.unnamed_statements),
                Err(error) => {
                    tracing::warn!(%error, "idempotency keys not swept");
                    return;
                }
            };
            let delete =
                super::operation::Once::new(async move |connection: &mut DB::Connection| {
                    execute_on(&delete, connection).await
                });
            match pool.failover(Route::Write, Replay::Never, delete).await {
                Ok(done) => {
                    tracing::debug!(
                        deleted = DB::rows_affected(&done.value),
                        "idempotency keys past their retention deleted"
                    );
                }
                Err(error) => tracing::debug!(%error, "idempotency keys not swept"),
            }
        });
    }
}

/// A write the pool can make exactly once per key: a sqlx [`Query`] or a [`DurableWrite`].
pub trait KeyedWrite<DB: Backend>: sealed::Sealed + Send + Sized {
    /// Takes the write apart into SQL and encoded arguments.
    #[doc(hidden)]
    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error>;
}

/// A durable write's values encoded for `DB`, as a statement to run.
pub(crate) fn statement_of<DB: Backend>(
    write: &DurableWrite,
) -> Result<Statement<DB>, sqlx::Error> {
    let arguments = DB::durable_arguments(write.values())?;
    Ok(Statement::new(write.sql_str(), arguments))
}

mod sealed {
    pub trait Sealed {}
    impl<DB: sqlx::Database, A> Sealed for sqlx::query::Query<'_, DB, A> {}
    impl Sealed for crate::durable::DurableWrite {}
}

impl<'q, DB, A> KeyedWrite<DB> for Query<'q, DB, A>
where
    DB: Backend,
    A: 'q + IntoArguments<DB> + Send,
{
    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        Statement::take_apart(self)
    }
}

impl<DB: Backend> KeyedWrite<DB> for DurableWrite {
    fn into_statement(self) -> Result<Statement<DB>, sqlx::Error> {
        statement_of(&self)
    }
}

impl<'p, DB: Backend, Q: KeyedWrite<DB>, C> Routed<'p, DB, Q, C> {
    /// Makes this write exactly-once per `key` (at most 200 bytes): it runs on the primary
    /// in a transaction that also records the key, and a key already recorded means it was
    /// applied before, so nothing runs again. Because of that, a try whose outcome is
    /// unknown is tried again, within the write route's timeout; see [`Keyed`].
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use protected_pool::WriteOutcome;
    ///
    /// let outcome = pool
    ///     .write(sqlx::query("INSERT INTO payments (order_id, cents) VALUES ($1, $2)").bind(42_i64).bind(1999_i64))
    ///     .idempotent("payment:order-42")
    ///     .execute()
    ///     .await?;
    /// assert!(matches!(outcome, WriteOutcome::Applied { .. } | WriteOutcome::AlreadyApplied));
    /// # Ok(()) }
    /// ```
    pub fn idempotent(self, key: impl Into<String>) -> Keyed<'p, DB, Q> {
        let (pool, _route, query) = self.into_parts();
        Keyed {
            pool,
            key: key.into(),
            query,
        }
    }
}

/// A write made exactly once per key (see [`Routed::idempotent`]).
///
/// What is guaranteed: the statement and the key's record commit together or not at all,
/// so for one key the statement's effect happens at most once, across tries, calls,
/// processes and restarts, for as long as the key is kept (the
/// [`retention`](IdempotencyConfig::retention)). A call that returns `Ok` has applied it (now
/// or before). A call that returns an error may or may not have: call again with the same
/// key, and it is applied exactly once. Not covered: a statement with effects outside the
/// database transaction, and two different writes given the same key (the second is taken
/// for the first).
#[must_use = "a keyed write does nothing until executed"]
pub struct Keyed<'p, DB: Backend, Q> {
    pool: &'p ProtectedPool<DB>,
    key: String,
    query: Q,
}

impl<DB: Backend, Q> std::fmt::Debug for Keyed<'_, DB, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl<'p, DB: Backend, Q: KeyedWrite<DB>> Keyed<'p, DB, Q> {
    /// Applies the write, or finds it applied.
    pub fn execute(self) -> impl Future<Output = Result<WriteOutcome>> + Send + 'p {
        let Self { pool, key, query } = self;
        let parts = check_key(&key)
            .and_then(|()| query.into_statement())
            .map_err(|source| Error::InvalidQuery {
                route: Route::Write,
                source,
            });
        async move {
            let statement = parts?;
            pool.inner
                .keyed_call(&key, statement, true)
                .await
                .map(Served::into_inner)
        }
    }
}

impl<DB: Backend> PoolInner<DB> {
    /// A keyed write as one call: its span, metrics and tries.
    pub(crate) async fn keyed_call(
        &self,
        key: &str,
        statement: Statement<DB>,
        retry: bool,
    ) -> Result<Served<WriteOutcome>> {
        let statement = statement.unnamed_if(self.unnamed_statements);
        let sql = statement.sql.clone();
        let plan = Plan {
            sql: Some(sql.as_str()),
            ..Plan::bare(Route::Write)
        };
        let call = Box::pin(self.keyed(key, &statement, retry));
        self.degrade(plan, call).await
    }
}

/// For a keyed write that is a [`DurableWrite`]: its key and the write, for the outbox.
#[cfg(feature = "outbox")]
pub(crate) struct Parts<DB: Backend> {
    pub(crate) key: String,
    pub(crate) statement: Statement<DB>,
    pub(crate) durable: DurableWrite,
}

#[cfg(feature = "outbox")]
impl<'p, DB: Backend> Keyed<'p, DB, DurableWrite> {
    /// The pool, key and write, checked.
    pub(crate) fn into_durable(self) -> (&'p ProtectedPool<DB>, Result<Parts<DB>>) {
        let Self { pool, key, query } = self;
        let parts = check_key(&key)
            .and_then(|()| statement_of(&query))
            .map(|statement| Parts {
                key,
                statement,
                durable: query,
            })
            .map_err(|source| Error::InvalidQuery {
                route: Route::Write,
                source,
            });
        (pool, parts)
    }
}

impl<DB: Backend> ProtectedPool<DB> {
    /// The statements that create the key table of keyed writes
    /// ([`IdempotencyConfig::table`]), for schema tools; the pool runs them itself (they
    /// are `IF NOT EXISTS`) before its first keyed write.
    pub fn idempotency_migration(&self) -> Vec<String> {
        self.inner.keys.migration().to_vec()
    }

    /// Creates the key table now rather than before the first keyed write.
    pub async fn create_idempotency_table(&self) -> Result<()> {
        let inner = &self.inner;
        inner.create_key_table(inner.write_deadline()).await
    }
}
