//! Storage adapters implementing the core's [`crate::core::store::TokenStore`] port.
//!
//! - [`file_store`]: standalone mode. An append-only log on local disk with group commit and compaction.
//! - [`kube_store`]: the sidecar. A journal ConfigMap shared by every replica, compacted into snapshot shards.
//! - [`postgres`]: the token state in PostgreSQL, for state past ConfigMaps or one machine (in progress).
pub mod file_store;
pub mod kube_store;
pub mod postgres;
