//! Used assertions remembered by this process until they expire: a trusted issuer's JWT is one grant, not many
//! (RFC 7523 section 3, item 7). A store that several servers share remembers them for all of them too
//! ([`super::store::TokenStore::remember_assertion`]); this memory answers a replay at the same server without a
//! round trip, and is all there is for stores that keep none.

use std::collections::HashMap;
use std::sync::Mutex;

use super::clock::UnixTime;

/// Live entries beyond which new assertions are refused (as unavailable, not as replays) rather than remembered:
/// memory stays bounded whatever a trusted issuer sends. Only a trusted issuer's signed JWTs get this far.
pub const MAX_REMEMBERED: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstUse {
    Yes,
    /// Seen before and not expired: a replay.
    Replayed,
    /// The memory is full of live entries.
    Full,
}

#[derive(Default)]
pub struct ReplayMemory {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashMap<String, UnixTime>,
    /// Expired entries are swept when the map reaches this size, which then doubles the live count: amortised O(1).
    sweep_at: usize,
}

impl ReplayMemory {
    /// Remembers `id` until `until` if it is not remembered already.
    pub fn first_use(&self, id: &str, until: UnixTime, now: UnixTime) -> FirstUse {
        // A panic elsewhere cannot leave the map half-updated: each operation is one insert or remove.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.seen.get(id).is_some_and(|exp| *exp > now) {
            return FirstUse::Replayed;
        }
        if g.seen.len() >= g.sweep_at.max(1024) {
            g.seen.retain(|_, exp| *exp > now);
            g.sweep_at = g.seen.len() * 2;
            if g.seen.len() >= MAX_REMEMBERED {
                return FirstUse::Full;
            }
        }
        g.seen.insert(id.to_string(), until);
        FirstUse::Yes
    }

    /// Forgets `id`: its grant did not go through for a reason that is not the client's (storage unavailable).
    pub fn forget(&self, id: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).seen.remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assertion_is_refused_while_remembered_and_accepted_once_expired() {
        let m = ReplayMemory::default();
        assert_eq!(m.first_use("a", 100, 10), FirstUse::Yes);
        assert_eq!(m.first_use("a", 100, 99), FirstUse::Replayed);
        assert_eq!(m.first_use("b", 100, 10), FirstUse::Yes);
        // Past its expiry the assertion itself is refused as expired; the memory no longer needs it.
        assert_eq!(m.first_use("a", 200, 100), FirstUse::Yes);
        m.forget("b");
        assert_eq!(m.first_use("b", 100, 10), FirstUse::Yes);
    }

    #[test]
    fn expired_entries_are_swept_so_memory_follows_the_live_ones() {
        let m = ReplayMemory::default();
        for i in 0..100_000u64 {
            // Each lives 10 s; time moves 1 s per 100 assertions.
            let now = i / 100;
            assert_eq!(m.first_use(&format!("id{i}"), now + 10, now), FirstUse::Yes);
        }
        // About 1,000 are live at the end; sweeping keeps the map within a small multiple of that.
        assert!(m.len() < 5_000, "{} entries kept", m.len());
    }
}
