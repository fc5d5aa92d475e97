//! Credentials never show: not in `Debug` of the builder or the pool, not in errors (their
//! `Display`, `Debug` or the reported endpoint), not in configuration problems.

use protected_pool::{Postgres, ProtectedPool, Route};

const SECRET: &str = "s3cr3t-Pa55";

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(SECRET), "{what} shows the password: {text}");
}

#[tokio::test]
async fn passwords_stay_out_of_debug_output_and_errors() {
    // Nothing listens on port 1: every call fails with a connection error.
    let url = format!("postgres://app:{SECRET}@127.0.0.1:1/app");
    let builder = ProtectedPool::<Postgres>::builder()
        .primary(&url)
        .replica(&url);
    assert_clean("builder Debug", &format!("{builder:?}"));
    let pool = builder.build().expect("valid configuration");
    assert_clean("pool Debug", &format!("{pool:?}"));

    let read = pool
        .read(sqlx::query_scalar::<_, i64>("SELECT 1"))
        .fetch_one()
        .await
        .expect_err("nothing listens there");
    let write = pool
        .write(sqlx::query("SELECT 1"))
        .execute()
        .await
        .expect_err("nothing listens there");
    for error in [&read, &write] {
        assert_clean("error Display", &error.to_string());
        assert_clean("error Debug", &format!("{error:?}"));
        assert!(matches!(error.endpoint(), Some("primary" | "replica-1")));
    }
    assert_eq!(read.attempts().len(), 2, "both endpoints tried: {read}");
    assert!(read.to_string().contains("[primary]") && read.to_string().contains("[replica-1]"));
    assert_eq!(write.route(), Some(Route::Write));

    let connect = ProtectedPool::<Postgres>::builder()
        .primary(&url)
        .connect()
        .await
        .expect_err("nothing listens there");
    assert_clean("connect error", &format!("{connect} {connect:?}"));
}

#[test]
fn a_bad_url_is_reported_without_its_password() {
    let error = ProtectedPool::<Postgres>::builder()
        .primary(format!("postgres://app:{SECRET}@db.example:not-a-port/app"))
        .build()
        .expect_err("the port is not a number");
    let text = format!("{error} {error:?}");
    assert_clean("configuration error", &text);
    assert!(text.contains("primary.url"), "{text}");
}
