//! Label and field selectors.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_top_level(s)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_term(term)?);
        }
        Ok(Self(reqs))
    }

    /// A `metav1.LabelSelector` as JSON (`matchLabels`, `matchExpressions` with `In`, `NotIn`, `Exists`,
    /// `DoesNotExist`), as webhook configurations carry them. Null or `{}` selects everything.
    pub(crate) fn from_json(selector: &Value) -> Result<Self, String> {
        let Some(sel) = selector.as_object() else {
            return if selector.is_null() { Ok(Self::default()) } else { Err("must be an object".into()) };
        };
        let mut reqs = Vec::new();
        match sel.get("matchLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                for (k, v) in labels {
                    let Some(v) = v.as_str() else { return Err(format!("matchLabels.{k}: must be a string")) };
                    reqs.push(LabelReq::Eq(check_key(k)?, check_value(v)?));
                }
            }
            Some(_) => return Err("matchLabels: must be a map of strings".into()),
        }
        match sel.get("matchExpressions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(exprs)) => {
                for (i, e) in exprs.iter().enumerate() {
                    let key = check_key(e.get("key").and_then(Value::as_str).unwrap_or_default())
                        .map_err(|err| format!("matchExpressions[{i}].key: {err}"))?;
                    let values = match e.get("values") {
                        None | Some(Value::Null) => Vec::new(),
                        Some(Value::Array(vs)) => vs
                            .iter()
                            .map(|v| v.as_str().ok_or_else(|| "must be a string".to_string()).and_then(check_value))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|err| format!("matchExpressions[{i}].values: {err}"))?,
                        Some(_) => return Err(format!("matchExpressions[{i}].values: must be a list of strings")),
                    };
                    let op = e.get("operator").and_then(Value::as_str).unwrap_or_default();
                    let req = match op {
                        "In" | "NotIn" if values.is_empty() => {
                            return Err(format!(
                                "matchExpressions[{i}].values: Required value: must be specified when `operator` is \
                                 'In' or 'NotIn'"
                            ));
                        }
                        "Exists" | "DoesNotExist" if !values.is_empty() => {
                            return Err(format!(
                                "matchExpressions[{i}].values: Forbidden: may not be specified when `operator` is \
                                 'Exists' or 'DoesNotExist'"
                            ));
                        }
                        "In" => LabelReq::In(key, values),
                        "NotIn" => LabelReq::NotIn(key, values),
                        "Exists" => LabelReq::Exists(key),
                        "DoesNotExist" => LabelReq::NotExists(key),
                        other => {
                            return Err(format!(
                                "matchExpressions[{i}].operator: Unsupported value: {other:?}: supported values: \
                                 \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
                            ));
                        }
                    };
                    reqs.push(req);
                }
            }
            Some(_) => return Err("matchExpressions: must be a list".into()),
        }
        Ok(Self(reqs))
    }

    /// Whether the selector selects everything.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.matches_labels(obj.pointer("/metadata/labels").and_then(Value::as_object))
    }

    /// Matches a label map (absent: no labels).
    pub(crate) fn matches_labels(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unexpected ')' in selector {s:?}"));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unclosed '(' in selector {s:?}"));
    }
    out.push(&s[start..]);
    Ok(out)
}

fn check_key(k: &str) -> Result<String, String> {
    let valid = !k.is_empty()
        && k.len() <= 316
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid { Ok(k.to_string()) } else { Err(format!("invalid label key {k:?}")) }
}

fn check_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    let valid = v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid { Ok(v.to_string()) } else { Err(format!("invalid label value {v:?}")) }
}

fn parse_term(term: &str) -> Result<LabelReq, String> {
    if let Some(k) = term.strip_prefix('!') {
        return Ok(LabelReq::NotExists(check_key(k.trim())?));
    }
    if let Some(open) = term.find('(') {
        let Some(inner) = term[open + 1..].strip_suffix(')') else {
            return Err(format!("invalid selector term {term:?}"));
        };
        let mut head = term[..open].split_whitespace();
        let (Some(key), Some(op), None) = (head.next(), head.next(), head.next()) else {
            return Err(format!("invalid selector term {term:?}"));
        };
        let values = inner.split(',').map(check_value).collect::<Result<Vec<_>, _>>()?;
        return match op {
            "in" => Ok(LabelReq::In(check_key(key)?, values)),
            "notin" => Ok(LabelReq::NotIn(check_key(key)?, values)),
            _ => Err(format!("unknown operator {op:?} in selector term {term:?}")),
        };
    }
    for (op, ne) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = term.split_once(op) {
            let (k, v) = (check_key(k.trim())?, check_value(v)?);
            return Ok(if ne { LabelReq::NotEq(k, v) } else { LabelReq::Eq(k, v) });
        }
    }
    Ok(LabelReq::Exists(check_key(term)?))
}

/// A parsed field selector. Only the fields the real API server supports for the type are accepted.
#[derive(Clone, Debug, Default)]
pub(crate) struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    /// `supported` lists the fields besides `metadata.name` and `metadata.namespace`.
    pub(crate) fn parse(s: &str, supported: &[&str]) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!("invalid field selector: {term:?}"));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") && !supported.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            reqs.push((field.to_string(), value.trim().to_string(), negated));
        }
        Ok(Self(reqs))
    }

    /// A `metadata.name=X` requirement, if any (lets single-object watches be expressed as selectors).
    pub(crate) fn with_name(mut self, name: &str) -> Self {
        self.0.push(("metadata.name".into(), name.into(), false));
        self
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, value, negated)| {
            let mut cur = Some(obj);
            for part in field.split('.') {
                cur = cur.and_then(|c| c.get(part));
            }
            let actual = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) != *negated
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}})
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, db)"));
        assert!(!m("app notin (web,db)"));
        assert!(m("missing notin (x)"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(!m("app=web,tier=back"));
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("app of (a)").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn label_selectors_as_json() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let m = |s: Value| LabelSelector::from_json(&s).unwrap().matches(&o);
        assert!(m(Value::Null));
        assert!(m(json!({})));
        assert!(m(json!({"matchLabels": {"app": "web"}})));
        assert!(!m(json!({"matchLabels": {"app": "db"}})));
        assert!(m(json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]})));
        assert!(!m(json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]})));
        assert!(m(json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]})));
        assert!(!m(json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})));
        assert!(m(json!({"matchExpressions": [{"key": "nope", "operator": "DoesNotExist"}]})));
        assert!(!m(json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "x", "operator": "Exists"}]})));
        assert!(LabelSelector::from_json(&json!({"matchExpressions": [{"key": "a", "operator": "In"}]})).is_err());
        assert!(
            LabelSelector::from_json(
                &json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})
            )
            .is_err()
        );
        assert!(LabelSelector::from_json(&json!({"matchExpressions": [{"key": "a", "operator": "Gt"}]})).is_err());
        assert!(LabelSelector::from_json(&json!("x")).is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let m = |s: &str| FieldSelector::parse(s, &[]).unwrap().matches(&o);
        assert!(m("metadata.name=a"));
        assert!(m("metadata.name==a,metadata.namespace=ns"));
        assert!(!m("metadata.name!=a"));
        assert!(FieldSelector::parse("spec.x=1", &[]).is_err());
        assert!(FieldSelector::parse("type=Opaque", &["type"]).is_ok());
    }
}
