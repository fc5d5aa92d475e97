//! Every future the pool hands out can be spawned on a multi-threaded runtime: service code
//! calls the pool from `tokio::spawn`ed tasks and from web handlers that require `Send`.
//! This file compiles only if that holds; the test then checks the futures also run.

use protected_pool::{ErrorClass, Postgres, ProtectedPool, Route};

fn assert_send<T: Send>(value: T) -> T {
    value
}

#[tokio::test]
async fn pool_futures_are_send_and_spawnable() {
    // A port nothing listens on: every call fails fast with a connection error.
    let pool: ProtectedPool<Postgres> = ProtectedPool::builder()
        .primary("postgres://app@127.0.0.1:1/app")
        .build()
        .unwrap();
    let tasks = vec![
        tokio::spawn({
            let pool = pool.clone();
            async move {
                assert_send(
                    pool.read(sqlx::query_scalar::<_, i64>("SELECT 1"))
                        .fetch_one(),
                )
                .await
                .map(drop)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            // An async fallback, here one that awaits and then declines: the call's error.
            let backup = pool.clone();
            async move {
                assert_send(
                    pool.read(sqlx::query_scalar::<_, i64>("SELECT 1"))
                        .or_fallback_async(move |_request| async move {
                            tokio::task::yield_now().await;
                            drop(backup);
                            Ok::<_, std::io::Error>(None)
                        })
                        .fetch_one(),
                )
                .await
                .map(drop)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                let query = sqlx::query_as::<_, (i64, String)>("SELECT 1, 'a'").bind(7_i64);
                assert_send(pool.auth(query).fetch_optional())
                    .await
                    .map(drop)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                assert_send(pool.write(sqlx::query("DELETE FROM t")).execute())
                    .await
                    .map(drop)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                assert_send(pool.read_with(async |conn| {
                    sqlx::query_scalar::<_, i64>("SELECT 1")
                        .fetch_one(&mut *conn)
                        .await
                }))
                .await
                .map(drop)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                assert_send(pool.with_connection(Route::Write, async |conn| {
                    sqlx::query("SELECT 1").execute(&mut *conn).await.map(drop)
                }))
                .await
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                assert_send(pool.transaction(async |tx| {
                    sqlx::query("SELECT 1").execute(&mut **tx).await.map(drop)
                }))
                .await
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                let retry = protected_pool::TransactionRetry::attempts(1);
                assert_send(pool.transaction_with_retry(retry, async |tx| {
                    sqlx::query("SELECT 1").execute(&mut **tx).await.map(drop)
                }))
                .await
            }
        }),
    ];
    // sqlx code through the pool: its errors are sqlx's.
    let sqlx_tasks = [
        tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tx = assert_send(pool.begin()).await?;
                assert_send(sqlx::query("SELECT 1").execute(&mut *tx)).await?;
                Ok::<_, sqlx::Error>(assert_send(tx.commit()).await?)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                use futures_util::TryStreamExt;
                let reader = pool.reader();
                assert_send(sqlx::query("SELECT 1").execute(&pool)).await?;
                assert_send(sqlx::query("SELECT 1").fetch_all(reader)).await?;
                let stream = pool.read(sqlx::query_scalar::<_, i32>("SELECT 1")).fetch();
                Ok(assert_send(stream.try_collect::<Vec<_>>())
                    .await
                    .map(drop)?)
            }
        }),
        tokio::spawn({
            let pool = pool.clone();
            async move {
                // A function over `impl Acquire`, as sqlx's docs write them, given `&pool`
                // in a spawned task: compiles only if the pool's `Acquire` impl holds for
                // every connection lifetime, as sqlx's `&Pool` does.
                async fn on_one_connection<'c>(
                    db: impl sqlx::Acquire<'c, Database = Postgres>,
                ) -> sqlx::Result<()> {
                    let mut conn = db.acquire().await?;
                    sqlx::query("SELECT 1").execute(&mut *conn).await.map(drop)
                }
                assert_send(on_one_connection(&pool)).await
            }
        }),
    ];
    for task in sqlx_tasks {
        let error = task
            .await
            .expect("task ran")
            .expect_err("nothing listens there");
        assert!(matches!(error, sqlx::Error::Io(_)), "{error:?}");
    }
    for task in tasks {
        let error = task
            .await
            .expect("task ran")
            .expect_err("nothing listens there");
        assert_eq!(error.class(), Some(ErrorClass::Connection), "{error}");
    }
    // A keyed write tries again until the write route gives up (its breaker opens).
    let keyed = tokio::spawn({
        let pool = pool.clone();
        async move {
            assert_send(
                pool.write(sqlx::query("DELETE FROM t WHERE id = $1").bind(1_i64))
                    .idempotent("delete:1")
                    .execute(),
            )
            .await
        }
    });
    let error = keyed
        .await
        .expect("task ran")
        .expect_err("nothing listens there");
    assert!(error.is_unavailable(), "{error}");

    let sqlite = ProtectedPool::sqlite()
        .primary("sqlite::memory:")
        .build()
        .unwrap();
    let value = tokio::spawn(async move {
        sqlite
            .read(sqlx::query_scalar::<_, i64>("SELECT 41 + 1"))
            .fetch_one()
            .await
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(value, 42);
}

/// A call's future is moved several times per call (into the task, through the span): it
/// must stay small. A connect future stored inline once made a read's future 42 kB, and the
/// copies a tenth of the pool's CPU time; an `async` block around the call, which holds the
/// call's future twice, made it 3,080 bytes (1,544 without). The endpoint loop's future is
/// held inline: boxing it cost an allocation and a copy of all of it on every call, more than
/// the moves of the larger future. Storing in the cache and falling back are boxed (3,416
/// bytes in all, from 4,024): they are off the common path. Boxing deadpool's checkout future
/// (1,192 bytes) too would make a read 2,296 bytes, but cost more in allocation than it
/// saved in copies (callgrind, key lookup: +500 instructions per call). The manager's recycle
/// future sits in that checkout future three times (deadpool's optional recycle timeout wraps
/// it): with its rare ping boxed it went from 184 to 64 bytes, and a read from 3,336 to 2,976.
#[test]
fn call_futures_stay_small() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let pool: ProtectedPool<Postgres> = ProtectedPool::builder()
        .primary("postgres://app@127.0.0.1:1/app")
        .build()
        .unwrap();
    let query = || sqlx::query_scalar::<_, i64>("SELECT $1").bind(1_i64);
    let sizes = [
        ("read", size_of_val(&pool.read(query()).fetch_one())),
        (
            "cached read",
            size_of_val(
                &pool
                    .read(query())
                    .cached("k", std::time::Duration::from_secs(1))
                    .fetch_one(),
            ),
        ),
        (
            "write",
            size_of_val(&pool.write(sqlx::query("SELECT 1")).execute()),
        ),
        (
            "read with an async fallback",
            size_of_val(
                &pool
                    .read(query())
                    .or_fallback_async(|_| async { Ok::<_, std::io::Error>(Some(0_i64)) })
                    .fetch_one(),
            ),
        ),
    ];
    for (call, size) in sizes {
        println!("the future of a {call}: {size} bytes");
        assert!(size <= 3072, "the future of a {call} is {size} bytes");
    }
}
