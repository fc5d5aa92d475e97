//! The `service` example as its clients see it, over HTTP: the compiled example runs as a child
//! process against a real PostgreSQL server that is killed (-9) and started again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protected_pool_testkit::PgServer;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

#[path = "support/http.rs"]
mod http;
use http::Response;

const ADMIN_TOKEN: &str = "test-admin-token";

/// The example binary, built by cargo (a no-op when it is up to date), in the profile and with
/// the features this test was built with, so the library already built for it is reused.
async fn service_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/service_http-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--example",
            "service",
            "--message-format=json-render-diagnostics",
            "--no-default-features",
            "--features",
            &features(),
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .stdin(Stdio::null());
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        cargo.arg("--release");
    }
    let output = cargo.output().await.expect("run cargo");
    assert!(
        output.status.success(),
        "cargo build --example service --features {} failed:\n{}",
        features(),
        String::from_utf8_lossy(&output.stderr)
    );
    // Cargo names the executable it produced (wherever the target dir is).
    let built = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "service")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from));
    let binary = built.unwrap_or_else(|| profile_dir.join("examples").join("service"));
    assert!(
        binary.is_file(),
        "no example binary at {}",
        binary.display()
    );
    binary
}

/// The crate's features this test was built with (`axum` among them: the example needs it).
fn features() -> String {
    let features = [
        ("postgres", cfg!(feature = "postgres")),
        ("sqlite", cfg!(feature = "sqlite")),
        ("axum", cfg!(feature = "axum")),
        ("redis", cfg!(feature = "redis")),
        ("tls-rustls", cfg!(feature = "tls-rustls")),
        ("tls-native-tls", cfg!(feature = "tls-native-tls")),
    ];
    let on: Vec<&str> = features
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
    on.join(",")
}

/// The example running as a child process; killed on drop, its log printed if the test fails.
struct Service {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Service {
    async fn start(binary: &Path, database_url: &str, admin_token: Option<&str>) -> Service {
        let mut command = Command::new(binary);
        match admin_token {
            Some(token) => command.env("ADMIN_TOKEN", token),
            None => command.env_remove("ADMIN_TOKEN"),
        };
        let mut child = command
            .env("DATABASE_URL", database_url)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            // Breakers retry after 1 s, so recovery is quick.
            .env("BREAKER_OPEN_SECS", "1")
            .env("RUST_LOG", "info")
            .env_remove("REPLICA_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the service");
        let log = Arc::new(Mutex::new(String::new()));
        tokio::spawn(collect(child.stderr.take().unwrap(), log.clone()));
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut service = Service {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log.clone(),
        };
        let mut first = String::new();
        tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut first))
            .await
            .expect("the service printed its address within 60 s")
            .expect("read the service's stdout");
        service.addr = first
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("first line is not the address: {first:?}"));
        tokio::spawn(collect(stdout, log));
        service
    }

    /// SIGTERM, then the exit status of the graceful shutdown.
    async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("the service is running");
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM {pid}");
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("the service stopped within 15 s of SIGTERM")
            .expect("wait for the service")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("---- service log ----\n{log}---- end of service log ----");
        }
    }
}

/// Appends everything `stream` says to `log`.
async fn collect(stream: impl AsyncRead + Unpin, log: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.push_str(&line);
        log.push('\n');
    }
}

async fn get(addr: SocketAddr, path: &str) -> Response {
    http::get(addr, path)
        .await
        .unwrap_or_else(|error| panic!("GET {path}: {error}"))
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> Response {
    http::post_json(addr, path, body)
        .await
        .unwrap_or_else(|error| panic!("POST {path}: {error}"))
}

async fn reset(addr: SocketAddr, route: &str, token: Option<&str>) -> Response {
    let path = format!("/breakers/{route}/reset");
    let authorization = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| ("Authorization", value.as_str()))
        .collect();
    http::request(addr, "POST", &path, &headers, None)
        .await
        .unwrap_or_else(|error| panic!("POST {path}: {error}"))
}

/// Retries `attempt` every 100 ms until it gives a value, failing the test with the last
/// observation after `within`.
async fn eventually<T>(
    what: &str,
    within: Duration,
    mut attempt: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The sum of the samples of metric `name` whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let present: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            let wanted = labels
                .iter()
                .all(|(key, value)| present.contains(&format!("{key}=\"{value}\"").as_str()));
            (metric == name && wanted).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The state of `route`'s breaker on the primary in a health report.
fn breaker_state(report: &Value, route: &str) -> String {
    let breakers = report["endpoints"][0]["breakers"]
        .as_array()
        .unwrap_or_else(|| panic!("no breakers in {report}"));
    let breaker = breakers
        .iter()
        .find(|breaker| breaker["route"] == route)
        .unwrap_or_else(|| panic!("no {route} breaker in {report}"));
    breaker["state"].as_str().unwrap_or_default().to_owned()
}

fn assert_fresh(response: &Response) {
    assert_eq!(response.header("x-served-from"), None, "{response:?}");
    assert_eq!(response.header("age"), None, "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_keeps_serving_through_a_database_outage() {
    // The harness turns synchronous commit off for speed; a kill -9 would then lose the last
    // commits, and the service's users would be gone after the restart.
    let database = PgServer::builder()
        .setting("synchronous_commit", "on")
        .start()
        .await
        .expect("start PostgreSQL");
    let binary = service_binary().await;
    let mut service = Service::start(&binary, &database.url(), Some(ADMIN_TOKEN)).await;
    let addr = service.addr;

    // 1. Everything up: writes, fresh reads, a healthy report, success counted.
    let created = post(
        addr,
        "/users",
        r#"{"name":"Ada","email":"ada@example.com"}"#,
    )
    .await;
    assert_eq!(created.status, 201, "{created:?}");
    let ada = created.json();
    assert_eq!(ada["name"], "Ada");
    assert_eq!(ada["email"], "ada@example.com");
    let id = ada["id"].as_i64().expect("numeric id");
    let user_path = format!("/users/{id}");

    let read = get(addr, &user_path).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.json(), ada);
    assert_fresh(&read);

    let duplicate = post(
        addr,
        "/users",
        r#"{"name":"Ada 2","email":"ada@example.com"}"#,
    )
    .await;
    assert_eq!(duplicate.status, 409, "{duplicate:?}");
    assert_eq!(duplicate.json()["error"], "conflict");
    for bad in [
        r#"{"name":"Ada""#,
        r#"{"name":"Ada"}"#,
        r#"{"name":"","email":"x@y"}"#,
    ] {
        let response = post(addr, "/users", bad).await;
        assert_eq!(response.status, 400, "{bad}: {response:?}");
        assert_eq!(response.json()["error"], "bad_request");
    }
    let missing = get(addr, &format!("/users/{}", id + 1)).await;
    assert_eq!(missing.status, 404, "{missing:?}");
    assert_fresh(&missing);

    let health = get(addr, "/health").await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json()["status"], "healthy");
    assert!(
        !health.body.contains(&database.url()),
        "no URL in the health report"
    );

    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let calls = "protected_pool_calls_total";
    let success = metric(&metrics.body, calls, &[("outcome", "success")]);
    assert!(
        success > 0.0,
        "no successful calls counted:\n{}",
        metrics.body
    );

    // 2. The database dies. Reads come from the cache, marked stale, until nothing can serve
    //    reads at all; writes are refused with Retry-After once the write breaker opens.
    database.kill9().await.expect("kill -9 PostgreSQL");
    eventually(
        "health 503 while reads are served from the cache",
        secs(20),
        async || {
            let read = get(addr, &user_path).await;
            assert_eq!(read.status, 200, "a read during the outage: {read:?}");
            assert_eq!(read.json(), ada);
            assert_eq!(read.header("x-served-from"), Some("cache"), "{read:?}");
            let age: u64 = read
                .header("age")
                .and_then(|age| age.parse().ok())
                .expect("Age");
            assert!(age < 600, "{read:?}");
            let health = get(addr, "/health").await;
            let report = health.json();
            match (health.status, breaker_state(&report, "read").as_str()) {
                (503, "open") if report["status"] == "unhealthy" => Ok(()),
                _ => Err(format!("{health:?}")),
            }
        },
    )
    .await;

    let mut refused = None;
    for _ in 0..30 {
        let write = post(
            addr,
            "/users",
            r#"{"name":"Grace","email":"grace@example.com"}"#,
        )
        .await;
        assert_eq!(write.status, 503, "a write during the outage: {write:?}");
        if write.json()["error"] == "circuit_open" {
            refused = Some(write);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("the write breaker opened within 30 writes");
    let retry_after: u64 = refused
        .header("retry-after")
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("a refused write without Retry-After: {refused:?}"));
    assert!((1..=2).contains(&retry_after), "{refused:?}");
    assert_eq!(refused.json()["retry_after_secs"], retry_after);

    eventually("health with the write breaker open", secs(10), async || {
        let health = get(addr, "/health").await;
        let report = health.json();
        let states = (
            breaker_state(&report, "read"),
            breaker_state(&report, "write"),
        );
        match (health.status, states.0.as_str(), states.1.as_str()) {
            (503, "open", "open") if report["status"] == "unhealthy" => Ok(()),
            _ => Err(format!("{health:?}")),
        }
    })
    .await;

    eventually("metrics of the outage", secs(10), async || {
        let text = get(addr, "/metrics").await.body;
        let cache = metric(&text, calls, &[("route", "read"), ("outcome", "cache")]);
        let rejected = metric(&text, calls, &[("route", "write"), ("outcome", "rejected")]);
        let write_labels = [("route", "write"), ("endpoint", "primary")];
        let state = metric(&text, "protected_pool_breaker_state", &write_labels);
        if cache > 0.0 && rejected > 0.0 && state == 1.0 {
            Ok(())
        } else {
            Err(format!(
                "cache={cache} rejected={rejected} write state={state}"
            ))
        }
    })
    .await;

    // 3. The admin endpoint: only with the token, only for a route that exists.
    let anonymous = reset(addr, "write", None).await;
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert!(
        anonymous.header("www-authenticate").is_some(),
        "{anonymous:?}"
    );
    let wrong = reset(addr, "write", Some("not-the-token")).await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let unknown = reset(addr, "reads", Some(ADMIN_TOKEN)).await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    assert!(
        unknown.json()["message"]
            .as_str()
            .unwrap()
            .contains("read, write and auth")
    );
    let done = reset(addr, "write", Some(ADMIN_TOKEN)).await;
    assert_eq!(done.status, 200, "{done:?}");
    assert_eq!(
        done.json(),
        json!({ "route": "write", "endpoints": [{ "name": "primary", "state": "closed" }] })
    );

    // 4. The database is back: the breakers close by themselves, writes and fresh reads work.
    database
        .start_again()
        .await
        .expect("start PostgreSQL again");
    // 200 comes with "degraded" too, while a breaker is half-open and its trial calls are
    // the probe's: wait until every breaker has closed.
    eventually("a healthy report after the restart", secs(60), async || {
        let health = get(addr, "/health").await;
        match health.status {
            200 if health.json()["status"] == "healthy" => Ok(()),
            200 | 503 => Err(format!("{health:?}")),
            _ => panic!("health after the restart: {health:?}"),
        }
    })
    .await;
    let grace = eventually("a write after the restart", secs(30), async || {
        let write = post(
            addr,
            "/users",
            r#"{"name":"Grace","email":"grace@example.com"}"#,
        )
        .await;
        match write.status {
            201 => Ok(write.json()),
            503 => Err(format!("{write:?}")),
            _ => panic!("a write after the restart: {write:?}"),
        }
    })
    .await;
    assert_eq!(grace["name"], "Grace");
    let read = get(addr, &format!("/users/{}", grace["id"])).await;
    assert_eq!(read.status, 200, "{read:?}");
    assert_eq!(read.json(), grace);
    assert_fresh(&read);
    let read = get(addr, &user_path).await;
    assert_eq!((read.status, read.json()), (200, ada.clone()));
    assert_fresh(&read);

    let status = service.terminate().await;
    assert!(status.success(), "graceful shutdown: {status}");

    // Without ADMIN_TOKEN the admin endpoint is off, whatever token is sent.
    let locked = Service::start(&binary, &database.url(), None).await;
    for token in [None, Some(""), Some(ADMIN_TOKEN)] {
        let refused = reset(locked.addr, "write", token).await;
        assert_eq!(refused.status, 403, "token {token:?}: {refused:?}");
        assert_eq!(refused.json()["error"], "disabled");
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
