//! Metrics and traces through a scripted outage of a real PostgreSQL server: a recording
//! metrics recorder and a capturing tracing subscriber are installed for this test binary,
//! and the values they saw are checked phase by phase.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use protected_pool::breaker::{BreakerConfig, OpenDuration, State};
use protected_pool::{Postgres, ProtectedPool, Route, telemetry};
use protected_pool_testkit::PgServer;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

// ---- metrics -------------------------------------------------------------------------------

/// A metric's name, its labels and its value.
type Entry = (String, Vec<(String, String)>, DebugValue);

/// One snapshot of the recorder: counters hold what was added since the previous snapshot.
struct Metrics(Vec<Entry>);

impl Metrics {
    fn take(snapshotter: &Snapshotter) -> Self {
        let entries = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let labels = key
                    .labels()
                    .map(|label| (label.key().to_owned(), label.value().to_owned()))
                    .collect();
                (key.name().to_owned(), labels, value)
            })
            .collect();
        Self(entries)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a DebugValue> + 'a {
        self.0.iter().filter_map(move |(metric, have, value)| {
            let all = labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
            (metric == name && all).then_some(value)
        })
    }

    /// The sum of the counters named `name` carrying `labels`.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|value| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).find_map(|value| match value {
            DebugValue::Gauge(v) => Some(v.into_inner()),
            _ => None,
        })
    }

    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.matching(name, labels)
            .map(|value| match value {
                DebugValue::Histogram(samples) => samples.len(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum()
    }
}

// ---- traces --------------------------------------------------------------------------------

type Fields = HashMap<String, String>;

#[derive(Clone, Default)]
struct Capture {
    open: Arc<Mutex<HashMap<u64, Fields>>>,
    closed: Arc<Mutex<Vec<Fields>>>,
    events: Arc<Mutex<Vec<(Level, Fields)>>>,
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = Fields::new();
        fields.insert("span".into(), attrs.metadata().name().into());
        attrs.record(&mut Collect(&mut fields));
        self.open.lock().unwrap().insert(id.into_u64(), fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Collect(fields));
        }
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(fields);
        }
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Collect(&mut fields));
        self.events
            .lock()
            .unwrap()
            .push((*event.metadata().level(), fields));
    }
}

impl Capture {
    /// Closed `db.call` spans, taking them.
    fn calls(&self) -> Vec<Fields> {
        std::mem::take(&mut *self.closed.lock().unwrap())
            .into_iter()
            .filter(|fields| fields["span"] == "db.call")
            .collect()
    }

    fn events_with(&self, message: &str) -> Vec<(Level, Fields)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, fields)| fields.get("message").is_some_and(|m| m == message))
            .cloned()
            .collect()
    }
}

fn has(span: &Fields, field: &str, value: &str) -> bool {
    span.get(field).is_some_and(|v| v == value)
}

// ---- the scenario --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_traces_follow_a_scripted_outage() {
    // Both must be in place before the pool is built: it registers its handles then.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .expect("the only subscriber of this test binary");

    let server = PgServer::start().await.expect("server");
    let quick = BreakerConfig {
        consecutive_failures: Some(1),
        open: OpenDuration {
            base: Duration::from_millis(300),
            max: Duration::from_millis(300),
            multiplier: 1.0,
            jitter: 0.0,
        },
        success_threshold: 1,
        ..BreakerConfig::read()
    };
    let pool = ProtectedPool::<Postgres>::builder()
        .primary_named("db", server.url())
        .breaker(Route::Read, quick.clone())
        .breaker(Route::Write, quick)
        .health_check_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect("connect");
    let read = |sql: &'static str| pool.read(sqlx::query_scalar::<_, i32>(sql));

    // Phase 1: healthy traffic and one bad query.
    for _ in 0..3 {
        read("SELECT 1")
            .cached("one", Duration::from_secs(60))
            .fetch_one()
            .await
            .expect("read");
    }
    read("SELEC 1").fetch_one().await.expect_err("syntax error");
    tokio::time::sleep(Duration::from_millis(250)).await; // a probe round: pool gauges
    let up = Metrics::take(&snapshotter);
    let read_db = [("route", "read"), ("endpoint", "db")];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = read_db.to_vec();
        labels.push(extra);
        labels
    };
    assert_eq!(
        up.counter(telemetry::CALLS, &with(("outcome", "success"))),
        3
    );
    assert_eq!(
        up.counter(telemetry::CALLS, &with(("outcome", "failure"))),
        1
    );
    assert_eq!(up.counter(telemetry::ERRORS, &with(("class", "query"))), 1);
    assert_eq!(
        up.samples(telemetry::CALL_DURATION, &with(("outcome", "success"))),
        3
    );
    assert_eq!(up.gauge(telemetry::BREAKER_STATE, &read_db), Some(0.0));
    let open = up.gauge(
        telemetry::CONNECTIONS,
        &[("endpoint", "db"), ("state", "open")],
    );
    assert!(open.is_some_and(|n| n >= 1.0), "open connections: {open:?}");
    assert_eq!(
        up.gauge(
            telemetry::CONNECTIONS,
            &[("endpoint", "db"), ("state", "max")]
        ),
        Some(10.0)
    );

    let spans = capture.calls();
    let ok = spans
        .iter()
        .filter(|s| has(s, "outcome", "success") && has(s, "db.operation", "SELECT"))
        .count();
    assert!(ok >= 3, "{spans:#?}");
    let span = spans
        .iter()
        .find(|s| has(s, "outcome", "success") && has(s, "route", "read"))
        .unwrap();
    for (field, value) in [("db.system", "postgresql"), ("endpoint", "db")] {
        assert!(has(span, field, value), "{field} in {span:?}");
    }
    let failed = spans
        .iter()
        .find(|s| has(s, "outcome", "failure"))
        .expect("failed span");
    assert!(has(failed, "error.class", "query"), "{failed:?}");

    // Phase 2: the server dies. One failure opens the breaker; the rest are refused and
    // served from the cache or a fallback.
    server.kill9().await.expect("kill -9");
    read("SELECT 1").fetch_one().await.expect_err("dead server");
    for _ in 0..2 {
        let served = read("SELECT 1")
            .cached("one", Duration::from_secs(60))
            .fetch_one()
            .await;
        assert!(served.expect("from the cache").is_stale());
    }
    let served = read("SELECT 1").or_fallback(|_| Some(7)).fetch_one().await;
    assert_eq!(*served.expect("fallback"), 7);
    let down = Metrics::take(&snapshotter);
    assert_eq!(
        down.counter(telemetry::CALLS, &with(("outcome", "failure"))),
        1
    );
    assert_eq!(
        down.counter(telemetry::ERRORS, &with(("class", "connection"))),
        1
    );
    assert_eq!(
        down.counter(telemetry::CALLS, &with(("outcome", "rejected"))),
        3
    );
    let none = [("route", "read"), ("endpoint", telemetry::NO_ENDPOINT)];
    let mut cache = none.to_vec();
    cache.push(("outcome", "cache"));
    let mut fallback = none.to_vec();
    fallback.push(("outcome", "fallback"));
    assert_eq!(down.counter(telemetry::CALLS, &cache), 2);
    assert_eq!(down.counter(telemetry::CALLS, &fallback), 1);
    assert_eq!(
        down.counter(
            telemetry::CACHE_LOOKUPS,
            &[("route", "read"), ("result", "hit")]
        ),
        2
    );
    assert_eq!(down.gauge(telemetry::BREAKER_STATE, &read_db), Some(1.0));
    let opened = with(("to", "open"));
    assert_eq!(down.counter(telemetry::BREAKER_TRANSITIONS, &opened), 1);

    let spans = capture.calls();
    assert_eq!(
        spans.iter().filter(|s| has(s, "outcome", "cache")).count(),
        2,
        "{spans:#?}"
    );
    assert_eq!(
        spans
            .iter()
            .filter(|s| has(s, "outcome", "fallback"))
            .count(),
        1
    );
    let warned = capture.events_with("circuit breaker opened");
    assert!(
        warned.iter().any(|(level, fields)| *level == Level::WARN
            && has(fields, "route", "read")
            && has(fields, "endpoint", "db")),
        "{warned:?}"
    );

    // Phase 3: the server is back; the probe closes the breaker with no user call.
    server.start_again().await.expect("restart");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while pool.breaker(Route::Read, "db").unwrap().state() != State::Closed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "read breaker never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = Metrics::take(&snapshotter);
    assert_eq!(
        back.counter(telemetry::BREAKER_TRANSITIONS, &with(("to", "closed"))),
        1
    );
    let closed = capture.events_with("circuit breaker closed");
    assert!(
        closed
            .iter()
            .any(|(level, fields)| *level == Level::INFO && has(fields, "route", "read")),
        "{closed:?}"
    );
}
