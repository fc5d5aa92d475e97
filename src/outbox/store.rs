//! The outbox's file: an embedded SQLite database (WAL, fsync on every commit) with the queue
//! and the dead letters. One connection, behind a lock: each change is one transaction.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::Mutex;

use crate::durable::{DurableWrite, Value};

/// A write taken from the queue to be applied.
#[derive(Debug)]
pub(crate) struct QueuedWrite {
    pub(crate) seq: i64,
    pub(crate) key: String,
    /// The write, or why its stored form no longer decodes.
    pub(crate) write: Result<DurableWrite, String>,
    pub(crate) bytes: u64,
}

/// What became of a write taken from the queue.
#[derive(Debug)]
pub(crate) enum Settled {
    Applied,
    AlreadyApplied,
    /// The database refused it for a reason of its own: it goes to the dead letters.
    Refused(String),
}

/// A queued write the database refused.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id among the dead letters (for [`Outbox::retry_dead_letter`](super::Outbox::retry_dead_letter)
    /// and [`Outbox::discard_dead_letter`](super::Outbox::discard_dead_letter)).
    pub id: i64,
    /// Its idempotency key.
    pub key: String,
    /// The write, if its stored form still decodes.
    pub write: Option<DurableWrite>,
    /// When it was queued, in milliseconds since the Unix epoch.
    pub queued_at_ms: i64,
    /// When the database refused it, in milliseconds since the Unix epoch.
    pub failed_at_ms: i64,
    /// Why.
    pub error: String,
}

/// How full the queue is, as of the last change.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) depth: u64,
    pub(crate) bytes: u64,
    /// When the oldest queued write was queued (ms since the epoch); `None` when empty.
    pub(crate) oldest_ms: Option<i64>,
    pub(crate) dead_letters: u64,
}

/// Why a write was not queued.
#[derive(Debug)]
pub(crate) enum NotQueued {
    Full(Counts),
    Failed(sqlx::Error),
}

pub(crate) struct Store {
    connection: Mutex<(SqliteConnection, Counts)>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queued (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    sql TEXT NOT NULL,
    arguments BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    queued_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    sql TEXT NOT NULL,
    arguments BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    queued_at INTEGER NOT NULL,
    failed_at INTEGER NOT NULL,
    error TEXT NOT NULL
);
";

impl Store {
    pub(crate) async fn open(path: &Path) -> Result<Self, sqlx::Error> {
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode, FULL syncs the log on every commit: a queued write survives a
            // power cut, not only a crash of the process.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let mut connection = SqliteConnection::connect_with(&options).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut connection).await?;
        let counts = count(&mut connection).await?;
        Ok(Self {
            connection: Mutex::new((connection, counts)),
        })
    }

    pub(crate) async fn counts(&self) -> Counts {
        self.connection.lock().await.1
    }

    /// Queues `write` under `key` unless that would pass a bound; a key already queued is
    /// not queued twice (its position is returned). Returns the position and the counts.
    pub(crate) async fn enqueue(
        &self,
        key: &str,
        write: &DurableWrite,
        now_ms: i64,
        max_writes: u64,
        max_bytes: u64,
    ) -> Result<(u64, Counts), NotQueued> {
        let mut guard = self.connection.lock().await;
        let (connection, counts) = &mut *guard;
        let existing: Option<i64> = sqlx::query_scalar("SELECT seq FROM queued WHERE key = ?1")
            .bind(key)
            .fetch_optional(&mut *connection)
            .await
            .map_err(NotQueued::Failed)?;
        if let Some(seq) = existing {
            let position: i64 = sqlx::query_scalar("SELECT count(*) FROM queued WHERE seq <= ?1")
                .bind(seq)
                .fetch_one(&mut *connection)
                .await
                .map_err(NotQueued::Failed)?;
            return Ok((u64::try_from(position).unwrap_or(0), *counts));
        }
        let bytes = (write.stored_len() + key.len()) as u64;
        if counts.depth + 1 > max_writes || counts.bytes + bytes > max_bytes {
            return Err(NotQueued::Full(*counts));
        }
        let arguments = serde_json::to_vec(write.values())
            .map_err(|error| NotQueued::Failed(sqlx::Error::Encode(error.into())))?;
        sqlx::query(
            "INSERT INTO queued (key, sql, arguments, bytes, queued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(key)
        .bind(write.sql())
        .bind(arguments)
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(now_ms)
        .execute(&mut *connection)
        .await
        .map_err(NotQueued::Failed)?;
        counts.depth += 1;
        counts.bytes += bytes;
        counts.oldest_ms.get_or_insert(now_ms);
        Ok((counts.depth, *counts))
    }

    /// The next `limit` writes, oldest first.
    pub(crate) async fn next(&self, limit: usize) -> Result<Vec<QueuedWrite>, sqlx::Error> {
        let mut guard = self.connection.lock().await;
        let rows = sqlx::query(
            "SELECT seq, key, sql, arguments, bytes, queued_at FROM queued ORDER BY seq LIMIT ?1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut guard.0)
        .await?;
        rows.into_iter().map(|row| queued_write(&row)).collect()
    }

    /// Takes a batch off the queue: every write of it in order, each settled. Refused ones go
    /// to the dead letters, in the same transaction.
    pub(crate) async fn settle(
        &self,
        batch: &[QueuedWrite],
        settled: &[Settled],
        now_ms: i64,
    ) -> Result<(Counts, Vec<i64>), sqlx::Error> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok((self.counts().await, Vec::new()));
        };
        let mut guard = self.connection.lock().await;
        let (connection, counts) = &mut *guard;
        let mut transaction = connection.begin().await?;
        let mut dead = Vec::new();
        for (write, settled) in batch.iter().zip(settled) {
            if let Settled::Refused(error) = settled {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO dead_letters (key, sql, arguments, bytes, queued_at, failed_at, error) \
                     SELECT key, sql, arguments, bytes, queued_at, ?2, ?3 FROM queued WHERE seq = ?1 \
                     RETURNING id",
                )
                .bind(write.seq)
                .bind(now_ms)
                .bind(error)
                .fetch_one(&mut *transaction)
                .await?;
                dead.push(id);
            }
        }
        // The batch is the oldest writes in order: no write queued since sits in its range.
        sqlx::query("DELETE FROM queued WHERE seq BETWEEN ?1 AND ?2")
            .bind(first.seq)
            .bind(last.seq)
            .execute(&mut *transaction)
            .await?;
        let oldest: Option<i64> =
            sqlx::query_scalar("SELECT queued_at FROM queued ORDER BY seq LIMIT 1")
                .fetch_optional(&mut *transaction)
                .await?;
        transaction.commit().await?;
        counts.depth = counts.depth.saturating_sub(batch.len() as u64);
        counts.bytes = counts
            .bytes
            .saturating_sub(batch.iter().map(|write| write.bytes).sum());
        counts.oldest_ms = oldest;
        counts.dead_letters += dead.len() as u64;
        Ok((*counts, dead))
    }

    pub(crate) async fn dead_letters(&self) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let mut guard = self.connection.lock().await;
        let rows = sqlx::query(
            "SELECT id, key, sql, arguments, queued_at, failed_at, error FROM dead_letters ORDER BY id",
        )
        .fetch_all(&mut guard.0)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: row.try_get("id")?,
                    key: row.try_get("key")?,
                    write: decode(row.try_get("sql")?, row.try_get("arguments")?).ok(),
                    queued_at_ms: row.try_get("queued_at")?,
                    failed_at_ms: row.try_get("failed_at")?,
                    error: row.try_get("error")?,
                })
            })
            .collect()
    }

    /// Moves dead letter `id` to the back of the queue; `false` if there is none, or its key
    /// is queued already.
    pub(crate) async fn retry_dead_letter(
        &self,
        id: i64,
        now_ms: i64,
    ) -> Result<(bool, Counts), sqlx::Error> {
        let mut guard = self.connection.lock().await;
        let (connection, counts) = &mut *guard;
        let mut transaction = connection.begin().await?;
        let moved = sqlx::query(
            "INSERT OR IGNORE INTO queued (key, sql, arguments, bytes, queued_at) \
             SELECT key, sql, arguments, bytes, ?2 FROM dead_letters WHERE id = ?1 RETURNING bytes",
        )
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(moved) = moved else {
            return Ok((false, *counts));
        };
        let bytes: i64 = moved.try_get("bytes")?;
        sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        counts.depth += 1;
        counts.bytes += u64::try_from(bytes).unwrap_or(0);
        counts.oldest_ms.get_or_insert(now_ms);
        counts.dead_letters = counts.dead_letters.saturating_sub(1);
        Ok((true, *counts))
    }

    /// Deletes dead letter `id`; `false` if there is none.
    pub(crate) async fn discard_dead_letter(&self, id: i64) -> Result<(bool, Counts), sqlx::Error> {
        let mut guard = self.connection.lock().await;
        let (connection, counts) = &mut *guard;
        let deleted = sqlx::query("DELETE FROM dead_letters WHERE id = ?1")
            .bind(id)
            .execute(&mut *connection)
            .await?
            .rows_affected();
        counts.dead_letters = counts.dead_letters.saturating_sub(deleted);
        Ok((deleted == 1, *counts))
    }
}

async fn count(connection: &mut SqliteConnection) -> Result<Counts, sqlx::Error> {
    let row = sqlx::query("SELECT count(*) AS depth, coalesce(sum(bytes), 0) AS bytes, min(queued_at) AS oldest FROM queued")
        .fetch_one(&mut *connection)
        .await?;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&mut *connection)
        .await?;
    let depth: i64 = row.try_get("depth")?;
    let bytes: i64 = row.try_get("bytes")?;
    Ok(Counts {
        depth: u64::try_from(depth).unwrap_or(0),
        bytes: u64::try_from(bytes).unwrap_or(0),
        oldest_ms: row.try_get("oldest")?,
        dead_letters: u64::try_from(dead).unwrap_or(0),
    })
}

fn queued_write(row: &sqlx::sqlite::SqliteRow) -> Result<QueuedWrite, sqlx::Error> {
    let bytes: i64 = row.try_get("bytes")?;
    Ok(QueuedWrite {
        seq: row.try_get("seq")?,
        key: row.try_get("key")?,
        write: decode(row.try_get("sql")?, row.try_get("arguments")?),
        bytes: u64::try_from(bytes).unwrap_or(0),
    })
}

fn decode(sql: String, arguments: Vec<u8>) -> Result<DurableWrite, String> {
    let values: Vec<Value> = serde_json::from_slice(&arguments)
        .map_err(|error| format!("the stored arguments do not decode: {error}"))?;
    Ok(DurableWrite::from_parts(sql, values))
}
