//! The Helm chart: generated files in sync, lint and offline schema validation over a matrix of values, the values
//! schema's refusals, and a manifest security linter. Needs `helm` (../shared/tools/install-helm), and
//! `kubernetes-validate` and `checkov` from PyPI (`pip install kubernetes-validate checkov`), as `.ci/run` installs
//! them: a missing tool fails the test, it is never skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/kubetoken")
}

/// The oldest and newest Kubernetes versions the chart supports (k8s-openapi's range: 1.33 to 1.37).
const KUBE_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).current_dir(root()).output().unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}): install it (helm: ../shared/tools/install-helm; pip install kubernetes-validate checkov)")
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn helm(args: &[&str]) -> Output {
    run("helm", args)
}

fn value_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .expect("charts/kubetoken/ci")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "the matrix of values: {files:?}");
    files
}

#[test]
fn the_chart_crd_is_the_generated_one() {
    let generated = std::fs::read_to_string(root().join("crds/oauthapplications.kubetoken.io.yaml")).expect("crd");
    let packaged =
        std::fs::read_to_string(chart().join("crds/oauthapplications.kubetoken.io.yaml")).expect("chart crd");
    assert!(
        generated == packaged,
        "charts/kubetoken/crds/ differs from crds/: copy crds/oauthapplications.kubetoken.io.yaml"
    );
}

#[test]
fn deploy_is_rendered_from_the_chart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("repo");
    std::fs::create_dir_all(&copy).expect("mkdir");
    for sub in ["charts", "deploy"] {
        let cp = Command::new("cp").arg("-r").arg(root().join(sub)).arg(&copy).status().expect("cp");
        assert!(cp.success(), "copying {sub}");
    }
    let out = Command::new("bash").arg(copy.join("deploy/render.sh")).output().expect("render");
    assert!(out.status.success(), "deploy/render.sh failed: {}", text(&out.stderr));
    for file in ["kubetoken.yaml", "sidecar-rbac.yaml"] {
        let committed = std::fs::read_to_string(root().join("deploy").join(file)).expect("committed");
        let rendered = std::fs::read_to_string(copy.join("deploy").join(file)).expect("rendered");
        assert!(committed == rendered, "deploy/{file} is stale: run deploy/render.sh");
    }
}

#[test]
fn the_chart_lints_and_every_rendered_manifest_validates_for_the_oldest_and_newest_kubernetes() {
    let chart = chart();
    let chart = chart.to_str().expect("path");
    let renders = tempfile::tempdir().expect("tempdir");
    for values in value_files() {
        let v = values.to_str().expect("path");
        let name = values.file_stem().and_then(|s| s.to_str()).expect("name");
        for kube in KUBE_VERSIONS {
            let lint = helm(&["lint", "--strict", chart, "-f", v, "--kube-version", kube]);
            assert!(lint.status.success(), "helm lint {name} ({kube}): {}{}", text(&lint.stdout), text(&lint.stderr));
            let out =
                helm(&["template", "kubetoken", chart, "-n", "kubetoken-system", "-f", v, "--kube-version", kube]);
            assert!(out.status.success(), "helm template {name}: {}", text(&out.stderr));
            let file = renders.path().join(format!("{name}-{kube}.yaml"));
            std::fs::write(&file, &out.stdout).expect("write");
            let check = run(
                "python3",
                &["-m", "kubernetes_validate", "--strict", "--quiet", "-k", kube, file.to_str().expect("path")],
            );
            // Custom resources (ServiceMonitor) have no schema here: a warning, not an error.
            assert!(
                check.status.success(),
                "{name} on Kubernetes {kube} does not validate:\n{}{}",
                text(&check.stdout),
                text(&check.stderr)
            );
        }
    }
    // The manifest security linter over every render, with each skipped check justified.
    let skipped = [
        // The default image is a tag (the chart's appVersion); users pin a digest with image.digest (rendered and
        // validated in ci/digest-values.yaml).
        "CKV_K8S_43",
        // IfNotPresent is right for immutable release tags and digests; Always would make every restart depend
        // on the registry.
        "CKV_K8S_15",
        // The controller talks to the API server with its ServiceAccount token, so the token must be mounted (the
        // test Pod does not mount one).
        "CKV_K8S_38",
        // The `helm test` Pod runs one wget and exits: probes do not apply to it.
        "CKV_K8S_8",
        "CKV_K8S_9",
        // A NetworkPolicy depends on the cluster's CNI and its API server address; left to the operator.
        "CKV2_K8S_6",
    ];
    let out = run(
        "python3",
        &[
            "-m",
            "checkov.main",
            "-d",
            renders.path().to_str().expect("path"),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
            "--skip-check",
            &skipped.join(","),
        ],
    );
    assert!(out.status.success(), "checkov found problems:\n{}{}", text(&out.stdout), text(&out.stderr));
}

#[test]
fn the_values_schema_refuses_wrong_values_with_a_clear_message() {
    let chart = chart();
    let chart = chart.to_str().expect("path");
    for (set, expected) in [
        ("replicaCount=two", "replicaCount: Invalid type. Expected: integer, given: string"),
        ("replicas=2", "Additional property replicas is not allowed"),
        ("image.pullPolicy=Sometimes", "image.pullPolicy must be one of the following"),
        ("leaderElection.leaseDuration=15", "leaderElection.leaseDuration: Invalid type"),
    ] {
        let out = helm(&["template", "x", chart, "--kube-version", "1.33.0", "--set", set]);
        assert!(!out.status.success(), "{set} was accepted");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{set}: expected {expected:?} in: {err}");
    }
    // Two controllers without leader election would both write: refused with the reason.
    let out = helm(&["template", "x", chart, "--kube-version", "1.33.0", "--set", "leaderElection.enabled=false"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("needs replicaCount: 1"), "{}", text(&out.stderr));
}
