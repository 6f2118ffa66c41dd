//! A clock adapter for end-to-end tests of the controller (`--clock-offset-file`, hidden): the system clock
//! shifted by a number of seconds read from a file at every call, so a test can move a running process's time
//! forward (e.g. past a 30-day key rotation). A missing or unreadable file means no shift.

use crate::core::clock::{Clock, SystemClock, UnixTime};

#[derive(Debug, Clone)]
pub struct OffsetFileClock {
    path: std::path::PathBuf,
}

impl OffsetFileClock {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl Clock for OffsetFileClock {
    fn now(&self) -> UnixTime {
        let offset: i64 = std::fs::read_to_string(&self.path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        SystemClock.now().saturating_add_signed(offset)
    }
}
