//! The controller's Prometheus metrics.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::Histogram;

const DURATION_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug)]
pub struct ControllerMetrics {
    reconciles: AtomicU64,
    errors: AtomicU64,
    duration: Histogram,
    leader: AtomicBool,
    admissions_injected: AtomicU64,
    admissions_refused: AtomicU64,
    pods_without_sidecar: AtomicU64,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconciles: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            duration: Histogram::new(DURATION_BOUNDS),
            leader: AtomicBool::new(false),
            admissions_injected: AtomicU64::new(0),
            admissions_refused: AtomicU64::new(0),
            pods_without_sidecar: AtomicU64::new(0),
        }
    }
}

impl ControllerMetrics {
    pub fn observe(&self, ok: bool, took: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.duration.observe(took.as_secs_f64());
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// An admission review answered with a sidecar (`injected`) or a refusal (`refused`).
    pub fn count_admission(&self, outcome: &str) {
        let counter = if outcome == "injected" { &self.admissions_injected } else { &self.admissions_refused };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_pods_without_sidecar(&self, n: u64) {
        self.pods_without_sidecar.store(n, Ordering::Relaxed);
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP kubetoken_controller_reconciles_total Reconciliations run.\n");
        out.push_str("# TYPE kubetoken_controller_reconciles_total counter\n");
        let _ = writeln!(out, "kubetoken_controller_reconciles_total {}", self.reconciles());
        out.push_str(
            "# HELP kubetoken_controller_reconcile_errors_total Reconciliations that failed (retried with backoff).\n",
        );
        out.push_str("# TYPE kubetoken_controller_reconcile_errors_total counter\n");
        let _ = writeln!(out, "kubetoken_controller_reconcile_errors_total {}", self.errors.load(Ordering::Relaxed));
        out.push_str("# HELP kubetoken_controller_reconcile_duration_seconds Time per reconciliation.\n");
        out.push_str("# TYPE kubetoken_controller_reconcile_duration_seconds histogram\n");
        self.duration.render(&mut out, "kubetoken_controller_reconcile_duration_seconds", "");
        out.push_str("# HELP kubetoken_controller_leader Whether this replica holds the leader Lease.\n");
        out.push_str("# TYPE kubetoken_controller_leader gauge\n");
        let _ = writeln!(out, "kubetoken_controller_leader {}", u8::from(self.is_leader()));
        out.push_str("# HELP kubetoken_controller_admissions_total Pods the admission webhook injected or refused.\n");
        out.push_str("# TYPE kubetoken_controller_admissions_total counter\n");
        for (outcome, n) in [("injected", &self.admissions_injected), ("refused", &self.admissions_refused)] {
            let _ = writeln!(
                out,
                "kubetoken_controller_admissions_total{{outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP kubetoken_controller_pods_without_sidecar Pods labelled kubetoken.io/inject that run without the \
             sidecar (created while the webhook was not called); the leader counts them.\n",
        );
        out.push_str("# TYPE kubetoken_controller_pods_without_sidecar gauge\n");
        let _ = writeln!(
            out,
            "kubetoken_controller_pods_without_sidecar {}",
            self.pods_without_sidecar.load(Ordering::Relaxed)
        );
        out
    }
}
