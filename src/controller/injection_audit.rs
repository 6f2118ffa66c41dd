//! Pods labelled `kubetoken.io/inject` that run without the sidecar: created while the webhook was not called
//! (its configuration deleted, a namespace it excludes, a pod created before kubetoken was installed). The leader
//! watches the labelled pods, publishes a Warning event on the application once per such pod, and keeps a gauge.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::metrics::ControllerMetrics;
use super::webhook::admission::INJECT_LABEL;
use crate::api::v1alpha1::OAuthApplication;
use crate::inject::SIDECAR_NAME;

/// Whether a labelled pod lacks the sidecar and is meant to be running (a finished pod no longer matters).
pub fn lacks_sidecar(pod: &Pod) -> bool {
    let finished =
        pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    let Some(spec) = pod.spec.as_ref() else { return false };
    let has = spec.init_containers.iter().flatten().chain(spec.containers.iter()).any(|c| c.name == SIDECAR_NAME);
    !finished && !has
}

struct Seen {
    scope: usize,
    lacking: bool,
}

/// Watches the labelled pods of each API scope (all namespaces, or each watched one) until the stream ends.
pub async fn run(scopes: Vec<Api<Pod>>, client: kube::Client, recorder: Recorder, metrics: Arc<ControllerMetrics>) {
    let config = watcher::Config::default().labels(INJECT_LABEL);
    let streams = scopes
        .into_iter()
        .enumerate()
        .map(|(scope, api)| watcher::watcher(api, config.clone()).map(move |event| (scope, event)).boxed());
    let mut events = futures::stream::select_all(streams);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    // A re-list (after a watch gap) rebuilds a scope's pods aside and swaps them in when it is complete, so the
    // gauge does not dip meanwhile; pods already reported are not reported again.
    let mut relisting: HashMap<usize, HashMap<String, Seen>> = HashMap::new();
    let mut reported: HashSet<String> = HashSet::new();
    let backoff = std::time::Duration::from_secs(5);
    while let Some((scope, event)) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                relisting.insert(scope, HashMap::new());
            }
            Ok(watcher::Event::InitApply(pod)) => {
                let lacking = lacks_sidecar(&pod);
                relisting.entry(scope).or_default().insert(pod.uid().unwrap_or_default(), Seen { scope, lacking });
                if lacking && reported.insert(pod.uid().unwrap_or_default()) {
                    report(&client, &recorder, &pod).await;
                }
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relisting.remove(&scope).unwrap_or_default();
                seen.retain(|_, s| s.scope != scope);
                seen.extend(fresh);
                reported.retain(|uid| seen.contains_key(uid));
            }
            Ok(watcher::Event::Apply(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                let lacking = lacks_sidecar(&pod);
                seen.insert(uid.clone(), Seen { scope, lacking });
                if lacking && reported.insert(uid) {
                    report(&client, &recorder, &pod).await;
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                let uid = pod.uid().unwrap_or_default();
                seen.remove(&uid);
                reported.remove(&uid);
            }
            Err(e) => {
                tracing::debug!(error = %e, "watching labelled pods; retrying");
                tokio::time::sleep(backoff).await;
            }
        }
        metrics.set_pods_without_sidecar(seen.values().filter(|s| s.lacking).count() as u64);
    }
}

async fn report(client: &kube::Client, recorder: &Recorder, pod: &Pod) {
    let namespace = pod.namespace().unwrap_or_default();
    let application = pod.labels().get(INJECT_LABEL).cloned().unwrap_or_default();
    let name = pod.name_any();
    tracing::warn!(pod = %name, %namespace, %application, "a pod labelled for injection runs without the kubetoken sidecar");
    // On the application when it exists (where its owner looks), else on the pod.
    let apps: Api<OAuthApplication> = Api::namespaced(client.clone(), &namespace);
    let reference = match apps.get_opt(&application).await {
        Ok(Some(app)) => app.object_ref(&()),
        _ => pod.object_ref(&()),
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "PodWithoutSidecar".into(),
        note: Some(format!(
            "pod {name} is labelled {INJECT_LABEL}={application} but runs without the kubetoken sidecar: it was created \
             while the admission webhook was not called (configuration missing, namespace excluded, or created before \
             kubetoken); delete the pod to have it injected"
        )),
        action: "Audit".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(init: &[&str], containers: &[&str], phase: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": {INJECT_LABEL: "shop"}},
            "spec": {
                "initContainers": init.iter().map(|n| serde_json::json!({"name": n})).collect::<Vec<_>>(),
                "containers": containers.iter().map(|n| serde_json::json!({"name": n})).collect::<Vec<_>>(),
            },
            "status": {"phase": phase},
        }))
        .expect("pod")
    }

    #[test]
    fn a_running_labelled_pod_without_the_sidecar_is_reported_and_others_are_not() {
        assert!(lacks_sidecar(&pod(&[], &["app"], Some("Running"))));
        assert!(lacks_sidecar(&pod(&["migrate"], &["app"], Some("Pending"))));
        assert!(!lacks_sidecar(&pod(&["kubetoken"], &["app"], Some("Running"))), "injected");
        assert!(!lacks_sidecar(&pod(&[], &["app", "kubetoken"], Some("Running"))), "the older, regular container");
        assert!(!lacks_sidecar(&pod(&[], &["app"], Some("Succeeded"))), "a finished pod no longer matters");
        assert!(!lacks_sidecar(&pod(&[], &["app"], Some("Failed"))));
    }
}
