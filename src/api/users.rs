//! The users Secret (`users.yaml`): parsed once, the same way for standalone mode, the controller's check and
//! the sidecar, into the core's [`User`]s.

use std::collections::HashMap;

use super::v1alpha1::UserEntry;
use crate::core::app::{PasswordDigest, User};

/// Parses a users list. Errors name the offending entry and field (e.g. `[2].passwordHash: ...`).
pub fn parse_users(yaml: &str) -> Result<HashMap<String, User>, String> {
    let entries: Vec<UserEntry> = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(yaml))
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let mut users = HashMap::new();
    for (i, entry) in entries.into_iter().enumerate() {
        // U+0001 separates a federated user's issuer and name in stored keys; NUL no store can hold.
        if entry.username.is_empty() || entry.username.contains(['\u{0}', '\u{1}']) {
            return Err(format!("[{i}].username: must be non-empty, without the characters U+0000 and U+0001"));
        }
        let digest = PasswordDigest::parse(&entry.password_hash).map_err(|e| format!("[{i}].passwordHash: {e}"))?;
        if users.insert(entry.username.clone(), User { digest, roles: entry.roles }).is_some() {
            return Err(format!("[{i}].username: {:?} is listed twice", entry.username));
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_entry_and_field() {
        let hash = bcrypt::hash("pw", 4).expect("hash");
        let ok =
            format!("- {{username: a, passwordHash: '{hash}', roles: [x]}}\n- {{username: b, passwordHash: '{hash}'}}");
        let users = parse_users(&ok).expect("valid");
        assert_eq!(users["a"].roles, vec!["x".to_string()]);
        let bad_hash = parse_users("- {username: a, passwordHash: plain}").expect_err("bad hash");
        assert!(bad_hash.starts_with("[0].passwordHash"), "{bad_hash}");
        let twice = parse_users(&format!(
            "- {{username: a, passwordHash: '{hash}'}}\n- {{username: a, passwordHash: '{hash}'}}"
        ))
        .expect_err("twice");
        assert!(twice.starts_with("[1].username"), "{twice}");
        assert!(parse_users("- {user: a}").is_err());
    }
}
