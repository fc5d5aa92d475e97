//! What runs on every new connection before it is handed out: the endpoint's SQL statements,
//! then the builder's hook.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::backend::Backend;

/// The future an [`after_connect`](crate::PoolBuilder::after_connect) hook returns: boxed,
/// as it borrows the connection (`Box::pin(async move { .. })`).
pub type AfterConnectFuture<'c> =
    Pin<Box<dyn Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// A hook run on every new connection.
pub(crate) type AfterConnectHook<DB> = Arc<
    dyn for<'c> Fn(&'c mut <DB as sqlx::Database>::Connection) -> AfterConnectFuture<'c>
        + Send
        + Sync,
>;

/// The endpoint's statements and the pool's hook, in the order they run.
pub(crate) struct AfterConnect<DB: Backend> {
    statements: Vec<String>,
    hook: Option<AfterConnectHook<DB>>,
}

impl<DB: Backend> AfterConnect<DB> {
    pub(crate) fn new(statements: Vec<String>, hook: Option<AfterConnectHook<DB>>) -> Self {
        Self { statements, hook }
    }

    /// Runs them on `connection`; the first error ends it, naming what failed in the log.
    pub(crate) async fn run(
        &self,
        endpoint: &str,
        connection: &mut DB::Connection,
    ) -> Result<(), sqlx::Error> {
        for (index, sql) in self.statements.iter().enumerate() {
            if let Err(error) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(DB::executor(connection))
                .await
            {
                tracing::warn!(
                    endpoint,
                    statement = index,
                    %error,
                    "after_connect statement failed; the new connection is closed"
                );
                return Err(error);
            }
        }
        if let Some(hook) = &self.hook
            && let Err(error) = hook(connection).await
        {
            tracing::warn!(
                endpoint,
                %error,
                "after_connect hook failed; the new connection is closed"
            );
            return Err(error);
        }
        Ok(())
    }
}
