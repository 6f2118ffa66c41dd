//! Watches: from a resourceVersion, selectors, bookmarks, timeout, 410 Gone, and kube's watcher recovering.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube_test_server::KubeTestServer;
use serde_json::json;

use crate::{client, configmap, within};

fn describe(ev: &WatchEvent<ConfigMap>) -> String {
    match ev {
        WatchEvent::Added(c) => format!("ADDED {}", c.metadata.name.as_deref().unwrap_or_default()),
        WatchEvent::Modified(c) => format!("MODIFIED {}", c.metadata.name.as_deref().unwrap_or_default()),
        WatchEvent::Deleted(c) => format!("DELETED {}", c.metadata.name.as_deref().unwrap_or_default()),
        WatchEvent::Bookmark(_) => "BOOKMARK".into(),
        WatchEvent::Error(e) => format!("ERROR {}", e.code),
    }
}

#[tokio::test]
async fn watch_replays_from_a_resource_version_then_streams_live_changes() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let pp = PostParams::default();
    let a = cms.create(&pp, &configmap("a", &[])).await.unwrap();
    let from = a.metadata.resource_version.clone().unwrap();
    cms.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "v"}}))).await.unwrap();
    cms.create(&pp, &configmap("b", &[])).await.unwrap();
    // Another namespace: not in this watch.
    Api::<ConfigMap>::namespaced(client.clone(), "elsewhere").create(&pp, &configmap("x", &[])).await.unwrap();

    let wp = WatchParams::default().disable_bookmarks();
    let mut stream = cms.watch(&wp, &from).await.unwrap().boxed();
    let mut next = async || describe(&within("watch event", stream.try_next()).await.unwrap().unwrap());
    assert_eq!(next().await, "MODIFIED a");
    assert_eq!(next().await, "ADDED b");
    cms.delete("b", &DeleteParams::default()).await.unwrap();
    assert_eq!(next().await, "DELETED b");

    // resourceVersion "0": every current object as ADDED, then changes.
    let mut all = cms.watch(&wp, "0").await.unwrap().boxed();
    assert_eq!(describe(&within("initial", all.try_next()).await.unwrap().unwrap()), "ADDED a");
    cms.create(&pp, &configmap("c", &[])).await.unwrap();
    assert_eq!(describe(&within("live", all.try_next()).await.unwrap().unwrap()), "ADDED c");
}

#[tokio::test]
async fn watch_selectors_turn_label_changes_into_added_and_deleted() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let pp = PostParams::default();
    cms.create(&pp, &configmap("a", &[])).await.unwrap();
    cms.create(&pp, &configmap("b", &[])).await.unwrap();
    let wp = WatchParams::default().labels("pick=yes").disable_bookmarks();
    let mut labelled = cms.watch(&wp, "0").await.unwrap().boxed();
    let fp = WatchParams::default().fields("metadata.name=b").disable_bookmarks();
    let mut named = cms.watch(&fp, "0").await.unwrap().boxed();
    assert_eq!(describe(&within("named initial", named.try_next()).await.unwrap().unwrap()), "ADDED b");

    let label = |v: Option<&str>| Patch::Merge(json!({"metadata": {"labels": {"pick": v}}}));
    cms.patch("a", &PatchParams::default(), &label(Some("yes"))).await.unwrap();
    assert_eq!(describe(&within("label added", labelled.try_next()).await.unwrap().unwrap()), "ADDED a");
    cms.patch("a", &PatchParams::default(), &label(None)).await.unwrap();
    assert_eq!(describe(&within("label removed", labelled.try_next()).await.unwrap().unwrap()), "DELETED a");
    cms.patch("b", &PatchParams::default(), &label(Some("yes"))).await.unwrap();
    assert_eq!(describe(&within("b labelled", labelled.try_next()).await.unwrap().unwrap()), "ADDED b");
    // The field-selected watch saw only b's change, not a's two.
    assert_eq!(describe(&within("named", named.try_next()).await.unwrap().unwrap()), "MODIFIED b");
}

#[tokio::test]
async fn bookmarks_and_timeout() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let rv = cms.create(&PostParams::default(), &configmap("a", &[])).await.unwrap().metadata.resource_version.unwrap();
    // Unrelated writes move the global resourceVersion; the bookmark reports it.
    Api::<ConfigMap>::namespaced(client.clone(), "other")
        .create(&PostParams::default(), &configmap("o", &[]))
        .await
        .unwrap();
    let mut stream = cms.watch(&WatchParams::default(), &rv).await.unwrap().boxed();
    match within("bookmark", stream.try_next()).await.unwrap().unwrap() {
        WatchEvent::Bookmark(b) => {
            assert_eq!(b.metadata.resource_version, server.resource_version().to_string());
            assert_eq!(b.types.kind, "ConfigMap");
        }
        other => panic!("expected a bookmark, got {}", describe(&other)),
    }

    let started = Instant::now();
    let wp = WatchParams::default().timeout(1).disable_bookmarks();
    let mut short = cms.watch(&wp, &rv).await.unwrap().boxed();
    let end = within("timeout ends the stream", short.try_next()).await.unwrap();
    assert!(end.is_none(), "no events, then the end of the stream");
    let took = started.elapsed();
    // At least the timeout (less a little clock granularity); the upper bound only catches a stream that never ends.
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(30), "{took:?}");
}

#[tokio::test]
async fn compacted_history_gives_410_and_kubes_watcher_relists() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let pp = PostParams::default();
    let old = cms.create(&pp, &configmap("a", &[])).await.unwrap().metadata.resource_version.unwrap();
    cms.create(&pp, &configmap("b", &[])).await.unwrap();
    server.compact_history();
    let mut stream = cms.watch(&WatchParams::default(), &old).await.unwrap().boxed();
    match within("410", stream.try_next()).await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410, got {}", describe(&other)),
    }
    assert!(within("end after 410", stream.try_next()).await.unwrap().is_none());
    // The current resourceVersion is still fine.
    let now = server.resource_version().to_string();
    let mut ok = cms.watch(&WatchParams::default().disable_bookmarks(), &now).await.unwrap().boxed();
    cms.create(&pp, &configmap("c", &[])).await.unwrap();
    assert_eq!(describe(&within("after compaction", ok.try_next()).await.unwrap().unwrap()), "ADDED c");

    // kube's watcher: started, then its resourceVersion falls out of the history while it reconnects.
    let mut events = watcher(cms.clone(), watcher::Config::default().disable_bookmarks()).boxed();
    let mut seen_init_done = false;
    while !seen_init_done {
        seen_init_done = matches!(within("init", events.try_next()).await.unwrap(), Some(watcher::Event::InitDone));
    }
    Api::<ConfigMap>::namespaced(client.clone(), "other").create(&pp, &configmap("bump", &[])).await.unwrap();
    server.compact_history();
    server.clear_requests();
    server.close_watches();
    // It sees the 410, relists, and then sees later changes.
    let mut saw_410 = false;
    let mut relisted = false;
    let mut created_after = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !created_after && Instant::now() < deadline {
        match within("watcher event", events.next()).await.unwrap() {
            Err(watcher::Error::WatchError(e)) if e.code == 410 => {
                saw_410 = true;
            }
            Ok(watcher::Event::InitDone) => {
                relisted = true;
                cms.create(&pp, &configmap("later", &[])).await.unwrap();
            }
            Ok(watcher::Event::Apply(c)) if c.metadata.name.as_deref() == Some("later") => created_after = true,
            _ => {}
        }
    }
    assert!(saw_410 && relisted && created_after, "410 {saw_410}, relist {relisted}, later change {created_after}");
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && !r.is_watch() && r.path.ends_with("/configmaps"))
        .count();
    assert!(lists >= 1, "the watcher relisted");
}

#[tokio::test]
async fn streaming_list_initial_events_end_with_a_bookmark() {
    let server = KubeTestServer::start();
    let client = client(&server).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    cms.create(&PostParams::default(), &configmap("a", &[])).await.unwrap();
    let mut events = watcher(cms.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut names = Vec::new();
    loop {
        match within("streaming list", events.try_next()).await.unwrap().unwrap() {
            watcher::Event::InitApply(c) => names.push(c.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(names, ["a"]);
    assert!(
        server.requests().iter().all(|r| r.method != "GET" || r.is_watch() || !r.path.ends_with("/configmaps")),
        "no list request"
    );
}
