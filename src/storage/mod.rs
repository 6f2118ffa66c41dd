//! Storage adapters implementing the core's [`crate::core::store::TokenStore`] port.
//!
//! - [`file_store`]: standalone mode. An append-only log on local disk with group commit and compaction.
pub mod file_store;
