//! Reads that survive a dead primary, writes that fail fast, breakers that close by themselves.
//!
//! With `PRIMARY_URL` and `REPLICA_URL` set (see docker-compose.yml) it runs against those for
//! 20 s while you stop and start the primary. Without them it starts a throwaway primary and
//! streaming replica from the machine's PostgreSQL binaries, kills the primary (-9) at 2 s and
//! starts it again at 6 s:
//!
//! `cargo run --example failover`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration};
use protected_pool::{ProtectedPool, Route};
use protected_pool_testkit::PgServer;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What happened in one second of the run.
#[derive(Default)]
struct Second {
    primary_reads: AtomicU64,
    replica_reads: AtomicU64,
    failed_reads: AtomicU64,
    writes: AtomicU64,
    failed_writes: AtomicU64,
    refused_writes: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (primary_url, replica_url, servers, run_for) =
        match (std::env::var("PRIMARY_URL"), std::env::var("REPLICA_URL")) {
            (Ok(primary), Ok(replica)) => (primary, replica, None, Duration::from_secs(20)),
            _ => {
                println!("starting a primary and a streaming replica from local binaries ...");
                let primary = PgServer::start().await?;
                let replica = PgServer::streaming_replica(&primary).await?;
                let urls = (primary.url(), replica.url());
                (
                    urls.0,
                    urls.1,
                    Some((primary, replica)),
                    Duration::from_secs(10),
                )
            }
        };

    let started = Instant::now();
    let quick = |config: BreakerConfig| BreakerConfig {
        open: OpenDuration {
            base: Duration::from_millis(500),
            max: Duration::from_secs(2),
            ..config.open
        },
        ..config
    };
    let pool = ProtectedPool::builder()
        .primary(primary_url)
        .replica(replica_url)
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .timeout(Route::Read, Duration::from_secs(1))
        .timeout(Route::Write, Duration::from_secs(2))
        .health_check_interval(Duration::from_millis(200))
        .on_state_change(move |change| {
            println!("{:>6.2}s  {change}", started.elapsed().as_secs_f64());
        })
        .connect()
        .await?;
    pool.with_connection(Route::Write, async |conn| {
        MIGRATOR.run(conn).await.map_err(Into::into)
    })
    .await?;
    pool.write(sqlx::query(
        "INSERT INTO users (id, name, email) VALUES (1, 'Ada', 'ada@example.com')
         ON CONFLICT (id) DO NOTHING",
    ))
    .execute()
    .await?;

    let seconds: Arc<Vec<Second>> =
        Arc::new((0..run_for.as_secs()).map(|_| Second::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let now_second = move || {
        let second = started.elapsed().as_secs() as usize;
        second.min(run_for.as_secs() as usize - 1)
    };
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (pool, seconds, stop) = (pool.clone(), seconds.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let read = pool
                    .read(sqlx::query_scalar::<_, bool>(
                        "SELECT pg_is_in_recovery() FROM users WHERE id = 1",
                    ))
                    .fetch_one()
                    .await;
                let second = &seconds[now_second()];
                let counter = match read {
                    Ok(false) => &second.primary_reads,
                    Ok(true) => &second.replica_reads,
                    Err(_) => &second.failed_reads,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    {
        let (pool, seconds, stop) = (pool.clone(), seconds.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let write = pool
                    .write(sqlx::query("UPDATE users SET name = 'Ada' WHERE id = 1"))
                    .execute()
                    .await;
                let second = &seconds[now_second()];
                let counter = match &write {
                    Ok(_) => &second.writes,
                    Err(error) if error.is_circuit_open() => &second.refused_writes,
                    Err(_) => &second.failed_writes,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    if let Some((primary, _replica)) = &servers {
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!(
            "{:>6.2}s  killing the primary (-9)",
            started.elapsed().as_secs_f64()
        );
        primary.kill9().await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        println!(
            "{:>6.2}s  starting the primary again",
            started.elapsed().as_secs_f64()
        );
        primary.start_again().await?;
    }
    tokio::time::sleep(run_for.saturating_sub(started.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }

    println!("\nsecond  reads: primary replica failed   writes: ok failed refused-fast");
    for (index, second) in seconds.iter().enumerate() {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        println!(
            "{index:>6}  {:>14} {:>7} {:>6}   {:>10} {:>6} {:>12}",
            get(&second.primary_reads),
            get(&second.replica_reads),
            get(&second.failed_reads),
            get(&second.writes),
            get(&second.failed_writes),
            get(&second.refused_writes),
        );
    }
    Ok(())
}
