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

pub const USERS_READY: &str = "UsersReady";
/// The reason of a `UsersReady` whose Secret is near the size limit; also comes with a Warning event.
pub const NEAR_SIZE_LIMIT: &str = "NearSizeLimit";
/// What the API server lets a Secret hold.
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// `UsersReady` once the users parsed: True, with reason `NearSizeLimit` from 80 % of [`MAX_SECRET_BYTES`] (the
/// Secret cannot grow past it, so users should move to an identity provider while there is room).
pub fn users(secret: &str, count: usize, bytes: usize) -> Finding {
    if bytes.saturating_mul(5) >= MAX_SECRET_BYTES * 4 {
        let percent = bytes.saturating_mul(100) / MAX_SECRET_BYTES;
        Finding::ok(
            USERS_READY,
            NEAR_SIZE_LIMIT,
            format!(
                "Secret {secret}: {} users in {} KiB: {percent} % of the 1 MiB a Secret may hold; move users to an \
                 identity provider (spec.trustedIssuers) before it fills",
                thousands(count),
                bytes.div_ceil(1024)
            ),
        )
    } else {
        Finding::ok(USERS_READY, "UsersLoaded", format!("{} user(s) in Secret {secret}", thousands(count)))
    }
}

/// 1234567 as "1,234,567".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub const TRUSTED_ISSUERS_READY: &str = "TrustedIssuersReady";
pub const KEY_SET_UNAVAILABLE: &str = "KeySetUnavailable";

/// `TrustedIssuersReady` for an application with `spec.trustedIssuers`: True when every issuer's key set can be
/// had, else False with reason `KeySetUnavailable` and each `problems` entry (one per issuer, naming it).
///
/// A False one does not make the application un-Ready: a key set that cannot be had now may come back, the sidecars
/// keep verifying with the set they hold, and the other grants (password, client_credentials) work meanwhile.
pub fn trusted_issuers(issuers: usize, problems: &[String]) -> Finding {
    if problems.is_empty() {
        return Finding::ok(
            TRUSTED_ISSUERS_READY,
            "KeySetsAvailable",
            format!("the key sets of all {issuers} trusted issuer(s) can be had"),
        );
    }
    Finding { gates_ready: false, ..Finding::failed(TRUSTED_ISSUERS_READY, KEY_SET_UNAVAILABLE, problems.join("; ")) }
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
    fn users_warn_from_80_percent_of_a_secret_and_stay_true() {
        let small = users("u", 3, 1_000);
        assert!(small.ok && small.reason == "UsersLoaded" && small.message.contains("3 user(s)"), "{small:?}");
        let below = users("u", 9_999, MAX_SECRET_BYTES * 4 / 5 - 1);
        assert_eq!(below.reason, "UsersLoaded");
        let near = users("u", 1_234, 880 * 1024);
        assert!(near.ok && near.reason == NEAR_SIZE_LIMIT, "{near:?}");
        assert!(near.message.contains("1,234 users in 880 KiB: 85 % of the 1 MiB"), "{near:?}");
        assert!(ready(&[near]).ok);
        assert_eq!(
            (thousands(0), thousands(999), thousands(1_000), thousands(1_234_567)),
            ("0".into(), "999".into(), "1,000".into(), "1,234,567".into())
        );
    }

    #[test]
    fn an_unavailable_key_set_is_false_but_leaves_the_application_ready() {
        let ok = trusted_issuers(2, &[]);
        assert!(ok.ok, "{ok:?}");
        let failed = trusted_issuers(2, &["issuer \"https://idp\": cannot connect".into()]);
        assert!(!failed.ok && failed.reason == KEY_SET_UNAVAILABLE && failed.message.contains("https://idp"));
        assert!(ready(&[ok, failed]).ok);
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
