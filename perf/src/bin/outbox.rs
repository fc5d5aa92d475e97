//! Keyed writes and the outbox: what `pool.write(q).idempotent(key)` costs against a plain
//! write, and how long the outbox takes to queue writes while the primary is away and to
//! drain them once it is back.
//!
//! One throwaway PostgreSQL server with `synchronous_commit` on (the server's default; the
//! harness turns it off for speed), one table. Part 1 (`keyed`): N inserts, one task after
//! another and then from concurrent tasks, as a plain write, as a keyed write (a sqlx query, a
//! `DurableWrite`, a `DurableWrite` through `or_enqueue()` while the primary serves) and on the
//! bare engine (deadpool over sqlx's `PgConnection`); the writers take turns in every round,
//! in alternating order. Part 2 (`drain`): the primary behind a fault proxy that refuses
//! connections, 10,000 keyed writes queued with `or_enqueue()`, then the proxy passes again
//! and the time until the outbox is empty is measured, for several replay batch sizes; the
//! table must then hold every write exactly once.
//!
//! `cargo run --release --manifest-path perf/Cargo.toml --bin outbox -- --help`

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::outbox::{OutboxConfig, OutboxEvent};
use protected_pool::{
    DurableWrite, EndpointOptions, Postgres, ProtectedPool, Route, Source, WriteOutcome,
};
use protected_pool_perf::{
    BareManager, BoxError, Flags, Usage, cpu_time, machine_summary, median, percentile, thousands,
    wait_quiet_as_documented,
};
use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// The table every writer inserts into.
const TABLE_SQL: &str = "CREATE TABLE outbox_bench (\
     task int4 NOT NULL, n int4 NOT NULL, amount int8 NOT NULL, PRIMARY KEY (task, n))";
/// The insert every writer makes.
const INSERT: &str = "INSERT INTO outbox_bench (task, n, amount) VALUES ($1, $2, $3)";
/// The pool's key table (its default name).
const KEY_TABLE: &str = "protected_pool_idempotency_keys";
/// How often the pool's recovery probes look at an open breaker.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The longest a drain may take before the run is declared broken.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

const USAGE: &str = "\
usage: outbox [--parts keyed,drain] [--rounds N] [--writes N] [--tasks N]
              [--queued N] [--batches 1,50,200] [--outbox-dir DIR] [--wait-quiet]

  --parts        keyed: the cost of a keyed write against a plain one; drain: queueing writes
                 in the outbox while the primary refuses connections, and draining them once it
                 is back (default both)
  --rounds       rounds of part 1; every writer runs once per round and shape (default 5)
  --writes       inserts per run in part 1 (default 2000)
  --tasks        concurrent tasks (and pooled connections) of part 1's second shape; the first
                 is 1 task (default 8)
  --queued       writes queued in part 2 (default 10000)
  --batches      replay batch sizes of part 2, OutboxConfig::batch (default 1,50,200)
  --outbox-dir   where the outbox files go (default the system's temporary directory: a real
                 disk, so that the outbox's fsync per queued write costs what it costs)
  --wait-quiet   first wait until the 1-minute load average is below 0.5 (up to 15 min)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// `pool.write(sqlx::query(INSERT)..).execute()`.
    Plain,
    /// `pool.write(sqlx::query(INSERT)..).idempotent(key).execute()`.
    Keyed,
    /// `pool.write(DurableWrite::new(INSERT)..).idempotent(key).execute()`.
    KeyedDurable,
    /// The same with `.or_enqueue()`, the primary serving: the outbox is looked at (empty),
    /// the write applied directly.
    KeyedOrEnqueue,
    /// deadpool over sqlx's `PgConnection`, the statement run on the checked-out connection.
    Bare,
}

impl Writer {
    const ALL: [Writer; 5] = [
        Self::Plain,
        Self::Keyed,
        Self::KeyedDurable,
        Self::KeyedOrEnqueue,
        Self::Bare,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Keyed => "keyed",
            Self::KeyedDurable => "keyed-durable",
            Self::KeyedOrEnqueue => "keyed-or-enqueue",
            Self::Bare => "bare-engine",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::Plain => "pool.write(sqlx::query(INSERT).bind(..)).execute()",
            Self::Keyed => "pool.write(sqlx::query(INSERT).bind(..)).idempotent(key).execute()",
            Self::KeyedDurable => {
                "pool.write(DurableWrite::new(INSERT).bind(..)).idempotent(key).execute()"
            }
            Self::KeyedOrEnqueue => {
                "the same with .or_enqueue() before execute(), the primary serving (applied \
                 directly; the outbox file is looked at, not written)"
            }
            Self::Bare => {
                "deadpool 0.13 over sqlx's PgConnection, sqlx::query(INSERT).bind(..)\
                 .execute(&mut *conn): the engine under the pool"
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(error) = run(args) {
        eprintln!("outbox: {error}");
        std::process::exit(1);
    }
}

struct Plan {
    keyed: bool,
    drain: bool,
    rounds: usize,
    writes: usize,
    tasks: usize,
    queued: usize,
    batches: Vec<usize>,
    outbox_dir: Option<PathBuf>,
}

fn run(args: Vec<String>) -> Result<(), BoxError> {
    let command = std::iter::once("outbox".to_owned())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut flags = Flags::parse(args, &["wait-quiet"], USAGE)?;
    let list = |value: String| -> Vec<String> {
        value
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let parts = list(flags.value("parts", "keyed,drain".to_owned())?);
    if let Some(unknown) = parts
        .iter()
        .find(|part| !matches!(part.as_str(), "keyed" | "drain"))
    {
        return Err(format!("no part {unknown:?}\n{USAGE}").into());
    }
    let plan = Plan {
        keyed: parts.iter().any(|part| part == "keyed"),
        drain: parts.iter().any(|part| part == "drain"),
        rounds: flags.value("rounds", 5)?,
        writes: flags.value("writes", 2_000)?,
        tasks: flags.value("tasks", 8)?,
        queued: flags.value("queued", 10_000)?,
        batches: list(flags.value("batches", "1,50,200".to_owned())?)
            .iter()
            .map(|size| size.parse::<usize>())
            .collect::<Result<_, _>>()?,
        outbox_dir: flags
            .value("outbox-dir", String::new())
            .map(|dir| Some(PathBuf::from(dir)).filter(|dir| !dir.as_os_str().is_empty()))?,
    };
    let wait_quiet = flags.switch("wait-quiet");
    flags.finish(USAGE)?;
    if plan.rounds == 0 || plan.writes == 0 || plan.tasks == 0 || plan.queued == 0 {
        return Err(format!(
            "--rounds, --writes, --tasks and --queued must be at least 1\n{USAGE}"
        )
        .into());
    }
    if plan.batches.iter().any(|&size| size == 0 || size > 10_000) {
        return Err(format!("a batch size is between 1 and 10000\n{USAGE}").into());
    }
    println!("command: {command}");
    if wait_quiet {
        wait_quiet_as_documented()?;
    }
    // tokio's multi-threaded default, one worker per CPU, as a service would run.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(plan))
}

async fn run_async(plan: Plan) -> Result<(), BoxError> {
    println!("machine: {}", machine_summary());
    let server = PgServer::builder()
        .setting("synchronous_commit", "on")
        .start()
        .await
        .map_err(|error| format!("starting the PostgreSQL server: {error}"))?;
    server
        .psql(TABLE_SQL)
        .await
        .map_err(|error| format!("creating the benchmark table: {error}"))?;
    let show = async |name: &str| -> Result<String, BoxError> {
        Ok(server.psql(&format!("SHOW {name}")).await?)
    };
    println!(
        "server: PostgreSQL {} on 127.0.0.1:{}, data in {}; synchronous_commit = {} (set to on, \
         the server default; the harness's own default is off), fsync = {} (the harness's)",
        show("server_version").await?,
        server.port(),
        server.root_dir().display(),
        show("synchronous_commit").await?,
        show("fsync").await?,
    );
    let outbox_dir = match &plan.outbox_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("outbox-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&outbox_dir)
        .map_err(|error| format!("creating {}: {error}", outbox_dir.display()))?;
    println!(
        "outbox files: {} ({})",
        outbox_dir.display(),
        file_system(&outbox_dir)
    );
    let mut admin = PgConnection::connect(&server.url()).await?;
    let result = async {
        if plan.keyed {
            keyed_part(&plan, &server, &outbox_dir, &mut admin).await?;
        }
        if plan.drain {
            drain_part(&plan, &server, &outbox_dir, &mut admin).await?;
        }
        Ok::<(), BoxError>(())
    }
    .await;
    if plan.outbox_dir.is_none() {
        let _ = std::fs::remove_dir_all(&outbox_dir);
    }
    result?;
    println!("\nmachine after the runs: {}", machine_summary());
    Ok(())
}

/// The file system `path` is on, from `/proc/self/mounts`: type and device.
fn file_system(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "file system unknown".to_owned();
    };
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then_some((point.len(), device, kind))
        })
        .max_by_key(|(len, ..)| *len)
        .map_or_else(
            || "file system unknown".to_owned(),
            |(_, device, kind)| format!("{kind} on {device}"),
        )
}

/// Empties the table and the key table.
async fn truncate(admin: &mut PgConnection) -> Result<(), BoxError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "TRUNCATE outbox_bench, {KEY_TABLE}"
    )))
    .execute(&mut *admin)
    .await?;
    Ok(())
}

/// Rows in the table, and distinct (task, n) in it.
async fn rows(admin: &mut PgConnection) -> Result<(i64, i64), BoxError> {
    Ok(
        sqlx::query_as("SELECT count(*), count(DISTINCT (task, n)) FROM outbox_bench")
            .fetch_one(&mut *admin)
            .await?,
    )
}

async fn key_rows(admin: &mut PgConnection) -> Result<i64, BoxError> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {KEY_TABLE}"
    )))
    .fetch_one(&mut *admin)
    .await?)
}

// ---- part 1: a keyed write against a plain one ----------------------------------------------

#[derive(Clone)]
struct Writers {
    pool: ProtectedPool<Postgres>,
    bare: deadpool::managed::Pool<BareManager>,
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    writes: usize,
    seconds: f64,
    cpu_seconds: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.writes as f64 / self.seconds
    }
}

/// One insert by `writer`: task `task`'s `n`-th of run `run` (the key names all three).
async fn write_once(
    writers: &Writers,
    writer: Writer,
    run: u64,
    task: i32,
    n: i32,
) -> Result<(), String> {
    let key = || format!("bench:{run}:{task}:{n}");
    let amount = i64::from(n) + 1;
    let query = || sqlx::query(INSERT).bind(task).bind(n).bind(amount);
    let durable = || DurableWrite::new(INSERT).bind(task).bind(n).bind(amount);
    let pool = &writers.pool;
    let applied = |outcome: WriteOutcome| match outcome {
        WriteOutcome::Applied { rows_affected: 1 } => Ok(()),
        other => Err(format!("{key}: {other:?}", key = key())),
    };
    match writer {
        Writer::Plain => {
            let done = pool
                .write(query())
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            if done.rows_affected() != 1 {
                return Err(format!("{} rows inserted", done.rows_affected()));
            }
            Ok(())
        }
        Writer::Keyed => applied(
            pool.write(query())
                .idempotent(key())
                .execute()
                .await
                .map_err(|e| e.to_string())?,
        ),
        Writer::KeyedDurable => applied(
            pool.write(durable())
                .idempotent(key())
                .execute()
                .await
                .map_err(|e| e.to_string())?,
        ),
        Writer::KeyedOrEnqueue => {
            let served = pool
                .write(durable())
                .idempotent(key())
                .or_enqueue()
                .execute()
                .await
                .map_err(|e| e.to_string())?;
            if !matches!(served.source(), Source::Database { .. }) {
                return Err(format!("not applied directly: {:?}", served.source()));
            }
            applied(served.into_inner())
        }
        Writer::Bare => {
            let mut conn = writers.bare.get().await.map_err(|e| e.to_string())?;
            let done = query()
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            if done.rows_affected() != 1 {
                return Err(format!("{} rows inserted", done.rows_affected()));
            }
            Ok(())
        }
    }
}

/// `writes` inserts by `writer` from `tasks` tasks, each one after another; the table and the
/// key table are emptied first, and checked after.
async fn run_writes(
    writers: &Writers,
    admin: &mut PgConnection,
    writer: Writer,
    tasks: usize,
    writes: usize,
    run: u64,
) -> Result<Run, BoxError> {
    truncate(admin).await?;
    let cpu_before = cpu_time(Usage::SelfProcess)?;
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let count = writes / tasks + usize::from(task < writes % tasks);
        let writers = writers.clone();
        handles.push(tokio::spawn(async move {
            for n in 0..count {
                write_once(&writers, writer, run, task as i32, n as i32).await?;
            }
            Ok::<(), String>(())
        }));
    }
    for handle in handles {
        handle
            .await?
            .map_err(|error| format!("a {} write failed: {error}", writer.name()))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = (cpu_time(Usage::SelfProcess)? - cpu_before).as_secs_f64();
    let (count, distinct) = rows(admin).await?;
    if count != writes as i64 || distinct != writes as i64 {
        return Err(format!(
            "{}: {count} rows ({distinct} distinct) after {writes} inserts",
            writer.name()
        )
        .into());
    }
    Ok(Run {
        writes,
        seconds,
        cpu_seconds,
    })
}

async fn keyed_part(
    plan: &Plan,
    server: &PgServer,
    outbox_dir: &Path,
    admin: &mut PgConnection,
) -> Result<(), BoxError> {
    let pool = ProtectedPool::postgres()
        .primary(server.url())
        .endpoint_options(EndpointOptions {
            max_connections: plan.tasks,
            ..EndpointOptions::default()
        })
        .outbox(OutboxConfig::new(outbox_dir.join("keyed.sqlite")))
        .connect()
        .await?;
    pool.create_idempotency_table().await?;
    let bare = deadpool::managed::Pool::<BareManager>::builder(BareManager {
        options: server.url().parse()?,
    })
    .max_size(plan.tasks)
    .build()?;
    let writers = Writers { pool, bare };
    println!(
        "\n# Part 1: a keyed write against a plain one\n\n\
         {} inserts per run into `outbox_bench` (int4, int4, int8; primary key on the first two), \
         emptied before each run; every writer runs once per round, in alternating order \
         (forward in odd rounds, backward in even ones), after one unmeasured warm-up run each. \
         Pool: one endpoint, default breakers and timeouts, max_connections {}; bare engine \
         max_size {}. Writers:\n",
        thousands(plan.writes as u64),
        plan.tasks,
        plan.tasks
    );
    for writer in Writer::ALL {
        println!("- {}: {}", writer.name(), writer.description());
    }
    let mut run_id = 0_u64;
    for writer in Writer::ALL {
        run_id += 1;
        run_writes(&writers, admin, writer, plan.tasks, plan.writes / 4, run_id).await?;
    }
    let shapes = if plan.tasks == 1 {
        vec![1]
    } else {
        vec![1, plan.tasks]
    };
    for tasks in shapes {
        let title = if tasks == 1 {
            "1 task, one insert after another".to_owned()
        } else {
            format!("{tasks} concurrent tasks on {tasks} connections")
        };
        println!("\n## {title}: writes/s per round\n");
        print!("| round |");
        for writer in Writer::ALL {
            print!(" {} |", writer.name());
        }
        println!();
        println!("|---|{}", "---|".repeat(Writer::ALL.len()));
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); Writer::ALL.len()];
        for round in 1..=plan.rounds {
            let mut order: Vec<usize> = (0..Writer::ALL.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            let mut rates = vec![0.0; Writer::ALL.len()];
            for index in order {
                run_id += 1;
                let run = run_writes(
                    &writers,
                    admin,
                    Writer::ALL[index],
                    tasks,
                    plan.writes,
                    run_id,
                )
                .await?;
                rates[index] = run.rate();
                runs[index].push(run);
            }
            print!("| {round} |");
            for rate in rates {
                print!(" {} |", thousands(rate.round() as u64));
            }
            println!();
        }
        summarize_writes(&title, tasks, plan.rounds, &runs);
    }
    Ok(())
}

fn summarize_writes(title: &str, tasks: usize, rounds: usize, runs: &[Vec<Run>]) {
    let medians: Vec<(f64, f64, f64, f64)> = runs
        .iter()
        .map(|runs| {
            let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
            let cpu: Vec<f64> = runs
                .iter()
                .map(|run| run.cpu_seconds * 1e6 / run.writes as f64)
                .collect();
            (
                median(&rates).unwrap_or(0.0),
                rates.iter().copied().fold(f64::INFINITY, f64::min),
                rates.iter().copied().fold(0.0, f64::max),
                median(&cpu).unwrap_or(0.0),
            )
        })
        .collect();
    let index = |writer: Writer| Writer::ALL.iter().position(|&w| w == writer).unwrap_or(0);
    let plain = medians[index(Writer::Plain)].0;
    let bare = medians[index(Writer::Bare)].0;
    // Time per write as one task sees it: each task makes its writes one after another.
    let us = |rate: f64| tasks as f64 / rate * 1e6;
    println!("\n## {title}: median of {rounds} rounds\n");
    println!(
        "| writer | median writes/s | min | max | µs per write | vs plain | +µs over plain | vs bare engine | client CPU per write |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (writer, &(rate, min, max, cpu)) in Writer::ALL.iter().zip(&medians) {
        println!(
            "| {} | {} | {} | {} | {:.0} µs | {:.2}x | {:+.0} µs | {:.2}x | {:.0} µs |",
            writer.name(),
            thousands(rate.round() as u64),
            thousands(min.round() as u64),
            thousands(max.round() as u64),
            us(rate),
            rate / plain,
            us(rate) - us(plain),
            rate / bare,
            cpu
        );
    }
    let keyed = medians[index(Writer::Keyed)].0;
    println!(
        "\nkeyed/plain: {:.2}x the writes/s, {:.2}x the time per write \
         (a keyed write is 4 round trips: BEGIN, the key's INSERT, the statement, COMMIT; a \
         plain one is 1)",
        keyed / plain,
        us(keyed) / us(plain)
    );
}

// ---- part 2: queueing while the primary is away, draining once it is back --------------------

/// The write breaker's open durations of `examples/failover.rs`: 500 ms doubling to 2 s, so
/// that the wait for the breaker after the outage is short and bounded.
fn quick(config: BreakerConfig) -> BreakerConfig {
    BreakerConfig {
        open: OpenDuration {
            base: Duration::from_millis(500),
            max: Duration::from_secs(2),
            ..config.open
        },
        ..config
    }
}

/// What the listeners saw, with when.
#[derive(Debug, Default)]
struct Seen {
    /// Transitions of the write breaker.
    write_breaker: Vec<(Instant, State)>,
    /// The first and last `Applied` events, and how many.
    first_applied: Option<Instant>,
    last_applied: Option<Instant>,
    applied: u64,
    already_applied: u64,
    dead_lettered: u64,
}

/// One drain: queueing, then draining.
struct Drain {
    batch: usize,
    queued: usize,
    /// Time of each `or_enqueue().execute()` call, in order.
    enqueue_calls: Vec<Duration>,
    enqueue_total: Duration,
    enqueue_cpu: Duration,
    /// How often the write breaker opened while writes were being queued.
    opened_while_queueing: usize,
    /// From the proxy passing again to: the write breaker closed, the first queued write
    /// settled (applied and taken off the queue), the last one settled, `wait_until_empty`
    /// returned.
    to_closed: Option<Duration>,
    to_first: Duration,
    to_last: Duration,
    to_empty: Duration,
    drain_cpu: Duration,
}

async fn drain_part(
    plan: &Plan,
    server: &PgServer,
    outbox_dir: &Path,
    admin: &mut PgConnection,
) -> Result<(), BoxError> {
    // The key table exists before the pool's first write gets through.
    for statement in ProtectedPool::postgres()
        .primary(server.url())
        .build()?
        .idempotency_migration()
    {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *admin)
            .await?;
    }
    let proxy = FaultProxy::to_server(server).await?;
    println!(
        "\n# Part 2: {} writes queued while the primary refuses connections, then drained\n\n\
         The pool's primary is reached through the harness's fault proxy, set to refuse \
         connections (FaultMode::Refuse); a single task queues {} keyed DurableWrites of the \
         same INSERT, one after another, with .idempotent(key).or_enqueue().execute() (each \
         returns Queued once the write is in the outbox's SQLite file, synced: WAL, \
         synchronous = FULL). Then the proxy passes again (FaultMode::Pass), and the outbox \
         drains: the replayer waits for the write breaker to close (a recovery probe closes \
         it), then applies batches of OutboxConfig::batch writes, each in one transaction \
         (one INSERT claiming the batch's keys, then the statements), and takes each batch \
         off the file. Pool: write breaker with open durations of 500 ms doubling to 2 s (as \
         examples/failover.rs), health_check_interval {} ms, everything else default. After \
         each drain the table must hold every write exactly once.",
        thousands(plan.queued as u64),
        thousands(plan.queued as u64),
        PROBE_INTERVAL.as_millis()
    );
    let mut drains = Vec::new();
    for &batch in &plan.batches {
        let drain = drain_once(plan, server, &proxy, outbox_dir, admin, batch).await?;
        drains.push(drain);
    }
    println!("\n## Queueing {} writes\n", thousands(plan.queued as u64));
    println!(
        "| batch size | total | writes/s | per write p50 | p99 | max | first call | client CPU per write | write breaker opened |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for drain in &drains {
        let mut sorted = drain.enqueue_calls[1..].to_vec();
        sorted.sort();
        let ms =
            |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2} ms", secs(d) * 1e3));
        println!(
            "| {} | {:.2} s | {} | {} | {} | {} | {} | {:.0} µs | {} |",
            drain.batch,
            secs(drain.enqueue_total),
            thousands((drain.queued as f64 / secs(drain.enqueue_total)).round() as u64),
            ms(percentile(&sorted, 50.0)),
            ms(percentile(&sorted, 99.0)),
            ms(sorted.last().copied()),
            ms(drain.enqueue_calls.first().copied()),
            secs(drain.enqueue_cpu) * 1e6 / drain.queued as f64,
            drain.opened_while_queueing
        );
    }
    println!(
        "\nThe first call tries the primary (refused) before it queues the write; every later \
         one joins the queue without trying, since a write never overtakes those queued \
         before it. The replayer reads nothing from the file while the write breaker is open. \
         \"write breaker opened\": how often, while queueing (recovery probes reopen it)."
    );
    println!(
        "\n## Draining {} writes after the primary is back (from FaultMode::Pass)\n",
        thousands(plan.queued as u64)
    );
    println!(
        "| batch size | write breaker closed | first write settled | last write settled | outbox empty | writes/s from Pass | after the first batch: writes/s | µs per write | ms per batch | client CPU per write |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for drain in &drains {
        let s = |d: Duration| format!("{:.3} s", secs(d));
        // The first batch settles at once; the span to the last settled write holds the rest.
        let rest = drain.queued.saturating_sub(drain.batch);
        let batches = drain.queued.div_ceil(drain.batch).saturating_sub(1);
        let span = secs(drain.to_last.saturating_sub(drain.to_first));
        let (rate, per_write, per_batch) = if rest == 0 || span <= 0.0 {
            ("-".to_owned(), "-".to_owned(), "-".to_owned())
        } else {
            (
                thousands((rest as f64 / span).round() as u64),
                format!("{:.0} µs", span * 1e6 / rest as f64),
                format!("{:.1} ms", span * 1e3 / batches as f64),
            )
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {rate} | {per_write} | {per_batch} | {:.0} µs |",
            drain.batch,
            drain.to_closed.map_or("-".to_owned(), s),
            s(drain.to_first),
            s(drain.to_last),
            s(drain.to_empty),
            thousands((drain.queued as f64 / secs(drain.to_empty)).round() as u64),
            secs(drain.drain_cpu) * 1e6 / drain.queued as f64
        );
    }
    println!(
        "\nTimes from the proxy passing again. \"settled\": applied on the primary and taken \
         off the outbox file (the replayer's OutboxEvent::Applied, emitted for each write of a \
         batch once the batch's removal from the file committed). \"after the first batch\": \
         the writes settled after the first batch, over the time from the first settled write \
         to the last: the replayer's pace once it runs, without the wait for the breaker."
    );
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn drain_once(
    plan: &Plan,
    server: &PgServer,
    proxy: &FaultProxy,
    outbox_dir: &Path,
    admin: &mut PgConnection,
    batch: usize,
) -> Result<Drain, BoxError> {
    truncate(admin).await?;
    let path = outbox_dir.join(format!("drain-{batch}.sqlite"));
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    proxy.set_mode(FaultMode::Refuse);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let pool = ProtectedPool::postgres()
        .primary(server.url_via(proxy))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .health_check_interval(PROBE_INTERVAL)
        .outbox(OutboxConfig::new(&path).batch(batch))
        .on_state_change({
            let seen = seen.clone();
            move |change| {
                if change.route == Route::Write {
                    seen.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .write_breaker
                        .push((Instant::now(), change.change.to));
                }
            }
        })
        .build()?;
    let outbox = pool.outbox().ok_or("the pool has no outbox")?;
    {
        let seen = seen.clone();
        outbox.on_event(move |event| {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            match event {
                OutboxEvent::Applied { already, .. } => {
                    let now = Instant::now();
                    seen.first_applied.get_or_insert(now);
                    seen.last_applied = Some(now);
                    if *already {
                        seen.already_applied += 1;
                    } else {
                        seen.applied += 1;
                    }
                }
                OutboxEvent::DeadLettered { .. } => seen.dead_lettered += 1,
                _ => {}
            }
        });
    }

    // Queueing.
    let mut enqueue_calls = Vec::with_capacity(plan.queued);
    let cpu_before = cpu_time(Usage::SelfProcess)?;
    let started = Instant::now();
    for n in 0..plan.queued {
        let n = n as i32;
        let call = Instant::now();
        let served = pool
            .write(
                DurableWrite::new(INSERT)
                    .bind(batch as i32)
                    .bind(n)
                    .bind(i64::from(n) + 1),
            )
            .idempotent(format!("drain:{batch}:{n}"))
            .or_enqueue()
            .execute()
            .await
            .map_err(|error| format!("queueing write {n}: {error}"))?;
        enqueue_calls.push(call.elapsed());
        if !matches!(served.source(), Source::Queued { .. }) {
            return Err(format!(
                "write {n} was not queued while the primary refused connections: {:?}",
                served.source()
            )
            .into());
        }
    }
    let enqueue_total = started.elapsed();
    let enqueue_cpu = cpu_time(Usage::SelfProcess)? - cpu_before;
    if outbox.depth() != plan.queued as u64 {
        return Err(format!(
            "the outbox holds {} writes after {} were queued",
            outbox.depth(),
            plan.queued
        )
        .into());
    }
    let opened_while_queueing = seen
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .write_breaker
        .iter()
        .filter(|(_, state)| *state == State::Open)
        .count();

    // Draining.
    let cpu_before = cpu_time(Usage::SelfProcess)?;
    proxy.set_mode(FaultMode::Pass);
    let passed = Instant::now();
    let drained = outbox.wait_until_empty(DRAIN_LIMIT).await;
    let to_empty = passed.elapsed();
    let drain_cpu = cpu_time(Usage::SelfProcess)? - cpu_before;
    if !drained {
        return Err(format!(
            "batch {batch}: the outbox still holds {} writes {} s after the primary came back",
            outbox.depth(),
            DRAIN_LIMIT.as_secs()
        )
        .into());
    }
    let (count, distinct) = rows(admin).await?;
    let keys = key_rows(admin).await?;
    let dead = outbox.dead_letters().await?.len();
    let expected = plan.queued as i64;
    if count != expected || distinct != expected || keys != expected || dead != 0 {
        return Err(format!(
            "batch {batch}: after the drain the table holds {count} rows ({distinct} distinct) \
             and the key table {keys} keys, for {expected} queued writes; {dead} dead letters"
        )
        .into());
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
    if seen.applied != plan.queued as u64 || seen.already_applied != 0 || seen.dead_lettered != 0 {
        return Err(format!(
            "batch {batch}: the outbox reported {} applied, {} already applied and {} dead \
             letters for {} queued writes",
            seen.applied, seen.already_applied, seen.dead_lettered, plan.queued
        )
        .into());
    }
    let (Some(first), Some(last)) = (seen.first_applied, seen.last_applied) else {
        return Err(format!("batch {batch}: no write was reported applied").into());
    };
    let to_closed = seen
        .write_breaker
        .iter()
        .find(|(at, state)| *at >= passed && *state == State::Closed)
        .map(|(at, _)| at.duration_since(passed));
    println!(
        "\nbatch {batch}: {} queued in {:.2} s, drained {:.3} s after the primary came back; \
         table checked: {count} rows, {distinct} distinct, {keys} keys, 0 dead letters",
        thousands(plan.queued as u64),
        secs(enqueue_total),
        secs(to_empty)
    );
    pool.close();
    Ok(Drain {
        batch,
        queued: plan.queued,
        enqueue_calls,
        enqueue_total,
        enqueue_cpu,
        opened_while_queueing,
        to_closed,
        to_first: first.saturating_duration_since(passed),
        to_last: last.saturating_duration_since(passed),
        to_empty,
        drain_cpu,
    })
}
