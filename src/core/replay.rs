//! Used assertions remembered by this process until they expire: a trusted issuer's JWT is one grant, not many
//! (RFC 7523 section 3, item 7). A store that several servers share remembers them for all of them too
//! ([`super::store::TokenStore::remember_assertion`]); this memory answers a replay at the same server without a
//! round trip, and is all there is for stores that keep none.
//!
//! Bounded: entries are 32-byte digests, expired ones are swept, at most [`MAX_REMEMBERED`] live ones are kept, and
//! one subject token counts toward a family (its token exchanges) of at most a given size, so that one client holding
//! one ID token cannot fill the memory by inventing device scopes.

use std::collections::HashMap;
use std::sync::Mutex;

use super::clock::UnixTime;

/// Live entries beyond which new assertions are refused (as unavailable, not as replays) rather than remembered.
pub const MAX_REMEMBERED: usize = 1_000_000;

type Digest = [u8; 32];

fn digest(id: &str) -> Digest {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstUse {
    Yes,
    /// Seen before and not expired: a replay.
    Replayed,
    /// Its family already has as many members as it may.
    FamilyFull,
    /// The memory is full of live entries.
    Full,
}

#[derive(Default)]
pub struct ReplayMemory {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashMap<Digest, UnixTime>,
    /// Members per family (one subject token's exchanges), until the family's last member expires.
    families: HashMap<Digest, (usize, UnixTime)>,
    /// Expired entries are swept when the map reaches this size, which then doubles the live count: amortised O(1).
    sweep_at: usize,
    /// When the last sweep ran: a full memory is swept again at most once per second.
    swept_at: UnixTime,
}

impl ReplayMemory {
    /// Remembers `id` until `until` if it is not remembered already. `family`: (a name shared by related ids, the
    /// most members it may have).
    pub fn first_use(&self, id: &str, family: Option<(&str, usize)>, until: UnixTime, now: UnixTime) -> FirstUse {
        let key = digest(id);
        // A panic elsewhere cannot leave the maps half-updated: each operation is one insert or remove.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.seen.get(&key).is_some_and(|exp| *exp > now) {
            return FirstUse::Replayed;
        }
        let full = g.seen.len() >= MAX_REMEMBERED;
        if (!full && g.seen.len() >= g.sweep_at.max(1024)) || (full && g.swept_at < now) {
            g.seen.retain(|_, exp| *exp > now);
            g.families.retain(|_, (_, exp)| *exp > now);
            g.sweep_at = g.seen.len() * 2;
            g.swept_at = now;
        }
        if g.seen.len() >= MAX_REMEMBERED {
            return FirstUse::Full;
        }
        if let Some((name, max)) = family {
            let slot = g.families.entry(digest(name)).or_insert((0, until));
            if slot.1 <= now {
                *slot = (0, until);
            }
            if slot.0 >= max {
                return FirstUse::FamilyFull;
            }
            slot.0 += 1;
            slot.1 = slot.1.max(until);
        }
        g.seen.insert(key, until);
        FirstUse::Yes
    }

    /// Forgets `id`: its grant did not go through for a reason that is not the client's (storage unavailable).
    pub fn forget(&self, id: &str, family: Option<&str>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.seen.remove(&digest(id)).is_some()
            && let Some(name) = family
            && let Some(slot) = g.families.get_mut(&digest(name))
        {
            slot.0 = slot.0.saturating_sub(1);
        }
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
        assert_eq!(m.first_use("a", None, 100, 10), FirstUse::Yes);
        assert_eq!(m.first_use("a", None, 100, 99), FirstUse::Replayed);
        assert_eq!(m.first_use("b", None, 100, 10), FirstUse::Yes);
        // Past its expiry the assertion itself is refused as expired; the memory no longer needs it.
        assert_eq!(m.first_use("a", None, 200, 100), FirstUse::Yes);
        m.forget("b", None);
        assert_eq!(m.first_use("b", None, 100, 10), FirstUse::Yes);
    }

    #[test]
    fn expired_entries_are_swept_so_memory_follows_the_live_ones() {
        let m = ReplayMemory::default();
        for i in 0..100_000u64 {
            // Each lives 10 s; time moves 1 s per 100 assertions.
            let now = i / 100;
            assert_eq!(m.first_use(&format!("id{i}"), None, now + 10, now), FirstUse::Yes);
        }
        // About 1,000 are live at the end; sweeping keeps the map within a small multiple of that.
        assert!(m.len() < 5_000, "{} entries kept", m.len());
    }

    #[test]
    fn a_family_has_at_most_its_size_and_a_forgotten_member_frees_its_place() {
        let m = ReplayMemory::default();
        for device in 0..3 {
            assert_eq!(m.first_use(&format!("t\0device_{device}"), Some(("t", 3)), 100, 10), FirstUse::Yes);
        }
        assert_eq!(m.first_use("t\0device_3", Some(("t", 3)), 100, 10), FirstUse::FamilyFull);
        assert_eq!(m.first_use("u\0device_3", Some(("u", 3)), 100, 10), FirstUse::Yes, "another subject token");
        m.forget("t\0device_2", Some("t"));
        assert_eq!(m.first_use("t\0device_3", Some(("t", 3)), 100, 10), FirstUse::Yes);
        // Once the family's members expired, it starts again.
        assert_eq!(m.first_use("t\0device_4", Some(("t", 3)), 300, 200), FirstUse::Yes);
    }

    #[test]
    fn the_memory_refuses_past_its_bound_every_time_not_once() {
        let m = ReplayMemory::default();
        for i in 0..MAX_REMEMBERED {
            assert_eq!(m.first_use(&i.to_string(), None, 100, 10), FirstUse::Yes);
        }
        for i in 0..3 {
            assert_eq!(m.first_use(&format!("more{i}"), None, 100, 10), FirstUse::Full, "attempt {i}");
        }
        assert_eq!(m.len(), MAX_REMEMBERED);
        // Once they expire, there is room again.
        assert_eq!(m.first_use("later", None, 300, 200), FirstUse::Yes);
    }
}
