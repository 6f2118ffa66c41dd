//! The standalone state directory:
//!
//! ```text
//! STATE_DIR/
//!   token-mac.key                       32 random bytes: the key of opaque token strings
//!   keys/<namespace>/<name>/<alg>.pk8   signing keys (PKCS#8 DER), generated once
//!   credentials/<namespace>/<name>.json generated client credentials
//!   tokens/                             the token log (see storage::file_store)
//! ```
//! The directory and every directory in it are mode 0700, every file 0600 (created so; files holding secrets are
//! written atomically: temp file, fsync, rename). At open, anything of that layout with a wider mode (left by an
//! earlier version, or copied in carelessly) is reported with a warning and restricted; a symbolic link is left
//! alone.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::api::v1alpha1::SigningAlgorithm;
use crate::core::signing::Algorithm;
use crate::core::signing::SigningKey;
use crate::storage::file_store::{
    PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, create_private_dir, restrict_file, restrict_path,
};

/// What the state directory holds, relative to it: only these are checked at open (the directory may be shared
/// with files that are not kubetoken's). `token-mac.tmp` is what a crash while writing the key leaves.
const LAYOUT: [&str; 5] = ["token-mac.key", "token-mac.tmp", "keys", "credentials", "tokens"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl StoredCredentials {
    /// New credentials for the application `name`.
    pub fn generate(name: &str) -> io::Result<Self> {
        Ok(Self {
            client_id: format!("{name}-{}", URL_SAFE_NO_PAD.encode(random_bytes::<6>()?)),
            client_secret: URL_SAFE_NO_PAD.encode(random_bytes::<32>()?),
        })
    }
}

/// A new opaque-token key.
pub fn generate_token_mac_key() -> io::Result<Vec<u8>> {
    Ok(random_bytes::<32>()?.to_vec())
}

/// The secrets standalone mode makes itself when the manifests do not give them: the opaque-token key, signing
/// keys, credentials. From the state directory, or shared by every instance through PostgreSQL.
pub trait SecretSource {
    fn token_mac_key(&self) -> io::Result<Vec<u8>>;
    fn signing_key(&self, ns: &str, name: &str, alg: SigningAlgorithm) -> io::Result<Vec<u8>>;
    /// `true` when created now.
    fn credentials(&self, ns: &str, name: &str) -> io::Result<(StoredCredentials, bool)>;
}

impl SecretSource for StateDir {
    fn token_mac_key(&self) -> io::Result<Vec<u8>> {
        StateDir::token_mac_key(self)
    }
    fn signing_key(&self, ns: &str, name: &str, alg: SigningAlgorithm) -> io::Result<Vec<u8>> {
        StateDir::signing_key(self, ns, name, alg)
    }
    fn credentials(&self, ns: &str, name: &str) -> io::Result<(StoredCredentials, bool)> {
        StateDir::credentials(self, ns, name)
    }
}

pub struct StateDir {
    root: PathBuf,
    tightened: Vec<TooOpen>,
}

/// A file or directory of the state that group or others could access when the state was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooOpen {
    pub path: PathBuf,
    /// Its permission bits then (now restricted to at most 0600, or 0700 for a directory).
    pub mode: u32,
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).map_err(|_| io::Error::other("the OS random number generator failed"))?;
    Ok(b)
}

/// Writes `data` to `path` atomically with mode 0600, creating missing directories (below the state directory)
/// with mode 0700.
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    fs::DirBuilder::new().recursive(true).mode(PRIVATE_DIR_MODE).create(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(PRIVATE_FILE_MODE).open(&tmp)?;
        // A temp file left by a crash keeps the mode it was created with: restrict it before writing a secret.
        restrict_file(&f, &tmp, PRIVATE_FILE_MODE)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// A path segment from a Kubernetes name (DNS-1123, so already safe; checked anyway).
fn segment(s: &str) -> io::Result<&str> {
    if s.is_empty() || s.contains(['/', '\\']) || s == "." || s == ".." {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} cannot name a file")));
    }
    Ok(s)
}

/// Restricts `path` and, for a directory, everything in it: directories to 0700, regular files to 0600. Symbolic
/// links (and sockets, FIFOs, devices) are left alone.
fn restrict_tree(path: &Path, found: &mut Vec<TooOpen>) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let want = if meta.is_dir() {
        PRIVATE_DIR_MODE
    } else if meta.is_file() {
        PRIVATE_FILE_MODE
    } else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !want != 0 {
        // The directory is restricted before its entries are listed.
        if let Some(mode) = restrict_path(path, want)? {
            found.push(TooOpen { path: path.to_path_buf(), mode });
        }
    }
    if meta.is_dir() {
        let entries = fs::read_dir(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        for entry in entries {
            let entry = entry.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            restrict_tree(&entry.path(), found)?;
        }
    }
    Ok(())
}

impl StateDir {
    /// Opens (or creates, mode 0700) the state directory. What of its layout group or others could access is
    /// logged as a warning, restricted, and listed by [`StateDir::tightened`].
    pub fn open(root: &Path) -> io::Result<Self> {
        let mut tightened = Vec::new();
        if let Some(mode) = create_private_dir(root)? {
            tightened.push(TooOpen { path: root.to_path_buf(), mode });
        }
        for name in LAYOUT {
            restrict_tree(&root.join(name), &mut tightened)?;
        }
        for t in &tightened {
            tracing::warn!(
                path = %t.path.display(),
                mode = %format!("{:04o}", t.mode),
                "state directory entry was accessible by group or others; restricted it to the owner"
            );
        }
        Ok(Self { root: root.to_path_buf(), tightened })
    }

    /// What was too open when the directory was opened (now restricted), with its mode then.
    pub fn tightened(&self) -> &[TooOpen] {
        &self.tightened
    }

    pub fn tokens_dir(&self) -> PathBuf {
        self.root.join("tokens")
    }

    /// The opaque-token key, created on first use.
    pub fn token_mac_key(&self) -> io::Result<Vec<u8>> {
        let path = self.root.join("token-mac.key");
        match fs::read(&path) {
            Ok(k) if k.len() >= 32 => Ok(k),
            Ok(_) => Err(io::Error::other(format!("{} is shorter than 32 bytes", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = generate_token_mac_key()?;
                write_private(&path, &key)?;
                Ok(key)
            }
            Err(e) => Err(e),
        }
    }

    /// The application's signing key for `alg` (PKCS#8 DER), generated on first use.
    pub fn signing_key(&self, ns: &str, name: &str, alg: SigningAlgorithm) -> io::Result<Vec<u8>> {
        let path = self.root.join("keys").join(segment(ns)?).join(segment(name)?).join(format!("{}.pk8", alg.as_str()));
        match fs::read(&path) {
            Ok(der) => Ok(der),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let alg = Algorithm::try_from(alg).map_err(io::Error::other)?;
                let der = SigningKey::generate_pkcs8(alg).map_err(io::Error::other)?;
                write_private(&path, &der)?;
                tracing::info!(namespace = ns, name, alg = alg.as_str(), "generated a signing key");
                Ok(der)
            }
            Err(e) => Err(e),
        }
    }

    /// Generated credentials for an application without a credentials Secret; `true` when created now.
    pub fn credentials(&self, ns: &str, name: &str) -> io::Result<(StoredCredentials, bool)> {
        let path = self.root.join("credentials").join(segment(ns)?).join(format!("{}.json", segment(name)?));
        match fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(|c| (c, false))
                .map_err(|e| io::Error::other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let creds = StoredCredentials::generate(name)?;
                write_private(&path, &serde_json::to_vec_pretty(&creds).map_err(io::Error::other)?)?;
                Ok((creds, true))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use super::*;
    use crate::core::clock::ManualClock;
    use crate::core::model::{Change, LivePair, Subject, TokenId, TokenKey};
    use crate::core::scope::ScopeSet;
    use crate::core::store::TokenStore;
    use crate::metrics::Histogram;
    use crate::storage::file_store::{FileStore, FileStoreOptions};

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Every file and directory under `root` (and `root` itself) with its mode, sorted by path.
    fn tree(root: &Path) -> Vec<(PathBuf, u32)> {
        let mut out = vec![(root.to_path_buf(), mode(root))];
        let mut entries: Vec<PathBuf> =
            fs::read_dir(root).expect("read_dir").map(|e| e.expect("entry").path()).collect();
        entries.sort();
        for path in entries {
            if fs::symlink_metadata(&path).expect("metadata").is_dir() {
                out.extend(tree(&path));
            } else {
                out.push((path.clone(), mode(&path)));
            }
        }
        out
    }

    fn assert_private(root: &Path) {
        let entries = tree(root);
        for (path, m) in &entries {
            let want = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(*m, want, "{} has mode {m:04o}, not {want:04o}; all: {entries:?}", path.display());
        }
    }

    #[tokio::test]
    async fn a_fresh_state_dir_is_0700_and_every_file_in_it_0600_also_after_compaction() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("state");
        let state = StateDir::open(&root).expect("open");
        state.token_mac_key().expect("mac key");
        state.signing_key("default", "shop", SigningAlgorithm::ES256).expect("signing key");
        state.credentials("default", "shop").expect("credentials");
        let (store, _) = FileStore::open(
            &state.tokens_dir(),
            Arc::new(ManualClock::new(10)),
            Arc::new(Histogram::new(&[1.0])),
            FileStoreOptions { compact_min_records: 20, ..Default::default() },
        )
        .expect("store");
        let key = TokenKey { client_id: "c".into(), subject: Subject::User("u".into()), scopes: ScopeSet::default() };
        let mut expect = None;
        for n in 1..=60u8 {
            let next = LivePair {
                access_id: TokenId([n; 16]),
                access_scopes: ScopeSet::default(),
                issued_at: 0,
                access_expires_at: 100,
                refresh: None,
            };
            store.commit(Change { key: key.clone(), expect, next: Some(next) }).await.expect("commit");
            expect = Some(TokenId([n; 16]));
        }
        let log = fs::read_to_string(state.tokens_dir().join("tokens.log")).expect("log");
        assert!(log.lines().count() < 60, "the log was never compacted");
        assert_private(&root);
        assert!(state.tightened().is_empty(), "nothing to report in a fresh state: {:?}", state.tightened());
    }

    #[test]
    fn key_and_secret_files_readable_by_others_are_reported_and_fixed() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("state");
        let key_dir = root.join("keys/default/shop");
        fs::create_dir_all(&key_dir).expect("dirs");
        fs::create_dir_all(root.join("credentials/default")).expect("dirs");
        let mac = root.join("token-mac.key");
        let signing = key_dir.join("ES256.pk8");
        let creds = root.join("credentials/default/shop.json");
        fs::write(&mac, [7u8; 32]).expect("mac key");
        fs::write(&signing, SigningKey::generate_pkcs8(Algorithm::ES256).expect("key")).expect("signing key");
        fs::write(&creds, br#"{"client_id":"shop-x","client_secret":"s"}"#).expect("credentials");
        let mut want = vec![
            (root.clone(), 0o755),
            (root.join("keys"), 0o755),
            (root.join("keys/default"), 0o711),
            (key_dir, 0o750),
            (signing, 0o640),
            (root.join("credentials"), 0o705),
            (root.join("credentials/default"), 0o700), // already private: not reported
            (creds, 0o604),
            (mac.clone(), 0o644),
        ];
        for (path, m) in &want {
            chmod(path, *m);
        }
        want.retain(|(_, m)| *m != 0o700);
        want.sort();
        let state = StateDir::open(&root).expect("open");
        let mut reported: Vec<(PathBuf, u32)> = state.tightened().iter().map(|t| (t.path.clone(), t.mode)).collect();
        reported.sort();
        assert_eq!(reported, want);
        assert_private(&root);
        assert_eq!(state.token_mac_key().expect("mac key"), vec![7u8; 32], "the key itself is kept");
        assert!(StateDir::open(&root).expect("reopen").tightened().is_empty(), "fixed once, reported once");
    }
}
