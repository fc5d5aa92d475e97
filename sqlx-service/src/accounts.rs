//! Accounts: opening, looking up, moving money between them.

use sqlx::{Connection, PgConnection, PgExecutor};

use crate::error::{ServiceError, overdraft, positive};

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Assigned by the database.
    pub id: i64,
    /// Unique among accounts.
    pub name: String,
    /// Never negative.
    pub balance_cents: i64,
}

/// Opens an account with an opening balance; returns its id. A name already taken is the
/// database's unique violation.
pub async fn open_account(
    db: impl PgExecutor<'_>,
    name: &str,
    balance_cents: i64,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        "INSERT INTO accounts (name, balance_cents) VALUES ($1, $2) RETURNING id",
        name,
        balance_cents
    )
    .fetch_one(db)
    .await
}

/// The account with this id, if there is one.
pub async fn account(db: impl PgExecutor<'_>, id: i64) -> sqlx::Result<Option<Account>> {
    sqlx::query_as!(
        Account,
        "SELECT id, name, balance_cents FROM accounts WHERE id = $1",
        id
    )
    .fetch_optional(db)
    .await
}

/// The sum of every account's balance: transfers never change it.
pub async fn total_balance(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT COALESCE(SUM(balance_cents), 0)::BIGINT AS "total!" FROM accounts"#
    )
    .fetch_one(db)
    .await
}

/// Moves `amount_cents` from one account to another, all or nothing.
///
/// The credit is written before the debit, so an overdraft is refused after the transaction
/// has already changed a row: the rollback is what keeps the money where it was.
pub async fn transfer(
    conn: &mut PgConnection,
    from: i64,
    to: i64,
    amount_cents: i64,
) -> Result<(), ServiceError> {
    positive(amount_cents)?;
    let mut tx = conn.begin().await?;
    let credited = sqlx::query!(
        "UPDATE accounts SET balance_cents = balance_cents + $2 WHERE id = $1",
        to,
        amount_cents
    )
    .execute(&mut *tx)
    .await?;
    if credited.rows_affected() == 0 {
        return Err(ServiceError::NoSuchAccount(to));
    }
    let debited = sqlx::query!(
        "UPDATE accounts SET balance_cents = balance_cents - $2 WHERE id = $1",
        from,
        amount_cents
    )
    .execute(&mut *tx)
    .await
    .map_err(|error| overdraft(error, from))?;
    if debited.rows_affected() == 0 {
        return Err(ServiceError::NoSuchAccount(from));
    }
    tx.commit().await?;
    Ok(())
}
