//! Orders, each paid from its account in the transaction that records it.

use sqlx::{Acquire, PgExecutor, Postgres};

use crate::error::{ServiceError, overdraft, positive};

/// An order as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Assigned by the database, increasing.
    pub id: i64,
    /// The account that paid.
    pub account_id: i64,
    /// What was bought.
    pub item: String,
    /// What it cost.
    pub price_cents: i64,
}

/// Pays `price_cents` from the account and records the order, in one transaction: either
/// both happen or neither does.
///
/// The transaction is begun on an acquired connection (as in sqlx's `Acquire` docs) rather
/// than with `Acquire::begin`, whose `sqlx::Transaction` can only own a connection of sqlx's
/// own pool: this way any pool whose reference is an `Acquire` serves.
pub async fn place_order<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    account_id: i64,
    item: &str,
    price_cents: i64,
) -> Result<Order, ServiceError> {
    positive(price_cents)?;
    let mut conn = db.acquire().await?;
    let mut tx = conn.begin().await?;
    let balance = sqlx::query_scalar!(
        "UPDATE accounts SET balance_cents = balance_cents - $2 WHERE id = $1 \
         RETURNING balance_cents",
        account_id,
        price_cents
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(|error| overdraft(error, account_id))?;
    if balance.is_none() {
        return Err(ServiceError::NoSuchAccount(account_id));
    }
    let order = sqlx::query_as!(
        Order,
        "INSERT INTO orders (account_id, item, price_cents) VALUES ($1, $2, $3) \
         RETURNING id, account_id, item, price_cents",
        account_id,
        item,
        price_cents
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(order)
}

/// The orders of an account, oldest first.
pub async fn orders_of(db: impl PgExecutor<'_>, account_id: i64) -> sqlx::Result<Vec<Order>> {
    sqlx::query_as!(
        Order,
        "SELECT id, account_id, item, price_cents FROM orders WHERE account_id = $1 ORDER BY id",
        account_id
    )
    .fetch_all(db)
    .await
}
