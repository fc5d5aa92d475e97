//! One timer for one try at a call, moved from deadline to deadline.
//!
//! A try waits on up to three deadlines in turn: a free connection, the end of its share of
//! the call's time, the route's deadline. A tokio timer per deadline costs a clock read, a
//! reference to the runtime's timer and an insert into and a removal from its wheel, each
//! time. This one is made when something first has to wait, and later deadlines move it:
//! moving a registered timer later is one atomic update, without touching the wheel.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A timer that does not exist until it is first polled; see the module documentation.
#[derive(Debug)]
pub(crate) struct Timer<'a> {
    sleep: Pin<&'a mut Option<Sleep>>,
}

impl<'a> Timer<'a> {
    /// A timer kept in `slot`, which the caller pins where the timer may live (the call's
    /// future), typically `std::pin::pin!(None)`.
    pub(crate) fn new(slot: Pin<&'a mut Option<Sleep>>) -> Self {
        Self { sleep: slot }
    }

    /// Ready once `deadline` has passed; registers the waker otherwise.
    pub(crate) fn poll_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        match self.sleep.as_mut().as_pin_mut() {
            Some(mut sleep) if sleep.deadline() != deadline => sleep.as_mut().reset(deadline),
            Some(_) => {}
            None => self.sleep.set(Some(tokio::time::sleep_until(deadline))),
        }
        self.sleep
            .as_mut()
            .as_pin_mut()
            .map_or(Poll::Ready(()), |sleep| sleep.poll(cx))
    }

    /// `future`'s output, or `None` when `deadline` passes first. The future is polled first,
    /// so one that is ready at once never arms the timer.
    pub(crate) async fn within<F: Future>(
        &mut self,
        deadline: Instant,
        future: F,
    ) -> Option<F::Output> {
        self.race(future, || deadline).await
    }

    /// `future` against the timer, the deadline asked for only once the future has to wait.
    async fn race<F: Future>(
        &mut self,
        future: F,
        mut deadline: impl FnMut() -> Instant,
    ) -> Option<F::Output> {
        let mut future = pin!(future);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            self.poll_until(deadline(), cx).map(|()| None)
        })
        .await
    }
}

/// `future`'s output, or `None` if it is not done within `limit`. Unlike
/// `tokio::time::timeout`, the clock is read and a timer made only if the future is not ready
/// at once (as a memory cache always is).
pub(crate) async fn within<F: Future>(limit: Duration, future: F) -> Option<F::Output> {
    let mut slot = pin!(None);
    let mut deadline = None;
    Timer::new(slot.as_mut())
        .race(future, || {
            *deadline.get_or_insert_with(|| Instant::now() + limit)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn within_a_limit() {
        let start = Instant::now();
        assert_eq!(within(Duration::from_secs(1), async { 1 }).await, Some(1));
        let slow = within(Duration::from_secs(1), async {
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        assert_eq!(slow.await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ready_future_never_arms_the_timer() {
        let mut slot = pin!(None);
        let got = Timer::new(slot.as_mut())
            .within(Instant::now() + Duration::from_secs(1), async { 7 })
            .await;
        assert_eq!(got, Some(7));
        assert!(slot.is_none(), "no timer for a future that was ready");
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_follows_each_deadline() {
        let mut slot = pin!(None);
        let mut timer = Timer::new(slot.as_mut());
        let start = Instant::now();
        let first = timer
            .within(
                start + Duration::from_millis(10),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(first, None);
        assert_eq!(start.elapsed(), Duration::from_millis(10));
        // A later deadline: the same timer, moved.
        let second = timer
            .within(start + Duration::from_millis(50), async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                "done"
            })
            .await;
        assert_eq!(second, Some("done"));
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        // An earlier deadline than the one it holds.
        let third = timer
            .within(
                start + Duration::from_millis(35),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(third, None);
        assert_eq!(start.elapsed(), Duration::from_millis(35));
        // A deadline already past.
        let fourth = timer.within(start, std::future::pending::<()>()).await;
        assert_eq!(fourth, None);
    }
}
