//! Measures how long starting throwaway servers takes.
//!
//! `cargo run --release --example start_timing -p protected-pool-testkit`

use std::time::Instant;

use protected_pool_testkit::{HarnessError, PgServer};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), HarnessError> {
    let t = Instant::now();
    let first = PgServer::start().await?;
    println!("first server (includes the one initdb): {:?}", t.elapsed());
    drop(first);

    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let pg = PgServer::start().await?;
        times.push(t.elapsed());
        let t = Instant::now();
        drop(pg);
        println!("  drop: {:?}", t.elapsed());
    }
    println!("next 5 servers, one at a time: {times:?}");

    let t = Instant::now();
    let servers = futures_join4().await?;
    println!("4 servers in parallel: {:?}", t.elapsed());
    drop(servers);

    let primary = PgServer::start().await?;
    let t = Instant::now();
    let replica = PgServer::streaming_replica(&primary).await?;
    println!("streaming replica: {:?}", t.elapsed());
    drop(replica);

    let t = Instant::now();
    primary.kill9().await?;
    primary.start_again().await?;
    println!("kill9 + start_again: {:?}", t.elapsed());
    Ok(())
}

async fn futures_join4() -> Result<Vec<PgServer>, HarnessError> {
    let (a, b, c, d) = tokio::join!(
        PgServer::start(),
        PgServer::start(),
        PgServer::start(),
        PgServer::start()
    );
    Ok(vec![a?, b?, c?, d?])
}
