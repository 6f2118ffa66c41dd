//! The compact binary form of state records in the journal segments and snapshot chunks.
//!
//! JSON lines cost about 230 bytes a token; this form costs about 100 in a journal batch and about 65 in a
//! snapshot, which is what keeps the bytes written per token and the snapshot objects small. Strings (client ids,
//! usernames, scopes) are written once per batch or snapshot and referred to by number afterwards.
//!
//! ```text
//! blob    := version(=2) record*
//! record  := 1 key flags(bit0 pair) [pair]                        set a key's pair
//!          | 3 user(u8) str(who) varint(at)                       a shared failed credential check
//!          | 4 digest32 varint(until)                             a shared used assertion
//! key     := str(client) subject(0 client | 1 user str(name) | 2 federated str(issuer U+0001 name)) varint(n) str*n
//! pair    := id16 scopes(0 the key's | 1 varint(n) str*n) varint(iat) varint(exp) has_refresh(u8) [grant]
//! grant   := id16 varint(exp) varint(generation) varint(session start)
//! str     := varint(0) varint(len) bytes    a new string, numbered from 1 in order of appearance
//!          | varint(n>0)                     string number n
//! ```
//! Version 1 blobs (written before refresh generations) are still read: their grants hold an 8-byte chain id in place
//! of the generation (read as generation 0), a set record may carry a rotated-out grant (flags bit1), and record
//! kind 2 is a remembered rotated token; those are read and dropped.
//! Decoding never panics: corrupt input is an error naming the byte offset.

use std::collections::HashMap;

use crate::core::lockout::SharedFailure;
use crate::core::model::{FederatedUser, LivePair, RefreshGrant, Subject, TokenId, TokenKey};
use crate::core::scope::ScopeSet;
use crate::core::state::Record;

const VERSION: u8 = 2;
/// The format before refresh-token generations.
const VERSION_CHAINS: u8 = 1;
const MAX_STRING: usize = 64 * 1024;
const MAX_SCOPES: u64 = 4096;

/// Writes records into one blob, one at a time (a snapshot is encoded without collecting its records first),
/// optionally cut into pieces of a fixed size as it goes (snapshot chunks: no buffer of the whole snapshot).
pub struct Encoder {
    out: Vec<u8>,
    strings: HashMap<Box<str>, u64>,
    piece_bytes: usize,
    pieces: Vec<Vec<u8>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self { out: vec![VERSION], strings: HashMap::new(), piece_bytes: usize::MAX, pieces: Vec::new() }
    }
}

impl Encoder {
    /// An encoder whose blob comes out in pieces of `piece_bytes` (the last one shorter).
    pub fn in_pieces(piece_bytes: usize) -> Self {
        let mut out = Vec::with_capacity(piece_bytes.min(1 << 20) + 1024);
        out.push(VERSION);
        Self { out, piece_bytes: piece_bytes.max(1), ..Self::default() }
    }

    /// The pieces so far and the last one.
    pub fn finish_pieces(mut self) -> Vec<Vec<u8>> {
        if !self.out.is_empty() || self.pieces.is_empty() {
            self.pieces.push(self.out);
        }
        self.pieces
    }

    /// Bytes encoded so far.
    pub fn total_len(&self) -> usize {
        self.pieces.iter().map(Vec::len).sum::<usize>() + self.out.len()
    }

    fn cut(&mut self) {
        while self.out.len() >= self.piece_bytes {
            let rest = self.out.split_off(self.piece_bytes);
            let mut next = Vec::with_capacity(self.piece_bytes.min(1 << 20) + 1024);
            next.extend_from_slice(&rest);
            self.pieces.push(std::mem::replace(&mut self.out, next));
        }
    }

    pub fn push(&mut self, record: &Record) {
        match record {
            Record::Set { k, p } => {
                self.out.push(1);
                self.key(k);
                self.out.push(u8::from(p.is_some()));
                if let Some(p) = p {
                    self.pair(k, p);
                }
            }
            // Never made any more; nothing to keep of it.
            Record::LegacyRotated {} => return,
            Record::Failed { f } => {
                self.out.push(3);
                self.out.push(u8::from(f.user));
                self.string(&f.who);
                self.varint(f.at);
            }
            Record::Used { d, u } => {
                self.out.push(4);
                self.out.extend_from_slice(d);
                self.varint(*u);
            }
        }
        self.cut();
    }

    pub fn finish(self) -> Vec<u8> {
        self.out
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.out.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    fn string(&mut self, s: &str) {
        if let Some(n) = self.strings.get(s) {
            let n = *n;
            self.varint(n);
            return;
        }
        let n = self.strings.len() as u64 + 1;
        self.strings.insert(s.into(), n);
        self.varint(0);
        self.varint(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    fn scopes(&mut self, scopes: &ScopeSet) {
        self.varint(scopes.iter().count() as u64);
        for s in scopes.iter() {
            self.string(s);
        }
    }

    fn key(&mut self, k: &TokenKey) {
        self.string(&k.client_id);
        match &k.subject {
            Subject::Client => self.out.push(0),
            Subject::User(u) => {
                self.out.push(1);
                self.string(u);
            }
            Subject::Federated(f) => {
                self.out.push(2);
                self.string(f.stored());
            }
        }
        self.scopes(&k.scopes);
    }

    fn pair(&mut self, k: &TokenKey, p: &LivePair) {
        self.out.extend_from_slice(&p.access_id.0);
        if p.access_scopes == k.scopes {
            self.out.push(0);
        } else {
            self.out.push(1);
            self.scopes(&p.access_scopes);
        }
        self.varint(p.issued_at);
        self.varint(p.access_expires_at);
        match &p.refresh {
            None => self.out.push(0),
            Some(g) => {
                self.out.push(1);
                self.grant(g);
            }
        }
    }

    fn grant(&mut self, g: &RefreshGrant) {
        self.out.extend_from_slice(&g.id.0);
        self.varint(g.expires_at);
        self.varint(u64::from(g.generation));
        self.varint(g.session_started_at);
    }
}

/// Encodes records into one blob.
pub fn encode<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<u8> {
    let mut e = Encoder::default();
    for r in records {
        e.push(r);
    }
    e.finish()
}

struct Decoder<'b> {
    input: &'b [u8],
    at: usize,
    /// The blob's format version.
    version: u8,
    strings: Vec<String>,
    /// The last error was the input ending (more may follow in the next chunk), not corrupt input.
    ended: bool,
}

type Decoded<T> = Result<T, String>;

impl Decoder<'_> {
    fn end<T>(&mut self) -> Decoded<T> {
        self.ended = true;
        self.fail("unexpected end")
    }

    fn fail<T>(&self, what: &str) -> Decoded<T> {
        Err(format!("byte {}: {what}", self.at))
    }

    fn byte(&mut self) -> Decoded<u8> {
        match self.input.get(self.at) {
            Some(b) => {
                self.at += 1;
                Ok(*b)
            }
            None => self.end(),
        }
    }

    fn varint(&mut self) -> Decoded<u64> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        self.fail("varint too long")
    }

    fn id(&mut self) -> Decoded<TokenId> {
        let Some(bytes) = self.input.get(self.at..self.at + 16) else { return self.end() };
        let mut id = [0u8; 16];
        id.copy_from_slice(bytes);
        self.at += 16;
        Ok(TokenId(id))
    }

    fn string(&mut self) -> Decoded<String> {
        let n = self.varint()?;
        if n > 0 {
            return match self.strings.get((n - 1) as usize) {
                Some(s) => Ok(s.clone()),
                None => self.fail("unknown string number"),
            };
        }
        let len = self.varint()? as usize;
        if len > MAX_STRING {
            return self.fail("string too long");
        }
        let Some(bytes) = self.input.get(self.at..self.at + len) else { return self.end() };
        let Ok(s) = std::str::from_utf8(bytes) else { return self.fail("string is not UTF-8") };
        self.at += len;
        self.strings.push(s.to_string());
        Ok(s.to_string())
    }

    fn scopes(&mut self) -> Decoded<ScopeSet> {
        let n = self.varint()?;
        if n > MAX_SCOPES {
            return self.fail("too many scopes");
        }
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            v.push(self.string()?);
        }
        Ok(ScopeSet::from_iter(v))
    }

    fn key(&mut self) -> Decoded<TokenKey> {
        let client_id = self.string()?;
        let subject = match self.byte()? {
            0 => Subject::Client,
            1 => Subject::User(self.string()?),
            2 => match FederatedUser::from_stored(&self.string()?) {
                Some(f) => Subject::Federated(f),
                None => return self.fail("a federated subject without its issuer"),
            },
            _ => return self.fail("unknown subject kind"),
        };
        Ok(TokenKey { client_id, subject, scopes: self.scopes()? })
    }

    fn grant(&mut self) -> Decoded<RefreshGrant> {
        let (id, expires_at) = (self.id()?, self.varint()?);
        let generation = if self.version == VERSION_CHAINS {
            // An 8-byte chain id, which the refresh id now stands for.
            if self.input.get(self.at..self.at + 8).is_none() {
                return self.end();
            }
            self.at += 8;
            0
        } else {
            match u32::try_from(self.varint()?) {
                Ok(generation) => generation,
                Err(_) => return self.fail("generation out of range"),
            }
        };
        Ok(RefreshGrant { id, expires_at, generation, session_started_at: self.varint()? })
    }

    fn pair(&mut self, k: &TokenKey) -> Decoded<LivePair> {
        let access_id = self.id()?;
        let access_scopes = match self.byte()? {
            0 => k.scopes.clone(),
            1 => self.scopes()?,
            _ => return self.fail("unknown scopes kind"),
        };
        let issued_at = self.varint()?;
        let access_expires_at = self.varint()?;
        let refresh = match self.byte()? {
            0 => None,
            1 => Some(self.grant()?),
            _ => return self.fail("unknown refresh kind"),
        };
        Ok(LivePair { access_id, access_scopes, issued_at, access_expires_at, refresh })
    }

    fn record(&mut self) -> Decoded<Record> {
        match self.byte()? {
            1 => {
                let k = self.key()?;
                let flags = self.byte()?;
                let known = if self.version == VERSION_CHAINS { 3 } else { 1 };
                if flags > known {
                    return self.fail("unknown flags");
                }
                let p = if flags & 1 == 1 { Some(self.pair(&k)?) } else { None };
                if flags & 2 == 2 {
                    self.grant()?; // version 1: a rotated-out refresh token, no longer kept
                }
                Ok(Record::Set { k, p })
            }
            2 if self.version == VERSION_CHAINS => {
                self.key()?;
                self.grant()?;
                Ok(Record::LegacyRotated {})
            }
            3 => {
                let user = match self.byte()? {
                    0 => false,
                    1 => true,
                    _ => return self.fail("unknown failure kind"),
                };
                let who = self.string()?;
                Ok(Record::Failed { f: SharedFailure { user, who, at: self.varint()? } })
            }
            4 => {
                let Some(bytes) = self.input.get(self.at..self.at + 32) else { return self.end() };
                let mut d = [0u8; 32];
                d.copy_from_slice(bytes);
                self.at += 32;
                Ok(Record::Used { d, u: self.varint()? })
            }
            _ => {
                self.at -= 1;
                self.fail("unknown record kind")
            }
        }
    }
}

/// Decodes a blob made by [`encode`].
pub fn decode(input: &[u8]) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    decode_each(input, |r| out.push(r))?;
    Ok(out)
}

/// Decodes a blob record by record (a snapshot is applied without collecting its records first). On an error,
/// the records before it have been handed out.
pub fn decode_each(input: &[u8], each: impl FnMut(Record)) -> Result<usize, String> {
    let mut d = ChunkDecoder::default();
    let n = d.feed(input, each)?;
    d.finish()?;
    Ok(n)
}

/// Decodes a blob that arrives in pieces (snapshot chunks), without joining them: a record cut by a chunk
/// boundary waits for the next piece.
#[derive(Default)]
pub struct ChunkDecoder {
    strings: Vec<String>,
    /// The start of a record cut off by the end of the last piece.
    carry: Vec<u8>,
    offset: usize,
    /// The format version, once read.
    version: Option<u8>,
}

impl ChunkDecoder {
    /// Decodes the records complete in `piece` (with what was carried over); returns how many.
    pub fn feed(&mut self, piece: &[u8], mut each: impl FnMut(Record)) -> Result<usize, String> {
        let joined;
        let input: &[u8] = if self.carry.is_empty() {
            piece
        } else {
            joined = [std::mem::take(&mut self.carry).as_slice(), piece].concat();
            &joined
        };
        let version = self.version.unwrap_or(VERSION);
        let mut d = Decoder { input, at: 0, version, strings: std::mem::take(&mut self.strings), ended: false };
        let mut n = 0;
        let result = (|| {
            if self.version.is_none() {
                match d.byte() {
                    Ok(v @ (VERSION | VERSION_CHAINS)) => {
                        self.version = Some(v);
                        d.version = v;
                    }
                    Ok(v) => return Err(format!("byte 0: unknown format version {v}")),
                    Err(_) if d.ended => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            while d.at < input.len() {
                let (start, known) = (d.at, d.strings.len());
                match d.record() {
                    Ok(r) => {
                        each(r);
                        n += 1;
                    }
                    Err(_) if d.ended => {
                        // Cut by the end of this piece: decode it again once the rest has arrived.
                        d.strings.truncate(known);
                        self.carry = input[start..].to_vec();
                        self.offset += start;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            self.offset += input.len();
            Ok(())
        })();
        self.strings = d.strings;
        let offset = self.offset;
        result.map(|()| n).map_err(|e| if offset == 0 { e } else { format!("{e} (counted from blob byte {offset})") })
    }

    /// Ends the blob: an error if it stopped in the middle of a record (or before the version).
    pub fn finish(self) -> Result<(), String> {
        if self.version.is_none() {
            return Err("byte 0: unexpected end".into());
        }
        if !self.carry.is_empty() {
            return Err(format!("byte {}: unexpected end in the middle of a record", self.offset + self.carry.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: Option<&str>, scopes: &str) -> TokenKey {
        TokenKey {
            client_id: "shop-0123456789abcdef".into(),
            subject: user.map_or(Subject::Client, |u| Subject::User(u.into())),
            scopes: ScopeSet::parse(scopes).expect("scopes"),
        }
    }

    fn sample() -> Vec<Record> {
        let k = key(Some("alice"), "device_ipad orders:read");
        let pair = LivePair {
            access_id: TokenId([1; 16]),
            access_scopes: k.scopes.clone(),
            issued_at: 1_700_000_000,
            access_expires_at: 1_700_003_600,
            refresh: Some(RefreshGrant {
                id: TokenId([2; 16]),
                expires_at: 1_700_086_400,
                generation: 300,
                session_started_at: 1_699_990_000,
            }),
        };
        let narrowed =
            LivePair { access_scopes: ScopeSet::parse("device_ipad").expect("scopes"), refresh: None, ..pair.clone() };
        vec![
            Record::Set { k: k.clone(), p: Some(pair) },
            Record::Set { k: k.clone(), p: Some(narrowed) },
            Record::Set { k: key(None, "default"), p: None },
            Record::Set {
                k: TokenKey {
                    subject: Subject::Federated(FederatedUser::new("https://idp.test/realms/shop", "alice")),
                    ..key(None, "device_ipad")
                },
                p: None,
            },
            Record::Failed { f: SharedFailure { user: true, who: "shop/alice\n\u{1b}[31m".into(), at: 5 } },
            Record::Used { d: [9; 32], u: 1_700_000_300 },
        ]
    }

    #[test]
    fn records_round_trip_and_strings_are_written_once() {
        let records = sample();
        let blob = encode(&records);
        assert_eq!(decode(&blob).expect("decode"), records);
        assert_eq!(blob.windows(21).filter(|w| w == b"shop-0123456789abcdef").count(), 1);
        // A typical journal record (a user's device key with access and refresh token) stays near 120 bytes.
        let one = encode(&records[..1]);
        assert!(one.len() <= 125, "{} bytes", one.len());
        assert!(serde_json::to_string(&records[0]).expect("json").len() > 2 * one.len());
    }

    #[test]
    fn a_blob_cut_into_pieces_anywhere_decodes_the_same() {
        let mut records = Vec::new();
        for i in 0..50 {
            records.extend(sample().into_iter().map(|r| match r {
                Record::Set { mut k, p } => {
                    k.subject = Subject::User(format!("user{i}"));
                    Record::Set { k, p }
                }
                other => other,
            }));
        }
        for piece in [1, 7, 64, 1000] {
            let mut e = Encoder::in_pieces(piece);
            for r in &records {
                e.push(r);
            }
            let pieces = e.finish_pieces();
            assert!(pieces.iter().rev().skip(1).all(|p| p.len() == piece), "pieces of {piece} bytes");
            assert_eq!(pieces.concat(), encode(&records), "the same blob as one piece");
            let mut d = ChunkDecoder::default();
            let mut out = Vec::new();
            for p in &pieces {
                d.feed(p, |r| out.push(r)).expect("feed");
            }
            d.finish().expect("finish");
            assert_eq!(out, records);
        }
        // A blob that stops inside a record is an error at the end, not silently shorter.
        let blob = encode(&records);
        let mut d = ChunkDecoder::default();
        let n = d.feed(&blob[..blob.len() - 3], |_| {}).expect("feed");
        assert_eq!(n, records.len() - 1);
        assert!(d.finish().expect_err("cut").contains("in the middle of a record"));
    }

    #[test]
    fn a_federated_subject_without_its_issuer_is_refused() {
        let k = key(Some("alice"), "default");
        let mut blob = encode(&[Record::Set { k, p: None }]);
        // The subject kind byte precedes the new-string mark and length of the username: make it a federated subject.
        let at = blob.windows(5).position(|w| w == b"alice").expect("username") - 3;
        assert_eq!(blob[at], 1, "the user subject kind");
        blob[at] = 2;
        assert!(decode(&blob).expect_err("no issuer").contains("federated"));
    }

    #[test]
    fn corrupt_input_is_an_error_never_a_panic() {
        let blob = encode(&sample());
        for cut in 1..blob.len() {
            // Every strict prefix either fails or decodes fewer records; none panics.
            if let Ok(r) = decode(&blob[..cut]) {
                assert!(r.len() < sample().len());
            }
        }
        for i in 0..blob.len() {
            for bit in 0..8 {
                let mut b = blob.clone();
                b[i] ^= 1 << bit;
                let _ = decode(&b);
            }
        }
        assert_eq!(decode(&[]), Err("byte 0: unexpected end".into()));
        assert_eq!(decode(&[9]), Err("byte 0: unknown format version 9".into()));
        assert!(decode(&[2, 7]).expect_err("kind").contains("byte 1: unknown record kind"));
        assert!(decode(&[2, 1, 5]).expect_err("string").contains("unknown string number"));
        // Kind 2 (a remembered rotated token) exists in version 1 blobs only.
        assert!(decode(&[2, 2]).expect_err("kind").contains("byte 1: unknown record kind"));
    }

    /// Journals and snapshots written before refresh generations still load: the chain ids and the remembered
    /// rotated tokens are read past and dropped, the live pairs kept.
    #[test]
    fn version_1_blobs_load_with_their_rotated_tokens_dropped() {
        fn str_new(out: &mut Vec<u8>, s: &str) {
            out.extend([0, s.len() as u8]);
            out.extend(s.as_bytes());
        }
        // grant: id16 varint(exp = 100) chain(8) varint(session start = 5)
        let grant = |out: &mut Vec<u8>, id: u8| {
            out.extend([id; 16]);
            out.push(100);
            out.extend([0xAB; 8]);
            out.push(5);
        };
        let mut blob = vec![1u8];
        // A set record with its pair (access id 1, the key's scopes, iat 1, exp 50, a refresh grant 2) and a
        // rotated-out grant 3 (flags 3).
        blob.push(1);
        str_new(&mut blob, "shop");
        blob.push(1);
        str_new(&mut blob, "alice");
        blob.push(1);
        str_new(&mut blob, "device_ipad");
        blob.push(3);
        blob.extend([1; 16]);
        blob.extend([0, 1, 50, 1]);
        grant(&mut blob, 2);
        grant(&mut blob, 3);
        // A remembered rotated token of the same key (strings by number).
        blob.extend([2, 1, 1, 2, 1, 3]);
        grant(&mut blob, 4);
        let records = decode(&blob).expect("a version 1 blob");
        let k = TokenKey {
            client_id: "shop".into(),
            subject: Subject::User("alice".into()),
            scopes: ScopeSet::parse("device_ipad").expect("scopes"),
        };
        let pair = LivePair {
            access_id: TokenId([1; 16]),
            access_scopes: k.scopes.clone(),
            issued_at: 1,
            access_expires_at: 50,
            refresh: Some(RefreshGrant { id: TokenId([2; 16]), expires_at: 100, generation: 0, session_started_at: 5 }),
        };
        assert_eq!(records, vec![Record::Set { k, p: Some(pair) }, Record::LegacyRotated {}]);
        // Flags beyond a pair are refused in the current version.
        let mut current = encode(&records[..1]);
        // version, kind, client (6 bytes), subject (8), scopes (14), then the flags.
        let flags_at = 1 + 1 + 6 + 8 + 14;
        assert_eq!(current[flags_at], 1);
        current[flags_at] = 3;
        assert!(decode(&current).expect_err("flags").contains("unknown flags"));
    }
}
