//! The `kubetoken` binary: one executable, one subcommand per role.
#![forbid(unsafe_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kubetoken::api::duration::{parse_duration, parse_duration_or_zero};
use kubetoken::core::lockout::LockoutPolicy;
use kubetoken::standalone::{StandaloneOptions, run};

#[derive(Parser)]
#[command(
    name = "kubetoken",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KUBETOKEN_GIT_COMMIT"), ")"),
    about = "Kubernetes-native OAuth2 token service with per-device access tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the token endpoint with no cluster: applications from manifest files, state on local disk.
    Standalone(StandaloneArgs),
    /// Serve the token endpoint next to an app in a cluster: applications and token state from the Kubernetes API.
    Sidecar(SidecarArgs),
    /// Reconcile OAuthApplications into credentials, signing keys, a JWKS and a status (KUBECONFIG or in-cluster).
    Controller(ControllerArgs),
    /// Read a password on stdin and print an argon2id hash for a users Secret.
    HashPassword(HashPasswordArgs),
    /// Print the OAuthApplication CustomResourceDefinition (crds/oauthapplications.kubetoken.io.yaml is this output).
    Crd,
    /// Add the kubetoken sidecar to the pods of workload manifests (YAML from a file or stdin, to stdout).
    Inject(InjectArgs),
}

#[derive(Args)]
struct InjectArgs {
    /// The OAuthApplication the sidecar serves.
    #[arg(long)]
    application: String,
    /// The manifests (several YAML documents); `-` or none: stdin.
    #[arg(short = 'f', long = "filename")]
    file: Option<std::path::PathBuf>,
    /// The sidecar image (default: this version's).
    #[arg(long)]
    image: Option<String>,
    /// The Secret with client_id and client_secret for the app's containers (default: <application>-credentials).
    #[arg(long)]
    credentials_secret: Option<String>,
    /// Keep the token state in PostgreSQL: a Secret whose key `uri` is the database URL (e.g. CloudNativePG's
    /// `<cluster>-app`), given to the sidecar as KUBETOKEN_POSTGRES_URL.
    #[arg(long)]
    postgres_secret: Option<String>,
    /// With --postgres-secret: a Secret whose key `ca.crt` is the database server's CA (e.g. CloudNativePG's
    /// `<cluster>-ca`); the sidecar then verifies the server's certificate and name (sslmode verify-full).
    #[arg(long, requires = "postgres_secret")]
    postgres_ca_secret: Option<String>,
    /// A ConfigMap whose key `ca.crt` holds the CA certificates of trusted identity providers behind a private CA
    /// (e.g. a trust-manager bundle); the sidecar trusts them when it fetches their key sets.
    #[arg(long)]
    issuer_ca_configmap: Option<String>,
}

#[derive(Args)]
struct ControllerArgs {
    /// Watch only this namespace (repeat for several; default: all namespaces).
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Keep a Role and RoleBinding for the sidecar of each application that sets spec.sidecar.serviceAccountName
    /// (needs RBAC to manage Roles and RoleBindings); `false` where the cluster forbids the controller to grant.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    manage_sidecar_rbac: bool,
    /// Compete for the leader Lease; `false` only with a single replica.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// TLS for that port (it carries no secrets: plain HTTP is allowed there).
    #[command(flatten)]
    tls: TlsArgs,
    /// Namespace of the leader-election Lease (default: $POD_NAMESPACE, else `default`).
    #[arg(long)]
    lease_namespace: Option<String>,
    #[arg(long, default_value = "kubetoken-controller")]
    lease_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else the host name and process ID).
    #[arg(long)]
    identity: Option<String>,
    /// How long a Lease holds without renewal before another replica may take over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: u64,
    /// How long a new signing key is published in the JWKS before it signs tokens.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    key_prepublication: u64,
    /// How long a retired key stays published after the last token it signed expired (clock skew, JWKS caches).
    #[arg(long, default_value = "5m", value_parser = parse_duration_or_zero)]
    key_retirement_margin: u64,
    /// Tests only: shift the reconciler's clock by the number of seconds in this file (read at every use).
    #[arg(long, hide = true)]
    clock_offset_file: Option<PathBuf>,
    /// PEM CA certificates trusted (besides the system's) when fetching trusted issuers' key sets (`jwksUri`) for the
    /// TrustedIssuersReady condition, for an identity provider behind a private CA (default:
    /// $KUBETOKEN_ISSUER_CA_FILE).
    #[arg(long)]
    issuer_ca_file: Option<PathBuf>,
    #[command(flatten)]
    webhook: WebhookArgs,
}

/// The admission webhook that injects the sidecar into pods labelled `kubetoken.io/inject: <application>`.
#[derive(Args)]
struct WebhookArgs {
    /// Serve the webhook (HTTPS) on this address; every replica serves it. Off when absent.
    #[arg(long)]
    webhook_listen: Option<SocketAddr>,
    /// The webhook Service (in the controller's namespace): the managed certificate's DNS names.
    #[arg(long, default_value = "kubetoken-webhook")]
    webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the controller keeps (managed certificates).
    #[arg(long, default_value = "kubetoken")]
    webhook_configuration: String,
    /// The Secret (in the controller's namespace) holding the managed CA and serving certificate.
    #[arg(long, default_value = "kubetoken-webhook-certs")]
    webhook_secret: String,
    /// A certificate kept by someone else (cert-manager), instead of the managed one; the caBundle is then theirs
    /// to set too. Reloaded when the file changes.
    #[arg(long, requires = "webhook_tls_key")]
    webhook_tls_cert: Option<PathBuf>,
    #[arg(long, requires = "webhook_tls_cert")]
    webhook_tls_key: Option<PathBuf>,
    /// The image of the sidecar the webhook injects (default: this version's).
    #[arg(long)]
    sidecar_image: Option<String>,
    /// NAMESPACE=SECRET: sidecars injected in NAMESPACE keep their token state in the PostgreSQL database whose URL is
    /// the Secret's key `uri`, unless the pod's annotation kubetoken.io/postgres-secret names another. Repeatable.
    #[arg(long, value_parser = namespace_secret)]
    sidecar_postgres_secret: Vec<(String, String)>,
    /// NAMESPACE=SECRET: the CA (key `ca.crt`) of those sidecars' PostgreSQL server, which they then verify, unless
    /// the pod's annotation kubetoken.io/postgres-ca-secret names another. Repeatable.
    #[arg(long, value_parser = namespace_secret)]
    sidecar_postgres_ca_secret: Vec<(String, String)>,
}

fn namespace_secret(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((ns, secret)) if !ns.is_empty() && !secret.is_empty() => Ok((ns.to_string(), secret.to_string())),
        _ => Err(format!("`{s}` is not NAMESPACE=SECRET")),
    }
}

impl WebhookArgs {
    fn options(self, namespace: &str) -> Option<kubetoken::controller::webhook::WebhookOptions> {
        use kubetoken::controller::webhook::{WebhookCertSource, WebhookOptions};
        let certs = match (self.webhook_tls_cert, self.webhook_tls_key) {
            (Some(cert), Some(key)) => WebhookCertSource::Files(kubetoken::http::tls::TlsFiles { cert, key }),
            _ => WebhookCertSource::Managed {
                namespace: namespace.to_string(),
                secret: self.webhook_secret,
                configuration: self.webhook_configuration,
                service: self.webhook_service,
            },
        };
        Some(WebhookOptions {
            listen: self.webhook_listen?,
            certs,
            sidecar_image: self.sidecar_image.unwrap_or_else(kubetoken::inject::default_image),
            postgres_secrets: self.sidecar_postgres_secret.into_iter().collect(),
            postgres_ca_secrets: self.sidecar_postgres_ca_secret.into_iter().collect(),
        })
    }
}

/// What the token endpoint of standalone mode and the sidecar share.
#[derive(Args)]
struct ServeArgs {
    /// PEM CA certificates trusted (besides the system's) when fetching trusted issuers' key sets (`jwksUri`), for an
    /// identity provider behind a private CA (default: $KUBETOKEN_ISSUER_CA_FILE).
    #[arg(long)]
    issuer_ca_file: Option<PathBuf>,
    /// The loopback by default: only this machine (standalone) or this pod (sidecar) reaches the endpoint.
    /// Another address needs TLS, --behind-tls-proxy or --insecure-http.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Issuer (`iss`) and base of the metadata endpoint URLs; defaults to <scheme>://<listen address>.
    #[arg(long)]
    issuer: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// A TLS-terminating proxy at these addresses (IPs or CIDR blocks, comma-separated) sits in front: plain HTTP
    /// is served off the loopback, and the proxy's X-Forwarded-Proto/-Host or Forwarded shape the default issuer.
    #[arg(long, value_name = "ADDRESSES")]
    behind_tls_proxy: Option<String>,
    /// Development only: serve plain HTTP on a non-loopback address with no proxy in front.
    #[arg(long, conflicts_with_all = ["behind_tls_proxy", "tls_cert"])]
    insecure_http: bool,
    /// Connections served at once; more wait in the kernel's accept queue.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// A request's headers must have arrived this long after its first byte.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: u64,
    /// A request's body must have arrived this long after its headers (else 408).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    body_read_timeout: u64,
    /// A connection with nothing read or written for this long is closed (idle keep-alive, stalled clients).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    idle_timeout: u64,
    #[command(flatten)]
    lockout: LockoutArgs,
    /// Scopes one request may ask for (more: invalid_scope).
    #[arg(long, default_value_t = 32)]
    max_request_scopes: usize,
    /// Bytes of one request's scope parameter (more: invalid_scope).
    #[arg(long, default_value_t = 1024)]
    max_scope_length: usize,
}

impl ServeArgs {
    fn policies(&self) -> Result<kubetoken::core::service::ServicePolicies, String> {
        let (user_lockout, client_lockout) = self.lockout.policies()?;
        let request_bounds = kubetoken::core::service::RequestBounds {
            max_scopes: self.max_request_scopes,
            max_scope_bytes: self.max_scope_length,
        };
        Ok(kubetoken::core::service::ServicePolicies { user_lockout, client_lockout, request_bounds })
    }
}

/// TLS from PEM files, reloaded when they change.
#[derive(Args)]
struct TlsArgs {
    /// PEM certificate (the chain may follow it in the same file).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> Option<kubetoken::http::tls::TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(kubetoken::http::tls::TlsFiles { cert: cert.clone(), key: key.clone() }),
            _ => None,
        }
    }
}

impl ServeArgs {
    fn endpoint(&self) -> Result<kubetoken::http::serve::Endpoint, String> {
        use kubetoken::http::exposure::{Plaintext, TrustedProxies};
        let plaintext = match (&self.behind_tls_proxy, self.insecure_http) {
            (Some(list), _) => Plaintext::BehindTlsProxy(TrustedProxies::parse(list)?),
            (None, true) => Plaintext::Insecure,
            (None, false) => Plaintext::LoopbackOnly,
        };
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        Ok(kubetoken::http::serve::Endpoint {
            listen: self.listen,
            tls: self.tls.files(),
            plaintext,
            issuer: self.issuer.clone(),
            limits: kubetoken::http::serve::ConnectionLimits {
                max_connections: self.max_connections,
                header_read_timeout: std::time::Duration::from_secs(self.header_read_timeout),
                idle_timeout: std::time::Duration::from_secs(self.idle_timeout),
            },
            body_read_timeout: std::time::Duration::from_secs(self.body_read_timeout),
        })
    }
}

/// Brute-force protection, the same for standalone and the sidecar.
#[derive(Args)]
struct LockoutArgs {
    /// Failed passwords in a row that lock a user (per application).
    #[arg(long, default_value_t = 5)]
    lockout_max_failures: u32,
    /// How long a locked user stays locked.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    lockout_duration: u64,
    /// Failed client authentications in a row that lock a client ID.
    #[arg(long, default_value_t = 10)]
    client_lockout_max_failures: u32,
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    client_lockout_duration: u64,
}

impl LockoutArgs {
    fn policies(&self) -> Result<(LockoutPolicy, LockoutPolicy), String> {
        if self.lockout_max_failures == 0 || self.client_lockout_max_failures == 0 {
            return Err("lockout failure counts must be at least 1".into());
        }
        Ok((
            LockoutPolicy { max_failures: self.lockout_max_failures, lock_secs: self.lockout_duration },
            LockoutPolicy { max_failures: self.client_lockout_max_failures, lock_secs: self.client_lockout_duration },
        ))
    }
}

#[derive(Args)]
struct SidecarArgs {
    /// OAuthApplication to serve (repeat for several).
    #[arg(long = "application", required = true)]
    applications: Vec<String>,
    /// Namespace of the applications (default: the service account's, or the kubeconfig context's).
    #[arg(long)]
    namespace: Option<String>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Also serve /healthz, /readyz and /metrics (only those, plain HTTP) here, e.g. 0.0.0.0:8081: kubelet probes
    /// and Prometheus reach the pod IP, not the pod's loopback where the token endpoint listens.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Token-journal writes per second this replica may send to the API server (group commit batches the rest).
    /// Compaction adds a few writes per snapshot on top (see ARCHITECTURE.md).
    #[arg(long, default_value_t = 4.8)]
    api_writes_per_second: f64,
    /// Seal a journal segment once it holds this many KiB of records (a ring of 16 segments; compaction when 12
    /// await it). Smaller segments mean smaller writes but more frequent snapshots.
    #[arg(long, default_value_t = 64)]
    journal_segment_kib: usize,
    #[command(flatten)]
    postgres: PostgresArgs,
}

#[derive(Args)]
struct HashPasswordArgs {
    /// argon2id memory cost in KiB (default: the OWASP recommendation, 19456).
    #[arg(long, default_value_t = 19_456)]
    m_cost: u32,
    /// argon2id iterations.
    #[arg(long, default_value_t = 2)]
    t_cost: u32,
    /// argon2id parallelism.
    #[arg(long, default_value_t = 1)]
    p_cost: u32,
}

#[derive(Args)]
struct StandaloneArgs {
    /// Directory of YAML manifests: OAuthApplications and the Secrets they reference.
    #[arg(long)]
    manifests: PathBuf,
    /// Directory for signing keys, generated credentials and the token log.
    #[arg(long, default_value = "kubetoken-state")]
    state_dir: PathBuf,
    #[command(flatten)]
    serve: ServeArgs,
    /// Runtime worker threads; defaults to the number of CPUs.
    #[arg(long)]
    worker_threads: Option<usize>,
    #[command(flatten)]
    postgres: PostgresArgs,
}

/// The token state in PostgreSQL.
#[derive(Args)]
struct PostgresArgs {
    /// Keep the token state and the shared lockout in PostgreSQL (postgres://user@host/db) instead of the state
    /// directory's log or the application's ConfigMaps, so that any number of instances serve as one (default:
    /// $KUBETOKEN_POSTGRES_URL).
    #[arg(long)]
    postgres: Option<String>,
    /// A file holding the PostgreSQL password (e.g. a mounted Secret), so that none sits in the URL or a manifest.
    #[arg(long)]
    postgres_password_file: Option<PathBuf>,
}

impl ServeArgs {
    /// Fetches trusted issuers' key sets, trusting the system's roots and `--issuer-ca-file`.
    fn key_sets(&self) -> Result<std::sync::Arc<kubetoken::federation::key_sets::KeySets>, String> {
        key_sets(self.issuer_ca_file.clone())
    }
}

/// Fetches trusted issuers' key sets, trusting the system's roots and the CA bundle in `issuer_ca_file` (default:
/// $KUBETOKEN_ISSUER_CA_FILE): the token endpoint (standalone, sidecar) and the controller's condition alike.
fn key_sets(
    issuer_ca_file: Option<PathBuf>,
) -> Result<std::sync::Arc<kubetoken::federation::key_sets::KeySets>, String> {
    let file = issuer_ca_file.or_else(|| std::env::var_os("KUBETOKEN_ISSUER_CA_FILE").map(PathBuf::from));
    let pem =
        file.map(|f| std::fs::read(&f).map_err(|e| format!("--issuer-ca-file {}: {e}", f.display()))).transpose()?;
    let fetcher = kubetoken::federation::key_sets::KeySetFetcher::new(pem.as_deref())
        .map_err(|e| format!("--issuer-ca-file: {e}"))?;
    Ok(std::sync::Arc::new(kubetoken::federation::key_sets::KeySets::new(fetcher)))
}

impl PostgresArgs {
    fn options(self) -> Result<Option<kubetoken::storage::postgres::PgOptions>, String> {
        let Some(url) = self.postgres.or_else(|| std::env::var("KUBETOKEN_POSTGRES_URL").ok()) else {
            return match self.postgres_password_file {
                Some(_) => Err("--postgres-password-file needs --postgres (or KUBETOKEN_POSTGRES_URL)".into()),
                None => Ok(None),
            };
        };
        let mut pg = kubetoken::storage::postgres::PgOptions::new(url);
        if let Some(file) = &self.postgres_password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("--postgres-password-file {}: {e}", file.display()))?;
            pg.password = Some(password.trim_end_matches(['\n', '\r']).to_string());
        }
        Ok(Some(pg))
    }
}

fn init_logging() {
    // KUBETOKEN_LOG takes tracing targets syntax, e.g. `info` or `kubetoken=debug`.
    let filter = std::env::var("KUBETOKEN_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false))
        .with(filter)
        .init();
}

fn standalone(args: StandaloneArgs) -> Result<(), String> {
    let policies = args.serve.policies()?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = args.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.build().map_err(|e| format!("cannot start the runtime: {e}"))?;
    let postgres = args.postgres.options()?;
    let key_sets = args.serve.key_sets()?;
    runtime.block_on(run(StandaloneOptions {
        key_sets: Some(key_sets),
        manifests: args.manifests,
        state_dir: args.state_dir,
        endpoint: args.serve.endpoint()?,
        policies,
        postgres,
    }))
}

fn sidecar(args: SidecarArgs) -> Result<(), String> {
    let policies = args.serve.policies()?;
    if args.api_writes_per_second.is_nan() || args.api_writes_per_second <= 0.0 {
        return Err("--api-writes-per-second must be positive".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let key_sets = args.serve.key_sets()?;
    runtime.block_on(kubetoken::sidecar::run(kubetoken::sidecar::SidecarOptions {
        key_sets: Some(key_sets),
        applications: args.applications,
        namespace: args.namespace,
        endpoint: args.serve.endpoint()?,
        health_listen: args.health_listen,
        policies,
        store: kubetoken::storage::kube_store::KubeStoreOptions {
            writes_per_second: args.api_writes_per_second,
            segment_bytes: args.journal_segment_kib.max(1) * 1024,
            ..Default::default()
        },
        postgres: args.postgres.options()?,
    }))
}

fn inject(args: InjectArgs) -> Result<(), String> {
    use std::io::Read;
    let mut opts = kubetoken::inject::InjectOptions::new(&args.application);
    if let Some(image) = args.image {
        opts.image = image;
    }
    if let Some(secret) = args.credentials_secret {
        opts.credentials_secret = secret;
    }
    opts.postgres_secret = args.postgres_secret;
    opts.postgres_ca_secret = args.postgres_ca_secret;
    opts.issuer_ca_config_map = args.issuer_ca_configmap;
    let (input, source) = match &args.file {
        Some(path) if path.as_os_str() != "-" => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("inject: cannot read {}: {e}", path.display()))?;
            (text, path.display().to_string())
        }
        _ => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| format!("inject: cannot read stdin: {e}"))?;
            (text, "stdin".to_string())
        }
    };
    let out = kubetoken::inject::inject_yaml(&input, &opts).map_err(|e| format!("inject: {source}: {e}"))?;
    print!("{out}");
    Ok(())
}

fn controller(args: ControllerArgs) -> Result<(), String> {
    use kubetoken::controller::leader::LeaseConfig;
    use std::time::Duration;
    let identity = args.identity.or_else(|| std::env::var("POD_NAME").ok()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let lease_namespace =
        args.lease_namespace.or_else(|| std::env::var("POD_NAMESPACE").ok()).unwrap_or_else(|| "default".into());
    let lease_duration = Duration::from_secs(args.lease_duration);
    // The webhook's Service and Secret live in the controller's own namespace (which --lease-namespace may not be).
    let own_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| lease_namespace.clone());
    let webhook = args.webhook.options(&own_namespace);
    // Read before the runtime starts: a CA file that cannot be read stops the controller with that error.
    let key_sets = key_sets(args.issuer_ca_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let clock: std::sync::Arc<dyn kubetoken::core::clock::Clock> = match args.clock_offset_file {
        Some(path) => std::sync::Arc::new(kubetoken::controller::offset_clock::OffsetFileClock::new(path)),
        None => std::sync::Arc::new(kubetoken::core::clock::SystemClock),
    };
    runtime.block_on(kubetoken::controller::run(kubetoken::controller::ControllerOptions {
        clock,
        key_timing: kubetoken::controller::reconcile::KeyTiming {
            prepublication: args.key_prepublication,
            retirement_margin: args.key_retirement_margin,
        },
        namespaces: args.namespaces,
        manage_sidecar_rbac: args.manage_sidecar_rbac,
        key_sets,
        webhook,
        leader_election: args.leader_election,
        listen: args.listen,
        tls: args.tls.files(),
        lease: LeaseConfig {
            namespace: lease_namespace,
            name: args.lease_name,
            identity,
            // Renew well within the lease; step down before anyone else may take over.
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 5).max(Duration::from_millis(200)),
            lease_duration,
        },
    }))
}

fn hash_password(args: HashPasswordArgs) -> Result<(), String> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).map_err(|e| format!("cannot read stdin: {e}"))?;
    let password = input.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(&input);
    if password.is_empty() {
        return Err("empty password on stdin".into());
    }
    println!("{}", kubetoken::core::app::hash_password_with(password, args.m_cost, args.t_cost, args.p_cost)?);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Standalone(args) => standalone(args),
        Command::Sidecar(args) => sidecar(args),
        Command::Controller(args) => controller(args),
        Command::HashPassword(args) => hash_password(args),
        Command::Crd => kubetoken::api::crd_yaml().map(|yaml| print!("{yaml}")),
        Command::Inject(args) => inject(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kubetoken: {message}");
            ExitCode::FAILURE
        }
    }
}
