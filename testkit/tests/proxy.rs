//! The fault-injection proxy, over real sockets: a tiny echo server, and a
//! real PostgreSQL server queried with `psql`.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Output, Stdio};
use std::time::Duration;

use protected_pool_testkit::{FaultMode, FaultProxy, PgServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

/// Generous bound for things that should happen "at once".
const PROMPT: Duration = Duration::from_secs(2);
/// How long a read must hang to count as hanging.
const HANG: Duration = Duration::from_millis(300);

/// An echo server on 127.0.0.1; it runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => {
                            let _ = stream.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = timeout(PROMPT, TcpStream::connect(proxy.addr()))
        .await
        .expect("connecting to the proxy timed out")
        .expect("connecting to the proxy failed");
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends `msg`, reads the same number of bytes back, checks they are `msg`,
/// and returns how long that took.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("no echo within 10 s")
        .expect("reading the echo failed");
    assert_eq!(
        String::from_utf8_lossy(&back),
        String::from_utf8_lossy(msg),
        "wrong echo"
    );
    start.elapsed()
}

/// Asserts that reading from `stream` gets nothing for [`HANG`].
async fn assert_hangs(stream: &mut TcpStream) {
    let mut buf = [0; 64];
    if let Ok(read) = timeout(HANG, stream.read(&mut buf)).await {
        panic!("expected the read to hang, got {read:?}");
    }
}

/// Asserts that reading from `stream` fails with a reset, promptly.
async fn assert_reset(stream: &mut TcpStream) {
    let mut buf = [0; 64];
    let start = Instant::now();
    let read = timeout(PROMPT, stream.read(&mut buf))
        .await
        .expect("the connection was not reset promptly");
    match read {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected ConnectionReset, got {other:?}"),
    }
    assert!(start.elapsed() < PROMPT);
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PROMPT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn pass_forwards_both_ways_and_counts_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    assert_eq!(proxy.mode(), FaultMode::Pass);
    assert_eq!(proxy.addr().ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(proxy.addr().port(), proxy.port());
    assert!(format!("{proxy:?}").contains(&proxy.port().to_string()));

    let mut a = connect(&proxy).await;
    let mut b = connect(&proxy).await;
    round_trip(&mut a, b"hello").await;

    // A megabyte, written while it is read back.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = b.split();
    let sent = big.clone();
    let mut back = vec![0; big.len()];
    let (w, r) = tokio::join!(write.write_all(&sent), read.read_exact(&mut back));
    w.unwrap();
    r.unwrap();
    assert!(back == big, "the megabyte came back altered");

    wait_for("2 open connections", || proxy.connections() == 2).await;
    assert_eq!(proxy.accepted(), 2);

    // A half close goes through: the echo server closes in turn.
    a.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(PROMPT, a.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());

    drop((a, b));
    wait_for("no open connection", || proxy.connections() == 0).await;
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_every_chunk_without_throttling() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let delay = Duration::from_millis(200);
    proxy.set_mode(FaultMode::Latency(delay));
    assert_eq!(proxy.mode(), FaultMode::Latency(delay));

    let mut stream = connect(&proxy).await;
    let rtt = round_trip(&mut stream, b"ping").await;
    assert!(rtt >= 2 * delay, "round trip took only {rtt:?}");

    // Five messages 100 ms apart: each comes back 2 * delay after it was
    // sent, in order. Delaying each chunk from when the previous one was
    // delivered instead (or sleeping before every read) would add up: the
    // fifth would take 4 * delay.
    let (mut read, mut write) = stream.split();
    let start = Instant::now();
    let writing = async {
        let mut sent = Vec::new();
        for i in 0..5u8 {
            sent.push(start.elapsed());
            write.write_all(&[b'0' + i; 8]).await.unwrap();
            sleep(Duration::from_millis(100)).await;
        }
        sent
    };
    let reading = async {
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut msg = [0; 8];
            timeout(Duration::from_secs(10), read.read_exact(&mut msg))
                .await
                .unwrap()
                .unwrap();
            got.push((start.elapsed(), msg));
        }
        got
    };
    let (sent, got) = tokio::join!(writing, reading);
    for (i, (sent_at, (got_at, msg))) in sent.iter().zip(&got).enumerate() {
        assert_eq!(msg, &[b'0' + i as u8; 8], "out of order");
        let rtt = *got_at - *sent_at;
        assert!(
            rtt >= 2 * delay && rtt < 2 * delay + Duration::from_millis(250),
            "message {i} took {rtt:?} (sent at {sent_at:?}, received at {got_at:?})"
        );
    }

    // Back to Pass: no delay any more.
    proxy.set_mode(FaultMode::Pass);
    let rtt = round_trip(&mut stream, b"pong").await;
    assert!(rtt < 2 * delay, "round trip in Pass took {rtt:?}");

    // Data queued under a long latency is delivered as soon as Pass is set.
    proxy.set_mode(FaultMode::Latency(Duration::from_secs(30)));
    let start = Instant::now();
    stream.write_all(b"queued").await.unwrap();
    sleep(Duration::from_millis(100)).await;
    proxy.set_mode(FaultMode::Pass);
    let mut back = [0; 6];
    timeout(Duration::from_secs(5), stream.read_exact(&mut back))
        .await
        .expect("queued data not delivered after switching to Pass")
        .unwrap();
    assert_eq!(&back, b"queued");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn blackhole_hangs_everything_and_pass_resumes() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut old = connect(&proxy).await;
    round_trip(&mut old, b"before").await;

    proxy.set_mode(FaultMode::Blackhole);
    old.write_all(b"lost").await.unwrap();
    assert_hangs(&mut old).await;

    // New connections are accepted, then hang.
    let mut new = connect(&proxy).await;
    new.write_all(b"dropped").await.unwrap();
    assert_hangs(&mut new).await;
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(proxy.connections(), 2, "nothing is closed in a blackhole");

    proxy.set_mode(FaultMode::Pass);
    // Forwarding resumes; what was sent during the blackhole is gone (the
    // echo would be "lost" + "after" otherwise).
    round_trip(&mut old, b"after").await;
    round_trip(&mut new, b"fresh").await;
    let mut third = connect(&proxy).await;
    round_trip(&mut third, b"third").await;
    assert_eq!(proxy.connections(), 3);
}

#[tokio::test]
async fn reset_resets_existing_and_new_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut old = connect(&proxy).await;
    round_trip(&mut old, b"before").await;

    proxy.set_mode(FaultMode::Reset);
    assert_reset(&mut old).await;

    // New connections are accepted, then reset at once.
    let mut new = connect(&proxy).await;
    assert_reset(&mut new).await;
    assert_eq!(proxy.accepted(), 2);
    wait_for("no open connection", || proxy.connections() == 0).await;

    proxy.set_mode(FaultMode::Pass);
    let mut again = connect(&proxy).await;
    round_trip(&mut again, b"again").await;
}

#[tokio::test]
async fn refuse_refuses_and_pass_listens_again_on_the_same_port() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let addr = proxy.addr();
    let mut old = connect(&proxy).await;
    round_trip(&mut old, b"before").await;

    proxy.set_mode(FaultMode::Refuse);
    let refused = TcpStream::connect(addr).await;
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert_reset(&mut old).await;
    // Setting it again changes nothing.
    proxy.set_mode(FaultMode::Refuse);
    assert_eq!(proxy.mode(), FaultMode::Refuse);

    proxy.set_mode(FaultMode::Pass);
    assert_eq!(proxy.addr(), addr);
    let mut new = connect(&proxy).await;
    round_trip(&mut new, b"again").await;
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn leaving_refuse_reports_a_port_taken_meanwhile() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    proxy.set_mode(FaultMode::Refuse);
    // The proxy keeps the port bound, but a socket with SO_REUSEADDR (as
    // std's) binding it explicitly may still listen on it.
    let squatter = std::net::TcpListener::bind(proxy.addr()).unwrap();
    let err = proxy.try_set_mode(FaultMode::Pass).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains("Refuse"), "{err}");
    assert_eq!(proxy.mode(), FaultMode::Refuse);

    drop(squatter);
    proxy.try_set_mode(FaultMode::Pass).unwrap();
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"back").await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_port_and_connections() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let addr = proxy.addr();
    let mut stream = connect(&proxy).await;
    round_trip(&mut stream, b"hello").await;

    drop(proxy);
    let refused = TcpStream::connect(addr).await;
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    let mut buf = [0; 16];
    let read = timeout(PROMPT, stream.read(&mut buf))
        .await
        .expect("the connection was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// `psql -c sql` over TCP at the proxy's port, as the superuser.
async fn psql_via(pg: &PgServer, proxy: &FaultProxy, sql: &str) -> Output {
    let mut cmd = pg.command("psql");
    cmd.args(["-h", "127.0.0.1", "-p", &proxy.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-w"])
        .args(["-c", sql])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.output().await.unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn psql_through_the_proxy() {
    let pg = PgServer::start().await.unwrap();
    let proxy = FaultProxy::to_server(&pg).await.unwrap();
    assert_eq!(
        proxy.target(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, pg.port()))
    );

    let out = psql_via(&pg, &proxy, "SELECT 1").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1");

    // The URL through the proxy works too.
    let url = pg.url_via(&proxy);
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port())
    );
    assert_eq!(
        pg.url_for_via(&proxy, "a@b", Some("p:w"), "db"),
        format!("postgres://a%40b:p%3Aw@127.0.0.1:{}/db", proxy.port())
    );
    let mut cmd = pg.command("psql");
    cmd.args(["-X", "-A", "-t", "-w", "-d", &url, "-c", "SELECT 2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "2");

    // Blackhole: psql hangs (it is killed when the timeout drops it).
    proxy.set_mode(FaultMode::Blackhole);
    let hung = timeout(Duration::from_secs(2), psql_via(&pg, &proxy, "SELECT 1")).await;
    assert!(hung.is_err(), "psql did not hang: {hung:?}");

    proxy.set_mode(FaultMode::Pass);
    let out = psql_via(&pg, &proxy, "SELECT 1").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1");

    // Reset: psql fails at once.
    proxy.set_mode(FaultMode::Reset);
    let out = timeout(Duration::from_secs(10), psql_via(&pg, &proxy, "SELECT 1"))
        .await
        .expect("psql hung in Reset");
    assert!(!out.status.success(), "psql succeeded in Reset");

    // Refuse: psql cannot connect.
    proxy.set_mode(FaultMode::Refuse);
    let out = timeout(Duration::from_secs(10), psql_via(&pg, &proxy, "SELECT 1"))
        .await
        .expect("psql hung in Refuse");
    assert!(!out.status.success(), "psql succeeded in Refuse");
    assert!(stderr(&out).contains("refused"), "{}", stderr(&out));

    proxy.set_mode(FaultMode::Pass);
    let out = psql_via(&pg, &proxy, "SELECT 1").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1");
}

/// A server on 127.0.0.1 that greets every connection with `name`, then
/// echoes; it runs until the test's runtime ends.
async fn greeting_server(name: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if stream.write_all(name).await.is_err() {
                    return;
                }
                let mut buf = vec![0; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Connects through `proxy` and returns the connection with the greeting it got.
async fn greeted(proxy: &FaultProxy) -> (TcpStream, String) {
    let mut stream = connect(proxy).await;
    let mut greeting = [0; 1];
    timeout(PROMPT, stream.read_exact(&mut greeting))
        .await
        .expect("no greeting")
        .expect("reading the greeting failed");
    (stream, String::from_utf8_lossy(&greeting).into_owned())
}

#[tokio::test]
async fn retarget_sends_new_connections_to_the_new_target_and_cuts_the_old_ones() {
    let (a, b) = (greeting_server(b"a").await, greeting_server(b"b").await);
    let proxy = FaultProxy::start(a).await.unwrap();
    let (mut on_a, greeting) = greeted(&proxy).await;
    assert_eq!(greeting, "a");
    round_trip(&mut on_a, b"hello").await;

    proxy.retarget(b);
    assert_eq!(proxy.target(), b);
    assert!(format!("{proxy:?}").contains(&b.to_string()));
    assert_reset(&mut on_a).await;
    let (mut on_b, greeting) = greeted(&proxy).await;
    assert_eq!(greeting, "b");
    round_trip(&mut on_b, b"hello").await;

    // The mode stays; a connection hanging in a blackhole is cut too, and
    // the next one reaches the new target once the blackhole ends.
    proxy.set_mode(FaultMode::Blackhole);
    let mut hanging = connect(&proxy).await;
    assert_hangs(&mut hanging).await;
    proxy.retarget(a);
    assert_eq!(proxy.mode(), FaultMode::Blackhole);
    assert_reset(&mut hanging).await;
    assert_reset(&mut on_b).await;
    proxy.set_mode(FaultMode::Pass);
    let (_, greeting) = greeted(&proxy).await;
    assert_eq!(greeting, "a");
}

#[tokio::test]
async fn point_to_moves_the_proxy_to_another_server_cutting_sessions_on_the_old_one() {
    let (a, b) = tokio::join!(PgServer::start(), PgServer::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    for (pg, name) in [(&a, "a"), (&b, "b")] {
        pg.psql(&format!("CREATE TABLE whoami AS SELECT '{name}' AS name"))
            .await
            .unwrap();
    }
    let proxy = FaultProxy::to_server(&a).await.unwrap();
    let whoami = "SELECT name FROM whoami";
    assert_eq!(stdout(&psql_via(&a, &proxy, whoami).await), "a");

    // A session busy on a for 10 s.
    let busy = tokio::spawn({
        let mut cmd = a.command("psql");
        cmd.args(["-h", "127.0.0.1", "-p", &proxy.port().to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-w"])
            .args(["-c", "SELECT pg_sleep(10)"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        async move { cmd.output().await.unwrap() }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(10)'")
        .await
        .unwrap()
        != "1"
    {
        assert!(Instant::now() < deadline, "the busy session never started");
        sleep(Duration::from_millis(10)).await;
    }

    proxy.point_to(&b);
    assert_eq!(proxy.target(), b.addr());
    let out = timeout(Duration::from_secs(5), busy)
        .await
        .expect("the session on the old server was not cut")
        .unwrap();
    assert!(
        !out.status.success(),
        "the session on the old server went on"
    );
    assert_eq!(stdout(&psql_via(&a, &proxy, whoami).await), "b");
}
