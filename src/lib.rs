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
mod endpoint;
mod error;
pub mod fallback;
mod health;
#[cfg(feature = "axum")]
mod http;
mod into_sqlx;
mod pool;
mod problem;
mod role;
mod route;
mod router;
pub mod telemetry;

pub use backend::Backend;
pub use classify::{Classifier, ErrorClass};
pub use config::PoolConfig;
pub use endpoint::{AfterConnectFuture, EndpointOptions, PoolStatus, RoleChange};
pub use error::{Attempt, Error, Result};
pub use fallback::{FallbackContext, FallbackRequest, Served, Source};
pub use health::{EndpointHealth, EndpointRole, HealthReport, HealthStatus, RouteHealth};
pub use pool::DefaultDatabase;
pub use pool::{
    AsyncFallback, Cacheable, CallFallback, ClusterEvent, Degradable, NoFallback, NotCacheable,
    OnRoute, PoolBuilder, PoolStateChange, ProtectedConnection, ProtectedPool,
    ProtectedTransaction, RoutableQuery, Routed, RowStream, TransactionRetry,
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
