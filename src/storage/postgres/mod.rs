//! Token state in PostgreSQL: for applications and standalone fleets past what ConfigMaps or one machine hold.
//!
//! - [`schema`]: the versioned schema, migrated at start under an advisory lock (several replicas may start at
//!   once), refusing a database whose schema is newer than this binary knows.
//! - [`store`]: the [`crate::core::store::TokenStore`] port: compare-and-set writes gathered into group commits (one
//!   statement per batch), reads fetched by [`crate::core::store::TokenStore::prepare`] into a bounded cache, expiry
//!   in small batches.
//! - [`tls`]: TLS to the server with rustls, honouring libpq's `sslmode` (`verify-full` included) and `sslrootcert`.
pub mod schema;
pub mod store;
pub mod tls;

pub use store::{PgOptions, PgStore};
