//! An HTTP service on the pool: user reads served from the cache while the database is down,
//! writes refused fast with `Retry-After`, `/health` from `pool.health()`, Prometheus metrics
//! and an admin endpoint that resets breakers.
//!
//! `cargo run --example service --features axum` (the pool's errors become responses through
//! the `axum` feature) — without `DATABASE_URL` it starts a throwaway PostgreSQL
//! from the machine's binaries (see `testkit/`). The first line on stdout is the address:
//! `listening on http://127.0.0.1:3000`; logs go to stderr (`RUST_LOG`, default `info`).
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DATABASE_URL` | the primary | a throwaway server |
//! | `REPLICA_URL` | a streaming replica, for reads | none |
//! | `LISTEN_ADDR` | where to listen (`127.0.0.1:0` picks a free port) | `127.0.0.1:3000` |
//! | `ADMIN_TOKEN` | bearer token of `POST /breakers/{route}/reset` | unset: endpoint disabled |
//! | `BREAKER_OPEN_SECS` | fixed open duration of every breaker | the presets' backoff |
//! | `READ_TIMEOUT_SECS`, `WRITE_TIMEOUT_SECS` | per-call timeouts | 5 s, 10 s |
//! | `CACHE_TTL_SECS` | how long a user read is kept for the cache fallback | 600 |
//!
//! ```text
//! curl -i -XPOST localhost:3000/users -H 'content-type: application/json' \
//!      -d '{"name":"Ada","email":"ada@example.com"}'
//! curl -i localhost:3000/users/<id>        # X-Served-From: cache and Age while the DB is down
//! curl -i localhost:3000/health
//! curl -s localhost:3000/metrics | grep protected_pool_
//! curl -i -XPOST localhost:3000/breakers/write/reset -H "authorization: Bearer $ADMIN_TOKEN"
//! ```

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Request, State};
use axum::http::header::{AGE, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use protected_pool::breaker::{BreakerConfig, OpenDuration};
use protected_pool::{
    Error, ErrorClass, HealthStatus, ProtectedPool, Route, RouteConfig, Served, Source,
    UnknownRoute,
};
use protected_pool_testkit::PgServer;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Where a response's body came from, when not from the database just now.
const SERVED_FROM: HeaderName = HeaderName::from_static("x-served-from");

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
struct User {
    id: i64,
    name: String,
    email: String,
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
    email: String,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    pool: ProtectedPool,
    metrics: PrometheusHandle,
    /// `None`: the admin endpoints are disabled.
    admin_token: Option<Arc<str>>,
    cache_ttl: Duration,
}

/// The service's settings, from the environment.
struct Config {
    database_url: Option<String>,
    replica_url: Option<String>,
    listen_addr: String,
    admin_token: Option<String>,
    breaker_open: Option<Duration>,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    cache_ttl: Duration,
}

impl Config {
    fn from_env() -> Result<Self, String> {
        Ok(Self {
            database_url: env_var("DATABASE_URL"),
            replica_url: env_var("REPLICA_URL"),
            listen_addr: env_var("LISTEN_ADDR").unwrap_or_else(|| "127.0.0.1:3000".into()),
            admin_token: env_var("ADMIN_TOKEN"),
            breaker_open: env_secs("BREAKER_OPEN_SECS")?,
            read_timeout: env_secs("READ_TIMEOUT_SECS")?,
            write_timeout: env_secs("WRITE_TIMEOUT_SECS")?,
            cache_ttl: env_secs("CACHE_TTL_SECS")?.unwrap_or(Duration::from_secs(600)),
        })
    }
}

/// A variable's value; unset and empty are the same.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// A positive number of seconds (fractions allowed).
fn env_secs(name: &str) -> Result<Option<Duration>, String> {
    let Some(value) = env_var(name) else {
        return Ok(None);
    };
    match value.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Ok(Some(Duration::from_secs_f64(secs))),
        _ => Err(format!(
            "{name}={value:?} is not a positive number of seconds"
        )),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // Stdout carries only the address line.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "service failed");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_env()?;
    // Before the pool: the pool registers its counters when it is built.
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });

    // Kept until the end: dropping it stops the server and removes its files.
    let mut throwaway: Option<PgServer> = None;
    let primary_url = match &config.database_url {
        Some(url) => url.clone(),
        None => {
            tracing::info!("DATABASE_URL is not set: starting a throwaway PostgreSQL server");
            let server = PgServer::start().await?;
            let url = server.url();
            tracing::info!(port = server.port(), "throwaway PostgreSQL server started");
            throwaway = Some(server);
            url
        }
    };

    let pool = build_pool(&config, primary_url).await?;
    pool.with_connection(Route::Write, async |conn| {
        MIGRATOR.run(conn).await.map_err(Into::into)
    })
    .await?;

    let state = AppState {
        pool: pool.clone(),
        metrics,
        admin_token: config.admin_token.as_deref().map(Arc::from),
        cache_ttl: config.cache_ttl,
    };
    if state.admin_token.is_none() {
        tracing::info!("ADMIN_TOKEN is not set: POST /breakers/{{route}}/reset is disabled");
    }
    let listener = tokio::net::TcpListener::bind(&config.listen_addr)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", config.listen_addr))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);

    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    pool.close();
    drop(throwaway);
    tracing::info!("stopped");
    Ok(())
}

/// The pool: route presets, with the open duration and timeouts the environment asks for.
async fn build_pool(config: &Config, primary_url: String) -> protected_pool::Result<ProtectedPool> {
    let mut builder = ProtectedPool::builder().primary(primary_url);
    if let Some(url) = &config.replica_url {
        builder = builder.replica(url.clone());
    }
    if let Some(open) = config.breaker_open {
        for route in Route::ALL {
            let preset = RouteConfig::for_route(route).breaker;
            let fixed = OpenDuration {
                base: open,
                max: open,
                ..preset.open
            };
            builder = builder.breaker(
                route,
                BreakerConfig {
                    open: fixed,
                    ..preset
                },
            );
        }
    }
    for (route, timeout) in [
        (Route::Read, config.read_timeout),
        (Route::Write, config.write_timeout),
    ] {
        if let Some(timeout) = timeout {
            builder = builder.timeout(route, timeout);
        }
    }
    builder.connect().await
}

/// The routes, with a log line and a span per request.
fn app(state: AppState) -> Router {
    Router::new()
        .route("/users", post(create_user))
        .route("/users/{id}", get(get_user))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/breakers/{route}/reset", post(reset_breakers))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
        })
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn log_request(request: Request, next: Next) -> Response {
    let span =
        tracing::info_span!("http", method = %request.method(), path = %request.uri().path());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
    span.in_scope(|| {
        if response.status().is_server_error() {
            tracing::warn!(status, ?elapsed, "request");
        } else {
            tracing::info!(status, ?elapsed, "request");
        }
    });
    response
}

async fn get_user(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            rejection.body_text(),
        )
    })?;
    let query =
        sqlx::query_as::<_, User>("SELECT id, name, email FROM users WHERE id = $1").bind(id);
    let served = state
        .pool
        .read(query)
        .cached(format!("user:{id}"), state.cache_ttl)
        .fetch_optional()
        .await?;
    let headers = provenance(&served);
    Ok(match served.into_inner() {
        Some(user) => (headers, Json(user)).into_response(),
        None => (
            headers,
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no user {id}")),
        )
            .into_response(),
    })
}

/// Headers saying a value did not come from the database just now: `X-Served-From: cache`
/// with `Age` in seconds, or `X-Served-From: fallback`.
fn provenance<T>(served: &Served<T>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    match served.source() {
        Source::Database { .. } => {}
        source => {
            headers.insert(SERVED_FROM, HeaderValue::from_static(source.as_str()));
            if let Some(age) = served.age() {
                headers.insert(AGE, HeaderValue::from(age.as_secs()));
            }
        }
    }
    headers
}

async fn create_user(
    State(state): State<AppState>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    // Malformed JSON and JSON of the wrong shape are both 400 (axum says 422 for the latter).
    let Json(new) = body.map_err(|rejection| {
        let (status, code) = match rejection {
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            JsonRejection::BytesRejection(ref bytes) => (bytes.status(), "unreadable_body"),
            _ => (StatusCode::BAD_REQUEST, "bad_request"),
        };
        ApiError::new(status, code, rejection.body_text())
    })?;
    let (name, email) = (new.name.trim(), new.email.trim());
    if name.is_empty() || !email.contains('@') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a user needs a non-empty name and an email address",
        ));
    }
    // `users.id` has no default (the schema is shared with SQLite): a random id below 2^53,
    // so it stays exact in JavaScript clients, and no read-then-insert race.
    let id = fastrand::i64(1..1 << 53);
    let insert = sqlx::query_as::<_, User>(
        "INSERT INTO users (id, name, email) VALUES ($1, $2, $3) RETURNING id, name, email",
    )
    .bind(id)
    .bind(name)
    .bind(email);
    // A write runs at most once: the pool never replays it, and neither does this handler.
    match state.pool.write(insert).fetch_one().await {
        Ok(user) => Ok((StatusCode::CREATED, Json(user))),
        Err(error)
            if error.class() == Some(ErrorClass::Query)
                && error.database_code().as_deref() == Some("23505") =>
        {
            let message = match constraint(&error) {
                Some("users_email_key") => format!("a user with email {email:?} already exists"),
                _ => "the user conflicts with an existing one".to_owned(),
            };
            Err(ApiError::new(StatusCode::CONFLICT, "conflict", message))
        }
        Err(error) => Err(error.into()),
    }
}

/// The constraint a database error names, if any.
fn constraint(error: &Error) -> Option<&str> {
    match error.as_sqlx()? {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// The pool's report; 503 when it cannot serve reads, so load balancers look elsewhere.
async fn health(State(state): State<AppState>) -> Response {
    let report = state.pool.health();
    let status = match report.status {
        HealthStatus::Healthy | HealthStatus::Degraded => StatusCode::OK,
        HealthStatus::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(report)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

/// Closes `route`'s breaker on every endpoint. Needs `Authorization: Bearer $ADMIN_TOKEN`;
/// without `ADMIN_TOKEN` it is disabled.
async fn reset_breakers(
    State(state): State<AppState>,
    Path(route): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, Response> {
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "disabled",
            "admin endpoints are disabled: ADMIN_TOKEN is not set",
        )
        .into_response());
    };
    let token = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let authorized = match token {
        None => Err("Bearer"),
        Some(token) if same_secret(token.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err("Bearer error=\"invalid_token\""),
    };
    if let Err(challenge) = authorized {
        let error = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        );
        return Err(([(WWW_AUTHENTICATE, challenge)], error).into_response());
    }
    let route: Route = route.parse().map_err(|unknown: UnknownRoute| {
        ApiError::new(StatusCode::NOT_FOUND, "unknown_route", unknown.to_string()).into_response()
    })?;
    let mut endpoints = Vec::new();
    for (name, _role) in state.pool.endpoints() {
        let reset = state
            .pool
            .reset(route, &name)
            .and_then(|()| state.pool.breaker(route, &name));
        let breaker = reset.map_err(IntoResponse::into_response)?;
        endpoints.push(serde_json::json!({ "name": name, "state": breaker.state() }));
    }
    tracing::warn!(route = route.as_str(), "breakers reset by an operator");
    Ok(Json(
        serde_json::json!({ "route": route, "endpoints": endpoints }),
    ))
}

/// Compares without stopping at the first difference, so timing reveals at most the length.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// An error response. The service's own refusals carry a JSON body of the same shape as the
/// pool's: `{"error": code, "message": ..}`.
#[derive(Debug)]
enum ApiError {
    /// The service's own answer (a bad request, a missing user, a conflict).
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// A pool call failed: the library's mapping (503 with `Retry-After` while the database
    /// is unavailable, 504 when it did not answer in time, ...), which keeps the details in
    /// the log.
    Pool(Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Refused {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        Self::Pool(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Refused {
                status,
                code,
                message,
            } => {
                let body = ErrorBody {
                    error: code,
                    message: &message,
                };
                (status, Json(body)).into_response()
            }
            Self::Pool(error) => error.into_response(),
        }
    }
}

/// Ctrl-C or SIGTERM: stop accepting, let requests in flight finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
