//! The repository: finding it, its `.bridge/` layout, its mirror name, the
//! user's extra ignore lines and the agent token.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Everything bridge keeps for one repository, under `.bridge/`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub repo: PathBuf,
    pub state: PathBuf,
    /// The daemon's control socket.
    pub control: PathBuf,
    pub token: PathBuf,
    pub index: PathBuf,
    pub daemon_log: PathBuf,
    pub daemon_pid: PathBuf,
    /// Held (`flock`) by the running daemon: one per repository.
    pub daemon_lock: PathBuf,
    /// Output paths of submitted jobs (repository-relative, one per line):
    /// never synced up, they come back from the agent.
    pub outputs: PathBuf,
    /// The provider `bridge up` chose (`ProviderSpec`, TOML).
    pub provider: PathBuf,
    /// Port forwards, set up again by a restarted daemon (JSON).
    pub forwards: PathBuf,
    /// Old versions of pulled outputs waiting for their background unlink
    /// (`bridge_proto::oldfiles::remove`); emptied when a daemon starts.
    pub gone: PathBuf,
    /// What output pulls wrote into the repository (`jobs::ledger`).
    pub pulled: PathBuf,
    /// The last `bridge up` for a remote provider that failed, and why: job
    /// commands then refuse to fall back to the local agent.
    pub up_failed: PathBuf,
}

impl Layout {
    pub fn new(repo: &Path) -> Layout {
        let state = repo.join(".bridge");
        Layout {
            repo: repo.to_path_buf(),
            control: state.join("daemon.sock"),
            token: state.join("token"),
            index: state.join("index"),
            daemon_log: state.join("daemon.log"),
            daemon_pid: state.join("daemon.pid"),
            daemon_lock: state.join("daemon.lock"),
            outputs: state.join("outputs"),
            provider: state.join("provider.toml"),
            forwards: state.join("forwards.json"),
            gone: state.join("gone"),
            pulled: state.join("pulled.json"),
            up_failed: state.join("up-failed.toml"),
            state,
        }
    }

    /// Creates `.bridge/` (0700) with a `.gitignore` that keeps git quiet about it.
    pub fn create(&self) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state)?;
        // It holds the token and the control socket: its owner's alone.
        check_private(&self.state, 0o700)?;
        let gi = self.state.join(".gitignore");
        if !gi.exists() {
            std::fs::write(gi, "*\n")?;
        }
        Ok(())
    }

    /// Removes what a stopped daemon left in `gone/` (it died before its
    /// background unlinks ran) and makes sure the directory exists.
    pub fn empty_gone(&self) -> io::Result<()> {
        bridge_proto::oldfiles::empty_dir(&self.gone)
    }
}

/// The repository containing `start`: the nearest ancestor with a `.git`.
pub fn find_repo(start: &Path) -> Option<PathBuf> {
    let start = start.canonicalize().ok()?;
    start
        .ancestors()
        .find(|d| d.join(".git").exists())
        .map(Path::to_path_buf)
}

/// A stable mirror name: the directory's name plus a hash of its full path and
/// this machine's name, so two checkouts never share a mirror.
pub fn mirror_name(repo: &Path) -> String {
    let base: String = repo
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(host.as_bytes());
    h.update(b"\0");
    h.update(repo.as_os_str().as_encoded_bytes());
    let base = base.trim_start_matches('.');
    format!(
        "{}-{}",
        if base.is_empty() { "repo" } else { base },
        &h.finalize().to_hex()[..12]
    )
}

/// Ignore lines the agent cannot read itself: the user's `core.excludesFile`
/// (or git's default `~/.config/git/ignore`), then `.git/info/exclude`.
pub fn exclude_lines(repo: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    let configured = std::process::Command::new("git")
        .args(["config", "--path", "--get", "core.excludesFile"])
        .current_dir(repo)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let global = configured.or_else(|| {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("git/ignore"))
    });
    for f in global.into_iter().chain([repo.join(".git/info/exclude")]) {
        if let Ok(text) = std::fs::read_to_string(&f) {
            lines.extend(text.lines().map(str::to_owned));
        }
    }
    lines
}

/// Refuses `path` (the token, `.bridge/`) when it is a symlink or others
/// may read or enter it: one line saying what to run.
pub fn check_private(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if m.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is a symlink; bridge keeps its token and socket only in a directory of its own: remove the link",
                path.display()
            ),
        ));
    }
    let have = m.permissions().mode() & 0o777;
    if have & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is open to other users (mode {have:o}); it holds the agent's token: `chmod {mode:o} {}`",
                path.display(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Reads the agent token, generating a new random one (mode 0600) if missing.
/// A token file others may read is refused, not used.
pub fn ensure_token(path: &Path) -> io::Result<String> {
    check_private(path, 0o600)?;
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
    let token = hex::encode(raw);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(token.as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn mirror_names_are_safe_and_distinct() {
        let a = mirror_name(Path::new("/home/u/my repo"));
        let b = mirror_name(Path::new("/tmp/my repo"));
        assert!(a.starts_with("my_repo-"));
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        );
        assert!(!mirror_name(Path::new("/x/..")).starts_with('.'));
    }

    #[test]
    fn token_is_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        let t = ensure_token(&p).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ensure_token(&p).unwrap(), t);
    }

    #[test]
    fn a_token_or_state_directory_open_to_others_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        ensure_token(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ensure_token(&p).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(
            ensure_token(&link)
                .unwrap_err()
                .to_string()
                .contains("symlink")
        );
        let repo = d.path().join("repo");
        std::fs::create_dir_all(repo.join(".bridge")).unwrap();
        std::fs::set_permissions(repo.join(".bridge"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let e = Layout::new(&repo).create().unwrap_err().to_string();
        assert!(e.contains("chmod 700"), "{e}");
    }
}
