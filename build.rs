//! Records the git commit the binary is built from, for `kubetoken --version`. Builds without a git checkout (a
//! container build context without `.git`) pass it in KUBETOKEN_GIT_COMMIT; otherwise it is `unknown`.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=KUBETOKEN_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    let commit = std::env::var("KUBETOKEN_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    });
    println!("cargo:rustc-env=KUBETOKEN_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
}
