//! The admission webhook's TLS when the controller manages it: a CA kept in a Secret the controller owns, a serving
//! certificate for the webhook Service signed by that CA, and the CA bundle the MutatingWebhookConfiguration must
//! carry. Pure: the current time is a parameter, so rotation is tested without waiting years.
//!
//! Rotation keeps the API server able to verify the webhook at every moment:
//! - the serving certificate is renewed a third of its life before it expires, by the same CA (the bundle does not
//!   change);
//! - the CA is renewed a year before it expires: the new CA joins the bundle next to the old one, and the serving
//!   certificate moves to the new CA only once the configuration's bundle holds it; the old CA leaves the bundle
//!   when it expires.

use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::core::clock::UnixTime;

const DAY: u64 = 86_400;
pub const CA_LIFETIME: u64 = 5 * 365 * DAY;
pub const CA_RENEW_BEFORE: u64 = 365 * DAY;
pub const SERVING_LIFETIME: u64 = 90 * DAY;
pub const SERVING_RENEW_BEFORE: u64 = 30 * DAY;
/// How long a new CA is in the published bundle before it signs.
pub const CA_PUBLISH_GRACE: u64 = 300;
/// Certificates are valid from an hour before they are made: the clocks of the API server and this node differ.
const BACKDATE: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the webhook certificate Secret is not usable: {0}")]
    Stored(String),
}

/// The CA that signs the serving certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    /// Part of its subject name, so that an old and a new CA in the bundle are told apart.
    pub created: UnixTime,
    pub not_after: UnixTime,
}

/// A CA replaced by a newer one: still in the bundle until it expires (its serving certificate may still be served).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetiredCa {
    pub cert_pem: String,
    pub not_after: UnixTime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: UnixTime,
    /// The `created` of the CA that signed it.
    pub issuer_created: UnixTime,
    pub dns_names: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookCerts {
    pub ca: Ca,
    pub previous_ca: Option<RetiredCa>,
    pub serving: Serving,
}

fn at(t: UnixTime) -> time::OffsetDateTime {
    let t = i64::try_from(t).unwrap_or(i64::MAX / 2);
    time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The CA's parameters, rebuilt identically from what the Secret stores whenever the CA signs.
fn ca_params(created: UnixTime, not_after: UnixTime) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, format!("kubetoken webhook CA {created}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = at(created.saturating_sub(BACKDATE));
    p.not_after = at(not_after);
    Ok(p)
}

impl Ca {
    pub fn generate(now: UnixTime) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let not_after = now + CA_LIFETIME;
        let cert = ca_params(now, not_after)?.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem(), created: now, not_after })
    }

    fn retire(self) -> RetiredCa {
        RetiredCa { cert_pem: self.cert_pem, not_after: self.not_after }
    }
}

impl Serving {
    /// A serving certificate for `dns_names`, signed by `ca`, never outliving it.
    pub fn issue(ca: &Ca, dns_names: &[String], now: UnixTime) -> Result<Self, CertError> {
        let ca_key = KeyPair::from_pem(&ca.key_pem)?;
        let issuer = Issuer::new(ca_params(ca.created, ca.not_after)?, &ca_key);
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(dns_names.to_vec())?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let not_after = (now + SERVING_LIFETIME).min(ca.not_after);
        p.not_before = at(now.saturating_sub(BACKDATE));
        p.not_after = at(not_after);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
            issuer_created: ca.created,
            dns_names: dns_names.to_vec(),
        })
    }
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CA_CREATED: &str = "ca.created";
const CA_NOT_AFTER: &str = "ca.not-after";
const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
const PREVIOUS_CA_NOT_AFTER: &str = "previous-ca.not-after";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_NOT_AFTER: &str = "tls.not-after";
const TLS_ISSUER_CREATED: &str = "tls.issuer-created";
const TLS_DNS_NAMES: &str = "tls.dns-names";

impl WebhookCerts {
    pub fn generate(dns_names: &[String], now: UnixTime) -> Result<Self, CertError> {
        let ca = Ca::generate(now)?;
        let serving = Serving::issue(&ca, dns_names, now)?;
        Ok(Self { ca, previous_ca: None, serving })
    }

    /// The PEM bundle the webhook configuration must carry: the CA, and the previous one until it expires.
    pub fn ca_bundle(&self, now: UnixTime) -> String {
        let mut bundle = self.ca.cert_pem.clone();
        if let Some(previous) = self.previous_ca.as_ref().filter(|p| p.not_after > now) {
            bundle.push_str(&previous.cert_pem);
        }
        bundle
    }

    /// What the Secret should hold now, if it must change. `ca_published`: every webhook of the configuration
    /// already trusts the current CA (so the serving certificate may move to it).
    pub fn plan(&self, dns_names: &[String], now: UnixTime, ca_published: bool) -> Result<Option<Self>, CertError> {
        let mut next = self.clone();
        if next.previous_ca.as_ref().is_some_and(|p| p.not_after <= now) {
            next.previous_ca = None;
        }
        let renewing_ca = next.ca.not_after.saturating_sub(now) < CA_RENEW_BEFORE;
        if renewing_ca {
            // The new CA joins the bundle first; the serving certificate follows once the bundle is published.
            let old = std::mem::replace(&mut next.ca, Ca::generate(now)?);
            next.previous_ca = Some(old.retire());
        }
        // The new CA signs only once every webhook of the configuration trusts it, and the API servers (which
        // read the configuration through their informers) have had time to see that.
        let new_ca_trusted = !renewing_ca && ca_published && now >= next.ca.created.saturating_add(CA_PUBLISH_GRACE);
        let moving = next.serving.issuer_created != next.ca.created && new_ca_trusted;
        let due =
            next.serving.not_after.saturating_sub(now) < SERVING_RENEW_BEFORE || next.serving.dns_names != dns_names;
        if moving || (due && (new_ca_trusted || next.serving.issuer_created == next.ca.created)) {
            next.serving = Serving::issue(&next.ca, dns_names, now)?;
        } else if due && renewing_ca {
            // Due in the very pass that made a new CA: renewed by the CA the configuration trusts now.
            next.serving = Serving::issue(&self.ca, dns_names, now)?;
        }
        Ok((next != *self).then_some(next))
    }

    /// The Secret's data.
    pub fn to_data(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        d.insert(CA_CERT.into(), self.ca.cert_pem.clone());
        d.insert(CA_KEY.into(), self.ca.key_pem.clone());
        d.insert(CA_CREATED.into(), self.ca.created.to_string());
        d.insert(CA_NOT_AFTER.into(), self.ca.not_after.to_string());
        if let Some(p) = &self.previous_ca {
            d.insert(PREVIOUS_CA_CERT.into(), p.cert_pem.clone());
            d.insert(PREVIOUS_CA_NOT_AFTER.into(), p.not_after.to_string());
        }
        d.insert(TLS_CERT.into(), self.serving.cert_pem.clone());
        d.insert(TLS_KEY.into(), self.serving.key_pem.clone());
        d.insert(TLS_NOT_AFTER.into(), self.serving.not_after.to_string());
        d.insert(TLS_ISSUER_CREATED.into(), self.serving.issuer_created.to_string());
        d.insert(TLS_DNS_NAMES.into(), self.serving.dns_names.join(","));
        d
    }

    /// Reads what [`Self::to_data`] wrote.
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, CertError> {
        let text = |k: &str| -> Result<String, CertError> {
            let raw = data.get(k).ok_or_else(|| CertError::Stored(format!("no {k}")))?;
            String::from_utf8(raw.clone()).map_err(|_| CertError::Stored(format!("{k} is not text")))
        };
        let number = |k: &str| -> Result<u64, CertError> {
            text(k)?.trim().parse().map_err(|e| CertError::Stored(format!("{k}: {e}")))
        };
        let previous_ca = match data.contains_key(PREVIOUS_CA_CERT) {
            true => Some(RetiredCa { cert_pem: text(PREVIOUS_CA_CERT)?, not_after: number(PREVIOUS_CA_NOT_AFTER)? }),
            false => None,
        };
        let certs = Self {
            ca: Ca {
                cert_pem: text(CA_CERT)?,
                key_pem: text(CA_KEY)?,
                created: number(CA_CREATED)?,
                not_after: number(CA_NOT_AFTER)?,
            },
            previous_ca,
            serving: Serving {
                cert_pem: text(TLS_CERT)?,
                key_pem: text(TLS_KEY)?,
                not_after: number(TLS_NOT_AFTER)?,
                issuer_created: number(TLS_ISSUER_CREATED)?,
                dns_names: text(TLS_DNS_NAMES)?.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect(),
            },
        };
        // The serving pair must load; the CA key must parse (it signs the next serving certificate).
        crate::http::tls::certified_key(certs.serving.cert_pem.as_bytes(), certs.serving.key_pem.as_bytes())
            .map_err(CertError::Stored)?;
        KeyPair::from_pem(&certs.ca.key_pem).map_err(|e| CertError::Stored(format!("{CA_KEY}: {e}")))?;
        Ok(certs)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime as PkiTime};

    use super::*;

    const NOW: UnixTime = 1_800_000_000;

    fn names() -> Vec<String> {
        vec![
            "kubetoken-webhook.kubetoken-system.svc".into(),
            "kubetoken-webhook.kubetoken-system.svc.cluster.local".into(),
        ]
    }

    /// Whether a client trusting `bundle` accepts `serving` for `name` at `now`, as the API server checks it.
    fn verifies(bundle: &str, serving: &Serving, name: &str, now: UnixTime) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
            roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
        let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &server_name,
                &[],
                PkiTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_fresh_set_serves_the_service_names_and_verifies_against_its_bundle() {
        let certs = WebhookCerts::generate(&names(), NOW).expect("generate");
        let bundle = certs.ca_bundle(NOW);
        for name in names() {
            verifies(&bundle, &certs.serving, &name, NOW).expect("verifies");
        }
        assert!(verifies(&bundle, &certs.serving, "evil.kubetoken-system.svc", NOW).is_err(), "other names refused");
        let other = WebhookCerts::generate(&names(), NOW).expect("generate");
        assert!(verifies(&other.ca_bundle(NOW), &certs.serving, &names()[0], NOW).is_err(), "another CA refused");
        assert_eq!(certs.plan(&names(), NOW, true).expect("plan"), None, "nothing to do on a fresh set");
    }

    #[test]
    fn the_secret_data_round_trips_and_broken_data_is_an_error() {
        let certs = WebhookCerts::generate(&names(), NOW).expect("generate");
        let bytes = |d: BTreeMap<String, String>| -> BTreeMap<String, Vec<u8>> {
            d.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
        };
        assert_eq!(WebhookCerts::from_data(&bytes(certs.to_data())).expect("read"), certs);
        let mut broken = certs.to_data();
        broken.insert(TLS_KEY.into(), "not a key".into());
        assert!(WebhookCerts::from_data(&bytes(broken)).is_err());
        let mut missing = certs.to_data();
        missing.remove(CA_KEY);
        let err = WebhookCerts::from_data(&bytes(missing)).expect_err("missing key");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    /// Years of a controller checking daily: the serving certificate is never served past its life nor untrusted
    /// by the bundle the configuration holds at that moment, through serving renewals and a CA renewal.
    #[test]
    fn rotation_keeps_the_webhook_verifiable_every_day_for_six_years() {
        let mut certs = WebhookCerts::generate(&names(), NOW).expect("generate");
        let mut published = certs.ca_bundle(NOW);
        let (mut serving_renewals, mut ca_renewals) = (0, 0);
        let mut now = NOW;
        while now < NOW + 6 * 365 * DAY {
            now += DAY;
            let ca_published = published.contains(&certs.ca.cert_pem);
            if let Some(next) = certs.plan(&names(), now, ca_published).expect("plan") {
                serving_renewals += usize::from(next.serving != certs.serving);
                ca_renewals += usize::from(next.ca != certs.ca);
                certs = next;
            }
            // The configuration is brought up to date after the Secret (the sync does both in one pass).
            published = certs.ca_bundle(now);
            verifies(&published, &certs.serving, &names()[0], now)
                .unwrap_or_else(|e| panic!("day {}: {e}", (now - NOW) / DAY));
        }
        // About every 60 days (90-day certificates renewed 30 days ahead), plus the move to the new CA.
        assert!((34..=38).contains(&serving_renewals), "serving renewals: {serving_renewals}");
        assert_eq!(ca_renewals, 1, "the CA renewed once, a year before it expired");
    }

    #[test]
    fn a_new_ca_signs_only_once_the_bundle_trusts_it_and_the_old_one_leaves_the_bundle_when_it_expires() {
        let mut certs = WebhookCerts::generate(&names(), NOW).expect("generate");
        let renew_at = certs.ca.not_after - CA_RENEW_BEFORE + DAY;
        // A serving certificate renewed lately, as a running controller would have.
        certs.serving = Serving::issue(&certs.ca, &names(), renew_at - DAY).expect("issue");
        let rotated = certs.plan(&names(), renew_at, true).expect("plan").expect("a new CA");
        assert_ne!(rotated.ca, certs.ca);
        assert_eq!(rotated.serving, certs.serving, "still signed by the old CA: the bundle does not hold the new one");
        let bundle = rotated.ca_bundle(renew_at);
        assert!(bundle.contains(&certs.ca.cert_pem) && bundle.contains(&rotated.ca.cert_pem), "both CAs trusted");
        // Not yet published, or published too recently for every API server to have seen it: it stays.
        assert_eq!(rotated.plan(&names(), renew_at + 60, false).expect("plan"), None);
        assert_eq!(rotated.plan(&names(), renew_at + 60, true).expect("plan"), None);
        // Published long enough: it moves to the new CA, which verifies it.
        let later = renew_at + CA_PUBLISH_GRACE + 1;
        let moved = rotated.plan(&names(), later, true).expect("plan").expect("moved");
        assert_eq!(moved.serving.issuer_created, moved.ca.created);
        verifies(&moved.ca_bundle(later), &moved.serving, &names()[0], later).expect("verifies");
        // The old CA's expiry takes it out of the bundle.
        let after = certs.ca.not_after + 1;
        let trimmed = moved.plan(&names(), after, true).expect("plan").expect("trimmed");
        assert!(!trimmed.ca_bundle(after).contains(&certs.ca.cert_pem));
    }

    /// A controller that was down for months: the CA and the serving certificate are both due in one pass. The
    /// serving certificate is renewed by the CA the configuration trusts now, never by the unpublished new one.
    #[test]
    fn a_serving_certificate_due_when_the_ca_is_renewed_is_signed_by_the_trusted_ca() {
        let certs = WebhookCerts::generate(&names(), NOW).expect("generate");
        let renew_at = certs.ca.not_after - CA_RENEW_BEFORE + DAY;
        let trusted_bundle = certs.ca_bundle(NOW);
        let next = certs.plan(&names(), renew_at, true).expect("plan").expect("renewed");
        assert_ne!(next.ca, certs.ca, "a new CA");
        assert_ne!(next.serving, certs.serving, "the expired serving certificate renewed");
        assert_eq!(next.serving.issuer_created, certs.ca.created, "by the old CA");
        verifies(&trusted_bundle, &next.serving, &names()[0], renew_at)
            .expect("the bundle before the update verifies it");
    }

    #[test]
    fn a_changed_service_name_reissues_the_serving_certificate() {
        let certs = WebhookCerts::generate(&names(), NOW).expect("generate");
        let renamed = vec!["other.kubetoken-system.svc".to_string()];
        let next = certs.plan(&renamed, NOW + 60, true).expect("plan").expect("reissued");
        assert_eq!(next.ca, certs.ca, "the CA stays");
        verifies(&next.ca_bundle(NOW + 60), &next.serving, &renamed[0], NOW + 60).expect("verifies");
    }
}
