//! What a service call can fail with, beyond the database's own errors.

/// An error of a service call.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No account has this id.
    #[error("account {0} does not exist")]
    NoSuchAccount(i64),
    /// The account's balance does not cover the amount; nothing was changed.
    #[error("account {0} cannot cover the amount")]
    InsufficientFunds(i64),
    /// Amounts of money moved or paid must be positive.
    #[error("amount {0} is not a positive number of cents")]
    InvalidAmount(i64),
    /// The database, or the way to it, failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The CHECK that keeps balances from going negative (named by PostgreSQL after the column).
const BALANCE_CHECK: &str = "accounts_balance_cents_check";

/// Reads an overdraft of `account` out of a statement's error: the balance CHECK refused it.
pub(crate) fn overdraft(error: sqlx::Error, account: i64) -> ServiceError {
    match &error {
        sqlx::Error::Database(db) if db.constraint() == Some(BALANCE_CHECK) => {
            ServiceError::InsufficientFunds(account)
        }
        _ => ServiceError::Database(error),
    }
}

/// Refuses an amount that is not positive before anything reaches the database.
pub(crate) fn positive(amount_cents: i64) -> Result<(), ServiceError> {
    if amount_cents > 0 {
        Ok(())
    } else {
        Err(ServiceError::InvalidAmount(amount_cents))
    }
}
