//! A connection out of the pool, and the only code that decides whether it may go back.

use deadpool::managed::Object;

use super::{Connection, PooledConnection};
use crate::backend::Backend;

/// A checked-out connection. It goes back to the pool only in a known state: a connection
/// given up mid-statement (its caller cancelled or timed out) or one that saw an error ending
/// its session is closed instead, so the pool's count drops at once and the slot can open a
/// fresh connection; the server is asked to stop a statement given up on.
pub(crate) struct Checkout<DB: Backend> {
    connection: Option<Connection<DB>>,
    /// Giving it back counts as use for the idle timeout: a caller's checkout on an endpoint
    /// that has one. Not the pool's own use (the health loop), and not at all without an idle
    /// timeout, where nobody reads the time and a clock read per call would be wasted.
    records_use: bool,
}

impl<DB: Backend> Checkout<DB> {
    pub(crate) fn new(connection: Connection<DB>, records_use: bool) -> Self {
        Self {
            connection: Some(connection),
            records_use,
        }
    }

    fn pooled(&mut self) -> &mut PooledConnection<DB> {
        self.connection.as_mut().expect("present until dropped")
    }

    /// Whether the connection was opened for this checkout rather than reused: an error on a
    /// reused one may only mean it died while it sat idle.
    pub(crate) fn is_fresh(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| Object::metrics(connection).recycle_count == 0)
    }

    /// Runs `operation` on the connection. While it runs the connection is busy: if this
    /// future is dropped before it finishes, the checkout closes the connection.
    pub(crate) async fn run<T>(
        &mut self,
        operation: impl AsyncFnOnce(&mut DB::Connection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let pooled = self.pooled();
        pooled.busy = true;
        let result = if pooled.one_transaction_per_call {
            // Boxed: the common path's future stays as small as it was.
            let (result, ended_badly) =
                Box::pin(in_transaction::<DB, T>(&mut pooled.raw, operation)).await;
            pooled.broken |= ended_badly;
            result
        } else {
            operation(&mut pooled.raw).await
        };
        pooled.busy = false;
        if let Err(error) = &result {
            // From the error itself, never from its class: see `Backend::breaks_connection`.
            pooled.broken |= DB::breaks_connection(error);
        }
        result
    }

    /// The connection, for a use that outlives one `run` (a stream of rows, a connection
    /// handed to the caller): busy until [`idle`](Self::idle), so a checkout dropped in
    /// between closes it and asks the server to stop what it runs.
    pub(crate) fn busy(&mut self) -> &mut DB::Connection {
        let pooled = self.pooled();
        pooled.busy = true;
        &mut pooled.raw
    }

    /// Ends a use begun by [`busy`](Self::busy); `error` is how it ended, if it failed.
    pub(crate) fn idle(&mut self, error: Option<&sqlx::Error>) {
        let pooled = self.pooled();
        pooled.busy = false;
        if let Some(error) = error {
            pooled.broken |= DB::breaks_connection(error);
        }
    }

    /// Whether each use of the connection must be a transaction of its own (behind a
    /// transaction-mode pooler, see [`run`](Self::run)).
    pub(crate) fn one_transaction_per_call(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| connection.one_transaction_per_call)
    }

    /// The connection, as it is (neither busy nor idle is changed).
    pub(crate) fn raw(&self) -> &DB::Connection {
        &self.connection.as_ref().expect("present until dropped").raw
    }

    /// The connection, for the caller that holds it (neither busy nor idle is changed).
    pub(crate) fn raw_mut(&mut self) -> &mut DB::Connection {
        &mut self.pooled().raw
    }

    /// Hands the connection to the caller: errors it meets there are not seen by the pool,
    /// so it is checked (pinged) before it is handed out again.
    pub(crate) fn hand_to_caller(&mut self) {
        self.pooled().check_before_reuse();
    }

    /// Closes the connection when the checkout ends instead of returning it to the pool.
    pub(crate) fn evict(&mut self) {
        self.pooled().broken = true;
    }

    /// Whether the last operation left the connection unusable.
    pub(crate) fn is_broken(&self) -> bool {
        self.connection
            .as_ref()
            .is_some_and(|connection| connection.broken)
    }
}

/// Runs `operation` in a transaction of its own, committed if it succeeds: behind a
/// transaction-mode pooler, a transaction is what keeps one server connection, and sqlx sends
/// a statement's parse and its execution in two round trips that must reach the same one. (A
/// transaction the operation opens itself becomes a savepoint.) Returns whether ending the
/// transaction left the connection unusable, besides the operation's result.
async fn in_transaction<DB: Backend, T>(
    raw: &mut DB::Connection,
    operation: impl AsyncFnOnce(&mut DB::Connection) -> Result<T, sqlx::Error>,
) -> (Result<T, sqlx::Error>, bool) {
    let mut transaction = match sqlx::Connection::begin(raw).await {
        Ok(transaction) => transaction,
        Err(error) => return (Err(error), false),
    };
    match operation(&mut transaction).await {
        Ok(value) => (transaction.commit().await.map(|()| value), false),
        Err(error) => {
            let ended_badly = transaction
                .rollback()
                .await
                .is_err_and(|rollback| DB::breaks_connection(&rollback));
            (Err(error), ended_badly)
        }
    }
}

impl<DB: Backend> Drop for Checkout<DB> {
    fn drop(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if !connection.busy && !connection.broken {
            if self.records_use {
                connection.used_at = std::time::Instant::now();
            }
            return; // back to the pool
        }
        if let Some(pool) = Object::pool(&connection) {
            let manager = pool.manager();
            if connection.broken {
                // Its siblings opened to the same server process very likely died with it.
                manager.connection_lost();
            }
            if let (true, Some(pid)) = (connection.busy, connection.server_pid) {
                manager.stop_statement(pid);
            }
        }
        connection.busy = false;
        drop(Object::take(connection));
    }
}
