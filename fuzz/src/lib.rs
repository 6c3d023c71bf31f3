//! What the fuzz targets share: scratch directories (on tmpfs when the
//! machine has one, so the targets that write files stay fast) and a listing
//! of a directory that follows no link.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// An empty directory `name` in this process's scratch space, emptied on
/// every call (each run of a target starts from nothing).
pub fn fresh(name: &str) -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let b = parent.join(format!("bridge-fuzz-{}", std::process::id()));
        fs::create_dir_all(&b).expect("scratch directory");
        b
    });
    let d = base.join(name);
    if fs::symlink_metadata(&d).is_ok() && fs::remove_dir_all(&d).is_err() {
        // A directory a run made read-only.
        let _ = std::process::Command::new("chmod")
            .args(["-R", "u+rwx"])
            .arg(&d)
            .status();
        fs::remove_dir_all(&d).expect("empty the scratch directory");
    }
    fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// Everything under `dir`, links not followed: path → what it is (a
/// directory, a link and its target, a file and its bytes).
pub fn listing(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", fs::read_link(&p).ok())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".into()
            } else {
                format!("file {:?}", fs::read(&p).ok())
            };
            let rel = p.strip_prefix(dir).expect("under dir");
            out.insert(rel.display().to_string(), what);
        }
    }
    out
}
