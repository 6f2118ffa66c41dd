//! Users from an identity provider (issue 21, in progress): what kubetoken needs from the network to accept a
//! trusted issuer's JWTs. The checks themselves are pure, in [`crate::core::assertion`].
//!
//! - [`key_sets`]: issuers' key sets fetched over HTTPS, bounded, cached, refetched on an unknown key at most once
//!   per 30 s per issuer, a failed fetch keeping the set held.
//!
//! Not yet: the grants (RFC 7523 JWT bearer, RFC 8693 token exchange) in the token service, `spec.trustedIssuers`,
//! replay detection in the stores, the controller's condition.
pub mod key_sets;
