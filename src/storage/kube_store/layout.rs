//! Where an application's token state lives in Kubernetes, and how it is written down. Shared by the controller
//! (which creates the objects, owned by the application) and the sidecars (which read and write them).
//!
//! ```text
//! <app>-tokens-journal   ConfigMap  base: "<seq>"            records up to here are in the shards
//!                                   b-<first seq, 12 digits>: one batch of records, one JSON record a line
//! <app>-tokens-00 .. 31  ConfigMaps upto: "<seq>"            this shard holds its keys' state up to this seq
//!                                   entries: snapshot records, one JSON record a line
//! ```
//! Records are the core's [`Record`]s: token keys, token ids and expiries. No token string, and nothing from
//! which one can be made without the token-tagging Secret (opaque and refresh strings carry an HMAC tag under
//! it; JWTs are signed with keys in another Secret).

use std::collections::BTreeMap;

use crate::core::model::TokenKey;
use crate::core::state::Record;

/// Number of snapshot shards per application. Fixed: a key's shard must never change.
pub const SHARDS: usize = 32;
pub const BASE_FIELD: &str = "base";
pub const UPTO_FIELD: &str = "upto";
pub const ENTRIES_FIELD: &str = "entries";
const BATCH_PREFIX: &str = "b-";

pub fn journal_name(app: &str) -> String {
    format!("{app}-tokens-journal")
}

pub fn shard_name(app: &str, shard: usize) -> String {
    format!("{app}-tokens-{shard:02}")
}

/// Every state object of an application.
pub fn object_names(app: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(journal_name(app)).chain((0..SHARDS).map(move |i| shard_name(app, i)))
}

/// The data of a freshly created state object.
pub fn empty_object(name: &str) -> BTreeMap<String, String> {
    if name.ends_with("-tokens-journal") {
        BTreeMap::from([(BASE_FIELD.to_string(), "0".to_string())])
    } else {
        BTreeMap::from([(UPTO_FIELD.to_string(), "0".to_string()), (ENTRIES_FIELD.to_string(), String::new())])
    }
}

/// The shard of a key: FNV-1a of its fields, stable across versions and processes.
pub fn shard_of(key: &TokenKey) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(key.client_id.as_bytes());
    eat(key.sub().as_bytes());
    eat(if key.username().is_some() { b"u" } else { b"c" });
    for s in key.scopes.iter() {
        eat(s.as_bytes());
    }
    (h % SHARDS as u64) as usize
}

/// The token key a record is about; `None` for records that are not token state (shared lockout failures).
pub fn record_key(record: &Record) -> Option<&TokenKey> {
    match record {
        Record::Set { k, .. } | Record::Rotated { k, .. } => Some(k),
        Record::Failed { .. } => None,
    }
}

pub fn batch_field(first_seq: u64) -> String {
    format!("{BATCH_PREFIX}{first_seq:012}")
}

/// The first sequence number of a batch field, if `field` is one.
pub fn batch_first_seq(field: &str) -> Option<u64> {
    field.strip_prefix(BATCH_PREFIX)?.parse().ok()
}

/// One JSON record a line.
pub fn encode_lines<'a>(records: impl IntoIterator<Item = &'a Record>) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r)?);
        out.push('\n');
    }
    Ok(out)
}

pub fn decode_lines(text: &str) -> Result<Vec<Record>, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Subject;
    use crate::core::scope::ScopeSet;

    #[test]
    fn shards_are_stable_and_spread() {
        let key = |u: &str, s: &str| TokenKey {
            client_id: "shop".into(),
            subject: Subject::User(u.into()),
            scopes: ScopeSet::parse(s).expect("scope"),
        };
        // Pinned: a change of the hash would put existing keys in the wrong shard (FNV-1a worked by hand).
        assert_eq!(shard_of(&key("alice", "device_ipad")), 3);
        let used: std::collections::HashSet<usize> =
            (0..200).map(|i| shard_of(&key(&format!("user{i}"), "device_x"))).collect();
        assert_eq!(used.len(), SHARDS);
        assert_eq!(batch_first_seq(&batch_field(42)), Some(42));
        assert_eq!(batch_first_seq(BASE_FIELD), None);
    }
}
