//! The delegate cache in `cniDir`: `<cniDir>/<containerID>` is the JSON list of delegates
//! Multus writes (so DEL works without the API server), `<cniDir>/results/` holds libcni's
//! result cache, and `<cniDir>/network-status/<containerID>` the network-status written to
//! the pod.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use cni::{CniError, ErrorCode};

use super::delegate::Delegate;

/// Directory of the kept network-status annotations.
pub const STATUS_DIR: &str = "network-status";

/// Creates `dir` and its parents with mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes `bytes` to `path` with mode 0600, through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::new(ErrorCode::IO_FAILURE, format!("{what}: {e}"))
}

/// The delegates file of a container.
pub fn delegates_path(cni_dir: &Path, container_id: &str) -> PathBuf {
    cni_dir.join(container_id)
}

/// Saves the delegates of a container.
pub fn save(
    cni_dir: &Path,
    container_id: &str,
    delegates: &[Delegate],
    status: &str,
) -> Result<(), CniError> {
    let path = delegates_path(cni_dir, container_id);
    create_private_dir(&cni_dir.join(STATUS_DIR)).map_err(io(format!("creating {}", cni_dir.display())))?;
    let bytes = serde_json::to_vec(delegates).unwrap_or_default();
    write_private(&path, &bytes).map_err(io(format!("writing {}", path.display())))?;
    let spath = cni_dir.join(STATUS_DIR).join(container_id);
    write_private(&spath, status.as_bytes()).map_err(io(format!("writing {}", spath.display())))
}

/// The cached delegates of a container; `Ok(None)` when there is no cache file.
pub fn load(cni_dir: &Path, container_id: &str) -> Result<Option<Vec<Delegate>>, CniError> {
    let path = delegates_path(cni_dir, container_id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        CniError::new(ErrorCode::DECODE, format!("delegate cache {} is not valid: {e}", path.display()))
    })
}

/// The kept network-status of a container.
pub fn load_status(cni_dir: &Path, container_id: &str) -> Option<String> {
    std::fs::read_to_string(cni_dir.join(STATUS_DIR).join(container_id)).ok()
}

/// Removes a container's delegates file and kept status.
pub fn remove(cni_dir: &Path, container_id: &str) {
    let _ = std::fs::remove_file(delegates_path(cni_dir, container_id));
    let _ = std::fs::remove_file(cni_dir.join(STATUS_DIR).join(container_id));
}

/// Container IDs that have a delegates file.
pub fn containers(cni_dir: &Path) -> Result<Vec<String>, CniError> {
    let entries = match std::fs::read_dir(cni_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("reading {}", cni_dir.display()))(e)),
    };
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    Ok(out)
}
