//! The password-verification adapter: argon2 and bcrypt checks on Tokio's blocking pool, at most one per CPU at a
//! time, each with argon2 working memory kept from one verification to the next. This bounds CPU and memory
//! under a flood of password requests, and keeps the async executor free for everything else.

use std::sync::{Arc, Mutex};

use crate::core::app::{PasswordCheck, PasswordDigest, PasswordVerifier};
use crate::core::service::{ServiceConfig, ServicePolicies};

/// The service configuration every server uses: its issuer and limits, passwords checked on the blocking pool.
pub fn service_config(issuer: impl Into<String>, policies: ServicePolicies) -> ServiceConfig {
    ServiceConfig {
        issuer: issuer.into(),
        policies,
        passwords: Arc::new(BlockingPoolVerifier::default()),
        key_sets: None,
    }
}

pub struct BlockingPoolVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    permits: tokio::sync::Semaphore,
    memories: Mutex<Vec<Vec<argon2::Block>>>,
}

impl Default for BlockingPoolVerifier {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { inner: Arc::new(Inner { permits: tokio::sync::Semaphore::new(cpus), memories: Mutex::default() }) }
    }
}

impl PasswordVerifier for BlockingPoolVerifier {
    fn verify(&self, digest: PasswordDigest, password: String) -> PasswordCheck {
        let inner = self.inner.clone();
        Box::pin(async move {
            let _permit = inner.permits.acquire().await.map_err(|_| "password checker closed".to_string())?;
            let worker = inner.clone();
            tokio::task::spawn_blocking(move || {
                let mut memory = worker.memories.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
                let ok = digest.verify(&password, &mut memory);
                worker.memories.lock().unwrap_or_else(|p| p.into_inner()).push(memory);
                ok
            })
            .await
            .map_err(|e| format!("password verification task failed: {e}"))
        })
    }
}
