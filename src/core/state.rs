//! The token state in memory, with the compare-and-set rule every storage adapter enforces.
//!
//! Adapters differ in how they make changes durable and shared; they all keep one of these as their view.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::clock::UnixTime;
use super::lockout::SharedFailure;
use super::model::{Change, LivePair, RefreshGrant, RefreshLookup, SharedKey, TokenId, TokenKey};

#[derive(Debug, Clone)]
struct RefreshEntry {
    key: SharedKey,
    expires_at: UnixTime,
    rotated: bool,
}

/// A change was decided on a pair that is no longer current: decide again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the token key changed concurrently")]
pub struct Conflict;

/// One durable record. A log of these, replayed in order, rebuilds the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Record {
    /// Set a key's pair (or remove it), optionally remembering a refresh token retired by rotation.
    #[serde(rename = "set")]
    Set {
        k: TokenKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        p: Option<LivePair>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rot: Option<RefreshGrant>,
    },
    /// Remember a retired refresh token (snapshots only).
    #[serde(rename = "rot")]
    Rotated { k: TokenKey, rot: RefreshGrant },
    /// A failed credential check, shared with the other servers of the same state for brute-force lockout. Not
    /// token state: applying it changes nothing here.
    #[serde(rename = "fail")]
    Failed { f: SharedFailure },
}

impl From<Change> for Record {
    fn from(c: Change) -> Self {
        Record::Set { k: c.key, p: c.next, rot: c.rotated_out }
    }
}

#[derive(Debug, Default)]
pub struct TokenState {
    pairs: HashMap<SharedKey, LivePair>,
    access: HashMap<TokenId, SharedKey>,
    refresh: HashMap<TokenId, RefreshEntry>,
}

impl TokenState {
    pub fn pair(&self, key: &TokenKey) -> Option<&LivePair> {
        self.pairs.get(key)
    }

    /// The key and pair whose current access token is `id`.
    pub fn find_access(&self, id: &TokenId) -> Option<(SharedKey, LivePair)> {
        let key = self.access.get(id)?;
        let pair = self.pairs.get(key)?;
        (pair.access_id == *id).then(|| (key.clone(), pair.clone()))
    }

    pub fn find_refresh(&self, id: &TokenId) -> RefreshLookup {
        match self.refresh.get(id) {
            None => RefreshLookup::Unknown,
            Some(e) if e.rotated => RefreshLookup::Rotated { key: e.key.clone() },
            Some(e) => match self.pairs.get(&e.key) {
                Some(pair) if pair.refresh.is_some_and(|r| r.id == *id) => {
                    RefreshLookup::Live { key: e.key.clone(), pair: pair.clone() }
                }
                _ => RefreshLookup::Unknown,
            },
        }
    }

    /// Whether `change` was decided on the current pair of its key.
    pub fn check(&self, change: &Change) -> Result<(), Conflict> {
        let current = self.pairs.get(&change.key).map(|p| p.access_id);
        if current == change.expect { Ok(()) } else { Err(Conflict) }
    }

    /// Applies a checked change (or a replayed record).
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Set { k, p, rot } => {
                let key: SharedKey = match self.pairs.get_key_value(&k) {
                    Some((existing, _)) => existing.clone(),
                    None => Arc::new(k),
                };
                if let Some(old) = self.pairs.remove(&key) {
                    self.access.remove(&old.access_id);
                    if let Some(r) = old.refresh {
                        self.refresh.remove(&r.id);
                    }
                }
                if let Some(pair) = p {
                    self.access.insert(pair.access_id, key.clone());
                    if let Some(r) = pair.refresh {
                        self.refresh
                            .insert(r.id, RefreshEntry { key: key.clone(), expires_at: r.expires_at, rotated: false });
                    }
                    self.pairs.insert(key.clone(), pair);
                }
                if let Some(r) = rot {
                    self.refresh.insert(r.id, RefreshEntry { key, expires_at: r.expires_at, rotated: true });
                }
            }
            Record::Rotated { k, rot } => {
                let key = self.pairs.get_key_value(&k).map_or_else(|| Arc::new(k), |(existing, _)| existing.clone());
                self.refresh.insert(rot.id, RefreshEntry { key, expires_at: rot.expires_at, rotated: true });
            }
            Record::Failed { .. } => {}
        }
    }

    /// Checks and applies in one step.
    pub fn commit(&mut self, change: Change) -> Result<(), Conflict> {
        self.check(&change)?;
        self.apply(change.into());
        Ok(())
    }

    /// Forgets everything that can no longer be used at `now`. Returns how many entries went.
    pub fn prune(&mut self, now: UnixTime) -> usize {
        let before = self.entries();
        let dead: Vec<SharedKey> =
            self.pairs.iter().filter(|(_, p)| p.dead_after() <= now).map(|(k, _)| k.clone()).collect();
        for key in dead {
            self.apply(Record::Set { k: (*key).clone(), p: None, rot: None });
        }
        self.refresh.retain(|_, e| !(e.rotated && e.expires_at <= now));
        before - self.entries()
    }

    /// Records that rebuild this state: every live pair and every remembered rotated refresh token.
    pub fn snapshot(&self) -> impl Iterator<Item = Record> + '_ {
        let pairs = self.pairs.iter().map(|(k, p)| Record::Set { k: (**k).clone(), p: Some(p.clone()), rot: None });
        let rotated = self.refresh.iter().filter(|(_, e)| e.rotated).map(|(id, e)| Record::Rotated {
            k: (*e.key).clone(),
            rot: RefreshGrant { id: *id, expires_at: e.expires_at },
        });
        pairs.chain(rotated)
    }

    /// Live pairs plus remembered rotated refresh tokens.
    pub fn entries(&self) -> usize {
        self.pairs.len() + self.refresh.values().filter(|e| e.rotated).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Subject;
    use crate::core::scope::ScopeSet;

    fn key(device: &str) -> TokenKey {
        TokenKey {
            client_id: "shop".into(),
            subject: Subject::User("alice".into()),
            scopes: ScopeSet::parse(device).expect("scope"),
        }
    }

    fn pair(n: u8, exp: UnixTime) -> LivePair {
        LivePair {
            access_id: TokenId([n; 16]),
            access_scopes: ScopeSet::default(),
            issued_at: 0,
            access_expires_at: exp,
            refresh: Some(RefreshGrant { id: TokenId([n + 100; 16]), expires_at: exp * 2 }),
        }
    }

    fn set(k: TokenKey, expect: Option<u8>, next: Option<LivePair>) -> Change {
        Change { key: k, expect: expect.map(|n| TokenId([n; 16])), next, rotated_out: None }
    }

    #[test]
    fn replacing_a_pair_revokes_its_tokens_and_other_keys_are_untouched() {
        let mut s = TokenState::default();
        s.commit(set(key("device_ipad"), None, Some(pair(1, 10)))).expect("first");
        s.commit(set(key("device_iphone"), None, Some(pair(2, 10)))).expect("other device");
        s.commit(set(key("device_ipad"), Some(1), Some(pair(3, 10)))).expect("supersede");
        assert!(s.find_access(&TokenId([1; 16])).is_none());
        assert_eq!(s.find_refresh(&TokenId([101; 16])), RefreshLookup::Unknown);
        assert!(s.find_access(&TokenId([2; 16])).is_some());
        assert!(s.find_access(&TokenId([3; 16])).is_some());
    }

    #[test]
    fn stale_expectations_conflict_and_change_nothing() {
        let mut s = TokenState::default();
        s.commit(set(key("device_ipad"), None, Some(pair(1, 10)))).expect("first");
        assert_eq!(s.commit(set(key("device_ipad"), None, Some(pair(2, 10)))), Err(Conflict));
        assert_eq!(s.commit(set(key("device_ipad"), Some(9), None)), Err(Conflict));
        assert!(s.find_access(&TokenId([1; 16])).is_some());
        assert!(s.find_access(&TokenId([2; 16])).is_none());
    }

    #[test]
    fn rotated_refresh_tokens_are_remembered_until_they_expire() {
        let mut s = TokenState::default();
        s.commit(set(key("a"), None, Some(pair(1, 10)))).expect("first");
        let old = pair(1, 10).refresh.expect("refresh");
        s.commit(Change { rotated_out: Some(old), ..set(key("a"), Some(1), Some(pair(2, 10))) }).expect("rotate");
        assert!(matches!(s.find_refresh(&old.id), RefreshLookup::Rotated { .. }));
        assert!(matches!(s.find_refresh(&TokenId([102; 16])), RefreshLookup::Live { .. }));
        assert_eq!(s.prune(19), 0);
        // At 20 the rotated token (exp 20) and the live pair (dead after 20) are gone.
        assert_eq!(s.prune(20), 2);
        assert_eq!(s.entries(), 0);
    }

    #[test]
    fn snapshot_replay_rebuilds_the_same_state() {
        let mut s = TokenState::default();
        s.commit(set(key("a"), None, Some(pair(1, 10)))).expect("a");
        let old = pair(1, 10).refresh.expect("refresh");
        s.commit(Change { rotated_out: Some(old), ..set(key("a"), Some(1), Some(pair(2, 10))) }).expect("rotate");
        s.commit(set(key("b"), None, Some(pair(3, 10)))).expect("b");
        let mut copy = TokenState::default();
        for r in s.snapshot() {
            let line = serde_json::to_string(&r).expect("encode");
            copy.apply(serde_json::from_str(&line).expect("decode"));
        }
        for id in [2u8, 3] {
            assert_eq!(copy.find_access(&TokenId([id; 16])), s.find_access(&TokenId([id; 16])));
        }
        assert!(matches!(copy.find_refresh(&old.id), RefreshLookup::Rotated { .. }));
        assert_eq!(copy.entries(), s.entries());
    }
}
