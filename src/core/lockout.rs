//! Brute-force protection: after `max_failures` consecutive failures for one subject (a user of a client, or a
//! client), the subject is locked for `lock_secs` and answered without checking the credential at all.

use std::collections::HashMap;
use std::sync::Mutex;

use super::clock::UnixTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub max_failures: u32,
    pub lock_secs: u64,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self { max_failures: 5, lock_secs: 300 }
    }
}

/// A failed credential check made by another server of the same state (sidecar replicas), so that an attacker
/// spreading guesses over replicas gets no more than the configured number in total.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedFailure {
    /// `true`: a user's password (`who` is the user's lockout key); `false`: a client's secret.
    #[serde(rename = "u")]
    pub user: bool,
    #[serde(rename = "w")]
    pub who: String,
    #[serde(rename = "at")]
    pub at: UnixTime,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    failures: u32,
    last_failure: UnixTime,
    locked_until: UnixTime,
    /// Checks admitted and not yet decided: each could be one more failure.
    in_flight: u32,
}

/// Why a check was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Locked for this many more seconds.
    Locked(u64),
    /// As many checks are under way as failures would lock the subject: wait for their outcome.
    Busy,
}

/// Bounds memory under a spray of made-up names: at most twice this many subjects are remembered. When the
/// current generation is full it becomes the previous one and the oldest is dropped whole, so every operation
/// is O(1) (amortized), never a scan of all entries. A subject is moved to the current generation when touched.
const GENERATION: usize = 50_000;

#[derive(Debug, Default)]
struct Entries {
    current: HashMap<String, Entry>,
    previous: HashMap<String, Entry>,
}

impl Entries {
    fn get(&self, who: &str) -> Option<&Entry> {
        self.current.get(who).or_else(|| self.previous.get(who))
    }

    /// The entry of `who` in the current generation (moved there, or created).
    fn touch(&mut self, who: &str) -> &mut Entry {
        if !self.current.contains_key(who) {
            if self.current.len() >= GENERATION {
                self.previous = std::mem::take(&mut self.current);
            }
            let entry = self.previous.remove(who).unwrap_or_default();
            self.current.insert(who.to_string(), entry);
        }
        self.current.entry(who.to_string()).or_default()
    }

    fn remove(&mut self, who: &str) {
        self.current.remove(who);
        self.previous.remove(who);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[derive(Debug, Default)]
pub struct Lockout {
    policy: LockoutPolicy,
    entries: Mutex<Entries>,
    /// Checks waiting for one under way to be decided (woken at every decision; each looks again).
    waiters: Mutex<Vec<std::task::Waker>>,
}

impl Lockout {
    pub fn new(policy: LockoutPolicy) -> Self {
        Self { policy, entries: Mutex::default(), waiters: Mutex::default() }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The map holds counters only; after a panic elsewhere it is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds left on the lock, if `who` is locked.
    pub fn locked(&self, who: &str, now: UnixTime) -> Option<u64> {
        self.entries().get(who).filter(|e| e.locked_until > now).map(|e| e.locked_until - now)
    }

    /// Counts a failure; returns true when this failure locked `who`.
    pub fn fail(&self, who: &str, now: UnixTime) -> bool {
        let policy = self.policy;
        let mut entries = self.entries();
        let e = entries.touch(who);
        // Failures spread wider apart than a lock period do not add up.
        if e.last_failure + policy.lock_secs <= now {
            e.failures = 0;
        }
        e.failures += 1;
        e.last_failure = now;
        if e.failures >= policy.max_failures {
            e.failures = 0;
            e.locked_until = now + policy.lock_secs;
            true
        } else {
            false
        }
    }

    pub fn succeed(&self, who: &str) {
        self.entries().remove(who);
    }

    /// Admits one credential check of `who`, decided together with the count: at most as many checks as failures
    /// would lock `who` are under way at once, so concurrent guesses cannot outrun the lockout. A check beyond
    /// that waits until one under way is decided (concurrent logins with the right password all get through, a
    /// few at a time); `Err(seconds)` once `who` is locked. The check ends with [`Admission::succeeded`] or
    /// [`Admission::failed`] (or is dropped: undecided).
    pub async fn admit<'a>(&'a self, who: &str, now: UnixTime) -> Result<Admission<'a>, u64> {
        std::future::poll_fn(|cx| {
            let decided = |r: Result<Admission<'a>, Refused>| match r {
                Ok(a) => Some(Ok(a)),
                Err(Refused::Locked(secs)) => Some(Err(secs)),
                Err(Refused::Busy) => None,
            };
            if let Some(r) = decided(self.try_admit(who, now)) {
                return std::task::Poll::Ready(r);
            }
            self.waiters.lock().unwrap_or_else(|p| p.into_inner()).push(cx.waker().clone());
            // Looked at again once registered: a decision in between would otherwise wake nobody.
            match decided(self.try_admit(who, now)) {
                Some(r) => std::task::Poll::Ready(r),
                None => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// [`Lockout::admit`] without waiting.
    fn try_admit<'a>(&'a self, who: &str, now: UnixTime) -> Result<Admission<'a>, Refused> {
        let policy = self.policy;
        let mut entries = self.entries();
        if let Some(e) = entries.get(who) {
            if e.locked_until > now {
                return Err(Refused::Locked(e.locked_until - now));
            }
            let failures = if e.last_failure + policy.lock_secs <= now { 0 } else { e.failures };
            if failures + e.in_flight >= policy.max_failures {
                return Err(Refused::Busy);
            }
        }
        entries.touch(who).in_flight += 1;
        Ok(Admission { lockout: self, who: who.to_string(), done: false })
    }

    fn settle(&self, who: &str) {
        {
            let mut entries = self.entries();
            if entries.get(who).is_some() {
                let e = entries.touch(who);
                e.in_flight = e.in_flight.saturating_sub(1);
                if e.in_flight == 0 && e.failures == 0 && e.locked_until == 0 {
                    entries.remove(who);
                }
            }
        }
        let waiting = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in waiting {
            waker.wake();
        }
    }
}

/// One admitted credential check.
pub struct Admission<'a> {
    lockout: &'a Lockout,
    who: String,
    done: bool,
}

impl Admission<'_> {
    pub fn succeeded(mut self) {
        self.done = true;
        self.lockout.settle(&self.who);
        self.lockout.succeed(&self.who);
    }

    /// Counts the failure; returns true when it locked the subject.
    pub fn failed(mut self, now: UnixTime) -> bool {
        self.done = true;
        let locked = self.lockout.fail(&self.who, now);
        self.lockout.settle(&self.who);
        locked
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.lockout.settle(&self.who);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_unlocks_after_the_period() {
        let l = Lockout::new(LockoutPolicy { max_failures: 3, lock_secs: 60 });
        assert!(!l.fail("alice", 100));
        assert!(!l.fail("alice", 101));
        assert_eq!(l.locked("alice", 101), None);
        assert!(l.fail("alice", 102));
        assert_eq!(l.locked("alice", 102), Some(60));
        assert_eq!(l.locked("bob", 102), None);
        assert_eq!(l.locked("alice", 162), None);
    }

    /// A spray of made-up names cannot grow memory without bound, and a subject being guessed at right now stays
    /// remembered through it.
    #[test]
    fn a_spray_of_names_is_bounded_and_the_current_victim_stays_locked() {
        let l = Lockout::new(LockoutPolicy { max_failures: 3, lock_secs: 60 });
        for i in 0..(5 * GENERATION) {
            l.fail(&format!("made-up-{i}"), 100);
            if i % 1000 == 0 {
                l.fail("alice", 100); // the attacker's real target, among the noise
            }
        }
        assert!(l.entries().len() <= 2 * GENERATION, "{} entries", l.entries().len());
        assert_eq!(l.locked("alice", 100), Some(60));
    }

    #[test]
    fn success_resets_and_old_failures_expire() {
        let l = Lockout::new(LockoutPolicy { max_failures: 2, lock_secs: 60 });
        l.fail("alice", 0);
        l.succeed("alice");
        assert!(!l.fail("alice", 1));
        // The next failure comes after a full period: the count starts again.
        assert!(!l.fail("alice", 100));
        assert!(l.fail("alice", 101));
    }
}
