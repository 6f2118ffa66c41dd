//! Conditions: one per child plus `Ready`, with `lastTransitionTime` moving only when a condition's status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// A child's condition as the reconciler found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub type_: &'static str,
    pub ok: bool,
    /// CamelCase, machine-readable.
    pub reason: String,
    /// For a human: what is wrong and what to do.
    pub message: String,
}

impl Finding {
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, ok: true, reason: reason.into(), message: message.into() }
    }
    pub fn failed(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, ok: false, reason: reason.into(), message: message.into() }
    }
}

pub const READY: &str = "Ready";

/// The `Ready` condition: true when every finding is.
pub fn ready(findings: &[Finding]) -> Finding {
    let failing: Vec<&Finding> = findings.iter().filter(|f| !f.ok).collect();
    match failing.first() {
        None => Finding::ok(READY, "Reconciled", "credentials, signing keys and JWKS are in place"),
        Some(first) => Finding::failed(
            READY,
            &first.reason,
            failing.iter().map(|f| format!("{}: {}", f.type_, f.message)).collect::<Vec<_>>().join("; "),
        ),
    }
}

/// Builds the conditions from `findings`, keeping each one's `lastTransitionTime` when its status did not change.
pub fn conditions(old: &[Condition], findings: &[Finding], generation: Option<i64>, now: &Time) -> Vec<Condition> {
    findings
        .iter()
        .map(|f| {
            let status = if f.ok { "True" } else { "False" };
            let last_transition_time = old
                .iter()
                .find(|c| c.type_ == f.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: f.type_.to_string(),
                status: status.to_string(),
                reason: f.reason.clone(),
                message: f.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("time"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let findings = vec![Finding::ok("JwksReady", "Published", "ok")];
        let first = conditions(&[], &findings, Some(1), &at(100));
        assert_eq!(first[0].last_transition_time, at(100));
        let same = conditions(&first, &[Finding::ok("JwksReady", "Published", "other message")], Some(2), &at(200));
        assert_eq!(same[0].last_transition_time, at(100));
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = conditions(&same, &[Finding::failed("JwksReady", "NameConflict", "x")], Some(2), &at(300));
        assert_eq!(flipped[0].last_transition_time, at(300));
        assert_eq!(flipped[0].status, "False");
    }

    #[test]
    fn ready_names_what_fails() {
        assert!(ready(&[Finding::ok("A", "R", "m")]).ok);
        let r = ready(&[Finding::ok("A", "R", "m"), Finding::failed("CredentialsReady", "MissingKeys", "add keys")]);
        assert!(!r.ok);
        assert_eq!(r.reason, "MissingKeys");
        assert_eq!(r.message, "CredentialsReady: add keys");
    }
}
