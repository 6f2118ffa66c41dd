//! Token state in PostgreSQL (issue 20, in progress): for applications and standalone fleets past what ConfigMaps
//! or one machine hold. What exists so far:
//!
//! - [`schema`]: the versioned schema, migrated at start under an advisory lock (several replicas may start at
//!   once), refusing a database whose schema is newer than this binary knows.
//! - [`store`]: the [`crate::core::store::TokenStore`] port: compare-and-set writes in the database, reads fetched
//!   by [`crate::core::store::TokenStore::prepare`] into a bounded cache, expiry in small batches.
pub mod schema;
pub mod store;

pub use store::{PgOptions, PgStore};
