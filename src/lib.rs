#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backend;
pub mod breaker;
mod classify;
mod endpoint;
mod error;
mod pool;
mod route;

pub use backend::Backend;
pub use classify::{Classifier, ErrorClass};
pub use endpoint::{EndpointOptions, PoolStatus, Role};
pub use error::{Error, Result};
pub use pool::{PoolBuilder, PoolStateChange, ProtectedPool, RoutableQuery, Routed};
pub use route::{Route, RouteConfig};
pub use sqlx::{Postgres, Sqlite};
