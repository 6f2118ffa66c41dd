//! kubetoken: a Kubernetes-native OAuth2 token service with per-device access tokens.
//!
//! Layers, from the inside out (see ARCHITECTURE.md):
//! - [`core`]: token semantics (grants, scope sets, per-device keys, revocation, refresh rotation). Pure: storage
//!   and time are the port traits [`core::store::TokenStore`] and [`core::clock::Clock`].
//! - [`storage`]: adapters implementing the storage port: the durable local-disk log of standalone mode, the
//!   ConfigMaps of the sidecar.
//! - [`http`]: the axum server; parses requests, calls the core, maps errors to RFC 6749 responses.
//! - [`api`]: the `OAuthApplication` resource as users write it (serde + schemars).
//! - [`standalone`]: wiring for `kubetoken standalone`: manifests on disk, state on disk.
//! - [`sidecar`]: wiring for `kubetoken sidecar`: applications from the Kubernetes API, state in ConfigMaps.
//! - [`controller`]: `kubetoken controller`, which reconciles OAuthApplications.
//! - [`inject`]: `kubetoken inject`, which adds the sidecar to workload manifests.
#![forbid(unsafe_code)]
// Errors are handled, not unwrapped: a panic in a request would drop a client connection without an answer.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod controller;
pub mod core;
pub mod federation;
pub mod http;
pub mod inject;
pub mod kube_client;
pub mod metrics;
pub mod passwords;
pub mod sidecar;
pub mod signal;
pub mod standalone;
pub mod storage;
