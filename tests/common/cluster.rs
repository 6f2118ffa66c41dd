//! A Kubernetes API for tests: the in-repo test server by default, or a real cluster when KUBETOKEN_TEST_KUBECONFIG
//! names a kubeconfig. Each test works in its own namespace. Also the real `kubetoken controller` as a process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, Config};
use kube_test_server::KubeTestServer;
use kubetoken::api::v1alpha1::OAuthApplication;
use kubetoken::controller::keys::StoredKey;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_kubetoken");

pub struct Cluster {
    pub server: Option<KubeTestServer>,
    pub kubeconfig: PathBuf,
    pub client: Client,
    pub namespace: String,
}

impl Cluster {
    pub async fn new(test: &str) -> Cluster {
        Self::connect(test, std::env::var_os("KUBETOKEN_TEST_KUBECONFIG")).await
    }

    /// Always the in-repo test server, even when KUBETOKEN_TEST_KUBECONFIG names a cluster: for tests that
    /// inject faults or store what a real API server would refuse, so they run (never skip) everywhere.
    pub async fn test_server(test: &str) -> Cluster {
        Self::connect(test, None).await
    }

    async fn connect(test: &str, kubeconfig: Option<std::ffi::OsString>) -> Cluster {
        let (server, kubeconfig) = match kubeconfig {
            Some(path) => (None, PathBuf::from(path)),
            None => {
                let server = KubeTestServer::start();
                let path = server.kubeconfig_path().to_path_buf();
                (Some(server), path)
            }
        };
        let yaml = std::fs::read_to_string(&kubeconfig).expect("kubeconfig");
        let kc = kube::config::Kubeconfig::from_yaml(&yaml).expect("kubeconfig parses");
        let config = Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("config");
        let client = Client::try_from(config).expect("client");
        let namespace = format!("kt-{test}-{}", std::process::id());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
        let _ = namespaces.create(&PostParams::default(), &ns).await;
        let cluster = Cluster { server, kubeconfig, client, namespace };
        cluster.install_crd().await;
        cluster
    }

    /// The test server, for a cluster made with [`Cluster::test_server`].
    pub fn server(&self) -> &KubeTestServer {
        self.server.as_ref().expect("this test runs against the in-repo test server (Cluster::test_server)")
    }

    pub async fn install_crd(&self) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let text = include_str!("../../crds/oauthapplications.kubetoken.io.yaml");
        let crd: CustomResourceDefinition = serde_yaml::from_str(text).expect("crd yaml");
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("CRD: {e}"),
        }
        eventually("the CRD is established", Duration::from_secs(30), || async {
            let crd = crds.get("oauthapplications.kubetoken.io").await.ok()?;
            let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        })
        .await;
    }

    pub fn apps(&self) -> Api<OAuthApplication> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
    pub fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn create_app(&self, name: &str, spec: Value) -> OAuthApplication {
        self.create_app_raw(name, spec, json!({})).await
    }

    pub async fn create_app_raw(&self, name: &str, spec: Value, annotations: Value) -> OAuthApplication {
        let app = json!({
            "apiVersion": "kubetoken.io/v1alpha1",
            "kind": "OAuthApplication",
            "metadata": {"name": name, "namespace": self.namespace, "annotations": annotations},
            "spec": spec,
        });
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &self.namespace,
            &kube::api::ApiResource::erase::<OAuthApplication>(&()),
        );
        let obj: kube::api::DynamicObject = serde_json::from_value(app).expect("object");
        api.create(&PostParams::default(), &obj).await.expect("create application");
        self.apps().get(name).await.expect("created application")
    }

    pub fn controller(&self, identity: &str) -> ControllerProcess {
        ControllerProcess::start(&self.kubeconfig, &self.namespace, identity, &[])
    }

    pub async fn ready(&self, name: &str) -> OAuthApplication {
        let start = Instant::now();
        loop {
            let app = self.apps().get(name).await.ok();
            if let Some(app) = &app
                && condition(app, "Ready").is_some_and(|(s, _)| s == "True")
            {
                return app.clone();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let conditions = app.and_then(|a| a.status).map(|s| s.conditions);
                panic!("timed out waiting until {name} is Ready; conditions: {conditions:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn jwks(&self, name: &str) -> Value {
        let cm = self.config_maps().get(&format!("{name}-jwks")).await.expect("jwks configmap");
        serde_json::from_str(&cm.data.expect("data")["jwks.json"]).expect("jwks json")
    }

    pub async fn stored_keys(&self, name: &str) -> Vec<StoredKey> {
        let s = self.secrets().get(&format!("{name}-signing-keys")).await.expect("signing keys");
        serde_json::from_slice(&s.data.expect("data")["keys.json"].0).expect("keys json")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every test against the test server doubles as an RBAC audit of what the binaries asked for.
        if let Some(server) = &self.server
            && !std::thread::panicking()
        {
            super::rbac::assert_least_privilege(&server.requests());
        }
    }
}

/// (status, reason) of a condition.
pub fn condition(app: &OAuthApplication, type_: &str) -> Option<(String, String)> {
    app.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

pub fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"].as_array().expect("keys").iter().map(|k| k["kid"].as_str().expect("kid").to_string()).collect()
}

pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct ControllerProcess {
    pub child: Child,
    pub health: String,
    /// The admission webhook's URL (`https://127.0.0.1:PORT`), when the controller serves one.
    pub webhook: Option<String>,
}

impl ControllerProcess {
    pub fn start(kubeconfig: &Path, namespace: &str, identity: &str, extra: &[&std::ffi::OsStr]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["controller", "--listen", "127.0.0.1:0"])
            .args(["--namespace", namespace, "--lease-namespace", namespace, "--identity", identity])
            // A lease a busy 2-core machine's scheduling cannot make a leader lose; take-over tests set a shorter one.
            .args(if extra.iter().any(|a| *a == "--lease-duration") {
                &[][..]
            } else {
                &["--lease-duration", "15s"][..]
            })
            // Short key timing unless a test sets its own: tests wait seconds, not minutes.
            .args(if extra.iter().any(|a| *a == "--key-prepublication") {
                &[][..]
            } else {
                &["--key-prepublication", "2s"][..]
            })
            .args(if extra.iter().any(|a| *a == "--key-retirement-margin") {
                &[][..]
            } else {
                &["--key-retirement-margin", "0s"][..]
            })
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("KUBETOKEN_LOG", "info");
        Self::spawn(cmd)
    }

    /// Runs `cmd` (a `kubetoken controller` command line) and waits until it serves its health port.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn controller");
        let (health, earlier) = read_banner_after(&mut child, "kubetoken controller health on ");
        let health = health.unwrap_or_else(|| panic!("controller exited before serving health"));
        let webhook =
            earlier.iter().find_map(|l| l.strip_prefix("kubetoken controller webhook on ")).map(str::to_string);
        Self { child, health, webhook }
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = ureq::get(&format!("{}/metrics", self.health)).call().ok()?.into_string().ok()?;
        text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Reads `child`'s stdout until a line starts with `prefix` and returns the rest of that line (`None` when the
/// process ends first) and the lines printed before it; the output after it is drained in the background.
fn read_banner_after(child: &mut Child, prefix: &str) -> (Option<String>, Vec<String>) {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut earlier = Vec::new();
    let found = lines.by_ref().map_while(Result::ok).find_map(|l| match l.strip_prefix(prefix) {
        Some(rest) => Some(rest.to_string()),
        None => {
            earlier.push(l);
            None
        }
    });
    std::thread::spawn(move || lines.for_each(drop));
    (found, earlier)
}

/// A running `kubetoken sidecar` against the cluster.
pub struct SidecarProcess {
    pub child: Child,
    pub base: String,
    /// The `--health-listen` port's base URL, if it has one.
    pub health: Option<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl SidecarProcess {
    /// Starts a sidecar for `applications` on a random loopback port and waits until it listens (not until
    /// it is ready: see [`SidecarProcess::wait_ready`]).
    pub fn start(kubeconfig: &Path, namespace: &str, applications: &[&str], extra: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["sidecar", "--listen", "127.0.0.1:0", "--namespace", namespace]);
        for a in applications {
            cmd.args(["--application", a]);
        }
        cmd.args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("KUBETOKEN_LOG", std::env::var("KUBETOKEN_TEST_SIDECAR_LOG").unwrap_or_else(|_| "info".into()));
        Self::spawn(cmd)
    }

    /// Runs `cmd` (a `kubetoken sidecar` command line) and waits until it listens.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn sidecar");
        let mut err = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let (found, earlier) = read_banner_after(&mut child, "kubetoken sidecar listening on ");
        let Some(base) = found else {
            let _ = child.kill();
            panic!("sidecar exited before listening: {}", stderr.join().unwrap_or_default());
        };
        let health = earlier.iter().find_map(|l| l.strip_prefix("kubetoken sidecar health on ")).map(str::to_string);
        Self { child, base, health, stderr: Some(stderr) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        // As the kubelet does: on the health port when there is one.
        let url = format!("{}/readyz", self.health.as_deref().unwrap_or(&self.base));
        let mut last = String::new();
        for _ in 0..600 {
            match ureq::get(&url).call() {
                Ok(_) => return,
                Err(ureq::Error::Status(_, r)) => last = r.into_string().unwrap_or_default(),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sidecar {} not ready after 60 s: {last}", self.base);
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let text = ureq::get(&self.url("/metrics")).call().ok()?.into_string().ok()?;
        text.lines().find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name || n.starts_with(&format!("{name}{{"))).then(|| v.parse().ok())?
        })
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process and returns what it logged.
    pub fn logs(&mut self) -> String {
        self.kill9();
        self.stderr.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        // A failing test shows what each sidecar logged.
        if std::thread::panicking() {
            let logs = self.logs();
            eprintln!("---- sidecar {} logged:\n{logs}", self.base);
        } else {
            self.kill9();
        }
    }
}
