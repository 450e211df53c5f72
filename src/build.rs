//! Records the commit Gatehouse is built from, for `gatehouse_build_info{version,commit}`:
//! `GATEHOUSE_COMMIT` when it is set (a build without its git history, such as a container
//! image built from an archive), else `git rev-parse --short=12 HEAD`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GATEHOUSE_COMMIT");
    let commit = std::env::var("GATEHOUSE_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=GATEHOUSE_COMMIT={}", commit.trim());
}

fn git_commit() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let git = root.join(".git");
    if !git.exists() {
        return None;
    }
    // A new commit moves HEAD or the branch it names.
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
        if let Some(reference) = head.trim().strip_prefix("ref: ") {
            let path = git.join(reference);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            } else {
                println!(
                    "cargo:rerun-if-changed={}",
                    git.join("packed-refs").display()
                );
            }
        }
    }
    let output = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let commit = String::from_utf8(output.stdout).ok()?;
    let commit = commit.trim();
    (!commit.is_empty()).then(|| commit.to_string())
}
