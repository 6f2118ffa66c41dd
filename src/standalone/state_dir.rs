//! The standalone state directory:
//!
//! ```text
//! STATE_DIR/
//!   token-mac.key                       32 random bytes: the key of opaque token strings
//!   keys/<namespace>/<name>/<alg>.pk8   signing keys (PKCS#8 DER), generated once
//!   credentials/<namespace>/<name>.json generated client credentials
//!   tokens/                             the token log (see storage::file_store)
//! ```
//! Files holding secrets are created with mode 0600 and written atomically (temp file, fsync, rename).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::api::v1alpha1::SigningAlgorithm;
use crate::core::signing::SigningKey;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredCredentials {
    pub client_id: String,
    pub client_secret: String,
}

pub struct StateDir {
    root: PathBuf,
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).map_err(|_| io::Error::other("the OS random number generator failed"))?;
    Ok(b)
}

/// Writes `data` to `path` atomically with mode 0600.
fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
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

impl StateDir {
    pub fn open(root: &Path) -> io::Result<Self> {
        fs::create_dir_all(root)?;
        Ok(Self { root: root.to_path_buf() })
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
                let key = random_bytes::<32>()?.to_vec();
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
                let creds = StoredCredentials {
                    client_id: format!("{name}-{}", URL_SAFE_NO_PAD.encode(random_bytes::<6>()?)),
                    client_secret: URL_SAFE_NO_PAD.encode(random_bytes::<32>()?),
                };
                write_private(&path, &serde_json::to_vec_pretty(&creds).map_err(io::Error::other)?)?;
                Ok((creds, true))
            }
            Err(e) => Err(e),
        }
    }
}
