//! Users from an identity provider: what kubetoken needs from the network to accept a trusted issuer's JWTs. The
//! checks themselves are pure, in [`crate::core::assertion`]; the grants are in [`crate::core::service`].
//!
//! - [`key_sets`]: issuers' key sets fetched over HTTPS, bounded, cached, refetched on an unknown key at most once
//!   per 30 s per issuer, a failed fetch keeping the set held.
pub mod key_sets;
