//! Counts requests in flight so shutdown can wait for exactly those.
//!
//! Each RPC holds an [`InFlight`] guard (a streaming RPC holds it until its
//! stream ends), and shutdown waits until the count is zero, bounded by
//! half the grace period, before its final flush. Only then does it wait
//! for the connections to close (GOAWAY sent at the signal; each closes
//! once its last frames are written, see [`crate::linger`]), until the
//! deadline: a request still running after half the grace must not hold
//! the final flush back.

use std::sync::{
    atomic::{AtomicUsize, Ordering::SeqCst},
    Arc,
};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Drain {
    count: AtomicUsize,
    idle: Notify,
}

/// Held while one request is being served.
#[derive(Debug)]
pub struct InFlight(Arc<Drain>);

impl Drain {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.count.fetch_add(1, SeqCst);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.count.load(SeqCst)
    }

    /// Resolves once no request is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a guard dropped in between still wakes us.
            notified.as_mut().enable();
            if self.count.load(SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_resolves_when_the_last_guard_drops() {
        let d = Arc::new(Drain::default());
        d.idle().await;
        let (a, b) = (d.enter(), d.enter());
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.idle().await }
        });
        drop(a);
        assert_eq!(d.in_flight(), 1);
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.unwrap();
        assert_eq!(d.in_flight(), 0);
    }
}
