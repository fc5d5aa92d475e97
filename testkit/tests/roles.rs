//! Changing the roles of real PostgreSQL servers, each keeping its port: promotion,
//! rejoining an old primary as a standby, switchover, and a split brain.

use std::process::Stdio;
use std::time::{Duration, Instant};

use protected_pool_testkit::{HarnessError, PgServer};

/// A primary holding table `t`, and a standby streaming from it.
async fn pair() -> (PgServer, PgServer) {
    let primary = PgServer::start().await.unwrap();
    primary
        .psql("CREATE TABLE t (x text PRIMARY KEY); INSERT INTO t VALUES ('before')")
        .await
        .unwrap();
    let standby = PgServer::streaming_replica(&primary).await.unwrap();
    wait_for(&standby, "SELECT string_agg(x, ',') FROM t", "before").await;
    (primary, standby)
}

/// Polls `sql` on `pg` until it returns `expected` (errors count as not yet), for 10 s.
async fn wait_for(pg: &PgServer, sql: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = pg.psql(sql).await;
        if got.as_deref().ok() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {}: {sql:?} gave {got:?}, not {expected:?}",
            pg.port()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn in_recovery(pg: &PgServer) -> bool {
    pg.psql("SELECT pg_is_in_recovery()").await.unwrap() == "t"
}

/// `pg_is_in_recovery()` of whatever answers on `pg`'s TCP port (the admin `psql` of the
/// harness goes through the unix socket instead).
async fn in_recovery_over_tcp(pg: &PgServer) -> bool {
    let out = pg
        .command("psql")
        .args(["-X", "-A", "-t", "-w", "-d", &pg.url()])
        .args(["-c", "SELECT pg_is_in_recovery()"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim() == "t"
}

/// The status of `standby`'s WAL receiver.
async fn receiver(standby: &PgServer) -> String {
    standby
        .psql("SELECT status FROM pg_stat_wal_receiver")
        .await
        .unwrap()
}

async fn assert_read_only(pg: &PgServer) {
    let err = pg
        .psql("INSERT INTO t VALUES ('refused')")
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("read-only transaction"),
        "port {}: {err}",
        pg.port()
    );
}

#[tokio::test]
async fn promote_makes_a_standby_a_primary_on_its_own_port() {
    let (primary, standby) = pair().await;
    let port = standby.port();
    primary.kill9().await.unwrap();

    standby.promote().await.unwrap();
    assert_eq!(standby.port(), port);
    assert!(!in_recovery(&standby).await);
    standby
        .psql("INSERT INTO t VALUES ('after')")
        .await
        .unwrap();
    assert_eq!(
        standby
            .psql("SELECT string_agg(x, ',' ORDER BY x) FROM t")
            .await
            .unwrap(),
        "after,before"
    );

    // A primary cannot be promoted.
    let err = standby.promote().await.unwrap_err();
    assert!(matches!(err, HarnessError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("not a standby"), "{err}");
}

#[tokio::test]
async fn a_killed_primary_rejoins_as_a_standby_of_the_new_one_on_the_same_port() {
    let (old, new) = pair().await;
    let (old_port, old_url) = (old.port(), old.url());
    old.kill9().await.unwrap();
    new.promote().await.unwrap();
    new.psql("INSERT INTO t VALUES ('on the new primary')")
        .await
        .unwrap();

    old.rejoin_as_standby_of(&new).await.unwrap();
    assert_eq!(old.port(), old_port);
    assert_eq!(old.url(), old_url);
    assert!(old.is_running());
    assert!(in_recovery(&old).await);
    assert!(in_recovery_over_tcp(&old).await);
    assert_eq!(receiver(&old).await, "streaming");
    wait_for(
        &old,
        "SELECT count(*) FROM t WHERE x = 'on the new primary'",
        "1",
    )
    .await;
    // And it goes on following.
    new.psql("INSERT INTO t VALUES ('later')").await.unwrap();
    wait_for(&old, "SELECT count(*) FROM t WHERE x = 'later'", "1").await;
    assert_read_only(&old).await;
}

#[tokio::test]
async fn switchover_swaps_the_roles_behind_the_two_ports_and_back() {
    let (a, b) = pair().await;
    let (a_port, b_port) = (a.port(), b.port());
    a.psql("INSERT INTO t VALUES ('by a')").await.unwrap();

    a.switchover_to(&b).await.unwrap();
    assert_eq!((a.port(), b.port()), (a_port, b_port));
    assert!(in_recovery_over_tcp(&a).await);
    assert!(!in_recovery_over_tcp(&b).await);
    // Nothing a took was lost: it was stopped cleanly before b's promotion.
    assert_eq!(
        b.psql("SELECT count(*) FROM t WHERE x = 'by a'")
            .await
            .unwrap(),
        "1"
    );
    b.psql("INSERT INTO t VALUES ('by b')").await.unwrap();
    wait_for(&a, "SELECT count(*) FROM t WHERE x = 'by b'", "1").await;
    assert_read_only(&a).await;

    b.switchover_to(&a).await.unwrap();
    assert!(!in_recovery(&a).await);
    assert!(in_recovery(&b).await);
    a.psql("INSERT INTO t VALUES ('by a again')").await.unwrap();
    wait_for(&b, "SELECT count(*) FROM t WHERE x = 'by a again'", "1").await;
}

#[tokio::test]
async fn an_old_primary_started_again_after_a_promotion_is_a_second_primary_until_it_rejoins() {
    let (old, new) = pair().await;
    old.kill9().await.unwrap();
    new.promote().await.unwrap();

    // Split brain: start_again brings the old primary back as it was, a primary.
    old.start_again().await.unwrap();
    assert!(!in_recovery(&old).await);
    assert!(!in_recovery(&new).await);
    old.psql("INSERT INTO t VALUES ('only on the old one')")
        .await
        .unwrap();
    new.psql("INSERT INTO t VALUES ('only on the new one')")
        .await
        .unwrap();
    let rows = "SELECT string_agg(x, ',' ORDER BY x) FROM t";
    assert_eq!(old.psql(rows).await.unwrap(), "before,only on the old one");
    assert_eq!(new.psql(rows).await.unwrap(), "before,only on the new one");

    // Rejoining ends it, and the old primary's own write is gone.
    old.rejoin_as_standby_of(&new).await.unwrap();
    assert!(in_recovery(&old).await);
    wait_for(&old, rows, "before,only on the new one").await;
}

#[tokio::test]
async fn rejoining_a_standby_or_oneself_is_refused() {
    let (primary, standby) = pair().await;
    let err = primary.rejoin_as_standby_of(&standby).await.unwrap_err();
    assert!(matches!(err, HarnessError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("promote it first"), "{err}");
    let err = primary.rejoin_as_standby_of(&primary).await.unwrap_err();
    assert!(matches!(err, HarnessError::Refused { .. }), "{err}");
    // Nothing was touched.
    assert!(!in_recovery(&primary).await);
    assert!(in_recovery(&standby).await);
}
