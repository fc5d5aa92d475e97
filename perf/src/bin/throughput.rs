//! Pool throughput: protected-pool against sqlx's `PgPool` and deadpool-postgres, with pgbench
//! as the libpq reference.
//!
//! One throwaway PostgreSQL server, a 10,000-row table, 16 concurrent tasks over 8 pooled
//! connections, two workloads (`SELECT 1` and a primary-key lookup of a random id). Each
//! contender runs in a child process of its own (this binary again, `child ...`) so that its
//! peak RSS is its own; contenders take turns within each round (A B C D A B C D ...).
//!
//! `cargo run --release --manifest-path perf/Cargo.toml --bin throughput -- --help`

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protected_pool::{EndpointOptions, ProtectedPool};
use protected_pool_perf::{
    BoxError, Flags, TABLE_ROWS, TABLE_SQL, Usage, children_peak_rss_kib, cpu_time,
    machine_summary, median, peak_rss_kib, thousands, wait_quiet_as_documented,
};
use protected_pool_testkit::PgServer;

/// Concurrent tasks (and pgbench clients).
const TASKS: usize = 16;
/// Connections per pool.
const POOL_SIZE: usize = 8;

const USAGE: &str = "\
usage: throughput [--rounds N] [--seconds S] [--warmup S] [--workloads select1,pk]
                  [--contenders protected-pool,sqlx-pgpool,sqlx-pgpool-noping,
                                deadpool-postgres,pgbench]
                  [--wrap 'COMMAND ARGS'] [--wait-quiet]

  --rounds       rounds; every contender runs once per round and workload (default 5)
  --seconds      measured seconds per run (default 5)
  --warmup       unmeasured seconds before each run (default 1)
  --wrap         run each Rust contender's child under COMMAND (split at spaces; {run}
                 becomes <contender>-<workload>), e.g. for a profile:
                 --wrap 'perf record -F 1999 --call-graph dwarf,16384 -o out/{run}.perf.data --'
  --wait-quiet   first wait until the 1-minute load average is below 0.5 (up to 15 min)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    ProtectedPool,
    SqlxPgPool,
    /// sqlx's pool without its ping on every checkout: what sqlx's driver and pool do without
    /// that round trip (a reference, not one of the contenders).
    SqlxPgPoolNoPing,
    DeadpoolPostgres,
    Pgbench,
}

impl Contender {
    const ALL: [Contender; 5] = [
        Self::ProtectedPool,
        Self::SqlxPgPool,
        Self::SqlxPgPoolNoPing,
        Self::DeadpoolPostgres,
        Self::Pgbench,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::ProtectedPool => "protected-pool",
            Self::SqlxPgPool => "sqlx-pgpool",
            Self::SqlxPgPoolNoPing => "sqlx-pgpool-noping",
            Self::DeadpoolPostgres => "deadpool-postgres",
            Self::Pgbench => "pgbench",
        }
    }

    fn from_name(name: &str) -> Result<Self, BoxError> {
        Self::ALL
            .into_iter()
            .find(|contender| contender.name() == name)
            .ok_or_else(|| format!("no contender {name:?}\n{USAGE}").into())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Select1,
    PkLookup,
}

impl Workload {
    const ALL: [Workload; 2] = [Self::Select1, Self::PkLookup];

    fn name(self) -> &'static str {
        match self {
            Self::Select1 => "select1",
            Self::PkLookup => "pk",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Select1 => "SELECT 1",
            Self::PkLookup => "primary-key lookup (random id of 10,000 rows)",
        }
    }

    fn from_name(name: &str) -> Result<Self, BoxError> {
        Self::ALL
            .into_iter()
            .find(|workload| workload.name() == name)
            .ok_or_else(|| format!("no workload {name:?}\n{USAGE}").into())
    }

    /// The statement every Rust contender runs (`$1` is the id).
    fn sql(self) -> &'static str {
        match self {
            Self::Select1 => "SELECT 1",
            Self::PkLookup => "SELECT value FROM bench_items WHERE id = $1",
        }
    }

    /// The same statement as a pgbench script.
    fn pgbench_script(self) -> String {
        match self {
            Self::Select1 => "SELECT 1;\n".to_owned(),
            Self::PkLookup => format!(
                "\\set id random(1, {TABLE_ROWS})\nSELECT value FROM bench_items WHERE id = :id;\n"
            ),
        }
    }
}

/// What one child run measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    queries: u64,
    seconds: f64,
    /// CPU time (user + system) the client used in the measured span.
    cpu_seconds: f64,
    rss_kib: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.queries as f64 / self.seconds
    }

    /// Client CPU per query, in microseconds.
    fn cpu_us_per_query(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.queries.max(1) as f64
    }

    fn to_line(self) -> String {
        format!(
            "RESULT queries={} seconds={} cpu_seconds={} rss_kib={}",
            self.queries, self.seconds, self.cpu_seconds, self.rss_kib
        )
    }

    fn from_output(stdout: &str) -> Result<Self, BoxError> {
        let line = stdout
            .lines()
            .find_map(|line| line.strip_prefix("RESULT "))
            .ok_or_else(|| format!("the child printed no RESULT line; its output:\n{stdout}"))?;
        let field = |name: &str| -> Result<&str, BoxError> {
            line.split_whitespace()
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| format!("no {name} in {line:?}").into())
        };
        Ok(Self {
            queries: field("queries")?.parse()?,
            seconds: field("seconds")?.parse()?,
            cpu_seconds: field("cpu_seconds")?.parse()?,
            rss_kib: field("rss_kib")?.parse()?,
        })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().is_some_and(|arg| arg == "child") {
        child(&args[1..])
    } else {
        orchestrate(args)
    };
    if let Err(error) = result {
        eprintln!("throughput: {error}");
        std::process::exit(1);
    }
}

// ---- the orchestrating process ---------------------------------------------------------------

struct Plan {
    rounds: usize,
    seconds: u64,
    warmup: u64,
    workloads: Vec<Workload>,
    contenders: Vec<Contender>,
    wrap: Option<String>,
}

fn orchestrate(args: Vec<String>) -> Result<(), BoxError> {
    let mut flags = Flags::parse(args, &["wait-quiet"], USAGE)?;
    let list = |value: String| -> Vec<String> {
        value
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let plan = Plan {
        rounds: flags.value("rounds", 5)?,
        seconds: flags.value("seconds", 5)?,
        warmup: flags.value("warmup", 1)?,
        workloads: list(flags.value("workloads", "select1,pk".to_owned())?)
            .iter()
            .map(|name| Workload::from_name(name))
            .collect::<Result<_, _>>()?,
        contenders: list(flags.value(
            "contenders",
            "protected-pool,sqlx-pgpool,sqlx-pgpool-noping,deadpool-postgres,pgbench".to_owned(),
        )?)
        .iter()
        .map(|name| Contender::from_name(name))
        .collect::<Result<_, _>>()?,
        wrap: flags
            .value("wrap", String::new())
            .map(|wrap| Some(wrap).filter(|wrap| !wrap.trim().is_empty()))?,
    };
    let wait_quiet = flags.switch("wait-quiet");
    flags.finish(USAGE)?;
    if plan.rounds == 0 || plan.seconds == 0 {
        return Err(format!("--rounds and --seconds must be at least 1\n{USAGE}").into());
    }
    if wait_quiet {
        wait_quiet_as_documented()?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(orchestrate_async(plan))
}

async fn orchestrate_async(plan: Plan) -> Result<(), BoxError> {
    println!("machine: {}", machine_summary());
    let server = PgServer::start()
        .await
        .map_err(|error| format!("starting the PostgreSQL server: {error}"))?;
    server
        .psql(TABLE_SQL)
        .await
        .map_err(|error| format!("creating the benchmark table: {error}"))?;
    let version = server.psql("SHOW server_version").await?;
    println!(
        "server: PostgreSQL {version} on 127.0.0.1:{} (harness settings: fsync off, \
         synchronous_commit off); {TASKS} tasks, {POOL_SIZE} connections per pool; \
         {} rounds x {} s measured after {} s warm-up, each contender in its own process",
        server.port(),
        plan.rounds,
        plan.seconds,
        plan.warmup
    );
    let exe = std::env::current_exe()?;
    let mut all = Vec::new();
    for &workload in &plan.workloads {
        let script = server
            .root_dir()
            .join(format!("pgbench-{}.sql", workload.name()));
        std::fs::write(&script, workload.pgbench_script())
            .map_err(|error| format!("writing {}: {error}", script.display()))?;
        println!("\n## {}\n", workload.title());
        print!("| round |");
        for contender in &plan.contenders {
            print!(" {} |", contender.name());
        }
        println!();
        println!("|---|{}", "---|".repeat(plan.contenders.len()));
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); plan.contenders.len()];
        for round in 1..=plan.rounds {
            print!("| {round} |");
            for (index, &contender) in plan.contenders.iter().enumerate() {
                let mut command = match &plan.wrap {
                    Some(wrap) if contender != Contender::Pgbench => {
                        let run = format!("{}-{}", contender.name(), workload.name());
                        let mut words = wrap.split_whitespace().map(|w| w.replace("{run}", &run));
                        let program = words.next().unwrap_or_default();
                        let mut command = tokio::process::Command::new(program);
                        command.args(words).arg(&exe);
                        command
                    }
                    _ => tokio::process::Command::new(&exe),
                };
                command
                    .arg("child")
                    .arg(contender.name())
                    .arg(workload.name())
                    .arg(plan.seconds.to_string())
                    .arg(plan.warmup.to_string());
                if contender == Contender::Pgbench {
                    command
                        .arg(server.bin_dir())
                        .arg(server.port().to_string())
                        .arg(&script);
                } else {
                    command.arg(server.url());
                }
                let output = command
                    .stdin(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()
                    .await
                    .map_err(|error| format!("running the {} child: {error}", contender.name()))?;
                let stdout = String::from_utf8_lossy(&output.stdout);
                if !output.status.success() {
                    return Err(format!(
                        "the {} child failed ({}); its output:\n{stdout}",
                        contender.name(),
                        output.status
                    )
                    .into());
                }
                let run = Run::from_output(&stdout)?;
                print!(" {} |", thousands(run.rate().round() as u64));
                use std::io::Write as _;
                std::io::stdout().flush()?;
                runs[index].push(run);
            }
            println!();
        }
        all.push((workload, runs));
    }
    summarize(&plan, &all);
    println!("\nmachine after the runs: {}", machine_summary());
    Ok(())
}

/// Median q/s of each contender in each workload, the ratios, the peak RSS, the targets.
fn summarize(plan: &Plan, all: &[(Workload, Vec<Vec<Run>>)]) {
    let find = |runs: &[Vec<Run>], wanted: Contender| -> Option<f64> {
        let index = plan.contenders.iter().position(|&c| c == wanted)?;
        median(&runs[index].iter().map(Run::rate).collect::<Vec<_>>())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    };
    let mut checks = Vec::new();
    for (workload, runs) in all {
        println!(
            "\n## {}: median of {} rounds\n",
            workload.title(),
            plan.rounds
        );
        println!(
            "| contender | median q/s | min | max | vs sqlx PgPool | vs deadpool-postgres | of pgbench | client CPU per query | peak RSS |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let sqlx = find(runs, Contender::SqlxPgPool);
        let deadpool = find(runs, Contender::DeadpoolPostgres);
        let pgbench = find(runs, Contender::Pgbench);
        for (index, contender) in plan.contenders.iter().enumerate() {
            let rates: Vec<f64> = runs[index].iter().map(Run::rate).collect();
            let med = median(&rates);
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rates.iter().copied().fold(0.0, f64::max);
            let rss = runs[index].iter().map(|run| run.rss_kib).max().unwrap_or(0);
            let cpu = median(
                &runs[index]
                    .iter()
                    .map(Run::cpu_us_per_query)
                    .collect::<Vec<_>>(),
            )
            .unwrap_or(0.0);
            let of_pgbench = match (med, pgbench) {
                (Some(a), Some(b)) => format!("{:.0} %", a / b * 100.0),
                _ => "-".to_owned(),
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {cpu:.1} µs | {:.1} MiB |",
                contender.name(),
                thousands(med.unwrap_or(0.0).round() as u64),
                thousands(min.round() as u64),
                thousands(max.round() as u64),
                ratio(med, sqlx),
                ratio(med, deadpool),
                of_pgbench,
                rss as f64 / 1024.0
            );
        }
        let ours = find(runs, Contender::ProtectedPool);
        if *workload == Workload::Select1 {
            if let (Some(ours), Some(sqlx)) = (ours, sqlx) {
                checks.push(target(
                    ours / sqlx >= 2.5,
                    format!(
                        "protected-pool >= 2.5x sqlx PgPool (defaults) on SELECT 1: {:.2}x",
                        ours / sqlx
                    ),
                ));
            }
            if let (Some(ours), Some(deadpool)) = (ours, deadpool) {
                checks.push(target(
                    ours / deadpool >= 1.0,
                    format!(
                        "protected-pool >= 1.0x deadpool-postgres on SELECT 1: {:.2}x",
                        ours / deadpool
                    ),
                ));
            }
        }
        if let (Some(ours), Some(pgbench)) = (ours, pgbench) {
            checks.push(format!(
                "INFO  protected-pool reaches {:.0} % of pgbench -c {TASKS} on {}",
                ours / pgbench * 100.0,
                workload.title()
            ));
        }
    }
    println!("\n## Targets\n");
    for check in checks {
        println!("{check}");
    }
}

fn target(met: bool, what: String) -> String {
    format!("{}  {what}", if met { "PASS" } else { "MISS" })
}

// ---- a child: one contender, one workload, one run -------------------------------------------

fn child(args: &[String]) -> Result<(), BoxError> {
    let usage =
        "child <contender> <workload> <seconds> <warmup> (<url> | <bin_dir> <port> <script>)";
    let [contender, workload, seconds, warmup, rest @ ..] = args else {
        return Err(usage.into());
    };
    let contender = Contender::from_name(contender)?;
    let workload = Workload::from_name(workload)?;
    let seconds = Duration::from_secs(seconds.parse()?);
    let warmup = Duration::from_secs(warmup.parse()?);
    let run = match (contender, rest) {
        (Contender::Pgbench, [bin_dir, port, script]) => {
            run_pgbench(bin_dir, port, script, seconds, warmup)?
        }
        (Contender::Pgbench, _) => return Err(usage.into()),
        (_, [url]) => {
            // The same runtime for every Rust contender: tokio's multi-threaded default, one
            // worker per CPU.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let measured = runtime.block_on(run_rust(contender, workload, url, seconds, warmup))?;
            drop(runtime);
            Run {
                rss_kib: peak_rss_kib()?,
                ..measured
            }
        }
        _ => return Err(usage.into()),
    };
    println!("{}", run.to_line());
    Ok(())
}

async fn run_rust(
    contender: Contender,
    workload: Workload,
    url: &str,
    seconds: Duration,
    warmup: Duration,
) -> Result<Run, BoxError> {
    let sql = workload.sql();
    match contender {
        Contender::ProtectedPool => {
            let pool: ProtectedPool = ProtectedPool::builder()
                .primary(url)
                .endpoint_options(EndpointOptions {
                    max_connections: POOL_SIZE,
                    ..EndpointOptions::default()
                })
                .connect()
                .await?;
            let measured = drive(workload, seconds, warmup, move |id| {
                let pool = pool.clone();
                async move {
                    match workload {
                        Workload::Select1 => pool
                            .read(sqlx::query_scalar::<_, i32>(sql))
                            .fetch_one()
                            .await
                            .map(drop),
                        Workload::PkLookup => pool
                            .read(sqlx::query_scalar::<_, i64>(sql).bind(id))
                            .fetch_one()
                            .await
                            .map(drop),
                    }
                    .map_err(|error| error.to_string())
                }
            })
            .await?;
            Ok(measured)
        }
        Contender::SqlxPgPool | Contender::SqlxPgPoolNoPing => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(POOL_SIZE as u32)
                // Default: true (a ping before every checkout).
                .test_before_acquire(contender == Contender::SqlxPgPool)
                .connect(url)
                .await?;
            let measured = drive(workload, seconds, warmup, {
                let pool = pool.clone();
                move |id| {
                    let pool = pool.clone();
                    async move {
                        match workload {
                            Workload::Select1 => sqlx::query_scalar::<_, i32>(sql)
                                .fetch_one(&pool)
                                .await
                                .map(drop),
                            Workload::PkLookup => sqlx::query_scalar::<_, i64>(sql)
                                .bind(id)
                                .fetch_one(&pool)
                                .await
                                .map(drop),
                        }
                        .map_err(|error| error.to_string())
                    }
                }
            })
            .await?;
            pool.close().await;
            Ok(measured)
        }
        Contender::DeadpoolPostgres => {
            use deadpool_postgres::{
                Config, ManagerConfig, PoolConfig, RecyclingMethod, Runtime, tokio_postgres,
            };
            // As deadpool-postgres's documentation recommends: fast recycling (no query on
            // checkout) and statements prepared once per connection (`prepare_cached`).
            let mut config = Config::new();
            config.url = Some(url.to_owned());
            config.manager = Some(ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            });
            config.pool = Some(PoolConfig::new(POOL_SIZE));
            let pool = config.create_pool(Some(Runtime::Tokio1), tokio_postgres::NoTls)?;
            drop(pool.get().await?); // fail now if the server cannot be reached
            let measured = drive(workload, seconds, warmup, move |id| {
                let pool = pool.clone();
                async move {
                    let client = pool.get().await.map_err(|error| error.to_string())?;
                    let statement = client
                        .prepare_cached(sql)
                        .await
                        .map_err(|error| error.to_string())?;
                    match workload {
                        Workload::Select1 => client.query_one(&statement, &[]).await.map(|row| {
                            let _: i32 = row.get(0);
                        }),
                        Workload::PkLookup => {
                            client.query_one(&statement, &[&id]).await.map(|row| {
                                let _: i64 = row.get(0);
                            })
                        }
                    }
                    .map_err(|error| error.to_string())
                }
            })
            .await?;
            Ok(measured)
        }
        Contender::Pgbench => unreachable!("pgbench is not a Rust contender"),
    }
}

/// Runs `operation` in [`TASKS`] tasks back to back: `warmup` unmeasured, then `seconds`
/// measured. Returns the queries completed in the measured span, its length and the CPU time
/// the process used in it (peak RSS left at 0).
async fn drive<F, Fut>(
    workload: Workload,
    seconds: Duration,
    warmup: Duration,
    operation: F,
) -> Result<Run, BoxError>
where
    F: Fn(i32) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let (operation, done, stop) = (operation.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(task as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                let id = match workload {
                    Workload::Select1 => 0,
                    Workload::PkLookup => rng.i32(1..=TABLE_ROWS),
                };
                operation(id).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    tokio::time::sleep(warmup).await;
    let (before, started) = (done.load(Ordering::Relaxed), Instant::now());
    let cpu_before = cpu_time(Usage::SelfProcess)?;
    tokio::time::sleep(seconds).await;
    let (after, measured) = (done.load(Ordering::Relaxed), started.elapsed());
    let cpu = cpu_time(Usage::SelfProcess)? - cpu_before;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?
            .map_err(|error| format!("a query failed: {error}"))?;
    }
    Ok(Run {
        queries: after - before,
        seconds: measured.as_secs_f64(),
        cpu_seconds: cpu.as_secs_f64(),
        rss_kib: 0,
    })
}

/// pgbench with the same concurrency (16 clients on 2 threads, prepared statements): one
/// unmeasured warm-up run, then the measured one. Its peak RSS is this process's children's.
fn run_pgbench(
    bin_dir: &str,
    port: &str,
    script: &str,
    seconds: Duration,
    warmup: Duration,
) -> Result<Run, BoxError> {
    let pgbench = |duration: Duration| -> Result<String, BoxError> {
        let mut command = std::process::Command::new(format!("{bin_dir}/pgbench"));
        command.env_clear();
        for var in ["PATH", "LD_LIBRARY_PATH"] {
            if let Some(value) = std::env::var_os(var) {
                command.env(var, value);
            }
        }
        let output = command
            .env("LC_ALL", "C")
            .args(["-n", "-M", "prepared", "-c", &TASKS.to_string(), "-j", "2"])
            .args(["-T", &duration.as_secs().max(1).to_string(), "-f", script])
            .args(["-h", "127.0.0.1", "-p", port, "-U", "postgres", "postgres"])
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("running {bin_dir}/pgbench: {error}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(format!(
                "pgbench failed ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        Ok(stdout)
    };
    if !warmup.is_zero() {
        pgbench(warmup)?;
    }
    let cpu_before = cpu_time(Usage::Children)?;
    let report = pgbench(seconds)?;
    let cpu = cpu_time(Usage::Children)? - cpu_before;
    let find = |prefix: &str| -> Result<f64, BoxError> {
        let line = report
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .ok_or_else(|| format!("no {prefix:?} line in pgbench's report:\n{report}"))?;
        let number = line.split_whitespace().next().unwrap_or_default();
        Ok(number
            .parse()
            .map_err(|error| format!("{prefix}{line}: {error}"))?)
    };
    let queries = find("number of transactions actually processed: ")?;
    let tps = find("tps = ")?;
    Ok(Run {
        queries: queries as u64,
        seconds: queries / tps,
        cpu_seconds: cpu.as_secs_f64(),
        rss_kib: children_peak_rss_kib()?,
    })
}
