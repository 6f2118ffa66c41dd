//! The time port. The core never reads the wall clock itself, so expiry and lockout are testable without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds since the Unix epoch.
pub type UnixTime = u64;

pub trait Clock: Send + Sync {
    fn now(&self) -> UnixTime;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now: UnixTime) -> Self {
        Self(AtomicU64::new(now))
    }
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        self.0.load(Ordering::SeqCst)
    }
}
