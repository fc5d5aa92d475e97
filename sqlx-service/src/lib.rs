//! An ordinary sqlx service: accounts with balances, orders paid from them, transfers between
//! them. Nothing here knows about `protected-pool`.
//!
//! It is written the way sqlx code usually is: functions take whatever executes a statement
//! (`impl PgExecutor<'_>`), whatever can start a transaction (`impl Acquire<'_>`) or a
//! `&mut PgConnection`, and their SQL is checked at compile time by `sqlx::query!`,
//! `query_as!` and `query_scalar!` against the committed `.sqlx/` cache (README.md says how
//! to regenerate it).
//!
//! The tests run these functions unchanged on a `sqlx::PgPool` and on a
//! `protected_pool::ProtectedPool`: adopting `protected-pool` is a change to how the pool is
//! built, not to this code.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod accounts;
mod error;
mod orders;

pub use accounts::{Account, account, open_account, total_balance, transfer};
pub use error::ServiceError;
pub use orders::{Order, orders_of, place_order};

/// The service's schema (`migrations/`): run it with `MIGRATOR.run(&pool)`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();
