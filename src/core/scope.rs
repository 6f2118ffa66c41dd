//! Scopes: parsing the `scope` parameter into a sorted, de-duplicated scope set, and deciding what is granted.
//!
//! The WSO2 "access token per device" rules:
//! - `device_<id>` scopes are always granted, never role-checked, and are part of the token key;
//! - any other scope is granted only if the application declares it and either it has no roles or the subject has
//!   one of them; everything else is dropped silently;
//! - when nothing is granted, the token gets the scope `default`.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub const DEVICE_PREFIX: &str = "device_";
pub const DEFAULT_SCOPE: &str = "default";
const MAX_DEVICE_ID_LEN: usize = 128;

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_char(b: u8) -> bool {
    b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b)
}

pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_scope_char)
}

/// `device_` followed by 1..=128 scope characters.
pub fn is_device_scope(s: &str) -> bool {
    s.strip_prefix(DEVICE_PREFIX)
        .is_some_and(|id| !id.is_empty() && id.len() <= MAX_DEVICE_ID_LEN && id.bytes().all(is_scope_char))
}

/// A sorted set of distinct scope tokens. Its order makes `a b` and `b a` the same token key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeSet(Vec<String>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope contains characters outside RFC 6749 §3.3")]
pub struct MalformedScope;

impl ScopeSet {
    /// Parses a `scope` parameter: space-delimited tokens, de-duplicated and sorted.
    pub fn parse(param: &str) -> Result<Self, MalformedScope> {
        let mut scopes = Vec::new();
        for token in param.split(' ').filter(|t| !t.is_empty()) {
            if !is_scope_token(token) {
                return Err(MalformedScope);
            }
            scopes.push(token.to_string());
        }
        Ok(Self::from_iter(scopes))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    pub fn contains(&self, scope: &str) -> bool {
        self.0.binary_search_by(|s| s.as_str().cmp(scope)).is_ok()
    }

    pub fn is_subset_of(&self, other: &ScopeSet) -> bool {
        self.iter().all(|s| other.contains(s))
    }

    pub fn default_scope() -> Self {
        Self(vec![DEFAULT_SCOPE.to_string()])
    }
}

impl FromIterator<String> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Self {
        let mut v: Vec<String> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        Self(v)
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(" "))
    }
}

/// The scopes an application declares, with the roles that may have each (empty: anyone).
#[derive(Debug, Clone, Default)]
pub struct ScopePolicy {
    declared: HashMap<String, Vec<String>>,
}

impl ScopePolicy {
    pub fn new(declared: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        Self { declared: declared.into_iter().collect() }
    }

    pub fn declared_names(&self) -> impl Iterator<Item = &str> {
        self.declared.keys().map(String::as_str)
    }

    /// What of `requested` is still declared (or a device scope), roles not checked: a federated user's refresh,
    /// which has no assertion to read roles from, keeps what its login was granted unless the application withdrew
    /// the scope.
    pub fn still_declared(&self, requested: &ScopeSet) -> ScopeSet {
        let kept: ScopeSet = requested
            .iter()
            .filter(|scope| is_device_scope(scope) || self.declared.contains_key(*scope))
            .map(str::to_string)
            .collect();
        if kept.is_empty() { ScopeSet::default_scope() } else { kept }
    }

    /// What a subject with `roles` is granted of `requested`. Never fails: unauthorized scopes are dropped, and an
    /// empty result becomes `default`.
    pub fn grant(&self, requested: &ScopeSet, roles: &[String]) -> ScopeSet {
        let granted: ScopeSet = requested
            .iter()
            .filter(|scope| {
                is_device_scope(scope)
                    || self
                        .declared
                        .get(*scope)
                        .is_some_and(|needed| needed.is_empty() || needed.iter().any(|r| roles.contains(r)))
            })
            .map(str::to_string)
            .collect();
        if granted.is_empty() { ScopeSet::default_scope() } else { granted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> ScopeSet {
        ScopeSet::parse(s).expect("valid scope")
    }

    fn shop_policy() -> ScopePolicy {
        ScopePolicy::new([
            ("orders:read".to_string(), vec!["customer".to_string(), "admin".to_string()]),
            ("orders:admin".to_string(), vec!["admin".to_string()]),
            ("catalog:read".to_string(), vec![]),
        ])
    }

    #[test]
    fn scope_sets_are_sorted_and_deduplicated() {
        assert_eq!(set("b a b  a"), set("a b"));
        assert_eq!(set("b a").to_string(), "a b");
        assert!(set("").is_empty());
    }

    #[test]
    fn malformed_scope_characters_are_rejected() {
        assert_eq!(ScopeSet::parse("a\"b"), Err(MalformedScope));
        assert_eq!(ScopeSet::parse("a\\b"), Err(MalformedScope));
        assert_eq!(ScopeSet::parse("caf\u{e9}"), Err(MalformedScope));
        assert_eq!(ScopeSet::parse("a\tb"), Err(MalformedScope));
    }

    #[test]
    fn device_scope_shape() {
        assert!(is_device_scope("device_ipad"));
        assert!(is_device_scope(&format!("device_{}", "x".repeat(128))));
        assert!(!is_device_scope(&format!("device_{}", "x".repeat(129))));
        assert!(!is_device_scope("device_"));
        assert!(!is_device_scope("devices_ipad"));
    }

    #[test]
    fn device_scopes_skip_role_checks_and_combine_with_others() {
        let p = shop_policy();
        assert_eq!(p.grant(&set("device_ipad"), &[]), set("device_ipad"));
        assert_eq!(
            p.grant(&set("device_ipad orders:read orders:admin"), &["customer".into()]),
            set("device_ipad orders:read")
        );
    }

    #[test]
    fn unauthorized_and_undeclared_scopes_are_dropped_and_empty_becomes_default() {
        let p = shop_policy();
        assert_eq!(p.grant(&set("orders:admin"), &["customer".into()]), set("default"));
        assert_eq!(p.grant(&set("nope catalog:read"), &[]), set("catalog:read"));
        assert_eq!(p.grant(&set(""), &["admin".into()]), set("default"));
        assert_eq!(p.grant(&set("orders:admin"), &["admin".into()]), set("orders:admin"));
    }
}
