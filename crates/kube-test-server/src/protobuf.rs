//! Just enough of the Kubernetes protobuf encoding to accept the request bodies kubectl's typed clients send
//! (`kubectl create secret|configmap|namespace`): the `k8s\0` envelope and Secret, ConfigMap, Namespace with the
//! common ObjectMeta fields. Responses are always JSON, which clients accept.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn bad(what: &str) -> ApiError {
    ApiError::bad_request(format!("invalid protobuf body: {what}"))
}

fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Wire<'_>)>, ApiError> {
    fn varint(buf: &mut &[u8]) -> Result<u64, ApiError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().ok_or_else(|| bad("truncated varint"))?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let wire = match key & 7 {
            0 => Wire::Varint(varint(&mut buf)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or_else(|| bad("truncated fixed field"))?;
                Wire::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| bad("length"))?;
                let (bytes, rest) = (buf.get(..len).ok_or_else(|| bad("truncated field"))?, &buf[len..]);
                buf = rest;
                Wire::Bytes(bytes)
            }
            _ => return Err(bad("unsupported wire type")),
        };
        out.push((key >> 3, wire));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(b.to_vec()).map_err(|_| bad("invalid UTF-8"))
}

/// A `map<string, V>` entry: (key, raw value bytes).
fn entry(b: &[u8]) -> Result<(String, Vec<u8>), ApiError> {
    let (mut k, mut v) = (String::new(), Vec::new());
    for (f, w) in fields(b)? {
        match (f, w) {
            (1, Wire::Bytes(x)) => k = string(x)?,
            (2, Wire::Bytes(x)) => v = x.to_vec(),
            _ => {}
        }
    }
    Ok((k, v))
}

fn object_meta(b: &[u8]) -> Result<Value, ApiError> {
    let mut m = Map::new();
    let (mut labels, mut annotations, mut finalizers, mut owners) = (Map::new(), Map::new(), Vec::new(), Vec::new());
    for (f, w) in fields(b)? {
        let Wire::Bytes(x) = w else { continue };
        match f {
            1 => _ = m.insert("name".into(), json!(string(x)?)),
            2 => _ = m.insert("generateName".into(), json!(string(x)?)),
            3 => _ = m.insert("namespace".into(), json!(string(x)?)),
            6 => _ = m.insert("resourceVersion".into(), json!(string(x)?)),
            11 | 12 => {
                let (k, v) = entry(x)?;
                let target = if f == 11 { &mut labels } else { &mut annotations };
                target.insert(k, json!(string(&v)?));
            }
            13 => {
                let mut o = Map::new();
                for (of, ow) in fields(x)? {
                    match (of, ow) {
                        (1, Wire::Bytes(v)) => _ = o.insert("kind".into(), json!(string(v)?)),
                        (3, Wire::Bytes(v)) => _ = o.insert("name".into(), json!(string(v)?)),
                        (4, Wire::Bytes(v)) => _ = o.insert("uid".into(), json!(string(v)?)),
                        (5, Wire::Bytes(v)) => _ = o.insert("apiVersion".into(), json!(string(v)?)),
                        (6, Wire::Varint(v)) => _ = o.insert("controller".into(), json!(v != 0)),
                        (7, Wire::Varint(v)) => _ = o.insert("blockOwnerDeletion".into(), json!(v != 0)),
                        _ => {}
                    }
                }
                owners.push(Value::Object(o));
            }
            14 => finalizers.push(json!(string(x)?)),
            _ => {}
        }
    }
    for (k, v) in [
        ("labels", Value::Object(labels)),
        ("annotations", Value::Object(annotations)),
        ("finalizers", Value::Array(finalizers)),
        ("ownerReferences", Value::Array(owners)),
    ] {
        if v.as_object().is_some_and(|o| !o.is_empty()) || v.as_array().is_some_and(|a| !a.is_empty()) {
            m.insert(k.into(), v);
        }
    }
    Ok(Value::Object(m))
}

/// Decodes a `k8s\0`-prefixed protobuf body into the JSON object it encodes.
pub(crate) fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let unknown = body.strip_prefix(b"k8s\0").ok_or_else(|| bad("missing the k8s envelope"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (f, w) in fields(unknown)? {
        match (f, w) {
            (1, Wire::Bytes(tm)) => {
                for (tf, tw) in fields(tm)? {
                    match (tf, tw) {
                        (1, Wire::Bytes(x)) => api_version = string(x)?,
                        (2, Wire::Bytes(x)) => kind = string(x)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Bytes(x)) => raw = x,
            _ => {}
        }
    }
    if !matches!(kind.as_str(), "Secret" | "ConfigMap" | "Namespace") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "protobuf bodies are only understood for Secret, ConfigMap and Namespace (got {kind:?}); send JSON"
            ),
        ));
    }
    let b64 = |v: &[u8]| json!(base64::engine::general_purpose::STANDARD.encode(v));
    let mut obj = json!({"apiVersion": api_version, "kind": kind});
    let (mut data, mut other) = (Map::new(), Map::new());
    for (f, w) in fields(raw)? {
        match (kind.as_str(), f, w) {
            (_, 1, Wire::Bytes(x)) => obj["metadata"] = object_meta(x)?,
            ("Secret", 2, Wire::Bytes(x)) => {
                let (k, v) = entry(x)?;
                data.insert(k, b64(&v));
            }
            ("Secret", 3, Wire::Bytes(x)) => obj["type"] = json!(string(x)?),
            ("Secret", 4, Wire::Bytes(x)) | ("ConfigMap", 2, Wire::Bytes(x)) => {
                let (k, v) = entry(x)?;
                let target = if kind == "Secret" { &mut other } else { &mut data };
                target.insert(k, json!(string(&v)?));
            }
            ("ConfigMap", 3, Wire::Bytes(x)) => {
                let (k, v) = entry(x)?;
                other.insert(k, b64(&v));
            }
            ("Secret", 5, Wire::Varint(v)) | ("ConfigMap", 4, Wire::Varint(v)) => obj["immutable"] = json!(v != 0),
            _ => {}
        }
    }
    if !data.is_empty() {
        obj["data"] = Value::Object(data);
    }
    if !other.is_empty() {
        obj[if kind == "Secret" { "stringData" } else { "binaryData" }] = Value::Object(other);
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![((n << 3) | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn decodes_a_secret() {
        let meta =
            [field(1, b"s"), field(3, b"ns"), field(11, &[field(1, b"app"), field(2, b"web")].concat())].concat();
        let secret =
            [field(1, &meta), field(2, &[field(1, b"k"), field(2, b"v")].concat()), field(3, b"Opaque")].concat();
        let unknown = [field(1, &[field(1, b"v1"), field(2, b"Secret")].concat()), field(2, &secret)].concat();
        let body = [b"k8s\0".to_vec(), unknown].concat();
        let v = decode(&body).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": {"k": "dg=="},
                   "metadata": {"name": "s", "namespace": "ns", "labels": {"app": "web"}}})
        );
        assert_eq!(decode(b"nope").unwrap_err().code, 400);
        assert_eq!(decode(&body[..body.len() - 3]).unwrap_err().code, 400);
    }
}
