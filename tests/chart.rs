//! The Helm chart: generated files in sync, lint and offline schema validation over a matrix of values, the values
//! schema's refusals, and a manifest security linter. Needs `helm`, and `kubernetes-validate` and `checkov` from PyPI,
//! which `scripts/test` (the README's test command) installs with `scripts/install-test-tools`: a missing tool fails
//! the test, it is never skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

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
        panic!("cannot run {program} ({e}): run the tests with scripts/test, which installs it, or put the tools of scripts/install-test-tools on the PATH")
    })
}

/// A temporary directory checkov reads: its name must not start with a dot (`tempfile`'s default `.tmp...`), or
/// checkov skips everything in it and passes.
fn scan_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("kubetoken-scan-").tempdir().expect("tempdir")
}

/// The manifest security linter over the manifests in `dir`, with each skipped check justified by the caller; fails
/// on any finding, and also if it checked nothing.
fn checkov(dir: &Path, skipped: &[&str]) {
    let out = run(
        "python3",
        &[
            "-m",
            "checkov.main",
            "-d",
            dir.to_str().expect("path"),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--skip-check",
            &skipped.join(","),
        ],
    );
    let report = text(&out.stdout);
    assert!(out.status.success(), "checkov found problems:\n{report}{}", text(&out.stderr));
    let passed = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Passed checks: ")?.split(',').next()?.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed > 0, "checkov checked nothing in {}:\n{report}", dir.display());
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// Runs `program` (helm, kubectl) against the cluster of `kubeconfig` from the repository root; its stdout.
fn run_against(kubeconfig: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).env("KUBECONFIG", kubeconfig).current_dir(root()).output();
    let out = out.unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
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
    let renders = scan_dir();
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
        // The controller keeps the caBundle of its own MutatingWebhookConfiguration: get and update of that one
        // object, by resourceNames (which this check does not read), as cert-manager's CA injector needs for every
        // configuration. webhook.certManager.enabled renders no such rule.
        "CKV_K8S_155",
    ];
    checkov(renders.path(), &skipped);
}

/// `kubetoken inject` of the example app, as a user runs it.
fn inject(file: &str) -> String {
    let out = run(common::BIN, &["inject", "--application", "shop", "-f", file]);
    assert!(out.status.success(), "kubetoken inject -f {file}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// examples/shop-app.yaml is `kubetoken inject` of examples/app/shop-app.yaml, below its comment header.
#[test]
fn the_example_app_is_what_kubetoken_inject_makes_of_the_plain_one() {
    let committed = std::fs::read_to_string(root().join("examples/shop-app.yaml")).expect("example");
    let body: String = committed.lines().skip_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    assert!(
        body == inject("examples/app/shop-app.yaml"),
        "examples/shop-app.yaml is stale: regenerate it with kubetoken inject --application shop -f \
         examples/app/shop-app.yaml (keeping its comment header)"
    );
}

/// What `kubetoken inject` makes of a Deployment and a Job validates against the oldest and newest supported
/// Kubernetes and passes the manifest security linter (each skipped check justified).
#[test]
fn kubetoken_inject_output_for_a_deployment_and_a_job_validates_and_passes_checkov() {
    let dir = scan_dir();
    let mut files = Vec::new();
    for name in ["shop-app", "shop-report-job"] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, inject(&format!("examples/app/{name}.yaml"))).expect("write");
        files.push(file.to_str().expect("path").to_string());
    }
    for kube in KUBE_VERSIONS {
        let mut args = vec!["-m", "kubernetes_validate", "--strict", "--quiet", "-k", kube];
        args.extend(files.iter().map(String::as_str));
        let check = run("python3", &args);
        assert!(check.status.success(), "on Kubernetes {kube}:\n{}{}", text(&check.stdout), text(&check.stderr));
    }
    let skipped = [
        // The example app runs busybox by tag; a real app pins its digest. The sidecar's image is the release tag.
        "CKV_K8S_43",
        "CKV_K8S_15",
        // The example app container (busybox in a loop) has no health endpoint to probe.
        "CKV_K8S_8",
        "CKV_K8S_9",
        // The default namespace: these are examples, applied where the user wants them.
        "CKV_K8S_21",
        // The app reads its client credentials from the environment, as twelve-factor apps and the OAuth client
        // libraries do; the Secret stays out of the manifest either way.
        "CKV_K8S_35",
        // A NetworkPolicy depends on the cluster's CNI; left to the operator (as for the chart).
        "CKV2_K8S_6",
    ];
    checkov(dir.path(), &skipped);
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
        // The API server would accept up to 30 s; a pod's creation should not wait that long.
        ("webhook.timeoutSeconds=10", "webhook.timeoutSeconds: Must be less than or equal to 5"),
        ("webhook.failurePolicy=Sometimes", "webhook.failurePolicy must be one of the following"),
        ("webhook.certManager.enabled=true", "needs webhook.certManager.issuerRef.name"),
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

/// The chart rendered with `ci/<values>` and `extra` arguments (`--set ...`): its text.
fn template(values: &str, extra: &[&str]) -> String {
    let chart = chart();
    let values = chart.join("ci").join(values);
    let args = ["template", "x", chart.to_str().expect("path"), "--kube-version", "1.33.0", "-f"];
    let out = helm(&[&args[..], &[values.to_str().expect("path")], extra].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The chart rendered with `ci/<values>` and `extra` arguments: its objects.
fn rendered(values: &str, extra: &[&str]) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(&template(values, extra))
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|d| !d.is_null())
        .collect()
}

/// The controller container's args.
fn controller_args(docs: &[Value]) -> Vec<String> {
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("the controller's Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

/// With the value alone (no other volume of the controller), and with the TLS values' volumes beside it.
#[test]
fn an_issuer_ca_config_map_reaches_the_controller_as_a_file_of_its_ca_certificates_only() {
    let alone = rendered("default-values.yaml", &["--set", "controller.issuerCaConfigMap=corp-ca-bundle"]);
    for docs in [alone, rendered("tls-values.yaml", &[])] {
        issuer_ca_reaches_the_controller(&docs);
    }
    // Without the value, neither.
    assert!(!controller_args(&rendered("default-values.yaml", &[])).iter().any(|a| a == "--issuer-ca-file"));
}

fn issuer_ca_reaches_the_controller(docs: &[Value]) {
    let args = controller_args(docs);
    assert!(args.windows(2).any(|w| w == ["--issuer-ca-file", "/etc/kubetoken/issuer-ca/ca.crt"]), "{args:?}");
    let pod = &docs.iter().find(|d| d["kind"] == "Deployment").expect("deployment")["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().expect("volumes").iter().find(|v| v["name"] == "issuer-ca").expect("volume");
    assert_eq!(
        volume["configMap"],
        serde_json::json!({"name": "corp-ca-bundle", "items": [{"key": "ca.crt", "path": "ca.crt"}]})
    );
    let mounts = pod["containers"][0]["volumeMounts"].as_array().expect("mounts");
    assert!(mounts.iter().any(|m| m["name"] == "issuer-ca" && m["mountPath"] == "/etc/kubetoken/issuer-ca"));
}

/// `sidecar.namespaces[].postgresSecret` and `postgresCaSecret`: the webhook is told the namespace's Secrets (the
/// controller's flags), and the sidecar's Role grants no ConfigMap, since its token state is in the database.
#[test]
fn a_namespace_postgres_secret_and_ca_reach_the_webhook_and_the_sidecar_role_grants_no_configmap() {
    let docs = rendered("postgres-values.yaml", &[]);
    let args = controller_args(&docs);
    assert!(
        args.windows(2).any(|w| w == ["--sidecar-postgres-secret", "shop=shop-db-app"]),
        "the controller is told the namespace's Secret: {args:?}"
    );
    assert!(
        args.windows(2).any(|w| w == ["--sidecar-postgres-ca-secret", "shop=shop-db-ca"]),
        "and the database's CA: {args:?}"
    );
    let role =
        docs.iter().find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "shop").expect("the sidecar's Role");
    let resources: Vec<&Value> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["resources"].as_array().expect("resources"))
        .collect();
    assert!(!resources.is_empty() && !resources.iter().any(|r| *r == "configmaps"), "{resources:?}");
    // Without it, the sidecar keeps its state in ConfigMaps and the Role grants them.
    let plain = template("sidecar-values.yaml", &[]);
    assert!(plain.contains("configmaps") && !plain.contains("--sidecar-postgres-secret"));
}

/// The command a kubelet would run for `container` of a Deployment: its image's entrypoint (the kubetoken binary)
/// with its args, and its env with the downward API filled in. The listen address becomes a free loopback port
/// (this test runs every "pod" on one machine); the API server comes from KUBECONFIG (the test server) instead of
/// the in-cluster service account.
fn kubelet_command(deployment: &Value, container: &str, pod_name: &str, kubeconfig: &Path) -> Command {
    let spec = &deployment["spec"]["template"]["spec"];
    // A container, or a native sidecar (an init container that keeps running: restartPolicy Always).
    let c = ["containers", "initContainers"]
        .iter()
        .flat_map(|list| spec[*list].as_array().into_iter().flatten())
        .find(|c| c["name"] == container)
        .expect("container");
    let image = c["image"].as_str().expect("image");
    assert!(image.contains("kubetoken"), "{container} runs the kubetoken image: {image}");
    let args: Vec<String> =
        c["args"].as_array().expect("args").iter().map(|a| a.as_str().expect("arg").to_string()).collect();
    // `--flag value` and `--flag=value` alike.
    let mut args: Vec<String> = args
        .iter()
        .flat_map(|a| match a.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => vec![flag.to_string(), value.to_string()],
            _ => vec![a.clone()],
        })
        .collect();
    assert_probes_reach_the_pod(c, container, &args);
    for flag in ["--listen", "--health-listen", "--webhook-listen"] {
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = "127.0.0.1:0".into(),
            None if flag == "--listen" => args.extend([flag.into(), "127.0.0.1:0".into()]),
            None => {}
        }
    }
    let mut cmd = Command::new(common::cluster::BIN);
    cmd.args(&args).env("KUBECONFIG", kubeconfig);
    let namespace = deployment["metadata"]["namespace"].as_str().expect("namespace");
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name");
        let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => v.to_string(),
            (None, Some("metadata.name")) => pod_name.to_string(),
            (None, Some("metadata.namespace")) => namespace.to_string(),
            (None, other) => panic!("{container}: env {name} from {other:?} is not something this test plays"),
        };
        cmd.env(name, value);
    }
    cmd
}

/// The kubelet sends HTTP probes from the node to the pod IP: a probe must not name a `host` (that would be the
/// node itself), and its port must be one the container serves beyond the pod's loopback.
fn assert_probes_reach_the_pod(c: &Value, container: &str, args: &[String]) {
    let served: Vec<std::net::SocketAddr> = ["--listen", "--health-listen"]
        .iter()
        .filter_map(|flag| args.iter().position(|a| a == flag).map(|i| args[i + 1].parse().expect("address")))
        .collect();
    // A native sidecar also has a startupProbe: the kubelet starts the app's containers once it passes.
    let native = c["restartPolicy"] == "Always";
    let probes: &[&str] = if native {
        &["startupProbe", "readinessProbe", "livenessProbe"]
    } else {
        &["readinessProbe", "livenessProbe"]
    };
    for probe in probes.iter().copied() {
        let get = &c[probe]["httpGet"];
        assert!(get.is_object(), "{container} has an HTTP {probe}");
        assert!(get["host"].is_null(), "{container}: {probe} names a host: the kubelet would probe its own node");
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().expect("port"),
            Value::String(name) => c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| {
                    panic!("{container}: {probe} names port {name}, which the container does not declare")
                }),
            other => panic!("{container}: {probe} port {other}"),
        };
        assert!(
            served.iter().any(|a| u64::from(a.port()) == port && !a.ip().is_loopback()),
            "{container}: {probe} targets port {port}, but the container serves {served:?} (the pod's loopback is \
             out of the kubelet's reach)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_wires_the_controller_and_the_example_sidecar_serves_a_device_token() {
    let server = kube_test_server::KubeTestServer::start();
    let kubeconfig = server.kubeconfig_path().to_path_buf();
    let with_kubeconfig = |program: &str, args: &[&str]| run_against(&kubeconfig, program, args);
    let chart = chart();
    let chart = chart.to_str().expect("path");
    let install = ["-n", "kubetoken-system", "-f", "deploy/sidecar-values.yaml"];
    with_kubeconfig("helm", &[&["install", "kubetoken", chart, "--create-namespace"][..], &install].concat());
    with_kubeconfig(
        "helm",
        &[&["upgrade", "kubetoken", chart, "--set", "controller.logLevel=info"][..], &install].concat(),
    );

    // Play the kubelet for one controller replica, exactly as the chart's Deployment says.
    let deployment =
        server.get_object("/apis/apps/v1/namespaces/kubetoken-system/deployments/kubetoken").expect("deployment");
    let _controller = common::cluster::ControllerProcess::spawn(kubelet_command(
        &deployment,
        "controller",
        "kubetoken-7d9f-abcde",
        &kubeconfig,
    ));

    // The README's walk-through: the examples, a Ready application, the app's sidecar.
    with_kubeconfig("kubectl", &["apply", "--validate=false", "-f", "examples/"]);
    let start = std::time::Instant::now();
    let credentials = loop {
        let app = server.get_object("/apis/kubetoken.io/v1alpha1/namespaces/default/oauthapplications/shop");
        let ready = app.as_ref().and_then(|a| a["status"]["conditions"].as_array().cloned()).unwrap_or_default();
        if ready.iter().any(|c| c["type"] == "Ready" && c["status"] == "True") {
            break server.get_object("/api/v1/namespaces/default/secrets/shop-credentials").expect("credentials");
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "shop is not Ready: {app:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let decode = |k: &str| {
        use base64::Engine;
        let raw =
            base64::engine::general_purpose::STANDARD.decode(credentials["data"][k].as_str().expect(k)).expect("b64");
        String::from_utf8(raw).expect("utf8")
    };
    let app = server.get_object("/apis/apps/v1/namespaces/default/deployments/shop-app").expect("app deployment");
    // The example is what `kubetoken inject` makes: a native sidecar started first, the only container with API
    // credentials. The kubelet, played here, starts it and starts the app's containers once its startupProbe passes.
    let pod = &app["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false, "the app's containers get no API credentials");
    assert_eq!(pod["initContainers"][0]["name"], "kubetoken", "the sidecar starts before everything else");
    assert_eq!(pod["initContainers"][0]["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(pod["initContainers"][0]["startupProbe"]["httpGet"]["path"], "/readyz");
    for c in pod["containers"].as_array().expect("containers") {
        assert!(c["volumeMounts"].as_array().into_iter().flatten().all(|m| m["name"] != "kubetoken-api-access"));
    }
    let sidecar =
        common::cluster::SidecarProcess::spawn(kubelet_command(&app, "kubetoken", "shop-app-5c4b-xyz12", &kubeconfig));
    sidecar.wait_ready().await;
    let (id, secret) = (decode("client_id"), decode("client_secret"));
    let r = common::post_form(
        &sidecar.url("/oauth2/token"),
        Some((&id, &secret)),
        &[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "alice-password"),
            ("scope", "device_ipad orders:read"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["scope"], "device_ipad orders:read");

    // Both binaries stayed within the RBAC the chart renders (deploy/ is rendered from it; a drift test keeps it so).
    let (controller_requests, sidecar_requests) = common::rbac::assert_least_privilege(&server.requests());
    assert!(controller_requests > 0 && sidecar_requests > 0);
    // The namespaced mode renders the same rules into a Role per watched namespace: audited the same way.
    let namespaced = helm(&[
        "template",
        "kubetoken",
        chart,
        "-n",
        "kubetoken-system",
        "--kube-version",
        "1.33.0",
        "-f",
        "charts/kubetoken/ci/namespaced-values.yaml",
    ]);
    assert!(namespaced.status.success());
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), &namespaced.stdout).expect("write");
    let rules = common::rbac::rules(file.path());
    let bad = common::rbac::violations(&server.requests(), "kubetoken-controller/", &rules);
    assert!(bad.is_empty(), "the namespaced mode's Roles do not allow: {bad:?}");

    // Uninstall leaves nothing of the controller behind but the CRD (Helm never deletes what crds/ installed).
    drop(sidecar);
    with_kubeconfig("helm", &["uninstall", "kubetoken", "-n", "kubetoken-system"]);
    for collection in [
        "/apis/apps/v1/namespaces/kubetoken-system/deployments",
        "/api/v1/namespaces/kubetoken-system/serviceaccounts",
        "/api/v1/namespaces/kubetoken-system/services",
        "/api/v1/namespaces/kubetoken-system/secrets",
        "/apis/policy/v1/namespaces/kubetoken-system/poddisruptionbudgets",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/kubetoken-system/roles",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/kubetoken-system/rolebindings",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    ] {
        let left = server.list_objects(collection);
        assert!(left.is_empty(), "{collection} still holds {left:?}");
    }
    assert!(
        server
            .get_object("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/oauthapplications.kubetoken.io")
            .is_some()
    );
}

/// A Pod as mutating webhooks receive it from kube-apiserver: its ServiceAccount admission (which runs first, and
/// which the test server does not play) has already mounted the pod's token into every container.
fn pod(name: &str, labels: Value) -> k8s_openapi::api::core::v1::Pod {
    let token = "/var/run/secrets/kubernetes.io/serviceaccount";
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "containers": [{
                "name": "app",
                "image": "shop:1",
                "env": [{"name": "MODE", "value": "prod"}],
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": token, "readOnly": true}],
            }],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            ]}}],
        },
    }))
    .expect("pod")
}

/// The whole webhook path, through the chart: `helm install` renders the MutatingWebhookConfiguration, its Service and
/// RBAC; two controller replicas run as the chart's Deployment says; the controller makes the webhook's certificate
/// and the configuration's caBundle; the test API server calls the webhook on Pod CREATE as kube-apiserver does
/// (TLS verified against the caBundle, the selectors, the failure policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_injects_labelled_pods_at_every_replica_and_an_outage_refuses_only_them() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, PostParams};

    let server = kube_test_server::KubeTestServer::start();
    let kubeconfig = server.kubeconfig_path().to_path_buf();
    let with_kubeconfig = |program: &str, args: &[&str]| {
        run_against(&kubeconfig, program, args);
    };
    let chart = chart();
    with_kubeconfig(
        "helm",
        &["install", "kubetoken", chart.to_str().expect("path"), "-n", "kubetoken-system", "--create-namespace"],
    );
    with_kubeconfig("kubectl", &["apply", "--validate=false", "-f", "examples/"]);
    let deployment =
        server.get_object("/apis/apps/v1/namespaces/kubetoken-system/deployments/kubetoken").expect("deployment");
    let replicas: Vec<common::cluster::ControllerProcess> = ["kubetoken-7d9f-aaaaa", "kubetoken-7d9f-bbbbb"]
        .iter()
        .map(|pod| {
            common::cluster::ControllerProcess::spawn(kubelet_command(&deployment, "controller", pod, &kubeconfig))
        })
        .collect();
    let webhook_addr = |c: &common::cluster::ControllerProcess| -> std::net::SocketAddr {
        let url = c.webhook.as_deref().expect("every replica serves the webhook");
        url.strip_prefix("https://").expect("https").parse().expect("address")
    };
    // Ready: the application reconciled, the configuration carries the controller's CA, both replicas ready.
    common::cluster::eventually(
        "shop Ready and the webhook's caBundle set",
        std::time::Duration::from_secs(60),
        || async {
            let app = server.get_object("/apis/kubetoken.io/v1alpha1/namespaces/default/oauthapplications/shop")?;
            let ready =
                app["status"]["conditions"].as_array()?.iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
            let config =
                server.get_object("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/kubetoken")?;
            let bundle = config["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|b| !b.is_empty());
            let replicas_ready = replicas
                .iter()
                .all(|r| ureq::get(&format!("{}/readyz", r.health)).call().is_ok_and(|resp| resp.status() == 200));
            (ready && bundle && replicas_ready).then_some(())
        },
    )
    .await;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
            &Default::default(),
        )
        .await
        .expect("config"),
    )
    .expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created = |p: Pod| -> Value { serde_json::to_value(p).expect("json") };

    // Each replica answers: the leader and the standby alike.
    for (i, replica) in replicas.iter().enumerate() {
        server.set_service_address("kubetoken-system", "kubetoken-webhook", webhook_addr(replica));
        let name = format!("shop-app-{i}");
        let labelled = pod(&name, serde_json::json!({"kubetoken.io/inject": "shop"}));
        let p = pods.create(&PostParams::default(), &labelled).await;
        let p = created(p.unwrap_or_else(|e| panic!("{name}: {e}")));
        let spec = &p["spec"];
        assert_eq!(spec["initContainers"][0]["name"], "kubetoken", "{name}: the sidecar is injected: {spec}");
        assert_eq!(spec["initContainers"][0]["restartPolicy"], "Always", "a native sidecar");
        assert_eq!(
            spec["initContainers"][0]["image"],
            deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        );
        assert_eq!(spec["automountServiceAccountToken"], false);
        // The app's container lost the token the ServiceAccount admission gave it; only the sidecar has one.
        assert_eq!(
            spec["containers"][0]["volumeMounts"],
            serde_json::json!([]),
            "{name}: no API credential in the app"
        );
        let volumes: Vec<&str> =
            spec["volumes"].as_array().expect("volumes").iter().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(volumes, ["kubetoken-api-access"]);
        let env = &spec["containers"][0]["env"];
        assert_eq!(env[0]["name"], "MODE", "the app's own environment stays");
        assert_eq!(env[1]["valueFrom"]["secretKeyRef"]["name"], "shop-credentials");
        // What the webhook made is what `kubetoken inject` makes of the same pod.
        let plain =
            serde_yaml::to_string(&pod(&name, serde_json::json!({"kubetoken.io/inject": "shop"}))).expect("yaml");
        let mut expected: Value = serde_yaml::from_str(
            &kubetoken::inject::inject_yaml(
                &plain,
                &kubetoken::inject::InjectOptions {
                    image: spec["initContainers"][0]["image"].as_str().expect("image").to_string(),
                    ..kubetoken::inject::InjectOptions::new("shop")
                },
            )
            .expect("inject"),
        )
        .expect("parse");
        assert_eq!(spec["initContainers"], expected["spec"]["initContainers"].take());
        assert_eq!(spec["volumes"], expected["spec"]["volumes"].take());
    }
    let webhook = webhook_addr(&replicas[0]);
    server.set_service_address("kubetoken-system", "kubetoken-webhook", webhook);

    // The PostgreSQL store by annotation: the sidecar gets the database URL from the named Secret.
    let mut with_db = pod("shop-app-pg", serde_json::json!({"kubetoken.io/inject": "shop"}));
    with_db.metadata.annotations =
        Some([("kubetoken.io/postgres-secret".to_string(), "shop-db-app".to_string())].into_iter().collect());
    let with_db = created(pods.create(&PostParams::default(), &with_db).await.expect("created"));
    let env = &with_db["spec"]["initContainers"][0]["env"];
    let url = env.as_array().expect("env").iter().find(|e| e["name"] == "KUBETOKEN_POSTGRES_URL").expect("the URL");
    assert_eq!(url["valueFrom"]["secretKeyRef"], serde_json::json!({"name": "shop-db-app", "key": "uri"}));

    // Pods that did not opt in are none of its business.
    let plain = created(
        pods.create(&PostParams::default(), &pod("plain", serde_json::json!({"app": "x"}))).await.expect("plain"),
    );
    assert!(plain["spec"]["initContainers"].is_null(), "an unlabelled pod is left alone");
    // A label naming no application: refused, with the reason.
    let err = pods
        .create(&PostParams::default(), &pod("typo", serde_json::json!({"kubetoken.io/inject": "shpo"})))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("shpo") && err.to_string().contains("does not exist"), "{err}");
    // kube-system is excluded: a labelled pod there is created as it is, and the leader reports it.
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let stray = pod("stray", serde_json::json!({"kubetoken.io/inject": "shop"}));
    let stray = created(system.create(&PostParams::default(), &stray).await.expect("kube-system pod"));
    assert!(stray["spec"]["initContainers"].is_null(), "kube-system is never sent to the webhook");
    common::cluster::eventually("the stray pod is reported", std::time::Duration::from_secs(30), || async {
        let gauge =
            replicas.iter().filter_map(|r| r.metric("kubetoken_controller_pods_without_sidecar")).fold(0.0, f64::max);
        let events = server.list_objects("/apis/events.k8s.io/v1/namespaces/kube-system/events");
        let event = events.iter().any(|e| e["reason"] == "PodWithoutSidecar" && e["regarding"]["name"] == "stray");
        (gauge == 1.0 && event).then_some(())
    })
    .await;
    let injected: f64 =
        replicas.iter().filter_map(|r| r.metric("kubetoken_controller_admissions_total{outcome=\"injected\"}")).sum();
    assert_eq!(injected, 3.0, "one injection per replica, and the pod with a database");

    // Both within the RBAC the chart renders.
    let (controller_requests, _) = common::rbac::assert_least_privilege(&server.requests());
    assert!(controller_requests > 0);

    // A replica stopping (a rollout, a drain): at once unready, so its endpoint leaves the webhook Service, but it
    // still answers for a few seconds, so that calls already routed to it are not refused; then it exits 0.
    let mut replicas = replicas;
    let mut stopping = replicas.remove(1);
    server.set_service_address("kubetoken-system", "kubetoken-webhook", webhook_addr(&stopping));
    let _ = Command::new("kill").arg("-TERM").arg(stopping.child.id().to_string()).status();
    common::cluster::eventually("the stopping replica is unready", std::time::Duration::from_secs(5), || async {
        let status = ureq::get(&format!("{}/readyz", stopping.health)).call().map_or_else(
            |e| match e {
                ureq::Error::Status(code, _) => code,
                _ => 0,
            },
            |r| r.status(),
        );
        (status == 503).then_some(())
    })
    .await;
    let during_drain = pod("during-drain", serde_json::json!({"kubetoken.io/inject": "shop"}));
    let drained = created(pods.create(&PostParams::default(), &during_drain).await.expect("answered while draining"));
    assert_eq!(drained["spec"]["initContainers"][0]["name"], "kubetoken");
    let stopped = common::cluster::eventually("the stopping replica exits", std::time::Duration::from_secs(20), || {
        let status = stopping.child.try_wait().expect("wait");
        async move { status }
    })
    .await;
    assert!(stopped.success(), "exit 0 on SIGTERM: {stopped:?}");

    // An outage (no replica answers): labelled pods are refused, never created without their sidecar; the rest of
    // the cluster's pods are created as usual.
    drop(replicas);
    let err = pods
        .create(&PostParams::default(), &pod("during-outage", serde_json::json!({"kubetoken.io/inject": "shop"})))
        .await
        .expect_err("refused while the webhook is down");
    assert!(err.to_string().contains("inject.kubetoken.io"), "{err}");
    assert!(pods.get_opt("during-outage").await.expect("get").is_none(), "nothing was created");
    pods.create(&PostParams::default(), &pod("unlabelled-during-outage", serde_json::json!({"app": "x"})))
        .await
        .expect("unlabelled pods are unaffected");

    // Uninstalling removes the configuration, and with it (its owner) the Secret the controller made.
    with_kubeconfig("helm", &["uninstall", "kubetoken", "-n", "kubetoken-system"]);
    assert!(server.get_object("/api/v1/namespaces/kubetoken-system/secrets/kubetoken-webhook-certs").is_none());
}
