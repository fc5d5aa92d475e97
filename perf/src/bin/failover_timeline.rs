//! Failover timeline: steady reads and writes through protected-pool while the primary is
//! killed (-9) or hung (SIGSTOP), against the same load on a plain sqlx `PgPool`; and while the
//! primary is killed and its streaming standby promoted, with writes following the promotion.
//!
//! Every request is recorded (start, route, endpoint that served it, outcome, latency) and so is
//! every breaker transition; the binary prints failed calls, latency percentiles before, during
//! and after the outage, how fast the breakers opened and closed, PASS/MISS per target, and
//! draws one chart per scenario and contender (PNG) plus a CSV of the samples.
//!
//! `cargo run --release --manifest-path perf/Cargo.toml --bin failover_timeline -- --help`

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::{Backend, ClusterEvent, ProtectedPool, ReadPreference, Role, Route};
use protected_pool_perf::{
    BoxError, Flags, TABLE_ROWS, TABLE_SQL, machine_summary, percentile, register_chart_font,
    thousands, wait_quiet_as_documented,
};
use protected_pool_testkit::PgServer;
use sqlx::Postgres;

const USAGE: &str = "\
usage: failover_timeline [--faults kill,pause,promote] [--contenders protected-pool,sqlx-pgpool]
                         [--readers N] [--writers N] [--health-interval-ms N] [--out DIR]
                         [--wait-quiet]

  --faults       kill: kill -9 the primary at 2 s, start it again at 8 s, 12 s of load;
                 pause: SIGSTOP the primary at 2 s, SIGCONT it at 8 s, 12 s of load;
                 promote: kill -9 the primary at 2 s, promote the standby at 3 s
                 (pg_promote), 8 s of load; protected-pool only (a PgPool has one host)
                 (default kill,pause)
  --readers      reader tasks, each pausing 10 ms between reads (default 16)
  --writers      writer tasks, each pausing 10 ms between writes (default 2)
  --health-interval-ms
                 protected-pool's health_check_interval (default 200; the library's own
                 default is 1000); charts and CSV files of another value than 200 are named
                 ...-health<N>ms
  --out          where charts and CSV files go (default perf/out)
  --wait-quiet   first wait until the 1-minute load average is below 0.5 (up to 15 min)";

/// When the fault starts (since the load started).
const FAULT_AT: Duration = Duration::from_secs(2);
/// Pause between two calls of one task.
const PAUSE: Duration = Duration::from_millis(10);

/// protected-pool's configuration in this run (as in `examples/failover.rs`): the read and
/// write presets with quick open durations, 1 s / 2 s operation timeouts, probes every 200 ms.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// The SQL that promotes the standby, waiting (up to 60 s) until it takes writes.
const PROMOTE_SQL: &str = "SELECT pg_promote(true, 60)";
/// Slack allowed over an operation timeout for timer and scheduling delays on a shared
/// 2-CPU machine.
const TIMEOUT_SLACK: Duration = Duration::from_millis(20);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    /// The primary killed (-9), then its standby promoted; the old primary stays dead.
    Promote,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Pause => "pause",
            Self::Promote => "promote",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Kill => "primary killed (-9) at 2 s, started again at 8 s",
            Self::Pause => "primary hung (SIGSTOP) at 2 s, resumed (SIGCONT) at 8 s",
            Self::Promote => "primary killed (-9) at 2 s, standby promoted at 3 s",
        }
    }

    fn from_name(name: &str) -> Result<Self, BoxError> {
        match name {
            "kill" => Ok(Self::Kill),
            "pause" => Ok(Self::Pause),
            "promote" => Ok(Self::Promote),
            _ => Err(format!("no fault {name:?}\n{USAGE}").into()),
        }
    }

    /// When the recovery (restart, SIGCONT, promotion) is issued, since the load started.
    fn recover_at(self) -> Duration {
        match self {
            Self::Kill | Self::Pause => Duration::from_secs(8),
            Self::Promote => Duration::from_secs(3),
        }
    }

    /// When the load stops, since it started.
    fn end_at(self) -> Duration {
        match self {
            Self::Kill | Self::Pause => Duration::from_secs(12),
            Self::Promote => Duration::from_secs(8),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    ProtectedPool,
    SqlxPgPool,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Self::ProtectedPool => "protected-pool",
            Self::SqlxPgPool => "sqlx-pgpool",
        }
    }

    fn from_name(name: &str) -> Result<Self, BoxError> {
        match name {
            "protected-pool" => Ok(Self::ProtectedPool),
            "sqlx-pgpool" => Ok(Self::SqlxPgPool),
            _ => Err(format!("no contender {name:?}\n{USAGE}").into()),
        }
    }
}

/// Which server answered a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Primary,
    Replica,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok(Served),
    /// Refused by the breakers without reaching a database.
    CircuitOpen,
    /// Failed, with its error class (`ErrorClass::as_str`).
    Failed(&'static str),
}

/// One call.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When it started, since the load started.
    at: Duration,
    route: Route,
    outcome: Outcome,
    latency: Duration,
}

/// One breaker transition.
#[derive(Debug, Clone)]
struct Change {
    at: Duration,
    route: Route,
    endpoint: String,
    from: State,
    to: State,
}

/// An endpoint's discovered role changed (`ClusterEvent::RoleChanged`).
#[derive(Debug, Clone)]
struct RoleEvent {
    /// Since the load started; `None` before it (the roles found when the pool connected).
    at: Option<Duration>,
    endpoint: String,
    from: Option<Role>,
    to: Option<Role>,
}

fn role_name(role: Option<Role>) -> &'static str {
    role.map_or("unknown", Role::as_str)
}

/// Everything one scenario recorded.
struct Timeline {
    fault: Fault,
    contender: Contender,
    /// protected-pool's `health_check_interval` in this run.
    health_interval: Duration,
    /// Fault issued / done, recovery issued / done (the server answers again; for a
    /// promotion, `pg_promote` returned), end.
    fault_at: Duration,
    fault_done: Duration,
    recover_at: Duration,
    recover_done: Duration,
    end: Duration,
    samples: Vec<Sample>,
    changes: Vec<Change>,
    roles: Vec<RoleEvent>,
    /// A new connection to the promoted standby with its role query (the pool asks every new
    /// connection `pg_is_in_recovery()`), median of a few after the load: "one connect".
    connect: Option<Duration>,
}

/// The pool under test.
#[derive(Clone)]
enum Client {
    Protected(ProtectedPool),
    Sqlx(sqlx::PgPool),
}

const READ_SQL: &str = "SELECT pg_is_in_recovery(), value FROM bench_items WHERE id = $1";
const WRITE_SQL: &str = "UPDATE bench_items SET value = value + 1 WHERE id = $1";

impl Client {
    async fn read(&self, id: i32) -> Outcome {
        let query = sqlx::query_as::<_, (bool, i64)>(READ_SQL).bind(id);
        let result = match self {
            Self::Protected(pool) => pool.read(query).fetch_one().await.map_err(protected_error),
            Self::Sqlx(pool) => query.fetch_one(pool).await.map_err(sqlx_error),
        };
        match result {
            Ok((true, _)) => Outcome::Ok(Served::Replica),
            Ok((false, _)) => Outcome::Ok(Served::Primary),
            Err(outcome) => outcome,
        }
    }

    async fn write(&self, id: i32) -> Outcome {
        let query = sqlx::query(WRITE_SQL).bind(id);
        let result = match self {
            Self::Protected(pool) => pool.write(query).execute().await.map_err(protected_error),
            Self::Sqlx(pool) => query.execute(pool).await.map_err(sqlx_error),
        };
        match result {
            Ok(_) => Outcome::Ok(Served::Primary),
            Err(outcome) => outcome,
        }
    }
}

fn protected_error(error: protected_pool::Error) -> Outcome {
    if error.is_circuit_open() {
        Outcome::CircuitOpen
    } else {
        Outcome::Failed(error.class().map_or("other", |class| class.as_str()))
    }
}

/// sqlx's errors classified by the same rule protected-pool uses.
fn sqlx_error(error: sqlx::Error) -> Outcome {
    Outcome::Failed(<Postgres as Backend>::classify(&error).as_str())
}

fn main() {
    if let Err(error) = run() {
        eprintln!("failover_timeline: {error}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), BoxError> {
    let mut flags = Flags::parse(std::env::args().skip(1), &["wait-quiet"], USAGE)?;
    let faults: Vec<Fault> = flags
        .value("faults", "kill,pause".to_owned())?
        .split(',')
        .map(Fault::from_name)
        .collect::<Result<_, _>>()?;
    let contenders: Vec<Contender> = flags
        .value("contenders", "protected-pool,sqlx-pgpool".to_owned())?
        .split(',')
        .map(Contender::from_name)
        .collect::<Result<_, _>>()?;
    let readers: usize = flags.value("readers", 16)?;
    let writers: usize = flags.value("writers", 2)?;
    let health_interval_ms: u64 = flags.value("health-interval-ms", 200)?;
    if health_interval_ms == 0 {
        return Err(format!("--health-interval-ms must be above zero\n{USAGE}").into());
    }
    let health_interval = Duration::from_millis(health_interval_ms);
    let out: PathBuf = flags.value(
        "out",
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/out")),
    )?;
    let wait_quiet = flags.switch("wait-quiet");
    flags.finish(USAGE)?;
    register_chart_font()?;
    std::fs::create_dir_all(&out)
        .map_err(|error| format!("creating {}: {error}", out.display()))?;
    if wait_quiet {
        wait_quiet_as_documented()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("machine: {}", machine_summary());
    println!(
        "load: {readers} readers and {writers} writers, each pausing {} ms between calls; \
         protected-pool: primary + streaming replica, ReadPreference::Primary, read/write \
         presets with open 500 ms doubling to 2 s, timeouts read {} s / write {} s, health \
         checks and probes every {} ms, other settings the library's defaults; sqlx PgPool: \
         defaults, primary only",
        PAUSE.as_millis(),
        READ_TIMEOUT.as_secs(),
        WRITE_TIMEOUT.as_secs(),
        health_interval.as_millis()
    );
    for &fault in &faults {
        for &contender in &contenders {
            if fault == Fault::Promote && contender == Contender::SqlxPgPool {
                println!(
                    "\n## {}: {}\n\nskipped: a PgPool connects to one host and cannot follow \
                     a promotion",
                    contender.name(),
                    fault.describe()
                );
                continue;
            }
            let timeline = runtime.block_on(scenario(
                fault,
                contender,
                readers,
                writers,
                health_interval,
            ))?;
            report(&timeline);
            let mut stem = format!("failover-{}-{}", fault.name(), contender.name());
            if health_interval != PROBE_INTERVAL {
                write!(stem, "-health{}ms", health_interval.as_millis())?;
            }
            let png = out.join(format!("{stem}.png"));
            render(&timeline, &png)?;
            write_csv(&timeline, &out.join(format!("{stem}.csv")))?;
            println!("chart: {}", png.display());
        }
    }
    Ok(())
}

async fn scenario(
    fault: Fault,
    contender: Contender,
    readers: usize,
    writers: usize,
    health_interval: Duration,
) -> Result<Timeline, BoxError> {
    println!(
        "\n## {}: {}\n\nstarting a primary and a streaming replica ...",
        contender.name(),
        fault.describe()
    );
    let primary = PgServer::start()
        .await
        .map_err(|error| format!("starting the primary: {error}"))?;
    primary
        .psql(TABLE_SQL)
        .await
        .map_err(|error| format!("creating the table: {error}"))?;
    let replica = PgServer::streaming_replica(&primary)
        .await
        .map_err(|error| format!("starting the replica: {error}"))?;

    let changes: Arc<Mutex<Vec<(Instant, Change)>>> = Arc::default();
    let roles: Arc<Mutex<Vec<(Instant, RoleEvent)>>> = Arc::default();
    let client = match contender {
        Contender::ProtectedPool => {
            let sink = roles.clone();
            let pool: ProtectedPool = ProtectedPool::builder()
                .primary(primary.url())
                .replica(replica.url())
                .read_preference(ReadPreference::Primary)
                .breaker(Route::Read, quick(BreakerConfig::read()))
                .breaker(Route::Write, quick(BreakerConfig::write()))
                .timeout(Route::Read, READ_TIMEOUT)
                .timeout(Route::Write, WRITE_TIMEOUT)
                .health_check_interval(health_interval)
                .on_cluster_event(move |event: &ClusterEvent| {
                    if let ClusterEvent::RoleChanged(change) = event {
                        let role = RoleEvent {
                            at: None,
                            endpoint: change.endpoint.to_string(),
                            from: change.from,
                            to: change.to,
                        };
                        sink.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((Instant::now(), role));
                    }
                })
                .connect()
                .await?;
            let sink = changes.clone();
            pool.on_state_change(move |event| {
                let change = Change {
                    at: Duration::ZERO,
                    route: event.route,
                    endpoint: event.endpoint.to_string(),
                    from: event.change.from,
                    to: event.change.to,
                };
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((Instant::now(), change));
            });
            Client::Protected(pool)
        }
        Contender::SqlxPgPool => Client::Sqlx(sqlx::PgPool::connect(&primary.url()).await?),
    };

    // Open the connections before the clock starts.
    let warm: Vec<_> = (0..readers + writers)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                let id = task as i32 + 1;
                (client.read(id).await, client.write(id).await)
            })
        })
        .collect();
    for task in warm {
        if let (Outcome::Failed(class), _) | (_, Outcome::Failed(class)) = task.await? {
            return Err(format!("a warm-up call failed ({class}) with the servers up").into());
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..readers + writers {
        let route = if task < readers {
            Route::Read
        } else {
            Route::Write
        };
        let (client, stop) = (client.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(task as u64 + 1);
            let mut samples = Vec::with_capacity(2_000);
            while !stop.load(Ordering::Relaxed) {
                let id = rng.i32(1..=TABLE_ROWS);
                let call_started = Instant::now();
                let outcome = match route {
                    Route::Write => client.write(id).await,
                    _ => client.read(id).await,
                };
                samples.push(Sample {
                    at: call_started - started,
                    route,
                    outcome,
                    latency: call_started.elapsed(),
                });
                tokio::time::sleep(PAUSE).await;
            }
            samples
        }));
    }

    tokio::time::sleep_until((started + FAULT_AT).into()).await;
    let fault_at = started.elapsed();
    match fault {
        Fault::Kill | Fault::Promote => primary.kill9().await?,
        Fault::Pause => primary.pause()?,
    }
    let fault_done = started.elapsed();
    tokio::time::sleep_until((started + fault.recover_at()).into()).await;
    let recover_at = started.elapsed();
    match fault {
        Fault::Kill => primary.start_again().await?,
        Fault::Pause => primary.resume()?,
        Fault::Promote => {
            let promoted = replica
                .psql(PROMOTE_SQL)
                .await
                .map_err(|error| format!("promoting the standby: {error}"))?;
            if promoted != "t" {
                return Err(format!("{PROMOTE_SQL} returned {promoted:?}, not t").into());
            }
        }
    }
    let recover_done = started.elapsed();
    tokio::time::sleep_until((started + fault.end_at()).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for task in tasks {
        let joined = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .map_err(|_| "a load task still had not finished 60 s after the end")?;
        samples.extend(joined?);
    }
    let end = started.elapsed();
    samples.sort_by_key(|sample| sample.at);
    let changes = std::mem::take(&mut *changes.lock().unwrap_or_else(PoisonError::into_inner))
        .into_iter()
        .map(|(at, change)| Change {
            at: at.saturating_duration_since(started),
            ..change
        })
        .collect();
    let roles = std::mem::take(&mut *roles.lock().unwrap_or_else(PoisonError::into_inner))
        .into_iter()
        .map(|(at, role)| RoleEvent {
            at: at.checked_duration_since(started),
            ..role
        })
        .collect();
    match client {
        Client::Protected(pool) => pool.close(),
        Client::Sqlx(pool) => pool.close().await,
    }
    let connect = match fault {
        Fault::Promote => Some(connect_time(&replica.url()).await?),
        Fault::Kill | Fault::Pause => None,
    };
    drop((replica, primary));
    Ok(Timeline {
        fault,
        contender,
        health_interval,
        fault_at,
        fault_done,
        recover_at,
        recover_done,
        end,
        samples,
        changes,
        roles,
        connect,
    })
}

/// The median time of 5 new connections to `url`, each with the role query the pool runs on
/// every new connection.
async fn connect_time(url: &str) -> Result<Duration, BoxError> {
    use sqlx::Connection as _;
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let mut connection = sqlx::PgConnection::connect(url).await?;
        let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut connection)
            .await?;
        times.push(started.elapsed());
        if in_recovery {
            return Err("the promoted standby still says it is in recovery".into());
        }
        connection.close().await?;
    }
    times.sort();
    Ok(times[times.len() / 2])
}

// ---- the print-out ---------------------------------------------------------------------------

/// Latency percentiles of the samples that match, as "p50 / p99 / max (n)".
fn latencies(samples: &[Sample], keep: impl Fn(&Sample) -> bool) -> (String, Vec<Duration>) {
    let mut values: Vec<Duration> = samples
        .iter()
        .filter(|s| keep(s))
        .map(|s| s.latency)
        .collect();
    values.sort();
    let text = match (
        percentile(&values, 50.0),
        percentile(&values, 99.0),
        values.last(),
    ) {
        (Some(p50), Some(p99), Some(max)) => format!(
            "{} / {} / {} (n={})",
            ms(p50),
            ms(p99),
            ms(*max),
            thousands(values.len() as u64)
        ),
        _ => "no calls".to_owned(),
    };
    (text, values)
}

fn ms(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.3} s", ms / 1000.0)
    }
}

/// The first transition of `route`'s breaker on the primary to `to` at or after `after`.
fn first_change(timeline: &Timeline, route: Route, to: State, after: Duration) -> Option<&Change> {
    timeline
        .changes
        .iter()
        .find(|c| c.route == route && c.endpoint == "primary" && c.to == to && c.at >= after)
}

/// The open duration (before jitter) in force on `route`'s primary breaker at `at`: the
/// preset's schedule, doubled for each re-open from half-open since it last closed.
fn open_duration_at(timeline: &Timeline, route: Route, at: Duration) -> Duration {
    let config = match route {
        Route::Write => quick(BreakerConfig::write()),
        _ => quick(BreakerConfig::read()),
    };
    let mut reopens: Option<u32> = None;
    for change in timeline
        .changes
        .iter()
        .filter(|c| c.route == route && c.endpoint == "primary" && c.at <= at)
    {
        match (change.from, change.to) {
            (State::Closed, State::Open) => reopens = Some(0),
            (State::HalfOpen, State::Open) => reopens = Some(reopens.map_or(0, |k| k + 1)),
            (_, State::Closed) => reopens = None,
            _ => {}
        }
    }
    config.open.nominal(reopens.unwrap_or(0))
}

fn target(met: bool, what: String) -> String {
    format!("{}  {what}", if met { "PASS" } else { "MISS" })
}

/// When writes succeeded again after a promotion: the first successful write's start (where
/// the outage ends), and the first return of a successful write.
#[derive(Debug, Clone, Copy)]
struct Resumed {
    started: Duration,
    returned: Duration,
}

/// `to - from`, signed: `-12.3 ms` when `to` came first.
fn signed(to: Duration, from: Duration) -> String {
    if to >= from {
        ms(to - from)
    } else {
        format!("-{}", ms(from - to))
    }
}

/// The promotion's figures: when the pool found the new primary, the time from the promotion
/// to the first write that succeeded, write latency around it. Returns its target line.
fn promotion_report(timeline: &Timeline, resumed: Option<Resumed>) -> Vec<String> {
    let samples = &timeline.samples;
    let (fault_at, issued, returned) = (
        timeline.fault_at,
        timeline.recover_at,
        timeline.recover_done,
    );
    println!(
        "\npromotion: pg_promote issued at {:.3} s, returned at {:.3} s ({} later)",
        issued.as_secs_f64(),
        returned.as_secs_f64(),
        ms(returned.saturating_sub(issued))
    );
    // The server itself, through the load: the first read after the kill that a primary
    // answered (pg_promote checks every 100 ms whether the promotion is done, so it returns
    // up to that long after the standby takes writes).
    let answered = samples
        .iter()
        .filter(|s| {
            s.route == Route::Read
                && s.at >= timeline.fault_done
                && s.outcome == Outcome::Ok(Served::Primary)
        })
        .min_by_key(|s| s.at + s.latency);
    if let Some(read) = answered {
        println!(
            "first read after the kill answered by a primary (the promoted standby): started \
             {:.3} s, returned {:.3} s ({} after pg_promote was issued)",
            read.at.as_secs_f64(),
            (read.at + read.latency).as_secs_f64(),
            signed(read.at, issued)
        );
    }
    let found = timeline.roles.iter().find_map(|role| {
        role.at
            .filter(|&at| at >= fault_at && role.to == Some(Role::Primary))
            .map(|at| (at, role))
    });
    match found {
        Some((at, role)) => println!(
            "{} found to be the primary at {:.3} s: {} after pg_promote returned, {} after \
             it was issued",
            role.endpoint,
            at.as_secs_f64(),
            signed(at, returned),
            signed(at, issued)
        ),
        None => println!("no endpoint was found to be the primary after the kill"),
    }
    let Some(first) = resumed else {
        println!("no write started after the kill succeeded");
        return vec![target(
            false,
            "writes succeed again within health_check_interval + one connect after the \
             promotion: none did"
                .to_owned(),
        )];
    };
    let done = first.returned;
    println!(
        "writes started after the kill succeed again: the first started at {:.3} s, the first \
         returned at {:.3} s",
        first.started.as_secs_f64(),
        done.as_secs_f64()
    );
    println!(
        "promotion -> first successful write returned: {} after pg_promote returned, {} after \
         it was issued{}",
        signed(done, returned),
        signed(done, issued),
        answered.map_or_else(String::new, |read| format!(
            ", {} after the first read answered by the promoted standby started",
            signed(done, read.at)
        ))
    );
    println!("\n| writes started | ok / failed / refused | p50 / p99 / max |");
    println!("|---|---|---|");
    for (name, from, to) in [
        ("before the kill", Duration::ZERO, fault_at),
        ("kill -> first success", fault_at, first.started),
        ("first success -> end", first.started, timeline.end),
    ] {
        let keep = |s: &Sample| s.route == Route::Write && s.at >= from && s.at < to;
        let count = |outcome: fn(&Outcome) -> bool| {
            thousands(
                samples
                    .iter()
                    .filter(|s| keep(s) && outcome(&s.outcome))
                    .count() as u64,
            )
        };
        println!(
            "| {name} ({:.3}-{:.3} s) | {} / {} / {} | {} |",
            from.as_secs_f64(),
            to.as_secs_f64(),
            count(|o| matches!(o, Outcome::Ok(_))),
            count(|o| matches!(o, Outcome::Failed(_))),
            count(|o| *o == Outcome::CircuitOpen),
            latencies(samples, keep).0
        );
    }
    let connect = timeline.connect.unwrap_or_default();
    let bound = timeline.health_interval + connect;
    vec![target(
        done <= returned + bound,
        format!(
            "writes succeed again within health_check_interval + one connect ({} + {} = {}) \
             after the promotion: {} after pg_promote returned ({} after it was issued)",
            ms(timeline.health_interval),
            ms(connect),
            ms(bound),
            signed(done, returned),
            signed(done, issued)
        ),
    )]
}

fn report(timeline: &Timeline) {
    let samples = &timeline.samples;
    let (fault_at, recover_done) = (timeline.fault_at, timeline.recover_done);
    let reads = |s: &Sample| s.route == Route::Read;
    let writes = |s: &Sample| s.route == Route::Write;
    let count = |keep: &dyn Fn(&Sample) -> bool| samples.iter().filter(|s| keep(s)).count() as u64;
    let (fault_word, recover_word, recovered) = match timeline.fault {
        Fault::Kill => ("kill -9", "restart", "server answering"),
        Fault::Pause => ("SIGSTOP", "SIGCONT", "server answering"),
        Fault::Promote => ("kill -9", "pg_promote", "returned"),
    };
    println!(
        "{fault_word} issued at {:.3} s (done {:.3} s), {recover_word} issued at {:.3} s \
         ({recovered} at {:.3} s), load stopped at {:.3} s",
        fault_at.as_secs_f64(),
        timeline.fault_done.as_secs_f64(),
        timeline.recover_at.as_secs_f64(),
        recover_done.as_secs_f64(),
        timeline.end.as_secs_f64()
    );
    let before_rate = count(&|s| reads(s) && s.at < fault_at) as f64 / fault_at.as_secs_f64();
    println!(
        "reads: {} ({} by the primary, {} by the replica), {} failed, {} refused by breakers \
         ({:.0} reads/s before the fault)",
        thousands(count(&reads)),
        thousands(count(
            &|s| reads(s) && s.outcome == Outcome::Ok(Served::Primary)
        )),
        thousands(count(
            &|s| reads(s) && s.outcome == Outcome::Ok(Served::Replica)
        )),
        thousands(count(
            &|s| reads(s) && matches!(s.outcome, Outcome::Failed(_))
        )),
        thousands(count(&|s| reads(s) && s.outcome == Outcome::CircuitOpen)),
        before_rate
    );
    println!(
        "writes: {} ({} ok, {} failed, {} refused by the breaker)",
        thousands(count(&writes)),
        thousands(count(&|s| writes(s) && matches!(s.outcome, Outcome::Ok(_)))),
        thousands(count(
            &|s| writes(s) && matches!(s.outcome, Outcome::Failed(_))
        )),
        thousands(count(&|s| writes(s) && s.outcome == Outcome::CircuitOpen)),
    );
    let mut classes: Vec<(Route, &str, u64)> = Vec::new();
    for sample in samples {
        if let Outcome::Failed(class) = sample.outcome {
            match classes
                .iter_mut()
                .find(|(route, c, _)| *route == sample.route && *c == class)
            {
                Some(entry) => entry.2 += 1,
                None => classes.push((sample.route, class, 1)),
            }
        }
    }
    if !classes.is_empty() {
        let list: Vec<String> = classes
            .iter()
            .map(|(route, class, n)| format!("{route} {class}: {}", thousands(*n)))
            .collect();
        println!("failures by class: {}", list.join(", "));
    }

    // After a promotion the outage ends when writes succeed again, among those started once
    // the old primary was dead (writes started while the harness was still killing it may
    // have been answered by it).
    let resumed = {
        let succeeded = || {
            samples.iter().filter(|s| {
                writes(s) && s.at >= timeline.fault_done && matches!(s.outcome, Outcome::Ok(_))
            })
        };
        succeeded()
            .map(|s| s.at)
            .min()
            .zip(succeeded().map(|s| s.at + s.latency).min())
            .map(|(started, returned)| Resumed { started, returned })
    };
    let outage_end = match timeline.fault {
        Fault::Kill | Fault::Pause => recover_done,
        Fault::Promote => resumed.map_or(timeline.end, |r| r.started),
    };
    println!("\n| phase | reads p50 / p99 / max | writes p50 / p99 / max |");
    println!("|---|---|---|");
    let phases = [
        ("before", Duration::ZERO, fault_at),
        ("outage", fault_at, outage_end),
        ("after", outage_end, timeline.end),
    ];
    let mut outage_reads = Vec::new();
    for (name, from, to) in phases {
        let within = |s: &Sample| s.at >= from && s.at < to;
        let (read_text, read_values) = latencies(samples, |s| reads(s) && within(s));
        let (write_text, _) = latencies(samples, |s| writes(s) && within(s));
        println!(
            "| {name} ({:.1}-{:.1} s) | {read_text} | {write_text} |",
            from.as_secs_f64(),
            to.as_secs_f64()
        );
        if name == "outage" {
            outage_reads = read_values;
        }
    }

    let read_open = first_change(timeline, Route::Read, State::Open, fault_at);
    let write_open = first_change(timeline, Route::Write, State::Open, fault_at);
    let since_fault = |change: Option<&Change>| change.map(|c| c.at.saturating_sub(fault_at));
    let show = |d: Option<Duration>| d.map_or_else(|| "never".to_owned(), ms);
    let (read_open_after, write_open_after) = (since_fault(read_open), since_fault(write_open));
    let last_close = |route: Route| {
        timeline
            .changes
            .iter()
            .rfind(|c| c.route == route && c.endpoint == "primary" && c.at >= recover_done)
            .filter(|c| c.to == State::Closed)
            .map(|c| c.at.saturating_sub(recover_done))
    };
    let (read_closed_after, write_closed_after) =
        (last_close(Route::Read), last_close(Route::Write));
    let bounds = [Route::Read, Route::Write]
        .map(|route| open_duration_at(timeline, route, recover_done) + timeline.health_interval);
    let protected = timeline.contender == Contender::ProtectedPool;
    if protected {
        // When the fault first showed: the first call of each route that did not get its
        // answer from the primary, by the time it returned.
        let first_hit = |route: Route| {
            samples
                .iter()
                .filter(|s| {
                    s.route == route
                        && s.at >= fault_at
                        && s.outcome != Outcome::Ok(Served::Primary)
                })
                .map(|s| (s.at + s.latency).saturating_sub(fault_at))
                .min()
        };
        println!(
            "\n{fault_word} -> first call not answered by the primary returned: read {}, write {}",
            show(first_hit(Route::Read)),
            show(first_hit(Route::Write))
        );
        println!(
            "{fault_word} -> primary breakers open: read {}, write {}",
            show(read_open_after),
            show(write_open_after)
        );
        if timeline.fault != Fault::Promote {
            println!(
                "{recover_word} (server answering) -> primary breakers closed: read {}, write \
                 {} (bounds: open duration in force + one probe interval = {} / {})",
                show(read_closed_after),
                show(write_closed_after),
                ms(bounds[0]),
                ms(bounds[1])
            );
        }
        println!("role changes:");
        for role in &timeline.roles {
            let at = role.at.map_or_else(
                || "connect".to_owned(),
                |at| format!("{:.3} s", at.as_secs_f64()),
            );
            println!(
                "  {at:>9}  {} is {} (was {})",
                role.endpoint,
                role_name(role.to),
                role_name(role.from)
            );
        }
        println!("breaker transitions:");
        for change in &timeline.changes {
            println!(
                "  {:>7.3} s  {} breaker on {}: {} -> {}",
                change.at.as_secs_f64(),
                change.route,
                change.endpoint,
                change.from,
                change.to
            );
        }
    }

    let label = match timeline.contender {
        Contender::ProtectedPool => "",
        Contender::SqlxPgPool => " (baseline; the targets are protected-pool's)",
    };
    let promotion_targets = match timeline.fault {
        Fault::Promote => promotion_report(timeline, resumed),
        Fault::Kill | Fault::Pause => Vec::new(),
    };
    println!("\ntargets{label}:");
    // A read refused by every breaker failed as much as one that reached a dead server.
    let failed_reads = count(&|s| reads(s) && !matches!(s.outcome, Outcome::Ok(_)));
    let mut lines = Vec::new();
    match timeline.fault {
        Fault::Promote => {
            lines.extend(promotion_targets);
            lines.push(target(
                failed_reads == 0,
                format!("0 failed reads: {}", thousands(failed_reads)),
            ));
            let outage_p99 = percentile(&outage_reads, 99.0);
            lines.push(format!(
                "INFO  p99 read latency from the kill to the first write that succeeded: {}",
                show(outage_p99)
            ));
        }
        Fault::Kill => {
            lines.push(target(
                failed_reads == 0,
                format!("0 failed reads: {}", thousands(failed_reads)),
            ));
            let outage_p99 = percentile(&outage_reads, 99.0);
            lines.push(target(
                outage_p99.is_some_and(|p| p <= Duration::from_millis(50)),
                format!(
                    "p99 read latency during the outage <= 50 ms: {}",
                    show(outage_p99)
                ),
            ));
            if !protected {
                lines.push(format!(
                    "n/a   breaker targets: a plain PgPool has no breaker; writes during the \
                     outage: {}",
                    latencies(samples, |s| writes(s)
                        && s.at >= fault_at
                        && s.at < recover_done)
                    .0
                ));
                for line in lines {
                    println!("{line}");
                }
                return;
            }
            let mut fast: Vec<Duration> = samples
                .iter()
                .filter(|s| {
                    writes(s)
                        && write_open.is_some_and(|open| s.at >= open.at)
                        && s.at < recover_done
                })
                .map(|s| s.latency)
                .collect();
            fast.sort();
            let fast_p99 = percentile(&fast, 99.0);
            lines.push(target(
                fast_p99.is_some_and(|p| p <= Duration::from_millis(1)),
                format!(
                    "writes fail fast once the write breaker is open, p99 <= 1 ms: {} (n={})",
                    show(fast_p99),
                    fast.len()
                ),
            ));
            for (route, after) in [
                (Route::Read, read_open_after),
                (Route::Write, write_open_after),
            ] {
                lines.push(target(
                    after.is_some_and(|d| d <= Duration::from_millis(50))
                        && before_rate >= 1000.0,
                    format!(
                        "kill -> {route} breaker open <= 50 ms at >= 1,000 reads/s: {} at {:.0} reads/s",
                        show(after),
                        before_rate
                    ),
                ));
            }
            for (index, (route, after)) in [
                (Route::Read, read_closed_after),
                (Route::Write, write_closed_after),
            ]
            .into_iter()
            .enumerate()
            {
                lines.push(target(
                    after.is_some_and(|d| d <= bounds[index]),
                    format!(
                        "restart -> {route} breaker closed <= open duration + probe interval \
                         ({}): {}",
                        ms(bounds[index]),
                        show(after)
                    ),
                ));
            }
        }
        Fault::Pause => {
            for (route, limit) in [(Route::Read, READ_TIMEOUT), (Route::Write, WRITE_TIMEOUT)] {
                let longest = samples
                    .iter()
                    .filter(|s| s.route == route)
                    .map(|s| s.latency)
                    .max()
                    .unwrap_or_default();
                let over = samples
                    .iter()
                    .filter(|s| s.route == route && s.latency > limit + TIMEOUT_SLACK)
                    .count();
                lines.push(target(
                    over == 0,
                    format!(
                        "no {route} waits past its {} s operation timeout (+{} ms slack): \
                         longest {}, {over} over",
                        limit.as_secs(),
                        TIMEOUT_SLACK.as_millis(),
                        ms(longest)
                    ),
                ));
            }
            lines.push(format!(
                "INFO  failed reads: {}; p99 read latency during the hang: {}",
                thousands(failed_reads),
                show(percentile(&outage_reads, 99.0))
            ));
        }
    }
    for line in lines {
        println!("{line}");
    }
}

// ---- chart and CSV ---------------------------------------------------------------------------

/// One kind of point on the chart.
struct Series {
    label: &'static str,
    /// Another label for the promotion scenario, where "the primary" is first one server and
    /// then the other.
    promoted_label: Option<&'static str>,
    color: RGBColor,
    read: bool,
    keep: fn(&Sample) -> bool,
}

const SERIES: [Series; 7] = [
    Series {
        label: "read served by the primary",
        promoted_label: Some("read served by the primary (old, then promoted)"),
        color: RGBColor(31, 119, 180),
        read: true,
        keep: |s| s.route == Route::Read && s.outcome == Outcome::Ok(Served::Primary),
    },
    Series {
        label: "read served by the replica",
        promoted_label: None,
        color: RGBColor(44, 160, 44),
        read: true,
        keep: |s| s.route == Route::Read && s.outcome == Outcome::Ok(Served::Replica),
    },
    Series {
        label: "read failed",
        promoted_label: None,
        color: RGBColor(214, 39, 40),
        read: true,
        keep: |s| s.route == Route::Read && matches!(s.outcome, Outcome::Failed(_)),
    },
    Series {
        label: "read refused (all breakers open)",
        promoted_label: None,
        color: RGBColor(255, 127, 14),
        read: true,
        keep: |s| s.route == Route::Read && s.outcome == Outcome::CircuitOpen,
    },
    Series {
        label: "write ok",
        promoted_label: Some("write ok (old, then promoted primary)"),
        color: RGBColor(148, 103, 189),
        read: false,
        keep: |s| s.route == Route::Write && matches!(s.outcome, Outcome::Ok(_)),
    },
    Series {
        label: "write failed",
        promoted_label: None,
        color: RGBColor(140, 20, 20),
        read: false,
        keep: |s| s.route == Route::Write && matches!(s.outcome, Outcome::Failed(_)),
    },
    Series {
        label: "write refused (breaker open)",
        promoted_label: None,
        color: RGBColor(230, 171, 2),
        read: false,
        keep: |s| s.route == Route::Write && s.outcome == Outcome::CircuitOpen,
    },
];

/// Chart size in pixels.
const CHART: (u32, u32) = (1280, 720);

/// Draws the chart into memory and writes it as a PNG with the strongest compression (plotters'
/// own encoder writes files about a third larger).
fn render(timeline: &Timeline, path: &Path) -> Result<(), BoxError> {
    let mut pixels = vec![0_u8; CHART.0 as usize * CHART.1 as usize * 3];
    draw(timeline, &mut pixels).map_err(|error| format!("drawing {}: {error}", path.display()))?;
    let file = std::fs::File::create(path)
        .map_err(|error| format!("creating {}: {error}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), CHART.0, CHART.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&pixels)?;
    writer.finish()?;
    Ok(())
}

fn draw(timeline: &Timeline, pixels: &mut [u8]) -> Result<(), BoxError> {
    let draw_error = |error: &dyn std::fmt::Display| error.to_string();
    let root = BitMapBackend::with_buffer(pixels, CHART).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_error(&e))?;
    let longest_ms = timeline
        .samples
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .fold(1.0, f64::max);
    let (y_min, y_max) = (0.001, (longest_ms * 3.0).max(3_000.0));
    let x_max = timeline
        .end
        .as_secs_f64()
        .max(timeline.fault.end_at().as_secs_f64());
    let title = format!(
        "{}: {} ({} reads, {} writes)",
        timeline.contender.name(),
        timeline.fault.describe(),
        thousands(
            timeline
                .samples
                .iter()
                .filter(|s| s.route == Route::Read)
                .count() as u64
        ),
        thousands(
            timeline
                .samples
                .iter()
                .filter(|s| s.route == Route::Write)
                .count() as u64
        ),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(|e| draw_error(&e))?;
    chart
        .configure_mesh()
        .x_desc("time since the load started (s)")
        .y_desc("latency of each call (ms, log scale)")
        .x_labels(13)
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| draw_error(&e))?;

    // Operation timeouts (protected-pool only: sqlx's pool has none by default).
    if timeline.contender == Contender::ProtectedPool {
        for (label, limit) in [
            ("read timeout", READ_TIMEOUT),
            ("write timeout", WRITE_TIMEOUT),
        ] {
            let y = limit.as_secs_f64() * 1000.0;
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, y), (x_max, y)],
                    6,
                    4,
                    RGBColor(120, 120, 120).stroke_width(1),
                ))
                .map_err(|e| draw_error(&e))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{label} {} s", limit.as_secs()),
                    (0.1, y * 1.15),
                    ("sans-serif", 16).into_font().color(&RGBColor(90, 90, 90)),
                )))
                .map_err(|e| draw_error(&e))?;
        }
    }

    for series in &SERIES {
        let points: Vec<(f64, f64)> = timeline
            .samples
            .iter()
            .filter(|s| (series.keep)(s))
            .map(|s| {
                (
                    s.at.as_secs_f64(),
                    (s.latency.as_secs_f64() * 1000.0).clamp(y_min, y_max),
                )
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let color = series.color;
        // Opaque: the PNG stays small enough to keep in the repository.
        let style = color.filled();
        let name = match (timeline.fault, series.promoted_label) {
            (Fault::Promote, Some(name)) => name,
            _ => series.label,
        };
        let label = format!("{name} ({})", thousands(points.len() as u64));
        if series.read {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 2, style)))
                .map_err(|e| draw_error(&e))?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
        } else {
            chart
                .draw_series(points.iter().map(|&p| TriangleMarker::new(p, 4, style)))
                .map_err(|e| draw_error(&e))?
                .label(label)
                .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
        }
    }

    // Fault and recovery; for a promotion also a thin line where pg_promote was issued (it
    // returns once the standby takes writes).
    let (dark, green) = (RGBColor(0, 0, 0), RGBColor(0, 90, 0));
    let mut marks = vec![(
        timeline.fault_at,
        match timeline.fault {
            Fault::Kill | Fault::Promote => "primary killed (-9)",
            Fault::Pause => "primary hung (SIGSTOP)",
        },
        dark,
        3,
    )];
    match timeline.fault {
        Fault::Kill => marks.push((timeline.recover_done, "primary started again", green, 3)),
        Fault::Pause => marks.push((timeline.recover_done, "primary resumed (SIGCONT)", green, 3)),
        Fault::Promote => marks.extend([
            (timeline.recover_at, "pg_promote issued", green, 1),
            (
                timeline.recover_done,
                "standby promoted (pg_promote returned)",
                green,
                3,
            ),
        ]),
    }
    for (at, label, color, width) in marks {
        let x = at.as_secs_f64();
        chart
            .draw_series(LineSeries::new(
                [(x, y_min), (x, y_max)],
                color.stroke_width(width),
            ))
            .map_err(|e| draw_error(&e))?
            .label(format!("{label} at {x:.2} s"))
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width))
            });
    }

    // Roles the pool discovered while the load ran (promotion only): dotted, full height.
    for role in timeline
        .roles
        .iter()
        .filter(|_| timeline.fault == Fault::Promote)
    {
        let Some(at) = role.at else { continue };
        let x = at.as_secs_f64();
        let color = match role.to {
            Some(Role::Primary) => RGBColor(23, 190, 207),
            Some(Role::Replica) => RGBColor(127, 127, 127),
            None => RGBColor(188, 189, 34),
        };
        chart
            .draw_series(DashedLineSeries::new(
                [(x, y_min), (x, y_max)],
                2,
                3,
                color.stroke_width(2),
            ))
            .map_err(|e| draw_error(&e))?
            .label(format!(
                "pool: {} is {} at {x:.2} s (health checks every {} ms)",
                role.endpoint,
                role_name(role.to),
                timeline.health_interval.as_millis()
            ))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }

    // Breaker transitions (on the primary; on any endpoint after a promotion): colour by new
    // state, solid for the read breaker, dashed for the write breaker, each kind labelled once.
    let state_color = |state: State| match state {
        State::Open | State::ForcedOpen => RGBColor(214, 39, 40),
        State::HalfOpen => RGBColor(255, 160, 0),
        State::Closed | State::Disabled => RGBColor(44, 160, 44),
    };
    let mut labelled: Vec<(&str, Route, State)> = Vec::new();
    for change in timeline
        .changes
        .iter()
        .filter(|c| timeline.fault == Fault::Promote || c.endpoint == "primary")
    {
        let x = change.at.as_secs_f64();
        let color = state_color(change.to);
        let key = (change.endpoint.as_str(), change.route, change.to);
        let first = !labelled.contains(&key);
        let label = if timeline.fault == Fault::Promote {
            format!(
                "{} {} breaker -> {}",
                change.endpoint, change.route, change.to
            )
        } else {
            format!("{} breaker -> {}", change.route, change.to)
        };
        // Read lines span the upper part of the chart, write lines the lower part, so the two
        // kinds stay apart when they coincide.
        let (low, high) = if change.route == Route::Read {
            (y_max / 1e3, y_max)
        } else {
            (y_min, y_min * 1e3)
        };
        let annotation = if change.route == Route::Read {
            chart
                .draw_series(LineSeries::new(
                    [(x, low), (x, high)],
                    color.mix(0.8).stroke_width(2),
                ))
                .map_err(|e| draw_error(&e))?
        } else {
            chart
                .draw_series(DashedLineSeries::new(
                    [(x, low), (x, high)],
                    5,
                    3,
                    color.mix(0.8).stroke_width(2),
                ))
                .map_err(|e| draw_error(&e))?
        };
        if first {
            labelled.push(key);
            let read = change.route == Route::Read;
            annotation.label(label).legend(move |(x, y)| {
                if read {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)).into_dyn()
                } else {
                    PathElement::new([(x, y), (x + 6, y)], color.stroke_width(2)).into_dyn()
                }
            });
        }
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(|e| draw_error(&e))?;
    root.present().map_err(|e| draw_error(&e))?;
    Ok(())
}

fn write_csv(timeline: &Timeline, path: &Path) -> Result<(), BoxError> {
    let mut text = String::from("# t_s,route,outcome,served_by,latency_ms\n");
    for s in &timeline.samples {
        let (outcome, served) = match s.outcome {
            Outcome::Ok(Served::Primary) => ("ok", "primary"),
            Outcome::Ok(Served::Replica) => ("ok", "replica"),
            Outcome::CircuitOpen => ("circuit_open", ""),
            Outcome::Failed(class) => (class, ""),
        };
        writeln!(
            text,
            "{:.6},{},{outcome},{served},{:.4}",
            s.at.as_secs_f64(),
            s.route,
            s.latency.as_secs_f64() * 1000.0
        )?;
    }
    text.push_str("# breaker transitions: t_s,route,endpoint,from,to\n");
    for c in &timeline.changes {
        writeln!(
            text,
            "# {:.6},{},{},{},{}",
            c.at.as_secs_f64(),
            c.route,
            c.endpoint,
            c.from,
            c.to
        )?;
    }
    text.push_str("# role changes: t_s (empty: when the pool connected),endpoint,from,to\n");
    for role in &timeline.roles {
        writeln!(
            text,
            "# {},{},{},{}",
            role.at
                .map_or_else(String::new, |at| format!("{:.6}", at.as_secs_f64())),
            role.endpoint,
            role_name(role.from),
            role_name(role.to)
        )?;
    }
    std::fs::write(path, text).map_err(|error| format!("writing {}: {error}", path.display()))?;
    Ok(())
}
