#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

#[cfg(not(any(feature = "postgres", feature = "sqlite")))]
compile_error!(
    "protected-pool needs a database: turn on its `postgres` or `sqlite` feature (both are on \
     by default)"
);

mod backend;
pub mod breaker;
pub mod cache;
mod classify;
pub mod config;
mod durable;
mod endpoint;
mod error;
pub mod fallback;
mod health;
#[cfg(feature = "axum")]
mod http;
mod into_sqlx;
#[cfg(feature = "outbox")]
#[cfg_attr(docsrs, doc(cfg(feature = "outbox")))]
pub mod outbox;
mod pool;
mod problem;
mod role;
mod route;
#[cfg(feature = "route-by-sql")]
#[cfg_attr(docsrs, doc(cfg(feature = "route-by-sql")))]
pub mod route_by_sql;
mod router;
pub mod telemetry;
mod timer;

pub use backend::Backend;
pub use classify::{Classifier, ErrorClass};
pub use config::PoolConfig;
pub use durable::{DurableWrite, Value, ValueKind};
pub use endpoint::{AfterConnectFuture, EndpointOptions, PoolStatus, RoleChange};
pub use error::{Attempt, Error, Result};
pub use fallback::{FallbackContext, FallbackRequest, Served, Source};
pub use health::{EndpointHealth, EndpointRole, HealthReport, HealthStatus, RouteHealth};
#[cfg(feature = "route-by-sql")]
pub use pool::BySql;
pub use pool::DefaultDatabase;
#[cfg(feature = "outbox")]
pub use pool::Enqueueing;
pub use pool::{
    AsyncFallback, Cacheable, CallFallback, ClusterEvent, Degradable, IdempotencyConfig, Keyed,
    KeyedWrite, MAX_KEY_LEN, NoFallback, NotCacheable, OnRoute, PoolBuilder, PoolStateChange,
    ProtectedConnection, ProtectedPool, ProtectedTransaction, RoutableQuery, Routed, RowStream,
    TransactionRetry, WriteOutcome,
};
pub use role::Role;
pub use route::{Route, RouteConfig, UnknownRoute};
pub use router::{ReadPreference, ReplicaSelection};
/// The sqlx this crate is built on, for a service that wants its exact version.
pub use sqlx;
#[cfg(feature = "postgres")]
pub use sqlx::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlx::Sqlite;
