//! Writes that follow a promotion: a primary and its streaming standby, given to the pool as
//! one libpq-style host list. The primary is killed (-9) at 2 s and the standby promoted at
//! 3 s, the way Patroni, RDS Multi-AZ or repmgr would; the pool finds the new primary by
//! itself and writes resume, with no restart and no write run twice.
//!
//! `cargo run --example promotion`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use protected_pool::breaker::{BreakerConfig, OpenDuration};
use protected_pool::{ClusterEvent, ProtectedPool, Route};
use protected_pool_testkit::PgServer;

/// What happened in one second of the run.
#[derive(Default)]
struct Second {
    reads: AtomicU64,
    failed_reads: AtomicU64,
    writes: AtomicU64,
    failed_writes: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("starting a primary and a streaming standby from local binaries ...");
    let primary = PgServer::start().await?;
    primary
        .psql("CREATE TABLE writes (id bigint PRIMARY KEY); CHECKPOINT")
        .await?;
    let standby = PgServer::streaming_replica(&primary).await?;
    // Both servers in one URL, as libpq takes them.
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );

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
        .cluster(url)
        .breaker(Route::Read, quick(BreakerConfig::read()))
        .breaker(Route::Write, quick(BreakerConfig::write()))
        .health_check_interval(Duration::from_millis(250))
        .on_cluster_event(move |event: &ClusterEvent| {
            println!("{:>6.2}s  {event}", started.elapsed().as_secs_f64());
        })
        .connect()
        .await?;

    let seconds: Arc<Vec<Second>> = Arc::new((0..8).map(|_| Second::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for writer in [true, false] {
        let (pool, seconds, stop) = (pool.clone(), seconds.clone(), stop.clone());
        let (next_id, acknowledged) = (next_id.clone(), acknowledged.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let second = &seconds[(started.elapsed().as_secs() as usize).min(7)];
                if writer {
                    let id = next_id.fetch_add(1, Ordering::Relaxed) as i64;
                    let insert = sqlx::query("INSERT INTO writes (id) VALUES ($1)").bind(id);
                    match pool.write(insert).execute().await {
                        Ok(_) => {
                            second.writes.fetch_add(1, Ordering::Relaxed);
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            second.failed_writes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else {
                    let read =
                        pool.read(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM writes"));
                    match read.fetch_one().await {
                        Ok(_) => second.reads.fetch_add(1, Ordering::Relaxed),
                        Err(_) => second.failed_reads.fetch_add(1, Ordering::Relaxed),
                    };
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "{:>6.2}s  kill -9 the primary",
        started.elapsed().as_secs_f64()
    );
    primary.kill9().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "{:>6.2}s  promote the standby",
        started.elapsed().as_secs_f64()
    );
    standby.psql("SELECT pg_promote(true, 60)").await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }

    println!("\nsecond | reads | failed reads | writes | failed writes");
    for (index, second) in seconds.iter().enumerate().take(7) {
        println!(
            "{index:>6} | {:>5} | {:>12} | {:>6} | {:>13}",
            second.reads.load(Ordering::Relaxed),
            second.failed_reads.load(Ordering::Relaxed),
            second.writes.load(Ordering::Relaxed),
            second.failed_writes.load(Ordering::Relaxed),
        );
    }
    // Rows on the new primary: those acknowledged after the promotion are all there, once
    // (writes acknowledged by the old primary just before its death may not have reached the
    // standby: replication here is asynchronous).
    let rows: u64 = standby.psql("SELECT count(*) FROM writes").await?.parse()?;
    println!(
        "\nacknowledged writes: {}; rows on the new primary: {rows}",
        acknowledged.load(Ordering::Relaxed)
    );
    for (name, _) in pool.endpoints() {
        let role = pool
            .role(&name)?
            .map_or("unknown (unreachable)", |role| role.as_str());
        println!("{name}: {role}");
    }
    Ok(())
}
