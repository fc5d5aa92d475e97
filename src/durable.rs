//! A write whose SQL and arguments can be stored and run again later, by another process: what
//! a keyed write must be to wait in the outbox (see [`Keyed::or_enqueue`](crate::Keyed::or_enqueue)).
//!
//! A sqlx query holds its arguments already encoded for one driver, in a form sqlx keeps to
//! itself; a [`DurableWrite`] holds them as plain [`Value`]s, encoded when the statement runs.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sqlx::{Arguments, Database, Encode, SqlSafeStr, SqlStr, Type};

/// One argument of a [`DurableWrite`].
///
/// Other types (timestamps, UUIDs, JSON, numerics) go as text with a cast in the SQL:
/// `VALUES ($1::uuid, $2::timestamptz)` on PostgreSQL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Value {
    /// `NULL`, sent as the given type (PostgreSQL checks a parameter's type against its column).
    Null(ValueKind),
    /// A boolean.
    Bool(bool),
    /// A 32-bit integer (`INT4`).
    I32(i32),
    /// A 64-bit integer (`INT8`).
    I64(i64),
    /// A double (`FLOAT8`); stored by its bits, so NaN and infinities survive the outbox.
    F64(#[serde(with = "f64_bits")] f64),
    /// Text.
    Text(String),
    /// Bytes (`BYTEA`, `BLOB`).
    Bytes(Vec<u8>),
}

/// The type of a [`Value`], and of a `NULL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ValueKind {
    /// [`Value::Bool`].
    Bool,
    /// [`Value::I32`].
    I32,
    /// [`Value::I64`].
    I64,
    /// [`Value::F64`].
    F64,
    /// [`Value::Text`].
    Text,
    /// [`Value::Bytes`].
    Bytes,
}

impl Value {
    /// The size of the value as stored, roughly: what the outbox's byte bound counts.
    #[cfg(feature = "outbox")]
    pub(crate) fn stored_len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Bytes(bytes) => bytes.len(),
            _ => 8,
        }
    }
}

mod f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.to_bits())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        u64::deserialize(deserializer).map(f64::from_bits)
    }
}

macro_rules! values {
    ($($type:ty => $variant:ident $(($convert:expr))?),* $(,)?) => {$(
        impl From<$type> for Value {
            fn from(value: $type) -> Self {
                Value::$variant(values!(@convert value $(, $convert)?))
            }
        }
        impl From<Option<$type>> for Value {
            fn from(value: Option<$type>) -> Self {
                match value {
                    Some(value) => value.into(),
                    None => Value::Null(ValueKind::$variant),
                }
            }
        }
    )*};
    (@convert $value:ident) => { $value };
    (@convert $value:ident, $convert:expr) => { $convert($value) };
}

values! {
    bool => Bool,
    i16 => I32(i32::from),
    i32 => I32,
    u32 => I64(i64::from),
    i64 => I64,
    f32 => F64(f64::from),
    f64 => F64,
    String => Text,
    &str => Text(str::to_owned),
    Vec<u8> => Bytes,
    &[u8] => Bytes(<[u8]>::to_vec),
}

/// A write statement with its arguments as plain [`Value`]s: it can be stored in the outbox
/// and run after the application restarted.
///
/// ```
/// use protected_pool::DurableWrite;
///
/// let write = DurableWrite::new("INSERT INTO orders (id, total) VALUES ($1, $2)")
///     .bind(42_i64)
///     .bind(19.99_f64);
/// assert_eq!(write.sql(), "INSERT INTO orders (id, total) VALUES ($1, $2)");
/// assert_eq!(write.values().len(), 2);
/// ```
#[derive(Clone, PartialEq)]
pub struct DurableWrite {
    sql: String,
    values: Vec<Value>,
}

impl fmt::Debug for DurableWrite {
    /// The SQL and the arguments' types; never their values, which may be personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<ValueKind> = self.values.iter().map(Value::kind).collect();
        f.debug_struct("DurableWrite")
            .field("sql", &self.sql)
            .field("values", &kinds)
            .finish()
    }
}

impl DurableWrite {
    /// A statement: a string literal, or [`sqlx::AssertSqlSafe`] around SQL built at run
    /// time, as for `sqlx::query`.
    pub fn new(sql: impl SqlSafeStr) -> Self {
        Self {
            sql: sql.into_sql_str().as_str().to_owned(),
            values: Vec::new(),
        }
    }

    /// Rebuilds a stored write.
    #[cfg(feature = "outbox")]
    pub(crate) fn from_parts(sql: String, values: Vec<Value>) -> Self {
        Self { sql, values }
    }

    /// Binds the next argument (`$1`, `$2`, ... in order).
    #[must_use]
    pub fn bind(mut self, value: impl Into<Value>) -> Self {
        self.values.push(value.into());
        self
    }

    /// The SQL.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The arguments, in order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// About how many bytes it takes in the outbox.
    #[cfg(feature = "outbox")]
    pub(crate) fn stored_len(&self) -> usize {
        self.sql.len()
            + self
                .values
                .iter()
                .map(|value| value.stored_len() + 4)
                .sum::<usize>()
    }

    /// The SQL as sqlx takes it. It came in as a [`SqlSafeStr`] (or from the outbox, which
    /// stores only such SQL).
    pub(crate) fn sql_str(&self) -> SqlStr {
        sqlx::AssertSqlSafe(self.sql.clone()).into_sql_str()
    }
}

impl Value {
    /// Its type.
    pub fn kind(&self) -> ValueKind {
        match self {
            Self::Null(kind) => *kind,
            Self::Bool(_) => ValueKind::Bool,
            Self::I32(_) => ValueKind::I32,
            Self::I64(_) => ValueKind::I64,
            Self::F64(_) => ValueKind::F64,
            Self::Text(_) => ValueKind::Text,
            Self::Bytes(_) => ValueKind::Bytes,
        }
    }
}

/// Milliseconds since the Unix epoch: how keys and queued writes are timestamped.
pub(crate) fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Encodes `values` as `DB`'s arguments.
pub(crate) fn arguments<DB>(values: &[Value]) -> Result<DB::Arguments, sqlx::Error>
where
    DB: Database,
    for<'q> bool: Encode<'q, DB> + Type<DB>,
    for<'q> i32: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
    for<'q> f64: Encode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<bool>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i32>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<f64>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<Vec<u8>>: Encode<'q, DB> + Type<DB>,
{
    let mut arguments = DB::Arguments::default();
    for value in values {
        let added = match value.clone() {
            Value::Null(kind) => match kind {
                ValueKind::Bool => arguments.add(None::<bool>),
                ValueKind::I32 => arguments.add(None::<i32>),
                ValueKind::I64 => arguments.add(None::<i64>),
                ValueKind::F64 => arguments.add(None::<f64>),
                ValueKind::Text => arguments.add(None::<String>),
                ValueKind::Bytes => arguments.add(None::<Vec<u8>>),
            },
            Value::Bool(value) => arguments.add(value),
            Value::I32(value) => arguments.add(value),
            Value::I64(value) => arguments.add(value),
            Value::F64(value) => arguments.add(value),
            Value::Text(value) => arguments.add(value),
            Value::Bytes(value) => arguments.add(value),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(arguments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_a_round_trip_through_json() {
        let values = vec![
            Value::from(f64::NAN),
            Value::from(f64::INFINITY),
            Value::from(None::<i64>),
            Value::from("text"),
            Value::from(vec![0_u8, 255]),
            Value::from(-3_i16),
        ];
        let json = serde_json::to_vec(&values).expect("encodes");
        let back: Vec<Value> = serde_json::from_slice(&json).expect("decodes");
        assert!(matches!(back[0], Value::F64(nan) if nan.is_nan()));
        assert_eq!(back[1..], values[1..]);
        assert_eq!(back[5], Value::I32(-3));
    }

    #[test]
    fn debug_shows_types_not_values() {
        let write = DurableWrite::new("UPDATE users SET password = $1").bind("hunter2");
        let shown = format!("{write:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Text"), "{shown}");
    }
}
