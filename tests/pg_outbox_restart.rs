//! The application killed (SIGKILL) with writes still in its outbox, and started again: the
//! restarted process applies every queued write exactly once, including those the killed one
//! had committed on the server but not yet taken off its queue.
//!
//! The application is a real child process: this test binary run again for the ignored test
//! [`child_application_queues_writes_then_waits`], which queues the writes while the server is
//! out of reach (a fault proxy refusing connections) and then waits to be killed. The parent
//! restarts the application as a new pool on the same outbox file.
//!
//! The server runs with `synchronous_commit` on (the harness turns it off for speed): with it
//! off, a commit the server acknowledged can be lost, and no client can be exactly-once then.

#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/scenario.rs"]
mod scenario;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledger::ledger;
use protected_pool::outbox::{OutboxConfig, OutboxEvent};
use protected_pool::{DurableWrite, Postgres, ProtectedPool, Route, RouteConfig, Source};
use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};
use scenario::ms;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, SqliteConnection};

/// No primary key: a write applied twice shows as two rows.
const LEDGER: &str =
    "CREATE TABLE ledger (writer int NOT NULL, n int NOT NULL, amount bigint NOT NULL)";
/// Each row takes 2 ms to insert, so that draining 2,000 writes takes seconds.
const SLOW: &str = "
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(0.002); RETURN NULL; END $$;
CREATE TRIGGER slow AFTER INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION slow();";

const WRITES: i32 = 2_000;
/// Writes per replay transaction: many transactions, so the kill lands between two.
const BATCH: usize = 20;
const WRITER: i32 = 1;

const CHILD: &str = "child_application_queues_writes_then_waits";
const ENV_URL: &str = "PROTECTED_POOL_RESTART_CHILD_URL";
const ENV_OUTBOX: &str = "PROTECTED_POOL_RESTART_CHILD_OUTBOX";
const ENV_WRITES: &str = "PROTECTED_POOL_RESTART_CHILD_WRITES";

async fn server() -> PgServer {
    let pg = PgServer::builder()
        .setting("synchronous_commit", "on")
        .start()
        .await
        .expect("start PostgreSQL");
    pg.psql(LEDGER).await.expect("create the ledger");
    pg.psql(SLOW).await.expect("a trigger that slows inserts");
    pg
}

/// The application's pool, in the child and after the restart alike.
fn application_pool(url: String, outbox: &Path) -> ProtectedPool<Postgres> {
    ProtectedPool::postgres()
        .primary(url)
        .route(
            Route::Write,
            RouteConfig {
                timeout: ms(500),
                ..RouteConfig::write()
            },
        )
        .health_check_interval(ms(100))
        .outbox(OutboxConfig::new(outbox).batch(BATCH))
        .build()
        .expect("build the pool")
}

fn entry(n: i32) -> DurableWrite {
    DurableWrite::new("INSERT INTO ledger (writer, n, amount) VALUES ($1, $2, $3)")
        .bind(WRITER)
        .bind(n)
        .bind(i64::from(n) + 1)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test is the child process of the tests in \
             tests/pg_outbox_restart.rs and only runs when started by them"
        )
    })
}

/// The application: queues the writes while the server cannot be reached, says so on stdout,
/// then waits for the parent to kill it (with SIGKILL: no destructor, no clean shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the tests in this file; run by them"]
async fn child_application_queues_writes_then_waits() {
    let url = env(ENV_URL);
    let outbox = PathBuf::from(env(ENV_OUTBOX));
    let writes: i32 = env(ENV_WRITES).parse().expect("a number of writes");
    let pool = application_pool(url, &outbox);
    for n in 0..writes {
        let receipt = pool
            .write(entry(n))
            .idempotent(format!("ledger:{n}"))
            .or_enqueue()
            .execute()
            .await
            .unwrap_or_else(|error| panic!("write {n}: {error}"));
        assert!(
            matches!(receipt.source(), Source::Queued { position, .. } if *position == u64::try_from(n).unwrap() + 1),
            "write {n} was not queued at its place: {:?}",
            receipt.source()
        );
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "QUEUED {writes}").unwrap();
    stdout.flush().unwrap();
    drop(stdout);
    // Killed long before this; the bound only keeps an orphan from living forever.
    tokio::time::sleep(Duration::from_secs(300)).await;
    panic!("the parent never killed this child");
}

/// The child process, killed when dropped if the test fails before it does.
struct Application {
    process: std::process::Child,
    stderr: PathBuf,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Application {
    /// Starts the child with the pool's URL and outbox file.
    fn start(url: &str, outbox: &Path, dir: &Path) -> Self {
        let stderr = dir.join("child.stderr");
        let mut process = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "--exact",
                CHILD,
                "--nocapture",
                "--ignored",
                "--test-threads",
                "1",
            ])
            .env(ENV_URL, url)
            .env(ENV_OUTBOX, outbox)
            .env(ENV_WRITES, WRITES.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).expect("a file for the child's stderr"))
            .spawn()
            .expect("start the child");
        let stdout = process.stdout.take().expect("the child's stdout");
        let (sender, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            process,
            stderr,
            lines,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the child to say it queued everything.
    async fn until_queued(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv()).await;
            match line {
                Ok(Some(line)) => {
                    // The harness's "test NAME ... " precedes it on its line.
                    if let Some((_, count)) = line.split_once("QUEUED ") {
                        assert_eq!(
                            count,
                            WRITES.to_string(),
                            "the child queued a different count"
                        );
                        return;
                    }
                    seen.push(line);
                }
                Ok(None) => panic!(
                    "the child ended before queuing its writes ({:?}); stdout:\n{}\nstderr:\n{}",
                    self.process.try_wait(),
                    seen.join("\n"),
                    self.stderr()
                ),
                Err(_) => panic!(
                    "the child did not queue its writes within 120 s; stdout:\n{}\nstderr:\n{}",
                    seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    /// SIGKILL, and the proof it was still running when it came.
    fn kill(&mut self) {
        assert!(
            self.process
                .try_wait()
                .expect("the child's status")
                .is_none(),
            "the child ended before it was killed; stderr:\n{}",
            self.stderr()
        );
        self.process.kill().expect("SIGKILL the child");
        let status = self.process.wait().expect("reap the child");
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The outbox file, opened by the parent as a second connection (WAL lets it read while the
/// child holds the file).
async fn open_outbox_file(path: &Path) -> SqliteConnection {
    SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("open the outbox file")
}

async fn queued_in_file(connection: &mut SqliteConnection) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM queued")
        .fetch_one(connection)
        .await
        .expect("count the queued writes")
}

async fn rows(pg: &PgServer) -> i64 {
    ledger(pg).await.0
}

/// Waits until no session but psql's is left on the server: a statement the killed child sent
/// has finished, committed or rolled back, before the ledger is counted.
async fn until_sessions_gone(pg: &PgServer) {
    let started = Instant::now();
    loop {
        let sessions: i64 = pg
            .psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .await
            .expect("psql")
            .parse()
            .expect("a count");
        if sessions == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the killed child's sessions are still on the server"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

/// The restarted application: a new pool on the same outbox file, reaching the server through
/// `proxy` (refusing until the listener is on, so no event is missed), drained.
/// Returns the `already` flag of every `Applied` event, and the pool.
async fn restart(
    pg: &PgServer,
    proxy: &FaultProxy,
    outbox: &Path,
) -> (Vec<bool>, ProtectedPool<Postgres>) {
    proxy.set_mode(FaultMode::Refuse);
    let pool = application_pool(pg.url_via(proxy), outbox);
    let applied = Arc::new(Mutex::new(Vec::new()));
    let sink = applied.clone();
    let box_ = pool.outbox().expect("an outbox");
    box_.on_event(move |event| {
        if let OutboxEvent::Applied { already, .. } = event {
            sink.lock().unwrap().push(*already);
        }
    });
    proxy.set_mode(FaultMode::Pass);
    let drained = box_.wait_until_empty(Duration::from_secs(60)).await;
    assert!(
        drained,
        "the restarted application did not drain its outbox: {} writes left",
        box_.depth()
    );
    assert_eq!(box_.depth(), 0);
    let applied = applied.lock().unwrap().clone();
    (applied, pool)
}

fn expected_ledger() -> (i64, i64, i64) {
    let total = i64::from(WRITES);
    (total, total, (1..=total).sum())
}

/// Killed mid-drain, between committing a batch on the server and taking it off its queue:
/// the restart finds that batch applied (its keys are there), applies the rest, and the
/// ledger holds every write exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_by_a_killed_application_are_applied_once_after_it_restarts() {
    let pg = server().await;
    let proxy = FaultProxy::to_server(&pg).await.expect("a fault proxy");
    proxy.set_mode(FaultMode::Refuse);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let outbox = dir.path().join("outbox.sqlite");
    let mut child = Application::start(&pg.url_via(&proxy), &outbox, dir.path());
    child.until_queued().await;

    let mut file = open_outbox_file(&outbox).await;
    assert_eq!(
        queued_in_file(&mut file).await,
        i64::from(WRITES),
        "every write in the file"
    );
    assert_eq!(
        rows(&pg).await,
        0,
        "nothing applied while the server is away"
    );

    // The server is back: the child drains its queue, a batch at a time.
    proxy.set_mode(FaultMode::Pass);
    let started = Instant::now();
    while rows(&pg).await < 200 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the child did not start draining; stderr:\n{}",
            child.stderr()
        );
        tokio::time::sleep(ms(20)).await;
    }
    // Hold the outbox file's write lock: the child's next batch commits on the server, then
    // cannot be taken off the queue. Kill it there.
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut file)
        .await
        .expect("lock the outbox file");
    let settled = i64::from(WRITES) - queued_in_file(&mut file).await;
    let started = Instant::now();
    while rows(&pg).await <= settled {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "no batch committed on the server while the outbox file was locked"
        );
        tokio::time::sleep(ms(10)).await;
    }
    child.kill();
    sqlx::raw_sql("ROLLBACK").execute(&mut file).await.unwrap();
    until_sessions_gone(&pg).await;
    let at_kill = rows(&pg).await;
    let depth_at_kill = queued_in_file(&mut file).await;
    file.close().await.unwrap();
    let committed_not_settled = at_kill - (i64::from(WRITES) - depth_at_kill);
    assert!(
        0 < at_kill && at_kill < i64::from(WRITES),
        "the child was not killed mid-drain: {at_kill} rows in"
    );
    assert!(
        committed_not_settled > 0,
        "the kill did not land between a commit and its settling: {at_kill} rows in, \
         {depth_at_kill} still queued"
    );

    let (applied, pool) = restart(&pg, &proxy, &outbox).await;
    let already = applied.iter().filter(|already| **already).count();
    let fresh = applied.len() - already;
    let why = format!(
        "{at_kill} rows at the kill, {depth_at_kill} writes still queued, of which \
         {committed_not_settled} applied already; the restart replayed {} ({fresh} applied, \
         {already} found applied)",
        applied.len()
    );
    assert_eq!(ledger(&pg).await, expected_ledger(), "{why}");
    assert!(
        i64::try_from(applied.len()).unwrap() + at_kill >= i64::from(WRITES),
        "{why}"
    );
    assert_eq!(
        i64::try_from(applied.len()).unwrap(),
        depth_at_kill,
        "every queued write replayed once: {why}"
    );
    assert_eq!(
        i64::try_from(already).unwrap(),
        committed_not_settled,
        "the batch committed before the kill found applied, not applied again: {why}"
    );
    assert_eq!(
        i64::try_from(fresh).unwrap(),
        i64::from(WRITES) - at_kill,
        "{why}"
    );
    let health = pool
        .health()
        .outbox
        .expect("an outbox in the health report");
    assert_eq!(health.depth, 0);
    assert_eq!(health.dead_letters, 0);
    assert_eq!(health.replayed, u64::try_from(depth_at_kill).unwrap());
}

/// Killed before the server could be reached at all: the restart applies every write, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_while_the_server_was_away_survive_a_kill_and_are_applied_once() {
    let pg = server().await;
    let proxy = FaultProxy::to_server(&pg).await.expect("a fault proxy");
    proxy.set_mode(FaultMode::Refuse);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let outbox = dir.path().join("outbox.sqlite");
    let mut child = Application::start(&pg.url_via(&proxy), &outbox, dir.path());
    child.until_queued().await;
    child.kill();

    let mut file = open_outbox_file(&outbox).await;
    assert_eq!(
        queued_in_file(&mut file).await,
        i64::from(WRITES),
        "every write in the file after the kill"
    );
    file.close().await.unwrap();
    assert_eq!(rows(&pg).await, 0);

    let (applied, pool) = restart(&pg, &proxy, &outbox).await;
    assert_eq!(ledger(&pg).await, expected_ledger());
    assert_eq!(
        applied.len(),
        usize::try_from(WRITES).unwrap(),
        "every write replayed"
    );
    assert!(
        applied.iter().all(|already| !already),
        "none was applied before the kill"
    );
    assert_eq!(
        pool.health().outbox.unwrap().replayed,
        u64::try_from(WRITES).unwrap()
    );
    // Sent again by the restarted application, a write is found applied.
    assert_eq!(
        pool.write(entry(0))
            .idempotent("ledger:0")
            .execute()
            .await
            .unwrap(),
        protected_pool::WriteOutcome::AlreadyApplied
    );
    assert_eq!(ledger(&pg).await, expected_ledger());
}
