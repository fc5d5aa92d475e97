//! Pool throughput: protected-pool against the engine it is built on (deadpool over sqlx's
//! `PgConnection`, no checkout check), sqlx's `PgPool` and deadpool-postgres, with pgbench as
//! the libpq reference.
//!
//! One throwaway PostgreSQL server, a 10,000-row table, four shapes of concurrent tasks over
//! pooled connections (1/1, 16/1, 16/8, 256/16) and three workloads (`SELECT 1`, a primary-key
//! lookup of a random id, and the same lookup with protected-pool's cache on). Each contender
//! runs in a child process of its own (this binary again, `child ...`) so that its peak RSS is
//! its own; contenders take turns within each round (A B C D A B C D ...). Beside the peak, each
//! child reports what was resident when its measured span ended, split into the memory it wrote
//! (heap, task futures, stacks) and the pages mapped from its binary and libraries (code), so a
//! difference in peak RSS shows where it lies.
//!
//! `cargo run --release --manifest-path perf/Cargo.toml --bin throughput -- --help`

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protected_pool::{EndpointOptions, ProtectedPool};
use protected_pool_perf::{
    BareManager, BoxError, Flags, TABLE_ROWS, TABLE_SQL, Usage, children_peak_rss_kib, cpu_time,
    machine_summary, median, peak_rss_kib, status_kib, thousands, wait_quiet_as_documented,
};
use protected_pool_testkit::PgServer;

/// Issue 14's targets for protected-pool's read route, against the bare engine in the same run.
const READ_TARGET: f64 = 0.97;
/// The same with the read's cache on (every result stored).
const CACHED_TARGET: f64 = 0.95;
/// Added latency per call at one task on one connection, in microseconds.
const ADDED_LATENCY_TARGET_US: f64 = 2.0;
/// Peak RSS above the bare engine's, in KiB.
const ADDED_RSS_TARGET_KIB: u64 = 1024;

/// How long a cached result lives: longer than any run, so the cache fills up to its bound.
const CACHE_TTL: Duration = Duration::from_secs(600);

const DEFAULT_SHAPES: &str = "1x1,16x1,16x8,256x16";
const DEFAULT_WORKLOADS: &str = "select1,pk,pk-cached";
const DEFAULT_CONTENDERS: &str =
    "protected-pool,deadpool-sqlx,sqlx-pgpool,sqlx-pgpool-noping,deadpool-postgres,pgbench";

const USAGE: &str = "\
usage: throughput [--rounds N] [--seconds S | --queries N] [--warmup S]
                  [--shapes 1x1,16x1,16x8,256x16] [--workloads select1,pk,pk-cached]
                  [--contenders protected-pool,deadpool-sqlx,sqlx-pgpool,
                                sqlx-pgpool-noping,deadpool-postgres,pgbench]
                  [--wrap 'COMMAND ARGS'] [--wait-quiet]

  --rounds       rounds; every contender runs once per round, shape and workload (default 5)
  --seconds      measured seconds per run (default 5)
  --queries      measure a fixed number of queries per run instead of a time, e.g. to compare
                 instruction counts under callgrind (pgbench, which runs for a time, is left out)
  --warmup       unmeasured seconds before each run (default 1; 0 for none)
  --shapes       concurrent tasks x pooled connections (pgbench: one client per connection)
  --workloads    select1: SELECT 1; pk: a primary-key lookup of a random id; pk-cached: the same
                 lookup with protected-pool's read .cached(key, ttl) (the database answers, every
                 result is stored), against deadpool-sqlx's plain lookup (only those two run it)
  --wrap         run each Rust contender's child under COMMAND (split at spaces; {run}
                 becomes <contender>-<workload>-<shape>), e.g. for a profile:
                 --wrap 'valgrind --tool=callgrind --callgrind-out-file=out/{run}.callgrind'
  --wait-quiet   first wait until the 1-minute load average is below 0.5 (up to 15 min)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contender {
    ProtectedPool,
    /// The bare engine protected-pool stands on: deadpool 0.13's managed pool over sqlx's
    /// `PgConnection`, with a manager that checks nothing when it hands a connection out again.
    DeadpoolSqlx,
    SqlxPgPool,
    /// sqlx's pool without its ping on every checkout: what sqlx's driver and pool do without
    /// that round trip.
    SqlxPgPoolNoPing,
    DeadpoolPostgres,
    Pgbench,
}

impl Contender {
    const ALL: [Contender; 6] = [
        Self::ProtectedPool,
        Self::DeadpoolSqlx,
        Self::SqlxPgPool,
        Self::SqlxPgPoolNoPing,
        Self::DeadpoolPostgres,
        Self::Pgbench,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::ProtectedPool => "protected-pool",
            Self::DeadpoolSqlx => "deadpool-sqlx",
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
    /// The key lookup with protected-pool's cache on: the database answers every call, so the
    /// stored value is never served, and every result is serialized and stored.
    PkCached,
}

impl Workload {
    const ALL: [Workload; 3] = [Self::Select1, Self::PkLookup, Self::PkCached];

    fn name(self) -> &'static str {
        match self {
            Self::Select1 => "select1",
            Self::PkLookup => "pk",
            Self::PkCached => "pk-cached",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Select1 => "SELECT 1",
            Self::PkLookup => "primary-key lookup (random id of 10,000 rows)",
            Self::PkCached => "primary-key lookup, protected-pool's read cached",
        }
    }

    fn from_name(name: &str) -> Result<Self, BoxError> {
        Self::ALL
            .into_iter()
            .find(|workload| workload.name() == name)
            .ok_or_else(|| format!("no workload {name:?}\n{USAGE}").into())
    }

    /// Whether `contender` runs this workload. Only protected-pool has a cache: with it on,
    /// the comparison the target names is the bare engine's plain lookup, and the others'
    /// plain lookups are already in the `pk` workload.
    fn contends(self, contender: Contender) -> bool {
        match self {
            Self::Select1 | Self::PkLookup => true,
            Self::PkCached => matches!(
                contender,
                Contender::ProtectedPool | Contender::DeadpoolSqlx
            ),
        }
    }

    /// protected-pool's target against the bare engine.
    fn target(self) -> f64 {
        match self {
            Self::Select1 | Self::PkLookup => READ_TARGET,
            Self::PkCached => CACHED_TARGET,
        }
    }

    /// The statement every Rust contender runs (`$1` is the id).
    fn sql(self) -> &'static str {
        match self {
            Self::Select1 => "SELECT 1",
            Self::PkLookup | Self::PkCached => "SELECT value FROM bench_items WHERE id = $1",
        }
    }

    /// The same statement as a pgbench script.
    fn pgbench_script(self) -> String {
        match self {
            Self::Select1 => "SELECT 1;\n".to_owned(),
            Self::PkLookup | Self::PkCached => format!(
                "\\set id random(1, {TABLE_ROWS})\nSELECT value FROM bench_items WHERE id = :id;\n"
            ),
        }
    }
}

/// Concurrent tasks over pooled connections (pgbench: one client per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    tasks: usize,
    connections: usize,
}

impl Shape {
    /// `16x8`: 16 tasks, 8 connections.
    fn parse(text: &str) -> Result<Self, BoxError> {
        let parsed = text.split_once('x').and_then(|(tasks, connections)| {
            Some(Self {
                tasks: tasks.parse().ok()?,
                connections: connections.parse().ok()?,
            })
        });
        match parsed {
            Some(shape) if shape.tasks > 0 && shape.connections > 0 => Ok(shape),
            _ => Err(
                format!("no shape {text:?}: TASKSxCONNECTIONS, both at least 1\n{USAGE}").into(),
            ),
        }
    }

    fn name(self) -> String {
        format!("{}x{}", self.tasks, self.connections)
    }

    fn title(self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        format!(
            "{} on {}",
            plural(self.tasks, "task"),
            plural(self.connections, "connection")
        )
    }
}

/// How long a child measures: a time, or a number of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    Seconds(Duration),
    Queries(u64),
}

impl Budget {
    /// `5s` or `10000q`, as the child takes it.
    fn to_arg(self) -> String {
        match self {
            Self::Seconds(seconds) => format!("{}s", seconds.as_secs()),
            Self::Queries(queries) => format!("{queries}q"),
        }
    }

    fn from_arg(arg: &str) -> Result<Self, BoxError> {
        if let Some(seconds) = arg.strip_suffix('s') {
            Ok(Self::Seconds(Duration::from_secs(seconds.parse()?)))
        } else if let Some(queries) = arg.strip_suffix('q') {
            Ok(Self::Queries(queries.parse()?))
        } else {
            Err(format!("no budget {arg:?}: 5s or 10000q").into())
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
    /// What was resident at the end of the measured span, by kind (0 where not measured): the
    /// memory the process wrote (heap, stacks), and the pages mapped from files (code).
    anon_kib: u64,
    file_kib: u64,
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
            "RESULT queries={} seconds={} cpu_seconds={} rss_kib={} anon_kib={} file_kib={}",
            self.queries,
            self.seconds,
            self.cpu_seconds,
            self.rss_kib,
            self.anon_kib,
            self.file_kib
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
            anon_kib: field("anon_kib")?.parse()?,
            file_kib: field("file_kib")?.parse()?,
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
    budget: Budget,
    warmup: u64,
    shapes: Vec<Shape>,
    workloads: Vec<Workload>,
    contenders: Vec<Contender>,
    wrap: Option<String>,
}

/// One shape and workload: who ran it, and each contender's runs in round order.
struct Table {
    shape: Shape,
    workload: Workload,
    contenders: Vec<Contender>,
    runs: Vec<Vec<Run>>,
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
    let seconds: u64 = flags.value("seconds", 5)?;
    let queries: u64 = flags.value("queries", 0)?;
    let budget = if queries > 0 {
        Budget::Queries(queries)
    } else {
        Budget::Seconds(Duration::from_secs(seconds))
    };
    let mut contenders: Vec<Contender> =
        list(flags.value("contenders", DEFAULT_CONTENDERS.to_owned())?)
            .iter()
            .map(|name| Contender::from_name(name))
            .collect::<Result<_, _>>()?;
    if matches!(budget, Budget::Queries(_)) && contenders.contains(&Contender::Pgbench) {
        println!("--queries: pgbench runs for a time, so it is left out");
        contenders.retain(|&contender| contender != Contender::Pgbench);
    }
    let plan = Plan {
        rounds: flags.value("rounds", 5)?,
        budget,
        warmup: flags.value("warmup", 1)?,
        shapes: list(flags.value("shapes", DEFAULT_SHAPES.to_owned())?)
            .iter()
            .map(|name| Shape::parse(name))
            .collect::<Result<_, _>>()?,
        workloads: list(flags.value("workloads", DEFAULT_WORKLOADS.to_owned())?)
            .iter()
            .map(|name| Workload::from_name(name))
            .collect::<Result<_, _>>()?,
        contenders,
        wrap: flags
            .value("wrap", String::new())
            .map(|wrap| Some(wrap).filter(|wrap| !wrap.trim().is_empty()))?,
    };
    let wait_quiet = flags.switch("wait-quiet");
    flags.finish(USAGE)?;
    if plan.rounds == 0 || seconds == 0 {
        return Err(format!("--rounds and --seconds must be at least 1\n{USAGE}").into());
    }
    if plan.shapes.is_empty() || plan.workloads.is_empty() || plan.contenders.is_empty() {
        return Err(format!("nothing to run: no shape, workload or contender\n{USAGE}").into());
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
    let measured = match plan.budget {
        Budget::Seconds(seconds) => format!("{} s", seconds.as_secs()),
        Budget::Queries(queries) => format!("{queries} queries"),
    };
    println!(
        "server: PostgreSQL {version} on 127.0.0.1:{} (harness settings: fsync off, \
         synchronous_commit off); shapes (tasks x connections) {}; {} rounds x {measured} \
         measured after {} s warm-up, each contender in its own process",
        server.port(),
        plan.shapes
            .iter()
            .map(|shape| shape.name())
            .collect::<Vec<_>>()
            .join(", "),
        plan.rounds,
        plan.warmup
    );
    let exe = std::env::current_exe()?;
    let mut tables = Vec::new();
    for &shape in &plan.shapes {
        for &workload in &plan.workloads {
            let script = server
                .root_dir()
                .join(format!("pgbench-{}.sql", workload.name()));
            std::fs::write(&script, workload.pgbench_script())
                .map_err(|error| format!("writing {}: {error}", script.display()))?;
            let contenders: Vec<Contender> = plan
                .contenders
                .iter()
                .copied()
                .filter(|&contender| workload.contends(contender))
                .collect();
            if contenders.is_empty() {
                continue;
            }
            println!(
                "\n## {}, {}: q/s per round\n",
                shape.title(),
                workload.title()
            );
            print!("| round |");
            for contender in &contenders {
                print!(" {} |", contender.name());
            }
            println!();
            println!("|---|{}", "---|".repeat(contenders.len()));
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); contenders.len()];
            for round in 1..=plan.rounds {
                print!("| {round} |");
                for (index, &contender) in contenders.iter().enumerate() {
                    let run = run_child(&plan, &exe, &server, &script, contender, workload, shape)
                        .await?;
                    print!(" {} |", thousands(run.rate().round() as u64));
                    use std::io::Write as _;
                    std::io::stdout().flush()?;
                    runs[index].push(run);
                }
                println!();
            }
            tables.push(Table {
                shape,
                workload,
                contenders,
                runs,
            });
        }
    }
    summarize(&plan, &tables);
    println!("\nmachine after the runs: {}", machine_summary());
    Ok(())
}

/// One run of `contender` in a child process of its own.
async fn run_child(
    plan: &Plan,
    exe: &std::path::Path,
    server: &PgServer,
    script: &std::path::Path,
    contender: Contender,
    workload: Workload,
    shape: Shape,
) -> Result<Run, BoxError> {
    let mut command = match &plan.wrap {
        Some(wrap) if contender != Contender::Pgbench => {
            let run = format!("{}-{}-{}", contender.name(), workload.name(), shape.name());
            let mut words = wrap.split_whitespace().map(|w| w.replace("{run}", &run));
            let program = words.next().unwrap_or_default();
            let mut command = tokio::process::Command::new(program);
            command.args(words).arg(exe);
            command
        }
        _ => tokio::process::Command::new(exe),
    };
    command
        .arg("child")
        .arg(contender.name())
        .arg(workload.name())
        .arg(shape.name())
        .arg(plan.budget.to_arg())
        .arg(plan.warmup.to_string());
    if contender == Contender::Pgbench {
        command
            .arg(server.bin_dir())
            .arg(server.port().to_string())
            .arg(script);
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
    Run::from_output(&stdout)
}

/// What the summary needs of one contender in one table: medians of the rounds, the largest
/// peak RSS.
#[derive(Debug, Clone, Copy)]
struct Summary {
    rate: f64,
    min: f64,
    max: f64,
    cpu_us: f64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

impl Summary {
    fn of(runs: &[Run]) -> Option<Self> {
        let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
        let cpu: Vec<f64> = runs.iter().map(Run::cpu_us_per_query).collect();
        Some(Self {
            rate: median(&rates)?,
            min: rates.iter().copied().fold(f64::INFINITY, f64::min),
            max: rates.iter().copied().fold(0.0, f64::max),
            cpu_us: median(&cpu)?,
            rss_kib: runs.iter().map(|run| run.rss_kib).max()?,
            anon_kib: runs.iter().map(|run| run.anon_kib).max()?,
            file_kib: runs.iter().map(|run| run.file_kib).max()?,
        })
    }

    /// Mean time per call in microseconds: each of `tasks` tasks runs one call after another.
    fn us_per_call(&self, tasks: usize) -> f64 {
        tasks as f64 / self.rate * 1e6
    }
}

/// Per shape and workload: median q/s of each contender, the ratios, client CPU, peak RSS; then
/// every target, PASS or MISS.
fn summarize(plan: &Plan, tables: &[Table]) {
    let ratio = |a: f64, b: Option<Summary>| match b {
        Some(b) => format!("{:.2}x", a / b.rate),
        None => "-".to_owned(),
    };
    let mut checks = Vec::new();
    for table in tables {
        let (shape, workload) = (table.shape, table.workload);
        let summaries: Vec<Option<Summary>> =
            table.runs.iter().map(|runs| Summary::of(runs)).collect();
        let find = |wanted: Contender| -> Option<Summary> {
            let index = table.contenders.iter().position(|&c| c == wanted)?;
            summaries[index]
        };
        let (ours, bare) = (
            find(Contender::ProtectedPool),
            find(Contender::DeadpoolSqlx),
        );
        let (sqlx, deadpool, pgbench) = (
            find(Contender::SqlxPgPool),
            find(Contender::DeadpoolPostgres),
            find(Contender::Pgbench),
        );
        let at = format!("{}, {}", shape.name(), workload.name());
        println!(
            "\n## {}, {}: median of {} rounds\n",
            shape.title(),
            workload.title(),
            plan.rounds
        );
        println!(
            "| contender | median q/s | min | max | vs bare engine | vs sqlx PgPool | vs deadpool-postgres | of pgbench | client CPU per query | peak RSS |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for (contender, summary) in table.contenders.iter().zip(&summaries) {
            let Some(summary) = summary else { continue };
            let mut vs_bare = ratio(summary.rate, bare);
            if let (Contender::ProtectedPool, Some(bare)) = (contender, bare) {
                let met = summary.rate / bare.rate >= workload.target();
                vs_bare = format!("**{vs_bare}** {}", if met { "PASS" } else { "MISS" });
            }
            let of_pgbench = match pgbench {
                Some(pgbench) => format!("{:.0} %", summary.rate / pgbench.rate * 100.0),
                None => "-".to_owned(),
            };
            println!(
                "| {} | {} | {} | {} | {vs_bare} | {} | {} | {of_pgbench} | {:.1} µs | {:.1} MiB |",
                contender.name(),
                thousands(summary.rate.round() as u64),
                thousands(summary.min.round() as u64),
                thousands(summary.max.round() as u64),
                ratio(summary.rate, sqlx),
                ratio(summary.rate, deadpool),
                summary.cpu_us,
                summary.rss_kib as f64 / 1024.0
            );
        }
        let (Some(ours), Some(bare)) = (ours, bare) else {
            continue;
        };
        checks.push(target(
            ours.rate / bare.rate >= workload.target(),
            format!(
                "{at}: protected-pool >= {:.2}x the bare engine: {:.2}x ({} vs {} q/s; client \
                 CPU {:.1} vs {:.1} µs per query)",
                workload.target(),
                ours.rate / bare.rate,
                thousands(ours.rate.round() as u64),
                thousands(bare.rate.round() as u64),
                ours.cpu_us,
                bare.cpu_us
            ),
        ));
        if shape.tasks == 1 && shape.connections == 1 {
            let (ours_us, bare_us) = (ours.us_per_call(1), bare.us_per_call(1));
            checks.push(target(
                ours_us - bare_us <= ADDED_LATENCY_TARGET_US,
                format!(
                    "{at}: added latency per call <= {ADDED_LATENCY_TARGET_US:.0} µs: {:+.1} µs \
                     ({ours_us:.1} vs {bare_us:.1} µs per call)",
                    ours_us - bare_us
                ),
            ));
        }
        checks.push(target(
            ours.rss_kib <= bare.rss_kib + ADDED_RSS_TARGET_KIB,
            format!(
                "{at}: peak RSS <= the bare engine's + 1 MiB: {:+.2} MiB ({:.1} vs {:.1} MiB)",
                (ours.rss_kib as f64 - bare.rss_kib as f64) / 1024.0,
                ours.rss_kib as f64 / 1024.0,
                bare.rss_kib as f64 / 1024.0
            ),
        ));
        checks.push(format!(
            "INFO  {at}: resident at the end of the run, over the bare engine: {:+.2} MiB the \
             process wrote (heap, stacks: {:.1} vs {:.1} MiB), {:+.2} MiB mapped from files \
             (code: {:.1} vs {:.1} MiB)",
            (ours.anon_kib as f64 - bare.anon_kib as f64) / 1024.0,
            ours.anon_kib as f64 / 1024.0,
            bare.anon_kib as f64 / 1024.0,
            (ours.file_kib as f64 - bare.file_kib as f64) / 1024.0,
            ours.file_kib as f64 / 1024.0,
            bare.file_kib as f64 / 1024.0
        ));
        if let Some(sqlx) = sqlx {
            checks.push(format!(
                "INFO  {at}: protected-pool is {:.2}x sqlx's PgPool with its defaults",
                ours.rate / sqlx.rate
            ));
        }
    }
    println!("\n## Targets\n");
    let met = checks
        .iter()
        .filter(|check| check.starts_with("PASS"))
        .count();
    let missed = checks
        .iter()
        .filter(|check| check.starts_with("MISS"))
        .count();
    for check in checks {
        println!("{check}");
    }
    println!("\n{met} targets met, {missed} missed");
}

fn target(met: bool, what: String) -> String {
    format!("{}  {what}", if met { "PASS" } else { "MISS" })
}

// ---- a child: one contender, one workload, one shape, one run --------------------------------

fn child(args: &[String]) -> Result<(), BoxError> {
    let usage = "child <contender> <workload> <shape> <budget> <warmup> \
                 (<url> | <bin_dir> <port> <script>)";
    let [contender, workload, shape, budget, warmup, rest @ ..] = args else {
        return Err(usage.into());
    };
    let contender = Contender::from_name(contender)?;
    let workload = Workload::from_name(workload)?;
    let shape = Shape::parse(shape)?;
    let budget = Budget::from_arg(budget)?;
    let warmup = Duration::from_secs(warmup.parse()?);
    let run = match (contender, rest, budget) {
        (Contender::Pgbench, [bin_dir, port, script], Budget::Seconds(seconds)) => {
            run_pgbench(bin_dir, port, script, shape, seconds, warmup)?
        }
        (Contender::Pgbench, ..) => return Err(usage.into()),
        (_, [url], _) => {
            // The same runtime for every Rust contender: tokio's multi-threaded default, one
            // worker per CPU.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let measured =
                runtime.block_on(run_rust(contender, workload, shape, url, budget, warmup))?;
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
    shape: Shape,
    url: &str,
    budget: Budget,
    warmup: Duration,
) -> Result<Run, BoxError> {
    let sql = workload.sql();
    match contender {
        Contender::ProtectedPool => {
            let pool = ProtectedPool::builder()
                .primary(url)
                .endpoint_options(EndpointOptions {
                    max_connections: shape.connections,
                    ..EndpointOptions::default()
                })
                .connect()
                .await?;
            drive(shape, workload, budget, warmup, move |id| {
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
                        Workload::PkCached => pool
                            .read(sqlx::query_scalar::<_, i64>(sql).bind(id))
                            .cached(format!("bench_items:{id}"), CACHE_TTL)
                            .fetch_one()
                            .await
                            .map(drop),
                    }
                    .map_err(|error| error.to_string())
                }
            })
            .await
        }
        Contender::DeadpoolSqlx => {
            let manager = BareManager {
                options: url.parse()?,
            };
            let pool = deadpool::managed::Pool::<BareManager>::builder(manager)
                .max_size(shape.connections)
                .build()?;
            drop(pool.get().await?); // fail now if the server cannot be reached
            drive(shape, workload, budget, warmup, move |id| {
                let pool = pool.clone();
                async move {
                    let mut conn = pool.get().await.map_err(|error| error.to_string())?;
                    match workload {
                        Workload::Select1 => sqlx::query_scalar::<_, i32>(sql)
                            .fetch_one(&mut *conn)
                            .await
                            .map(drop),
                        Workload::PkLookup | Workload::PkCached => {
                            sqlx::query_scalar::<_, i64>(sql)
                                .bind(id)
                                .fetch_one(&mut *conn)
                                .await
                                .map(drop)
                        }
                    }
                    .map_err(|error| error.to_string())
                }
            })
            .await
        }
        Contender::SqlxPgPool | Contender::SqlxPgPoolNoPing => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(shape.connections as u32)
                // Default: true (a ping before every checkout).
                .test_before_acquire(contender == Contender::SqlxPgPool)
                .connect(url)
                .await?;
            let measured = drive(shape, workload, budget, warmup, {
                let pool = pool.clone();
                move |id| {
                    let pool = pool.clone();
                    async move {
                        match workload {
                            Workload::Select1 => sqlx::query_scalar::<_, i32>(sql)
                                .fetch_one(&pool)
                                .await
                                .map(drop),
                            Workload::PkLookup | Workload::PkCached => {
                                sqlx::query_scalar::<_, i64>(sql)
                                    .bind(id)
                                    .fetch_one(&pool)
                                    .await
                                    .map(drop)
                            }
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
            config.pool = Some(PoolConfig::new(shape.connections));
            let pool = config.create_pool(Some(Runtime::Tokio1), tokio_postgres::NoTls)?;
            drop(pool.get().await?); // fail now if the server cannot be reached
            drive(shape, workload, budget, warmup, move |id| {
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
                        Workload::PkLookup | Workload::PkCached => {
                            client.query_one(&statement, &[&id]).await.map(|row| {
                                let _: i64 = row.get(0);
                            })
                        }
                    }
                    .map_err(|error| error.to_string())
                }
            })
            .await
        }
        Contender::Pgbench => unreachable!("pgbench is not a Rust contender"),
    }
}

/// Runs `operation` in `shape.tasks` tasks back to back: `warmup` unmeasured, then the
/// measured phase `budget` asks for. Returns the queries completed in the measured phase, its
/// length and the CPU time the process used in it (peak RSS left at 0).
async fn drive<F, Fut>(
    shape: Shape,
    workload: Workload,
    budget: Budget,
    warmup: Duration,
    operation: F,
) -> Result<Run, BoxError>
where
    F: Fn(i32) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    if !warmup.is_zero() {
        phase(
            shape,
            workload,
            Budget::Seconds(warmup),
            0,
            operation.clone(),
        )
        .await?;
    }
    // Other ids than the warm-up's: the lookups do not all start from ids just looked up.
    phase(shape, workload, budget, 1_000, operation).await
}

/// One phase: the tasks start, run until `budget` is spent, and are all joined before it
/// returns. A query budget is shared: each task takes a ticket before each query.
async fn phase<F, Fut>(
    shape: Shape,
    workload: Workload,
    budget: Budget,
    seed: u64,
    operation: F,
) -> Result<Run, BoxError>
where
    F: Fn(i32) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tickets = match budget {
        Budget::Seconds(_) => None,
        Budget::Queries(queries) => Some((Arc::new(AtomicU64::new(0)), queries)),
    };
    let cpu_before = cpu_time(Usage::SelfProcess)?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(shape.tasks);
    for task in 0..shape.tasks {
        let (operation, done, stop, tickets) = (
            operation.clone(),
            done.clone(),
            stop.clone(),
            tickets.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed + task as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                if let Some((taken, limit)) = &tickets
                    && taken.fetch_add(1, Ordering::Relaxed) >= *limit
                {
                    break;
                }
                let id = match workload {
                    Workload::Select1 => 0,
                    Workload::PkLookup | Workload::PkCached => rng.i32(1..=TABLE_ROWS),
                };
                operation(id).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    let join = |tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>| async move {
        for task in tasks {
            task.await?
                .map_err(|error| format!("a query failed: {error}"))?;
        }
        Ok::<(), BoxError>(())
    };
    // What is resident by kind, read while the pool and its connections are alive.
    let resident =
        || -> Result<(u64, u64), BoxError> { Ok((status_kib("RssAnon")?, status_kib("RssFile")?)) };
    let measured = match budget {
        Budget::Seconds(seconds) => {
            tokio::time::sleep(seconds).await;
            // Counted when the time is up; calls still in flight finish unmeasured.
            let measured = (
                done.load(Ordering::Relaxed),
                started.elapsed(),
                cpu_time(Usage::SelfProcess)? - cpu_before,
                resident()?,
            );
            stop.store(true, Ordering::Relaxed);
            join(tasks).await?;
            measured
        }
        Budget::Queries(_) => {
            join(tasks).await?;
            (
                done.load(Ordering::Relaxed),
                started.elapsed(),
                cpu_time(Usage::SelfProcess)? - cpu_before,
                resident()?,
            )
        }
    };
    let (queries, elapsed, cpu, (anon_kib, file_kib)) = measured;
    Ok(Run {
        queries,
        seconds: elapsed.as_secs_f64(),
        cpu_seconds: cpu.as_secs_f64(),
        rss_kib: 0,
        anon_kib,
        file_kib,
    })
}

/// pgbench with one client per pooled connection (`-c connections -j min(connections, 2)`,
/// prepared statements): one unmeasured warm-up run, then the measured one. Its peak RSS is
/// this process's children's.
fn run_pgbench(
    bin_dir: &str,
    port: &str,
    script: &str,
    shape: Shape,
    seconds: Duration,
    warmup: Duration,
) -> Result<Run, BoxError> {
    let (clients, threads) = (shape.connections, shape.connections.min(2));
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
            .args(["-n", "-M", "prepared"])
            .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
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
        anon_kib: 0,
        file_kib: 0,
    })
}
