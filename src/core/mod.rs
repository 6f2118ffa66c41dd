//! The token core: what a grant means, independent of HTTP, Kubernetes and the wall clock.
//!
//! - [`scope`]: scope parsing, the `device_` rule and role-based granting.
//! - [`model`]: token keys, live token pairs and the changes the core asks storage to make.
//! - [`state`]: the in-memory token state and its compare-and-set rules (shared by every storage adapter).
//! - [`store`]: the storage port the core owns, and a non-durable in-memory implementation.
//! - [`clock`]: the time port.
//! - [`signing`]: JWT signing keys (parsed once) and the JWKS.
//! - [`tokens`]: token strings: opaque handles, JWT claims.
//! - [`app`]: validated applications, client and user authentication.
//! - [`lockout`]: brute-force protection.
//! - [`service`]: the grant flows, revocation and introspection.
//! - [`error`]: the core's error enum (RFC 6749 error codes).
pub mod app;
pub mod clock;
pub mod error;
pub mod lockout;
pub mod model;
pub mod scope;
pub mod service;
pub mod signing;
pub mod state;
pub mod store;
pub mod tokens;
