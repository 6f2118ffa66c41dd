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
//! - [`assertion`]: a trusted identity provider's JWTs checked as users (jwt-bearer, token exchange).
//! - [`replay`]: used assertions remembered until they expire.
//! - [`service`]: the grant flows, revocation and introspection.
//! - [`error`]: the core's error enum (RFC 6749 error codes).
pub mod app;
pub mod assertion;
pub mod clock;
pub mod error;
pub mod lockout;
pub mod model;
pub mod replay;
pub mod scope;
pub mod service;
pub mod signing;
pub mod state;
pub mod store;
pub mod tokens;

#[cfg(test)]
mod tests {
    /// Dependencies point one way: the core knows nothing of the CRD types, Kubernetes, the HTTP layer, the storage
    /// adapters or the async runtime (its tests may use anything).
    #[test]
    fn the_core_imports_no_adapter_and_no_runtime() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
        let forbidden = [
            "crate::api",
            "crate::http",
            "crate::storage",
            "crate::controller",
            "crate::sidecar",
            "crate::standalone",
            "crate::passwords",
            "kube::",
            "k8s_openapi",
            "tokio::",
        ];
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("src/core") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if name.ends_with("_tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read");
            // The code before the file's own `#[cfg(test)]` module.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for f in forbidden {
                if code.contains(f) {
                    found.push(format!("{name}: {f}"));
                }
            }
        }
        assert!(found.is_empty(), "the core depends on outer layers: {found:?}");
    }
}
