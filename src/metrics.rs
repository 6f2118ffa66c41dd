//! Prometheus metrics, kept with atomics and rendered as text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths, so it fits an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        // Buckets are stored non-cumulative and summed when rendered: one increment per observation.
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Endpoints with a latency histogram.
pub const ENDPOINTS: [&str; 3] = ["token", "revoke", "introspect"];

#[derive(Debug)]
pub struct Metrics {
    /// (grant_type, outcome) → count; outcome is `issued`, `reused` or the OAuth error code.
    tokens: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    revocations: AtomicU64,
    latency: [Histogram; 3],
    /// Records per durable storage write (group commit).
    pub storage_batch: Arc<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            tokens: Mutex::default(),
            revocations: AtomicU64::new(0),
            latency: ENDPOINTS.map(|_| Histogram::new(LATENCY_BOUNDS)),
            storage_batch: Arc::new(Histogram::new(BATCH_BOUNDS)),
        }
    }
}

impl Metrics {
    pub fn token_outcome(&self, grant: &'static str, outcome: &'static str) {
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((grant, outcome)).or_default() += 1;
    }

    pub fn revoked(&self) {
        self.revocations.fetch_add(1, Ordering::Relaxed);
    }

    /// `endpoint` is one of [`ENDPOINTS`].
    pub fn observe_latency(&self, endpoint: &str, seconds: f64) {
        if let Some(i) = ENDPOINTS.iter().position(|e| *e == endpoint) {
            self.latency[i].observe(seconds);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP kubetoken_tokens_total Token requests by grant type and outcome (issued, reused or OAuth error code).\n");
        out.push_str("# TYPE kubetoken_tokens_total counter\n");
        for ((grant, outcome), n) in self.tokens.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "kubetoken_tokens_total{{grant_type=\"{grant}\",outcome=\"{outcome}\"}} {n}");
        }
        out.push_str("# HELP kubetoken_revocations_total Token pairs revoked through the revocation endpoint.\n");
        out.push_str("# TYPE kubetoken_revocations_total counter\n");
        let _ = writeln!(out, "kubetoken_revocations_total {}", self.revocations.load(Ordering::Relaxed));
        out.push_str("# HELP kubetoken_request_duration_seconds Request latency by endpoint.\n");
        out.push_str("# TYPE kubetoken_request_duration_seconds histogram\n");
        for (endpoint, h) in ENDPOINTS.iter().zip(&self.latency) {
            h.render(&mut out, "kubetoken_request_duration_seconds", &format!("endpoint=\"{endpoint}\""));
        }
        out.push_str(
            "# HELP kubetoken_storage_batch_records State changes made durable per storage write (group commit).\n",
        );
        out.push_str("# TYPE kubetoken_storage_batch_records histogram\n");
        self.storage_batch.render(&mut out, "kubetoken_storage_batch_records", "");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.storage_batch.observe(1.0);
        m.storage_batch.observe(3.0);
        m.storage_batch.observe(5000.0);
        let text = m.render();
        assert!(text.contains("kubetoken_storage_batch_records_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("kubetoken_storage_batch_records_bucket{le=\"4\"} 2\n"), "{text}");
        assert!(text.contains("kubetoken_storage_batch_records_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("kubetoken_storage_batch_records_count 3\n"), "{text}");
    }
}
