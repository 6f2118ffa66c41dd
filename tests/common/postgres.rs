//! A PostgreSQL server for tests: the distribution's server binaries (`scripts/install-test-tools` puts them on the
//! PATH, or finds them under /usr/lib/postgresql), a fresh data directory, the loopback only, run as an
//! unprivileged user (initdb refuses root: as root the server runs as `postgres`). One database per test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The directory holding `initdb` and `postgres`: on the PATH, else the newest /usr/lib/postgresql/N/bin.
fn bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file());
    let packaged = || {
        let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .filter(|(_, d)| d.join("initdb").is_file())
            .collect();
        dirs.sort();
        dirs.pop().map(|(_, d)| d)
    };
    on_path.or_else(packaged).unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries (initdb, postgres): run scripts/install-test-tools, which installs them")
    })
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `program` run as the unprivileged `postgres` user when this process is root (setpriv execs it: the child is
/// the server itself, so signals reach it).
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

pub struct Postgres {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    databases: AtomicU32,
    /// `-c` settings beyond the defaults.
    settings: Vec<String>,
}

impl Postgres {
    /// A server for tests: no fsync (a test's data need not survive a power cut).
    pub fn start() -> Self {
        Self::start_with(|_| vec!["fsync=off".into()])
    }

    /// A server as durable as a production one (fsync, synchronous commit), for benchmarks; a little more memory
    /// for the cache than the distribution's default.
    pub fn start_durable() -> Self {
        Self::start_with(|_| vec!["shared_buffers=256MB".into(), "max_connections=200".into()])
    }

    /// A server that also accepts TLS, with this certificate and key (PEM).
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(|dir| {
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert, cert_pem).expect("write the certificate");
            std::fs::write(&key, key_pem).expect("write the key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod the key");
            vec![
                "fsync=off".into(),
                "ssl=on".into(),
                format!("ssl_cert_file={}", cert.display()),
                format!("ssl_key_file={}", key.display()),
            ]
        })
    }

    /// `settings` gets the server's directory (files put there are the server's) and returns `-c` settings.
    fn start_with(settings: impl FnOnce(&Path) -> Vec<String>) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new().prefix("kubetoken-pg-").tempdir().expect("tempdir");
        let data = dir.path().join("data");
        if is_root() {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "chown the data directory to postgres");
        }
        let out = command(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "kubetoken", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let settings = settings(dir.path());
        if is_root() {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status();
            assert!(status.is_ok_and(|s| s.success()), "chown the server's files to postgres");
        }
        let port = free_port();
        let child = Self::spawn(dir.path(), port, &settings);
        let pg = Self { child, port, dir, databases: AtomicU32::new(0), settings };
        pg.wait_listening();
        pg
    }

    fn spawn(dir: &Path, port: u16, settings: &[String]) -> Child {
        let mut command = command(&bin_dir().join("postgres"));
        command
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", dir.display()));
        for setting in settings {
            command.arg("-c").arg(setting);
        }
        command
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres")
    }

    fn wait_listening(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "PostgreSQL did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (immediate shutdown: clients see their connections end).
    pub fn stop(&mut self) {
        let _ = Command::new("kill").args(["-QUIT", &self.child.id().to_string()]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same data and port.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), self.port, &self.settings);
        self.wait_listening();
    }

    /// Where the server's Unix socket is.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://kubetoken@127.0.0.1:{}/{database}", self.port)
    }

    /// A fresh, empty database; its URL.
    pub async fn database(&self) -> String {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let client = self.connect("postgres").await;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        self.url(&name)
    }

    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        connect(&self.url(database)).await
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let start = Instant::now();
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            // The server may still be starting up after it began listening.
            Err(_) if start.elapsed() < Duration::from_secs(30) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("connect to {url}: {e}"),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
