//! Fault injection: failing requests, latency, closed watches; kube's watcher recovering from them.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube_test_server::KubeTestServer;

use crate::{client, code, configmap, raw, within};

#[tokio::test]
async fn injected_failures_then_recovery() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "f");
    cms.create(&PostParams::default(), &configmap("a", &[])).await.unwrap();

    server.fail_next(2, 500);
    assert_eq!(code(cms.get("a").await), (500, "InternalError".into()));
    assert_eq!(server.pending_failures(), 1);
    assert_eq!(code(cms.get("a").await), (500, "InternalError".into()));
    assert!(cms.get("a").await.is_ok(), "recovered after two failures");

    // kube's client retries 503 (and 429, 504) by itself: the caller sees success, the server two requests.
    server.fail_next(1, 503);
    assert!(cms.get("a").await.is_ok());
    assert_eq!(server.pending_failures(), 0);

    // Without the client's retry layer, 503 and 429 surface, 429 with Retry-After.
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(server.kubeconfig_path()).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.default_retry = false;
    let no_retry = kube::Client::try_from(config).unwrap();
    server.fail_next(1, 429);
    let (status, headers, body) = raw(&no_retry, "GET", "/api/v1/namespaces/f/configmaps/a", None, "").await;
    assert_eq!(status, 429);
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert_eq!((body["kind"].as_str(), body["reason"].as_str()), (Some("Status"), Some("TooManyRequests")));
    server.fail_next(1, 503);
    let (status, _, body) = raw(&no_retry, "GET", "/api/v1/namespaces/f/configmaps/a", None, "").await;
    assert_eq!((status, body["reason"].as_str(), body["code"].as_u64()), (503, Some("ServiceUnavailable"), Some(503)));
    // Writes that failed didn't happen.
    server.fail_next(1, 500);
    assert!(cms.create(&PostParams::default(), &configmap("b", &[])).await.is_err());
    assert_eq!(code(cms.get("b").await).0, 404);

    // Added latency delays the answer by at least that much; without it, a GET is not delayed by it (a second is
    // far beyond what a busy machine adds to a loopback GET).
    server.set_latency(Duration::from_secs(1));
    let started = Instant::now();
    cms.get("a").await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    server.set_latency(Duration::ZERO);
    let started = Instant::now();
    cms.get("a").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    let gets =
        server.requests().iter().filter(|r| r.method == "GET" && r.path == "/api/v1/namespaces/f/configmaps/a").count();
    assert_eq!(gets, 9, "2 failed + 1, 503 + its retry, 429, 503, 2 with latency");
}

type Events = tokio::sync::mpsc::UnboundedReceiver<Result<watcher::Event<ConfigMap>, watcher::Error>>;

/// Drives kube's watcher (with its default backoff) in a task, like a controller would.
fn spawn_watcher(api: Api<ConfigMap>) -> (Events, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    (rx, task)
}

/// Waits for the watcher's next Apply of `name`, skipping everything else (errors included).
async fn applied(events: &mut Events, name: &str) {
    within(&format!("watcher sees {name}"), async {
        loop {
            if let Some(Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c))) = events.recv().await
                && c.metadata.name.as_deref() == Some(name)
            {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn kube_watcher_reconnects_after_closed_watches_and_server_errors() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "f");
    let pp = PostParams::default();
    cms.create(&pp, &configmap("first", &[])).await.unwrap();
    let (mut events, task) = spawn_watcher(cms.clone());
    applied(&mut events, "first").await;
    within("watch open", async {
        while server.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // The server ends the watch: the watcher re-watches from where it was and misses nothing.
    server.close_watches();
    assert_eq!(server.open_watches(), 0);
    cms.create(&pp, &configmap("second", &[])).await.unwrap();
    applied(&mut events, "second").await;
    let watches = server.requests().iter().filter(|r| r.is_watch()).count();
    assert!(watches >= 2, "re-watched ({watches} watch requests)");

    // The server ends the watch and fails the re-watch: the watcher backs off, retries and recovers.
    server.fail_next(1, 500);
    server.close_watches();
    within("the re-watch consumed the failure", async {
        while server.pending_failures() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let failed = server.requests().iter().filter(|r| r.is_watch()).count();
    cms.create(&pp, &configmap("third", &[])).await.unwrap();
    applied(&mut events, "third").await;
    let watches = server.requests().iter().filter(|r| r.is_watch()).count();
    assert!(watches > failed, "watched again after the failed attempt");
    cms.create(&pp, &configmap("fourth", &[])).await.unwrap();
    applied(&mut events, "fourth").await;
    task.abort();
}

#[tokio::test]
async fn dropping_the_server_ends_watches_and_refuses_connections() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "f");
    cms.create(&Default::default(), &crate::configmap("x", &[("a", "1")])).await.unwrap();
    assert!(cms.get("x").await.is_ok(), "the object is there while the server runs");
    let mut stream = cms.watch(&Default::default(), "0").await.unwrap().boxed();
    // The watch from "0" first replays the object.
    assert!(matches!(within("the ADDED event", stream.try_next()).await, Ok(Some(_))));
    drop(server);
    let end = within("stream ends", stream.try_next()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "the stream ends when the server goes");
    // The same GET now fails at the connection, not with a 404.
    match cms.get("x").await {
        Err(kube::Error::Api(status)) => panic!("the dropped server still answered: {status:?}"),
        Err(_) => {}
        Ok(_) => panic!("the dropped server still served the object"),
    }
}
