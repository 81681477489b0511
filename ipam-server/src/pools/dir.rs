//! Pools for the embedded store: a directory of YAML files holding IPPool objects, the same
//! objects `kubectl apply` takes (several per file with `---`; `.yaml`, `.yml` or `.json`).
//!
//! Read at start, then again on SIGHUP and whenever a file in it changes (name, size or
//! modification time, looked at every [`POLL`]). A file that cannot be read, a document
//! that is not an IPPool of ours, and a pool defined twice are logged and left out; the
//! rest still load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::warn;

use super::{PoolError, PoolSet, Pools, check};
use crate::k8s::crd::IPPool;

/// How often the directory is looked at for changes.
pub const POLL: Duration = Duration::from_secs(2);

const API_VERSION: &str = "ipam.rust-ipam.io/v1alpha1";

/// The files of `dir` that hold pools, by name.
fn pool_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                // Editors' and kubectl's temporary files.
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What identifies the directory's content without reading it.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    pool_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            let (len, modified) = m.map_or((0, None), |m| (m.len(), m.modified().ok()));
            (p, len, modified)
        })
        .collect()
}

/// Reads every pool in `dir`.
pub fn load(dir: &Path) -> PoolSet {
    let mut set = PoolSet::default();
    let files = match pool_files(dir) {
        Ok(f) => f,
        Err(e) => {
            set.unreadable.push(PoolError::Unreadable {
                source_name: dir.display().to_string(),
                reason: format!("cannot list the pools directory: {e}"),
            });
            return set;
        }
    };
    // Where each pool was defined, to name both files of a duplicate.
    let mut defined_in: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        let shown = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => read_text(&shown, &text, &mut set, &mut defined_in),
            Err(e) => {
                set.unreadable.push(PoolError::Unreadable { source_name: shown, reason: e.to_string() })
            }
        }
    }
    set
}

/// The pools of one file's text (`shown` names it in errors), as [`load`] reads each file.
pub fn from_text(shown: &str, text: &str) -> PoolSet {
    let mut set = PoolSet::default();
    read_text(shown, text, &mut set, &mut BTreeMap::new());
    set
}

/// Adds the IPPools of `text` to `set`; `defined_in` says where each name was first
/// defined, so a second definition is refused naming both places.
fn read_text(shown: &str, text: &str, set: &mut PoolSet, defined_in: &mut BTreeMap<String, String>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = format!("{shown} document {}", i + 1);
        let unreadable = |reason: String| PoolError::Unreadable { source_name: at.clone(), reason };
        let value = match <serde_yaml::Value as serde::Deserialize>::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                set.unreadable.push(unreadable(format!("is not YAML: {e}")));
                // The rest of the stream cannot be trusted to split where the author meant.
                break;
            }
        };
        let (kind, api) = (value.get("kind").and_then(|k| k.as_str()), value.get("apiVersion"));
        if kind != Some("IPPool") || api.and_then(|a| a.as_str()) != Some(API_VERSION) {
            set.unreadable.push(unreadable(format!(
                "is not an IPPool of {API_VERSION} (kind {kind:?}, apiVersion {:?})",
                api.and_then(|a| a.as_str())
            )));
            continue;
        }
        let pool: IPPool = match serde_yaml::from_value(value) {
            Ok(p) => p,
            Err(e) => {
                set.unreadable.push(unreadable(format!("is not a valid IPPool: {e}")));
                continue;
            }
        };
        let Some(name) = pool.metadata.name.clone().filter(|n| !n.is_empty()) else {
            set.unreadable.push(unreadable("has no metadata.name".into()));
            continue;
        };
        if let Some(first) = defined_in.get(&name) {
            set.unreadable.push(unreadable(format!("defines pool {name:?} again (first in {first})")));
            continue;
        }
        defined_in.insert(name.clone(), at.clone());
        set.pools.insert(name.clone(), check(&name, &pool.spec).map(std::sync::Arc::new));
    }
}

/// Loads `dir` into `pools` now, then again on SIGHUP and on every change, until the
/// task is dropped.
pub async fn watch(dir: PathBuf, pools: Pools) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no SIGHUP handler; the pools directory is reloaded on change only");
            None
        }
    };
    let mut seen = fingerprint(&dir);
    pools.replace(load(&dir));
    loop {
        let hangup = async {
            match &mut hup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            _ = hangup => true,
            () = tokio::time::sleep(POLL) => false,
        };
        let now = fingerprint(&dir);
        if forced || now != seen {
            seen = now;
            pools.replace(load(&dir));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: ipam.rust-ipam.io/v1alpha1
kind: IPPool
metadata:
  name: rail0
spec:
  ranges:
  - range: 198.18.0.0/24
    gateway: 198.18.0.1
  cooldown: 30s
";

    #[test]
    fn a_directory_of_pools_loads_and_bad_entries_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = GOOD.replace("rail0", "rail1").replace("198.18.0.1", "198.19.0.1");
        std::fs::write(dir.path().join("a.yaml"), format!("{GOOD}---\n{bad}")).expect("write");
        std::fs::write(dir.path().join("b.yml"), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
            .expect("write");
        std::fs::write(dir.path().join("c.yaml"), GOOD).expect("write");
        std::fs::write(dir.path().join("ignored.txt"), "not read").expect("write");
        let set = load(dir.path());
        let names: Vec<&String> = set.pools.keys().collect();
        assert_eq!(names, ["rail0", "rail1"]);
        assert_eq!(set.pools["rail0"].as_ref().expect("valid").cooldown, Duration::from_secs(30));
        assert_eq!(
            set.pools["rail1"].as_ref().expect_err("invalid").to_string(),
            r#"pool "rail1" is invalid: spec.ranges[0].gateway "198.19.0.1" is outside range 198.18.0.0/24"#
        );
        let d = dir.path().display();
        let unreadable: Vec<String> = set.unreadable.iter().map(ToString::to_string).collect();
        assert_eq!(
            unreadable,
            [
                format!(
                    r#"{d}/b.yml document 1: is not an IPPool of ipam.rust-ipam.io/v1alpha1 (kind Some("ConfigMap"), apiVersion Some("v1"))"#
                ),
                format!(
                    r#"{d}/c.yaml document 1: defines pool "rail0" again (first in {d}/a.yaml document 1)"#
                ),
            ]
        );
    }
}
