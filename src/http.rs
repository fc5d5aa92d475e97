//! [`Error`] as an HTTP response (feature `axum`): what a service's clients are told when a
//! pool call fails, without any of the details they must not see.

use std::time::Duration;

use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::classify::ErrorClass;
use crate::error::Error;

/// A handler can return `Result<_, protected_pool::Error>` and use `?` on pool calls.
///
/// | the call failed because | status | `error` | `Retry-After` |
/// |---|---|---|---|
/// | breakers refused it ([`is_circuit_open`](Error::is_circuit_open)): nothing was sent | 503 | `circuit_open` | when the breaker is tried again ([`retry_after`](Error::retry_after)) |
/// | the database did not answer in time: every endpoint tried timed out (the operation timeout, a statement timeout) | 504 | `timeout` | — |
/// | the database cannot serve it otherwise ([`is_unavailable`](Error::is_unavailable)): connection lost or refused, server out of resources or failing, this pool saturated, no primary, replicas lagging | 503 | `unavailable` | when a breaker among the endpoints tried is tried again, if one refused |
/// | the pool is closed (the service is shutting down) | 503 | `shutting_down` | — |
/// | a serialization failure, a deadlock or a lock not available ([`ErrorClass::Transient`]): the request may be sent again as it is | 409 | `transient` | — |
/// | the server rejected the query: syntax, constraint, data, no row, a value that did not decode ([`ErrorClass::Query`]) | 500 | `query` | — |
/// | the service is misconfigured: the database rejected its credentials or database name ([`ErrorClass::Auth`]), bad configuration, an unknown endpoint | 500 | `configuration` | — |
///
/// `Retry-After` is in whole seconds, rounded up and at least 1 (`0` would invite a retry at
/// once). The body is JSON: `error` as above, a fixed `message` in English,
/// `retry_after_secs` with the header, and `"outcome_unknown": true` when a statement may
/// have run although the call failed ([`is_outcome_unknown`](Error::is_outcome_unknown)).
/// It never carries the driver's message, the SQL, an endpoint or a URL; a 500 is logged
/// (`tracing`, level error) with the whole error instead, the others at level debug.
///
/// Errors a handler expects are better matched before they get here: a missing row is a
/// 404 and a unique violation (`23505`) a 409 in most APIs, while here both are 500, the
/// answer for a query the service did not expect to fail.
///
/// ```
/// use axum::extract::{Path, State};
/// use axum::http::StatusCode;
/// use axum::response::IntoResponse;
/// use axum::routing::get;
/// use axum::{Json, Router};
/// use protected_pool::{ProtectedPool, Sqlite};
///
/// // `?` turns a failed pool call into the response in the table above.
/// async fn user_name(
///     State(pool): State<ProtectedPool<Sqlite>>,
///     Path(id): Path<i64>,
/// ) -> Result<Json<String>, protected_pool::Error> {
///     let name = pool
///         .read(sqlx::query_scalar("SELECT name FROM users WHERE id = ?").bind(id))
///         .fetch_one()
///         .await?;
///     Ok(Json(name))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let pool = ProtectedPool::sqlite()
///     .primary("sqlite::memory:")
///     .build()
///     .unwrap();
/// let app: Router = Router::new()
///     .route("/users/{id}", get(user_name))
///     .with_state(pool.clone());
/// # drop(app);
///
/// pool.close();
/// let response = user_name(State(pool), Path(1)).await.into_response();
/// assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
/// # }
/// ```
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let answer = Answer::to(&self);
        if answer.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, code = answer.code, "database call failed");
        } else {
            let status = answer.status.as_u16();
            tracing::debug!(error = %self, code = answer.code, status, "database call failed");
        }
        answer.into_response()
    }
}

/// What a client is told about a failed call.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    code: &'static str,
    message: &'static str,
    retry_after: Option<u64>,
    outcome_unknown: bool,
}

#[derive(serde::Serialize)]
struct Body {
    error: &'static str,
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_secs: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    outcome_unknown: bool,
}

impl Answer {
    fn to(error: &Error) -> Self {
        // An async fallback's failure changes nothing to what the caller is told.
        let error = error.original();
        let unknown = error.is_outcome_unknown();
        let (status, code, message) = if matches!(error, Error::Closed) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is shutting down",
            )
        } else if error.is_unavailable() && timed_out(error) {
            let message = if unknown {
                "the database did not answer in time; the statement may or may not have run"
            } else {
                "the database did not answer in time"
            };
            (StatusCode::GATEWAY_TIMEOUT, "timeout", message)
        } else if error.is_circuit_open() {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                "the database is unavailable; calls are refused until it is tried again",
            )
        } else if error.is_unavailable() {
            let message = if unknown {
                "the database is unavailable; the statement may or may not have run"
            } else {
                "the database is unavailable"
            };
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        } else if error.class() == Some(ErrorClass::Transient) {
            (
                StatusCode::CONFLICT,
                "transient",
                "the request conflicted with another one running at the same time; it may be \
                 sent again",
            )
        } else if error.class() == Some(ErrorClass::Auth)
            || matches!(error, Error::Config(_) | Error::UnknownEndpoint(_))
        {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "configuration",
                "the service's database configuration is wrong",
            )
        } else {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "query",
                "the database rejected the query",
            )
        };
        Self {
            status,
            code,
            message,
            // Where a breaker refused: a call that failed elsewhere for another reason is
            // not answered by waiting.
            retry_after: error
                .retry_after()
                .filter(|_| status == StatusCode::SERVICE_UNAVAILABLE)
                .map(whole_seconds),
            outcome_unknown: unknown,
        }
    }
}

/// Whether every endpoint tried timed out (our timeout or the server's statement timeout).
fn timed_out(error: &Error) -> bool {
    match error {
        Error::AllEndpointsFailed { attempts, .. } => {
            !attempts.is_empty() && attempts.iter().all(|attempt| timed_out(&attempt.error))
        }
        other => other.class() == Some(ErrorClass::Timeout),
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code,
            message: self.message,
            retry_after_secs: self.retry_after,
            outcome_unknown: self.outcome_unknown,
        };
        // Serializing a struct of strings, numbers and booleans cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (
            self.status,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            json,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Rounded up, at least 1: `Retry-After: 0` would invite an immediate retry.
fn whole_seconds(duration: Duration) -> u64 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_a_whole_second_at_least() {
        for (millis, secs) in [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (14_500, 15)] {
            assert_eq!(
                whole_seconds(Duration::from_millis(millis)),
                secs,
                "{millis} ms"
            );
        }
    }
}
