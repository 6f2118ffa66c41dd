//! The kube store's binary record codec. The first two bytes choose a split point, the rest is a blob:
//! - `decode` never panics;
//! - `ChunkDecoder` fed the blob in two pieces at the split decodes what `decode` does (or fails likewise);
//! - whatever decodes encodes back to the same records, whole or in pieces of any size (less the rotated tokens of
//!   version 1 blobs, which are read and dropped).
#![no_main]

use kubetoken::core::state::Record;
use kubetoken::storage::kube_store::codec::{ChunkDecoder, Encoder, decode, encode};
use libfuzzer_sys::fuzz_target;

fn decode_in_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Record>, String> {
    let mut d = ChunkDecoder::default();
    let mut out = Vec::new();
    for piece in pieces {
        d.feed(piece, |r| out.push(r))?;
    }
    d.finish()?;
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let (split, blob) = match data {
        [a, b, blob @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), blob),
        _ => (0, data),
    };
    let whole = decode(blob);
    let at = if blob.is_empty() { 0 } else { split % (blob.len() + 1) };
    let (head, tail) = blob.split_at(at);
    let chunked = decode_in_pieces([head, tail]);
    match (&whole, &chunked) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "split at {at}"),
        (Err(_), Err(_)) => {}
        _ => panic!("split at {at}: whole {whole:?}, in pieces {chunked:?}"),
    }
    let Ok(records) = whole else { return };
    let records: Vec<Record> = records.into_iter().filter(|r| !matches!(r, Record::LegacyRotated {})).collect();
    assert_eq!(decode(&encode(&records)).as_ref(), Ok(&records), "decode(encode(decoded))");
    let mut encoder = Encoder::in_pieces(split % 64 + 1);
    for r in &records {
        encoder.push(r);
    }
    let pieces = encoder.finish_pieces();
    assert_eq!(decode_in_pieces(pieces.iter().map(Vec::as_slice)).as_ref(), Ok(&records), "in pieces");
});
