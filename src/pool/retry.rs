//! Transactions run again when the server asks for it: a serialization failure (`40001`) or
//! a deadlock (`40P01`) rolled the whole transaction back, so running the whole closure again
//! is safe, and is what every caller would otherwise write by hand. Never outside a
//! transaction: a single statement's failure may have come after it took effect.

use std::time::Duration;

use super::ProtectedPool;
use crate::backend::Backend;
use crate::classify::ErrorClass;
use crate::error::{Error, Result};

/// How a transaction is retried on transient errors (serialization failures, deadlocks):
/// up to `max_attempts` runs in all, each wait drawn at random up to an exponential backoff
/// (full jitter), and no retry that would start after `budget` has passed since the first
/// run began.
///
/// ```
/// use std::time::Duration;
/// use protected_pool::TransactionRetry;
///
/// let mut retry = TransactionRetry::attempts(3);
/// retry.budget = Duration::from_secs(2);
/// assert_eq!(retry.max_attempts, 3);
/// assert_eq!(retry.base_delay, TransactionRetry::default().base_delay);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransactionRetry {
    /// Runs in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The backoff before the first retry; doubled for each one after.
    pub base_delay: Duration,
    /// The longest backoff.
    pub max_delay: Duration,
    /// No retry starts once this long has passed since the first run began.
    pub budget: Duration,
}

impl Default for TransactionRetry {
    /// 5 runs, 10 ms doubling up to 1 s, within 10 s.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            budget: Duration::from_secs(10),
        }
    }
}

impl TransactionRetry {
    /// Up to `max_attempts` runs, with the default backoff and budget.
    pub fn attempts(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            ..Self::default()
        }
    }

    /// The wait before run `attempt + 1` (`attempt` runs done): up to the backoff, at random.
    fn delay(&self, attempt: u32) -> Duration {
        let doubling = 1_u32 << attempt.saturating_sub(1).min(20);
        let ceiling = self.base_delay.saturating_mul(doubling).min(self.max_delay);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Whether the server rolled the transaction back and asked for it to be run again. An
/// outcome the pool does not know (a commit whose answer was lost) is never retried.
fn worth_retrying(error: &Error) -> bool {
    error.class() == Some(ErrorClass::Transient) && !error.is_outcome_unknown()
}

impl<DB: Backend> ProtectedPool<DB> {
    /// Like [`transaction`](Self::transaction), and when the server rolls it back with a
    /// serialization failure or a deadlock (class [`ErrorClass::Transient`]), runs the whole
    /// closure again in a new transaction, as `retry` allows. The closure may run several
    /// times: it must do nothing outside the transaction that cannot be repeated. Every other
    /// error, and a commit whose outcome is unknown, is returned at once.
    ///
    /// ```no_run
    /// # async fn demo(pool: protected_pool::ProtectedPool) -> protected_pool::Result<()> {
    /// use protected_pool::TransactionRetry;
    ///
    /// pool.transaction_with_retry(TransactionRetry::default(), async |tx| {
    ///     sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").execute(&mut **tx).await?;
    ///     sqlx::query("UPDATE counters SET n = n + 1 WHERE id = 1").execute(&mut **tx).await?;
    ///     Ok(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction_with_retry<T: 'static, F>(
        &self,
        retry: TransactionRetry,
        operation: F,
    ) -> Result<T>
    where
        F: AsyncFn(&mut sqlx::Transaction<'_, DB>) -> Result<T, sqlx::Error>,
    {
        let started = tokio::time::Instant::now();
        let mut attempt = 1;
        loop {
            let error = match self.transaction(async |tx| operation(tx).await).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let delay = retry.delay(attempt);
            let in_budget = started
                .elapsed()
                .checked_add(delay)
                .is_some_and(|retry_at| retry_at < retry.budget);
            if !worth_retrying(&error) || attempt >= retry.max_attempts || !in_budget {
                return Err(error);
            }
            tracing::debug!(attempt, ?delay, %error, "transaction rolled back by the server; running it again");
            crate::telemetry::transaction_retried();
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}
