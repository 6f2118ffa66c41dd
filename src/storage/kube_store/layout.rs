//! Where an application's token state lives in Kubernetes, and how it is written down. Shared by the controller
//! (which creates the objects, owned by the application) and the sidecars (which read and write them).
//!
//! ```text
//! <app>-tokens-journal-00 .. 15   ConfigMaps, a ring of journal segments
//!     epoch: "<seq>"              the sequence number of this segment's first record (0: never used)
//!     sealed: "<seq>"             present once full: its last record; nothing is appended after it
//!     binaryData b-<seq>-<n>      one batch of n records (see codec), its first record numbered <seq>
//! <app>-tokens-snapshot           ConfigMap: which snapshot is current
//!     set, chunks, upto, gen      chunks 0..chunks of set 0 or 1 hold the state up to record <upto>
//!     claim                       present while a replica is writing the next snapshot
//!     keys, capacity              the snapshot's live token keys and the keys a full snapshot would hold at its
//!                                 bytes per key (written with it; the controller reports them in TokenStateReady)
//! <app>-tokens-snapshot-00 .. 31  ConfigMaps: two sets of 16 snapshot chunks (set 0: 00..15, set 1: 16..31)
//!     gen, binaryData state       one piece of a snapshot; its gen must equal the pointer's
//! ```
//! Records are the core's [`Record`]s in the binary form of [`super::codec`]: token keys, token ids and expiries.
//! No token string, and nothing from which one can be made without the token-tagging Secret (opaque and refresh
//! strings carry an HMAC tag under it; JWTs are signed with keys in another Secret).

use std::collections::BTreeMap;

/// Journal segments in the ring.
pub const SEGMENTS: usize = 16;
/// Snapshot chunks per set.
pub const CHUNKS_PER_SET: usize = 16;
/// Largest snapshot chunk (decoded bytes; base64 in the object makes it 4/3 of this, under the 1 MiB limit).
pub const CHUNK_BYTES: usize = 700 * 1024;

pub const EPOCH_FIELD: &str = "epoch";
pub const SEALED_FIELD: &str = "sealed";
pub const SET_FIELD: &str = "set";
pub const CHUNKS_FIELD: &str = "chunks";
pub const UPTO_FIELD: &str = "upto";
pub const GEN_FIELD: &str = "gen";
pub const CLAIM_FIELD: &str = "claim";
pub const KEYS_FIELD: &str = "keys";
pub const CAPACITY_FIELD: &str = "capacity";
/// The most snapshot bytes there is room for.
pub const SNAPSHOT_CAPACITY_BYTES: usize = CHUNK_BYTES * CHUNKS_PER_SET;
pub const STATE_FIELD: &str = "state";
const BATCH_PREFIX: &str = "b-";

pub fn segment_name(app: &str, index: usize) -> String {
    format!("{app}-tokens-journal-{index:02}")
}

/// The pointer to the current snapshot.
pub fn pointer_name(app: &str) -> String {
    format!("{app}-tokens-snapshot")
}

pub fn chunk_name(app: &str, set: usize, part: usize) -> String {
    format!("{app}-tokens-snapshot-{:02}", set * CHUNKS_PER_SET + part)
}

/// Every state object of an application.
pub fn object_names(app: &str) -> impl Iterator<Item = String> + '_ {
    (0..SEGMENTS)
        .map(move |i| segment_name(app, i))
        .chain(std::iter::once(pointer_name(app)))
        .chain((0..2 * CHUNKS_PER_SET).map(move |i| chunk_name(app, 0, i)))
}

/// The data of a freshly created state object.
pub fn empty_object(app: &str, name: &str) -> BTreeMap<String, String> {
    let field = |k: &str, v: &str| (k.to_string(), v.to_string());
    if name == segment_name(app, 0) {
        // The first segment is open from the start: records are numbered from 1.
        BTreeMap::from([field(EPOCH_FIELD, "1")])
    } else if name == pointer_name(app) {
        BTreeMap::from([field(SET_FIELD, "0"), field(CHUNKS_FIELD, "0"), field(UPTO_FIELD, "0"), field(GEN_FIELD, "")])
    } else if name.starts_with(&format!("{app}-tokens-journal-")) {
        BTreeMap::from([field(EPOCH_FIELD, "0")])
    } else {
        BTreeMap::from([field(GEN_FIELD, "")])
    }
}

/// The field of a batch of `records` records, the first numbered `first_seq`.
pub fn batch_field(first_seq: u64, records: usize) -> String {
    format!("{BATCH_PREFIX}{first_seq:012}-{records}")
}

/// The first sequence number and the number of records of a batch field, if `field` is one.
pub fn batch_of(field: &str) -> Option<(u64, usize)> {
    let (first, n) = field.strip_prefix(BATCH_PREFIX)?.split_once('-')?;
    Some((first.parse().ok()?, n.parse().ok()?)).filter(|(_, n)| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_has_its_own_name_and_a_start() {
        let names: Vec<String> = object_names("shop").collect();
        assert_eq!(names.len(), SEGMENTS + 1 + 2 * CHUNKS_PER_SET);
        assert_eq!(names.iter().collect::<std::collections::HashSet<_>>().len(), names.len());
        assert_eq!(names[0], "shop-tokens-journal-00");
        assert_eq!(chunk_name("shop", 1, 0), "shop-tokens-snapshot-16");
        assert_eq!(empty_object("shop", "shop-tokens-journal-00")[EPOCH_FIELD], "1");
        assert_eq!(empty_object("shop", "shop-tokens-journal-07")[EPOCH_FIELD], "0");
        assert_eq!(empty_object("shop", "shop-tokens-snapshot")[UPTO_FIELD], "0");
        assert_eq!(empty_object("shop", "shop-tokens-snapshot-31")[GEN_FIELD], "");
        assert_eq!(batch_of(&batch_field(42, 7)), Some((42, 7)));
        assert_eq!(batch_of(EPOCH_FIELD), None);
        assert_eq!(batch_of("b-000000000042-0"), None);
    }
}
