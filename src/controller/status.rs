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
    /// Whether a failure makes the application not `Ready`. A full token state does not: the sidecars keep serving
    /// every existing session, and a sidecar starting then must serve them too (it waits for `Ready`).
    pub gates_ready: bool,
}

impl Finding {
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, ok: true, reason: reason.into(), message: message.into(), gates_ready: true }
    }
    pub fn failed(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self { type_, ok: false, reason: reason.into(), message: message.into(), gates_ready: true }
    }
}

/// How full an application's token state is, as its sidecars last wrote it with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenStateUsage {
    pub keys: u64,
    pub capacity: u64,
}

pub const TOKEN_STATE_READY: &str = "TokenStateReady";
/// Reasons of `TokenStateReady` that also come with a Warning event.
pub const NEAR_CAPACITY: &str = "NearCapacity";
pub const FULL: &str = "Full";

/// `TokenStateReady` once the state objects exist (`present_reason`: Created or Present): True below 80 % of the
/// capacity, True with reason `NearCapacity` from 80 %, False with reason `Full` at 100 % (new logins are refused
/// then, existing sessions keep working, so it does not make the application un-Ready).
pub fn token_state(present_reason: &str, objects: usize, usage: Option<TokenStateUsage>) -> Finding {
    let Some(u) = usage.filter(|u| u.capacity > 0) else {
        return Finding::ok(
            TOKEN_STATE_READY,
            present_reason,
            format!("{objects} ConfigMaps hold the token state; no snapshot yet reports its size"),
        );
    };
    let percent = u.keys.saturating_mul(100) / u.capacity;
    let of = format!("{} live token keys of a capacity of about {} ({percent} %)", u.keys, u.capacity);
    if u.keys >= u.capacity {
        Finding {
            gates_ready: false,
            ..Finding::failed(
                TOKEN_STATE_READY,
                FULL,
                format!(
                    "{of}: new logins are refused (503) until tokens expire or are revoked; lower \
                     maxTokenKeysPerUser or the refresh token lifetime, or split the application"
                ),
            )
        }
    } else if percent >= 80 {
        Finding::ok(TOKEN_STATE_READY, NEAR_CAPACITY, format!("{of}: new logins will be refused at 100 %"))
    } else {
        Finding::ok(TOKEN_STATE_READY, present_reason, format!("{objects} ConfigMaps hold the token state; {of}"))
    }
}

pub const READY: &str = "Ready";

/// The `Ready` condition: true when every finding is.
pub fn ready(findings: &[Finding]) -> Finding {
    let failing: Vec<&Finding> = findings.iter().filter(|f| !f.ok && f.gates_ready).collect();
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
    fn token_state_warns_at_80_percent_and_is_false_but_not_un_ready_at_capacity() {
        let usage = |keys| Some(TokenStateUsage { keys, capacity: 150_000 });
        let low = token_state("Present", 49, usage(1_000));
        assert!(low.ok && low.reason == "Present" && low.message.contains("1000 live token keys"), "{low:?}");
        let near = token_state("Present", 49, usage(120_000));
        assert!(near.ok && near.reason == NEAR_CAPACITY && near.message.contains("(80 %)"), "{near:?}");
        let full = token_state("Present", 49, usage(150_000));
        assert!(!full.ok && full.reason == FULL && full.message.contains("refused"), "{full:?}");
        // Full does not make the application un-Ready; a failure that gates it does.
        assert!(ready(&[low.clone(), full.clone()]).ok);
        assert!(!ready(&[full, Finding::failed("JwksReady", "NameConflict", "x")]).ok);
        // Before any snapshot reported a size.
        let unknown = token_state("Created", 49, None);
        assert!(unknown.ok && unknown.reason == "Created");
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
