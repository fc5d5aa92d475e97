//! A statement's rows as a stream. Until the first row (or result) arrives the call is like
//! any other: the route's breakers, its deadline, and for a read, the next endpoint after a
//! failure of this one. Once a row has been handed on, the stream is the caller's: it is not
//! replayed (the caller has seen rows), and it is not timed (the caller sets the pace).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::StreamExt;
use sqlx::{Database, Either};
use sqlx_core::transaction::TransactionManager;
use tokio::sync::mpsc;
use tokio::time::timeout_at;

use super::PoolInner;
use super::attempt::Failed;
use super::failover::Replay;
use super::handout::{Taken, Use};
use super::statement::{Statement, Steps};
use crate::backend::Backend;
use crate::endpoint::Checkout;
use crate::error::{Error, Result};
use crate::route::Route;

/// What a statement gives: a result (rows affected) or a row.
pub(crate) type Step<DB> = Either<<DB as Database>::QueryResult, <DB as Database>::Row>;

/// The items of a stream of rows, as they come from the endpoint that serves it.
///
/// Returned by [`Routed::fetch`](crate::Routed::fetch); polled like any [`Stream`]
/// (`futures::StreamExt::next`, `TryStreamExt::try_next`). Dropping it mid-way closes its
/// connection and asks the server to stop the statement.
#[must_use = "a stream of rows does nothing unless polled"]
pub struct RowStream<'p, T> {
    /// Runs the statement and hands its items on; `None` once finished.
    driver: Option<Pin<Box<dyn Future<Output = ()> + Send + 'p>>>,
    items: mpsc::Receiver<Result<T>>,
}

impl<T> fmt::Debug for RowStream<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowStream")
            .field("finished", &self.driver.is_none())
            .finish_non_exhaustive()
    }
}

impl<T> Stream for RowStream<'_, T> {
    type Item = Result<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        let this = self.get_mut();
        if let Some(driver) = &mut this.driver
            && driver.as_mut().poll(cx).is_ready()
        {
            // Its sender is gone with it: the items left are read out, then the end.
            this.driver = None;
        }
        this.items.poll_recv(cx)
    }
}

impl<DB: Backend> PoolInner<DB> {
    /// The items `pick` keeps of `statement`'s results and rows, on `route`.
    pub(crate) fn stream<'p, T: Send + 'p>(
        &'p self,
        route: Route,
        replay: Replay,
        statement: Result<Statement<DB>>,
        pick: fn(Step<DB>) -> Option<Result<T, sqlx::Error>>,
    ) -> RowStream<'p, T> {
        // One item ahead at most: the statement goes at the pace the caller reads.
        let (sender, items) = mpsc::channel(1);
        let driver = async move {
            let statement = match statement {
                Ok(statement) => statement.unnamed_if(self.unnamed_statements),
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    return;
                }
            };
            let using = Streaming {
                statement: &statement,
                pick,
                sender: &sender,
            };
            let streamed = self.hand_out(route, replay, using).await;
            if let Err(error) = streamed {
                let _ = sender.send(Err(error)).await;
            }
        };
        RowStream {
            driver: Some(Box::pin(driver)),
            items,
        }
    }
}

type Manager<DB> = <DB as Database>::TransactionManager;

/// A statement streamed on a connection handed out: its first item is the first step.
struct Streaming<'x, DB: Backend, T> {
    statement: &'x Statement<DB>,
    pick: fn(Step<DB>) -> Option<Result<T, sqlx::Error>>,
    sender: &'x mpsc::Sender<Result<T>>,
}

impl<DB: Backend, T: Send> Use<DB> for Streaming<'_, DB, T> {
    type Output = ();

    fn take<'a>(
        &'a mut self,
        taken: Taken<'a, DB>,
    ) -> impl Future<Output = Result<(), Failed>> + Send + 'a {
        stream_from(taken, self.statement, self.pick, self.sender)
    }
}

/// The next item `pick` keeps.
async fn next_kept<DB: Backend, T>(
    steps: &mut Steps<'_, DB>,
    pick: fn(Step<DB>) -> Option<Result<T, sqlx::Error>>,
) -> Option<Result<T, sqlx::Error>> {
    loop {
        match steps.next().await? {
            Ok(step) => {
                if let Some(item) = pick(step) {
                    return Some(item);
                }
            }
            Err(error) => return Some(Err(error)),
        }
    }
}

/// Runs `statement` on a connection handed out and sends its items: the first under the
/// route's deadline and the breaker's verdict (a failure may move to the next endpoint), the
/// rest as the caller reads them (a failure ends the stream with its error).
async fn stream_from<DB: Backend, T>(
    taken: Taken<'_, DB>,
    statement: &Statement<DB>,
    pick: fn(Step<DB>) -> Option<Result<T, sqlx::Error>>,
    sender: &mpsc::Sender<Result<T>>,
) -> Result<(), Failed> {
    let Taken {
        mut checkout,
        verdict,
        deadline,
    } = taken;
    let route = verdict.route;
    // Behind a transaction-mode pooler the statement's round trips must reach one server
    // connection: the whole stream is one transaction.
    let own_transaction = checkout.one_transaction_per_call();
    if own_transaction {
        match timeout_at(deadline, Manager::<DB>::begin(checkout.busy(), None)).await {
            Err(_) => return Err(verdict.timed_out()),
            Ok(Err(source)) => return Err(verdict.failed(&mut checkout, source)),
            Ok(Ok(())) => {}
        }
    }
    let mut steps = statement.fetch_many_on(checkout.busy());
    let first = match timeout_at(deadline, next_kept::<DB, T>(&mut steps, pick)).await {
        Err(_) => return Err(verdict.timed_out()),
        Ok(Some(Err(source))) => {
            drop(steps);
            let source = end(&mut checkout, own_transaction, Err(source)).await;
            return Err(verdict.failed(&mut checkout, source.unwrap_err()));
        }
        Ok(None) => {
            drop(steps);
            return match end(&mut checkout, own_transaction, Ok(())).await {
                Ok(()) => {
                    checkout.idle(None);
                    verdict.succeeded();
                    Ok(())
                }
                Err(source) => Err(verdict.failed(&mut checkout, source)),
            };
        }
        Ok(Some(Ok(first))) => first,
    };
    let endpoint = verdict.succeeded();
    if sender.send(Ok(first)).await.is_err() {
        return Ok(()); // nobody reads any more; the busy checkout closes the connection
    }
    let mut failure = None;
    while let Some(item) = next_kept::<DB, T>(&mut steps, pick).await {
        match item {
            Ok(item) => {
                if sender.send(Ok(item)).await.is_err() {
                    return Ok(());
                }
            }
            Err(source) => {
                failure = Some(source);
                break;
            }
        }
    }
    drop(steps);
    let ended = match failure {
        Some(source) => end(&mut checkout, own_transaction, Err(source)).await,
        None => end(&mut checkout, own_transaction, Ok(())).await,
    };
    let failure = ended.err();
    checkout.idle(failure.as_ref());
    if let Some(source) = failure {
        let outcome_unknown = checkout.is_broken();
        let error = Error::Database {
            route,
            endpoint,
            class: DB::classify(&source),
            outcome_unknown,
            source,
        };
        let _ = sender.send(Err(error)).await;
    }
    Ok(())
}

/// Ends the stream's own transaction, if it has one: committed after a clean end, rolled back
/// after `outcome`'s error (which stays the error to report).
async fn end<DB: Backend>(
    checkout: &mut Checkout<DB>,
    own_transaction: bool,
    outcome: Result<(), sqlx::Error>,
) -> Result<(), sqlx::Error> {
    if !own_transaction {
        return outcome;
    }
    let raw = checkout.busy();
    match outcome {
        Ok(()) => Manager::<DB>::commit(raw).await,
        Err(error) => {
            if let Err(rollback) = Manager::<DB>::rollback(raw).await {
                // The connection may be gone with it; the first error is the one to report.
                checkout.idle(Some(&rollback));
            }
            Err(error)
        }
    }
}
