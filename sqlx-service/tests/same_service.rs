//! The service's functions, unchanged, on a plain `sqlx::PgPool` and on a `ProtectedPool`,
//! each against a real PostgreSQL server of its own: both tests run one body, generic over the
//! pool, and differ only in how the pool is built. Everything the service does — migrations,
//! compile-time checked queries, transactions that commit or roll back, the database's own
//! errors — must look the same to it on both.
use protected_pool::breaker::State;
use protected_pool::{ProtectedPool, Route};
use protected_pool_sqlx_service::{
    self as service, Account, MIGRATOR, Order, ServiceError, account, open_account, orders_of,
    place_order, total_balance, transfer,
};
use protected_pool_testkit::PgServer;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Acquire, PgExecutor, Postgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_on_a_plain_pgpool() {
    let pg = PgServer::start().await.expect("start PostgreSQL");
    let pool = PgPoolOptions::new()
        .connect(&pg.url())
        .await
        .expect("connect");
    run_the_service(&pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_on_a_protected_pool() {
    let pg = PgServer::start().await.expect("start PostgreSQL");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("connect");
    run_the_service(&pool).await;

    // It ran through the primary's write breaker, and the service's refusals (a taken name,
    // overdrafts: the server answered) did not count against the server.
    let write = pool
        .breaker(Route::Write, "primary")
        .expect("the primary's write breaker")
        .snapshot();
    assert!(write.total_successes >= 10, "{write:?}");
    assert_eq!(write.total_failures, 0, "{write:?}");
    assert_eq!(write.state, State::Closed);
}

/// The one sqlx pattern a service must not use with a `ProtectedPool`: `Acquire::begin`, whose
/// `sqlx::Transaction` can only own a connection of sqlx's own pool. `place_order` acquires a
/// connection and begins on it instead. A service that does use it is told so at its first
/// transaction, with the fix in the message, and nothing is left half done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_begin_on_a_protected_pool_is_refused_with_the_fix() {
    let pg = PgServer::start().await.expect("start PostgreSQL");
    let pool = ProtectedPool::<Postgres>::builder()
        .primary(pg.url())
        .connect()
        .await
        .expect("connect");
    MIGRATOR.run(&pool).await.expect("migrate");

    async fn open_in_a_transaction<'c>(
        db: impl Acquire<'c, Database = Postgres>,
    ) -> sqlx::Result<i64> {
        let mut tx = db.begin().await?;
        let id = open_account(&mut *tx, "carol", 1).await?;
        tx.commit().await?;
        Ok(id)
    }
    let refused = open_in_a_transaction(&pool)
        .await
        .expect_err("a sqlx::Transaction over a ProtectedPool connection");
    assert!(
        matches!(&refused, sqlx::Error::Configuration(why) if why.to_string().contains("pool.begin()")),
        "{refused:?}"
    );
    assert_eq!(total_balance(&pool).await.expect("total"), 0);
}

/// Everything the service does, on whichever pool it is given, and what its callers see.
async fn run_the_service<P>(pool: &P)
where
    for<'a> &'a P: PgExecutor<'a> + Acquire<'a, Database = Postgres>,
{
    MIGRATOR.run(pool).await.expect("migrate");
    MIGRATOR
        .run(pool)
        .await
        .expect("migrating again is a no-op");

    // Plain statements.
    let alice = open_account(pool, "alice", 10_000).await.expect("open");
    let bob = open_account(pool, "bob", 500).await.expect("open");
    assert_eq!(
        account(pool, alice).await.expect("look up"),
        Some(Account {
            id: alice,
            name: "alice".into(),
            balance_cents: 10_000
        })
    );
    assert_eq!(account(pool, -1).await.expect("look up"), None);
    let taken = open_account(pool, "alice", 1)
        .await
        .expect_err("a second account named alice");
    assert!(
        matches!(&taken, sqlx::Error::Database(db) if db.is_unique_violation()),
        "the database's own error reaches the service as sqlx's: {taken:?}"
    );
    assert_eq!(total_balance(pool).await.expect("total"), 10_500);

    // A transaction begun on the pool: committed, or rolled back on every refusal.
    let keyboard = place_order(pool, alice, "keyboard", 4_500)
        .await
        .expect("order");
    assert_eq!(
        keyboard,
        Order {
            id: keyboard.id,
            account_id: alice,
            item: "keyboard".into(),
            price_cents: 4_500
        }
    );
    assert_eq!(balance(pool, alice).await, 5_500);
    let too_dear = place_order(pool, bob, "monitor", 20_000).await;
    assert!(
        matches!(too_dear, Err(ServiceError::InsufficientFunds(id)) if id == bob),
        "{too_dear:?}"
    );
    let nobody = place_order(pool, -1, "mouse", 1).await;
    assert!(
        matches!(nobody, Err(ServiceError::NoSuchAccount(-1))),
        "{nobody:?}"
    );
    assert_eq!(balance(pool, bob).await, 500);
    assert_eq!(orders_of(pool, alice).await.expect("orders"), [keyboard]);
    assert_eq!(orders_of(pool, bob).await.expect("orders"), []);

    // A transaction on a connection taken from the pool.
    let mut conn = pool.acquire().await.expect("a connection");
    transfer(&mut conn, alice, bob, 1_000)
        .await
        .expect("transfer");
    // The credit to alice is written before bob's overdraft is refused: only the rollback
    // keeps it from staying.
    let overdraft = transfer(&mut conn, bob, alice, 10_000).await;
    assert!(
        matches!(overdraft, Err(ServiceError::InsufficientFunds(id)) if id == bob),
        "{overdraft:?}"
    );
    let to_nobody = transfer(&mut conn, alice, -1, 1).await;
    assert!(
        matches!(to_nobody, Err(ServiceError::NoSuchAccount(-1))),
        "{to_nobody:?}"
    );
    assert_eq!(
        account(&mut *conn, bob)
            .await
            .expect("look up")
            .map(|a| a.balance_cents),
        Some(1_500),
        "the connection is usable after its rolled back transactions"
    );
    drop(conn);

    assert_eq!(balance(pool, alice).await, 4_500);
    assert_eq!(balance(pool, bob).await, 1_500);
    assert_eq!(
        total_balance(pool).await.expect("total"),
        10_500 - 4_500,
        "money only left through the order"
    );
}

async fn balance(db: impl PgExecutor<'_>, id: i64) -> i64 {
    service::account(db, id)
        .await
        .expect("look up")
        .expect("the account exists")
        .balance_cents
}
