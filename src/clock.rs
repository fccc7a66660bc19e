//! The server clock, behind a trait so tests (and the model test) can drive
//! time. The domain never reads a clock: it takes time as a parameter.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::calendar::{now_ts, Ts};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Ts;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Ts {
        now_ts()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(at: Ts) -> ManualClock {
        ManualClock(AtomicI64::new(at))
    }

    pub fn set(&self, at: Ts) {
        self.0.store(at, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Ts) {
        self.0.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Ts {
        self.0.load(Ordering::SeqCst)
    }
}
