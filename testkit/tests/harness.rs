//! The harness against real PostgreSQL servers.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use protected_pool_testkit::{APP_PASSWORD, APP_USER, Backend, HarnessError, PgServer};

/// Runs `sql` with psql over TCP at `url` (not the unix socket the admin
/// helpers use), with `PGPASSWORD` if given and never prompting.
fn tcp_psql(
    pg: &PgServer,
    url: &str,
    password: Option<&str>,
    sql: &str,
) -> tokio::process::Command {
    let mut cmd = pg.command("psql");
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-w",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        url,
        "-c",
        sql,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    cmd
}

async fn tcp_query(pg: &PgServer, sql: &str) -> Output {
    tcp_psql(pg, &pg.url(), None, sql).output().await.unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s[s.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next()
            .unwrap();
        state != "Z" && state != "X"
    })
}

#[tokio::test]
async fn two_servers_start_in_parallel_on_distinct_ports() {
    let (a, b) = tokio::join!(PgServer::start(), PgServer::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    for pg in [&a, &b] {
        assert_eq!(pg.psql("SELECT 1").await.unwrap(), "1");
        let out = tcp_query(pg, "SELECT 1").await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "1");
        assert_eq!(pg.host(), "127.0.0.1");
        assert_eq!(
            pg.url(),
            format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
        );
        assert!(pg.is_running());
        assert!(pg.log_path().exists());
        assert!(!pg.log_tail(5).is_empty());
    }
    // A local postmaster listens on 127.0.0.1 only. In a container PostgreSQL must listen on
    // the container's interface; there the port is published on 127.0.0.1 of the host instead.
    let listening_on = match a.backend() {
        Backend::Local => "127.0.0.1",
        _ => "*",
    };
    assert_eq!(a.psql("SHOW listen_addresses").await.unwrap(), listening_on);
    assert_eq!(a.psql("SHOW fsync").await.unwrap(), "off");
    assert_eq!(a.psql("SHOW wal_level").await.unwrap(), "replica");
}

#[tokio::test]
async fn servers_run_on_the_selected_backend() {
    let pg = PgServer::start().await.unwrap();
    assert_eq!(pg.backend(), Backend::selected().unwrap());
    let replica = PgServer::streaming_replica(&pg).await.unwrap();
    assert_eq!(replica.backend(), pg.backend());
}

#[tokio::test]
async fn kill9_then_start_again_answers_again() {
    let pg = PgServer::start().await.unwrap();
    let port = pg.port();
    let pid = pg.pid().unwrap();
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1); CHECKPOINT")
        .await
        .unwrap();

    pg.kill9().await.unwrap();
    assert!(!alive(pid));
    assert!(!pg.is_running());
    assert_eq!(pg.pid(), None);
    let out = tcp_query(&pg, "SELECT 1").await;
    assert!(!out.status.success(), "a killed server answered");
    assert!(matches!(pg.kill9().await, Err(HarnessError::NotRunning)));

    pg.start_again().await.unwrap();
    assert_eq!(pg.port(), port);
    assert_ne!(pg.pid(), Some(pid));
    assert_eq!(pg.psql("SELECT x FROM t").await.unwrap(), "1");
    let out = tcp_query(&pg, "SELECT 2").await;
    assert_eq!(stdout(&out), "2", "{}", stderr(&out));
    assert!(matches!(
        pg.start_again().await,
        Err(HarnessError::AlreadyRunning)
    ));

    // And once more, right away (the old postmaster may still be a zombie).
    pg.kill9().await.unwrap();
    pg.start_again().await.unwrap();
    assert_eq!(pg.psql("SELECT 3").await.unwrap(), "3");
}

#[tokio::test]
async fn pause_hangs_new_and_established_connections_until_resume() {
    let pg = PgServer::start().await.unwrap();

    // An established connection, busy for 1 s.
    let busy = tcp_psql(&pg, &pg.url(), None, "SELECT pg_sleep(1); SELECT 'done'")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg
        .psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(1)%'")
        .await
        .unwrap()
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "the sleeping query never showed up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    pg.pause().unwrap();
    assert!(pg.is_paused());
    assert!(pg.is_running());

    // A new connection hangs...
    let fresh = tcp_psql(&pg, &pg.url(), None, "SELECT 1").output();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), fresh)
            .await
            .is_err(),
        "a query to a paused server finished"
    );
    // ...and so does the established one, well past its 1 s sleep.
    let busy = busy.wait_with_output();
    tokio::pin!(busy);
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut busy)
            .await
            .is_err(),
        "an established connection kept working while paused"
    );

    pg.resume().unwrap();
    assert!(!pg.is_paused());
    let out = tokio::time::timeout(Duration::from_secs(10), busy)
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("done"), "{}", stdout(&out));
    let out = tcp_query(&pg, "SELECT 1").await;
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));
}

#[tokio::test]
async fn max_connections_and_settings_are_applied() {
    let pg = PgServer::builder()
        .max_connections(17)
        .setting("work_mem", "7MB")
        .setting("cluster_name", r"it's \quoted")
        .start()
        .await
        .unwrap();
    assert_eq!(pg.psql("SHOW max_connections").await.unwrap(), "17");
    assert_eq!(pg.psql("SHOW work_mem").await.unwrap(), "7MB");
    assert_eq!(pg.psql("SHOW cluster_name").await.unwrap(), r"it's \quoted");
    assert_eq!(pg.psql("SHOW max_wal_senders").await.unwrap(), "10");
    assert_eq!(pg.psql("SHOW hot_standby").await.unwrap(), "on");
    assert_eq!(pg.psql("SHOW synchronous_commit").await.unwrap(), "off");
}

#[tokio::test]
async fn password_auth_requires_the_right_password() {
    let pg = PgServer::builder()
        .password_auth(true)
        .start()
        .await
        .unwrap();
    let no_pw_url = pg.url_for(APP_USER, None, "postgres");

    let out = tcp_psql(&pg, &no_pw_url, Some("wrong"), "SELECT 1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "a wrong password was accepted");
    assert!(
        stderr(&out).contains("password authentication failed"),
        "{}",
        stderr(&out)
    );
    let out = tcp_psql(&pg, &no_pw_url, None, "SELECT 1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "no password was accepted");

    let out = tcp_psql(&pg, &no_pw_url, Some(APP_PASSWORD), "SELECT current_user")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), APP_USER);

    // The password in the URL works too, and app may create tables.
    let out = tcp_psql(
        &pg,
        &pg.app_url(),
        None,
        "CREATE TABLE mine (x int); SELECT 'ok'",
    )
    .output()
    .await
    .unwrap();
    assert_eq!(stdout(&out), "ok", "{}", stderr(&out));

    // The superuser keeps trust, over TCP as well.
    let out = tcp_query(&pg, "SELECT current_user").await;
    assert_eq!(stdout(&out), "postgres", "{}", stderr(&out));
    assert_eq!(
        pg.psql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app'")
            .await
            .unwrap(),
        "t"
    );
}

#[tokio::test]
async fn streaming_replica_follows_the_primary() {
    let primary = PgServer::start().await.unwrap();
    primary
        .psql("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let replica = PgServer::streaming_replica(&primary).await.unwrap();
    assert_ne!(replica.port(), primary.port());
    assert_ne!(replica.data_dir(), primary.data_dir());
    assert_eq!(
        replica.psql("SELECT pg_is_in_recovery()").await.unwrap(),
        "t"
    );
    assert_eq!(
        primary.psql("SELECT pg_is_in_recovery()").await.unwrap(),
        "f"
    );

    primary
        .psql("INSERT INTO items VALUES (1, 'first')")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = replica
            .psql("SELECT name FROM items WHERE id = 1")
            .await
            .unwrap();
        if got == "first" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the row did not reach the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Over TCP too, and it is read-only.
    let out = tcp_query(&replica, "SELECT count(*) FROM items").await;
    assert_eq!(stdout(&out), "1", "{}", stderr(&out));
    let err = replica
        .psql("INSERT INTO items VALUES (2, 'no')")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_dir() {
    let pg = PgServer::start().await.unwrap();
    let root: PathBuf = pg.root_dir().to_owned();
    let pid = pg.pid().unwrap();
    let url = pg.url();
    // Inherently local: on the container backend the data dir is inside the container.
    if pg.backend() == Backend::Local {
        assert!(root.join("data/PG_VERSION").exists());
    }
    drop(pg);
    assert!(!root.exists(), "{} is still there", root.display());
    assert!(!alive(pid), "postmaster {pid} survived the drop");

    // Also when paused, and when killed.
    let paused = PgServer::start().await.unwrap();
    let (root, pid) = (paused.root_dir().to_owned(), paused.pid().unwrap());
    paused.pause().unwrap();
    drop(paused);
    assert!(!root.exists());
    assert!(!alive(pid));

    let killed = PgServer::start().await.unwrap();
    let root = killed.root_dir().to_owned();
    killed.kill9().await.unwrap();
    drop(killed);
    assert!(!root.exists());
    let _ = url;
}

#[tokio::test]
async fn a_panicking_test_still_cleans_up() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let pg = PgServer::start().await.unwrap();
        tx.send((pg.root_dir().to_owned(), pg.pid().unwrap()))
            .unwrap();
        panic!("the test failed");
    });
    assert!(task.await.unwrap_err().is_panic());
    let (root, pid) = rx.await.unwrap();
    assert!(!root.exists());
    assert!(!alive(pid));
}

#[tokio::test]
async fn stops_and_restarts_on_the_same_port() {
    let pg = PgServer::start().await.unwrap();
    let port = pg.port();
    pg.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        .await
        .unwrap();

    pg.stop_fast().await.unwrap();
    assert!(!pg.is_running());
    assert!(matches!(
        pg.psql("SELECT 1").await,
        Err(HarnessError::CommandFailed { .. })
    ));
    pg.stop_fast().await.unwrap(); // stopping a stopped server is fine
    pg.start_again().await.unwrap();
    assert_eq!(pg.psql("SELECT x FROM kept").await.unwrap(), "7");

    pg.restart().await.unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("SELECT x FROM kept").await.unwrap(), "7");

    pg.pause().unwrap();
    pg.stop_immediate().await.unwrap(); // resumes first
    assert!(!pg.is_running());
    pg.start_again().await.unwrap();
    assert_eq!(pg.psql("SELECT x FROM kept").await.unwrap(), "7");
}

#[tokio::test]
async fn admin_helpers() {
    let pg = PgServer::start().await.unwrap();
    pg.create_database("other db").await.unwrap();
    assert_eq!(
        pg.psql_db("other db", "SELECT current_database()")
            .await
            .unwrap(),
        "other db"
    );
    assert_eq!(pg.psql("SELECT 1, 'a'; SELECT 2").await.unwrap(), "1|a\n2");
    let err = pg.psql("SELECT * FROM no_such_table").await.unwrap_err();
    assert!(matches!(err, HarnessError::CommandFailed { .. }));
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(
        pg.url_for("u@x", Some("p:w/d"), "db 1"),
        format!("postgres://u%40x:p%3Aw%2Fd@127.0.0.1:{}/db%201", pg.port())
    );
}

#[tokio::test]
async fn a_server_that_cannot_start_reports_why_with_its_log() {
    let err = PgServer::builder()
        .setting("shared_buffers", "lots")
        .start()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HarnessError::StartFailed { .. }), "{msg}");
    assert!(msg.contains("did not start"), "{msg}");
    assert!(
        msg.contains(r#"invalid value for parameter "shared_buffers""#),
        "{msg}"
    );
}
