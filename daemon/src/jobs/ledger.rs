//! What output pulls put in the repository (`.bridge/pulled.json`): the
//! size, change time and inode of each file a pull installed, and when this
//! laptop submitted each job (its own clock: the agent's may be off by
//! hours, and a local file's times are the laptop's). A later pull
//! tells a file a pull wrote (replaced quietly) from one the user changed
//! since (kept, the job's version put beside it: see
//! [`super::puller::Puller`]). Shared by every job's puller; saved after
//! each pull that wrote something; a missing or unreadable ledger is empty
//! (its files then count as the user's when changed after submission).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bridge_proto::scan::Stat;
use serde::{Deserialize, Serialize};

/// How long a job's submission time is kept (its outputs are pulled long
/// before; the agent keeps only recent jobs' trees anyway).
const KEEP_SUBMITTED: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// A file as a pull left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Mark {
    size: u64,
    ctime_ns: i64,
    ino: u64,
}

impl Mark {
    fn of(st: &Stat) -> Mark {
        Mark {
            size: st.size,
            ctime_ns: st.ctime_ns,
            ino: st.ino,
        }
    }
}

/// The ledger's content, as saved.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Book {
    /// Repository-relative path → the file as a pull left it.
    files: HashMap<String, Mark>,
    /// Job id → when this laptop submitted it (unix ns, its own clock).
    submitted: HashMap<String, i64>,
}

#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    book: Mutex<Book>,
}

impl Ledger {
    /// The ledger in `path`; empty when there is none (or it is corrupt).
    /// What no longer matters is dropped: files changed or gone since a pull
    /// left them (paths relative to the directory above `path`'s, the
    /// repository), and jobs submitted more than [`KEEP_SUBMITTED`] ago.
    pub fn open(path: &Path) -> Ledger {
        let mut book: Book = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(repo) = path.parent().and_then(Path::parent) {
            book.files
                .retain(|rel, m| Stat::lstat(&repo.join(rel)).is_ok_and(|st| Mark::of(&st) == *m));
        }
        let horizon = bridge_proto::index::now_ns() - KEEP_SUBMITTED.as_nanos() as i64;
        book.submitted.retain(|_, at| *at > horizon);
        Ledger {
            path: path.to_path_buf(),
            book: Mutex::new(book),
        }
    }

    /// A pull installed the file `rel` (repository-relative), now `st`.
    pub fn wrote(&self, rel: &str, st: &Stat) {
        self.lock().files.insert(rel.to_string(), Mark::of(st));
    }

    /// This laptop submitted job `id` at `at_ns` (its clock); saved.
    pub fn submitted(&self, id: &str, at_ns: i64) {
        self.lock().submitted.insert(id.to_string(), at_ns);
        self.save();
    }

    /// When this laptop submitted job `id`, if it did.
    pub fn submitted_at(&self, id: &str) -> Option<i64> {
        self.lock().submitted.get(id).copied()
    }

    /// Whether `rel`, now `st`, is as a pull left it. The change time, not
    /// the modification time: an edit that restores the mtime (`cp -p`,
    /// `touch -r`) still moves it.
    pub fn is_pulled(&self, rel: &str, st: &Stat) -> bool {
        self.lock().files.get(rel) == Some(&Mark::of(st))
    }

    /// Writes the ledger out (atomically).
    pub fn save(&self) {
        let bytes = serde_json::to_vec(&*self.lock()).expect("ledger serializes");
        if let Err(e) = bridge_proto::index::write_atomic(&self.path, &bytes) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot save the output ledger");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulled_file_is_known_until_it_changes_and_across_a_reopen() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join(".bridge");
        std::fs::create_dir(&state).unwrap();
        let ledger = state.join("pulled.json");
        let f = d.path().join("m.pt");
        std::fs::write(&f, b"job").unwrap();
        std::fs::write(d.path().join("gone.pt"), b"job").unwrap();
        let now = bridge_proto::index::now_ns();
        let l = Ledger::open(&ledger);
        l.wrote("m.pt", &Stat::lstat(&f).unwrap());
        l.wrote("gone.pt", &Stat::lstat(&d.path().join("gone.pt")).unwrap());
        l.submitted("7", now);
        l.submitted("old", 42);
        std::fs::remove_file(d.path().join("gone.pt")).unwrap();
        let l = Ledger::open(&ledger);
        assert!(l.is_pulled("m.pt", &Stat::lstat(&f).unwrap()));
        assert!(!l.is_pulled("other", &Stat::lstat(&f).unwrap()));
        assert_eq!(l.submitted_at("7"), Some(now));
        assert_eq!(l.submitted_at("8"), None);
        // Dropped at open: a file gone since, a submission long ago.
        assert_eq!(l.submitted_at("old"), None);
        assert!(!l.lock().files.contains_key("gone.pt"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"mine").unwrap();
        assert!(!l.is_pulled("m.pt", &Stat::lstat(&f).unwrap()));
        std::fs::write(&ledger, b"{not json").unwrap();
        assert!(!Ledger::open(&ledger).is_pulled("m.pt", &Stat::lstat(&f).unwrap()));
    }
}
