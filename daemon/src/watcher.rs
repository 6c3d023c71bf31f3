//! Watching the repository.
//!
//! One non-recursive inotify watch per synced directory: ignored directories
//! are never walked, so they cost no watch (a 200k-file `.venv` costs nothing).
//! Events become [`Dirty`] scopes; the engine debounces them (see
//! [`QUIET`], [`SETTLE_WINDOW`], [`DEBOUNCE_WINDOW`] and [`DEBOUNCE_CAP`]).
//!
//! When the kernel refuses more watches (`fs.inotify.max_user_watches`), the
//! watcher says so once, clearly, and the engine falls back to a periodic full
//! rescan ([`POLL_INTERVAL`]): changes are never silently missed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bridge_proto::path::RelPath;
use bridge_proto::scan::{is_always_excluded, is_ignore_file};
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::local::Dirty;

/// Trailing-edge debounce: a burst is processed once no event arrived for this
/// long, while its last event leaves a file being written (a creation, a
/// write). Editors' atomic saves (write temp, rename over) land well inside it.
pub const DEBOUNCE_WINDOW: Duration = Duration::from_millis(8);

/// The same when the burst's last event left a whole file in place (a close
/// after writing, a rename into the tree, a change of mode or times, a new
/// directory): only the rest of a save storm is waited for, whose steps
/// follow each other within microseconds.
pub const SETTLE_WINDOW: Duration = Duration::from_millis(1);

/// A burst that begins after this long without one is a save: once its last
/// event leaves a whole file, it is synced at once, with the events already
/// queued (most of an edit's latency was the 8 ms window before, issue 25).
/// Bursts that follow within it (the rest of a `git checkout`) are coalesced
/// by the windows.
pub const QUIET: Duration = Duration::from_millis(50);

/// Upper bound on how long a continuous burst may delay a sync.
pub const DEBOUNCE_CAP: Duration = Duration::from_millis(100);

/// Full-rescan period when inotify cannot watch everything.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What the watcher tells the engine.
#[derive(Debug)]
pub enum WatchMsg {
    /// A scope to look at again, and whether its event ends a change (see
    /// [`SETTLE_WINDOW`]).
    Dirty(Dirty, bool),
    /// The barrier's marker (see [`touch_marker`]): every event before it
    /// has been sent.
    Marker,
    /// The kernel dropped events (queue overflow): rescan everything.
    Overflow,
}

/// How changes are noticed, for status.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub enum Mode {
    #[serde(rename = "inotify")]
    Inotify,
    /// Periodic full rescans, with the reason.
    #[serde(rename = "polling")]
    Polling(String),
}

pub struct Watcher {
    root: PathBuf,
    inner: Option<notify::RecommendedWatcher>,
    watched: HashSet<PathBuf>,
    pub mode: Mode,
}

/// The message shown once when inotify watches run out.
pub fn limit_message(watched: usize) -> String {
    format!(
        "inotify watch limit reached after {watched} directories (fs.inotify.max_user_watches); \
         falling back to a full rescan every {}s. Raise the limit with \
         `sudo sysctl fs.inotify.max_user_watches=524288` (persist it in /etc/sysctl.d/) \
         and run `bridge down && bridge up`.",
        POLL_INTERVAL.as_secs()
    )
}

impl Watcher {
    pub fn new(root: &Path, tx: mpsc::UnboundedSender<WatchMsg>) -> Watcher {
        let r = root.to_path_buf();
        let marker = root.join(MARKER);
        let handler = move |res: notify::Result<Event>| match res {
            Ok(ev) => {
                tracing::trace!(?ev, "event");
                if ev.need_rescan() {
                    let _ = tx.send(WatchMsg::Overflow);
                    return;
                }
                if matches!(ev.kind, EventKind::Modify(ModifyKind::Metadata(_)))
                    && ev.paths.contains(&marker)
                {
                    let _ = tx.send(WatchMsg::Marker);
                    return;
                }
                let settled = settles(&ev.kind);
                for d in classify(&r, &ev) {
                    let _ = tx.send(WatchMsg::Dirty(d, settled));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch error; rescanning");
                let _ = tx.send(WatchMsg::Overflow);
            }
        };
        let (inner, mode) = match notify::recommended_watcher(handler) {
            Ok(w) => (Some(w), Mode::Inotify),
            Err(e) => (None, Mode::Polling(format!("cannot start inotify: {e}"))),
        };
        Watcher {
            root: root.to_path_buf(),
            inner,
            watched: HashSet::new(),
            mode,
        }
    }

    /// A watcher that watches nothing, standing in while this one is lent
    /// to a thread.
    pub fn stand_in(&self) -> Watcher {
        Watcher {
            root: self.root.clone(),
            inner: None,
            watched: HashSet::new(),
            mode: self.mode.clone(),
        }
    }

    /// Stops watching every directory `keep` rejects (`None` is the root).
    pub fn retain(&mut self, keep: impl Fn(Option<&RelPath>) -> bool) {
        let Some(w) = self.inner.as_mut() else { return };
        let root = &self.root;
        self.watched.retain(|p| {
            let rel = if p == root {
                None
            } else {
                match RelPath::from_fs(root, p) {
                    Ok(r) => Some(r),
                    Err(_) => return true,
                }
            };
            if keep(rel.as_ref()) {
                return true;
            }
            let _ = w.unwatch(p);
            false
        });
    }

    /// Number of directories watched.
    pub fn watches(&self) -> usize {
        self.watched.len()
    }

    /// Watches `dirs` (relative; `None` is the root). Switches to polling mode
    /// when the kernel refuses.
    pub fn add<'a>(&mut self, dirs: impl IntoIterator<Item = Option<&'a RelPath>>) {
        let Some(w) = self.inner.as_mut() else { return };
        if self.mode != Mode::Inotify {
            return;
        }
        for d in dirs {
            let p = d
                .map(|d| d.to_fs(&self.root))
                .unwrap_or_else(|| self.root.clone());
            if self.watched.contains(&p) {
                continue;
            }
            match w.watch(&p, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(p);
                }
                Err(e) if is_limit(&e) => {
                    let msg = limit_message(self.watched.len());
                    tracing::error!("{msg}");
                    self.mode = Mode::Polling(msg);
                    return;
                }
                // The directory vanished between scan and watch; its parent's
                // events cover it.
                Err(e) => tracing::debug!(path = %p.display(), error = %e, "cannot watch"),
            }
        }
    }

    pub fn remove<'a>(&mut self, dirs: impl IntoIterator<Item = &'a RelPath>) {
        let Some(w) = self.inner.as_mut() else { return };
        for d in dirs {
            let p = d.to_fs(&self.root);
            if self.watched.remove(&p) {
                let _ = w.unwatch(&p);
            }
        }
    }
}

fn is_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => io.raw_os_error() == Some(28), // ENOSPC
        _ => false,
    }
}

/// The directory whose timestamps the barrier touches: `.bridge`, which the
/// root's watch sees as a child (an attribute change) and which is never
/// synced.
pub const MARKER: &str = ".bridge";

/// The sync barrier's marker: a change of `.bridge`'s times, which the
/// root's inotify watch reports after every event queued before it (one
/// inotify queue, read in order). Nothing else changes `.bridge`'s
/// attributes.
pub fn touch_marker(root: &Path) -> std::io::Result<()> {
    let now = std::time::SystemTime::now();
    std::fs::File::open(root.join(MARKER))?.set_times(
        std::fs::FileTimes::new()
            .set_accessed(now)
            .set_modified(now),
    )
}

/// Whether an event leaves a whole file in place: a close after writing, a
/// rename into the tree, a change of mode or times, a new directory. A
/// creation or a write of a file still open does not, nor a removal or a
/// rename away, which an editor's save often follows with the new version.
fn settles(kind: &EventKind) -> bool {
    use notify::event::{CreateKind, RenameMode};
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To))
            | EventKind::Modify(ModifyKind::Metadata(_))
            | EventKind::Create(CreateKind::Folder)
    )
}

/// Maps one event to the scopes to look at again.
fn classify(root: &Path, ev: &Event) -> Vec<Dirty> {
    let mut out = Vec::new();
    let content_only = matches!(
        ev.kind,
        EventKind::Modify(ModifyKind::Data(_))
            | EventKind::Modify(ModifyKind::Metadata(_))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    // Opens and reads (our own rescans among them) change nothing.
    if matches!(ev.kind, EventKind::Access(_)) && !content_only {
        return out;
    }
    for p in &ev.paths {
        let Ok(rel) = RelPath::from_fs(root, p) else {
            if p == root {
                out.push(Dirty::Dir(None));
            }
            continue;
        };
        if rel.as_str().split('/').any(is_always_excluded) {
            continue;
        }
        if is_ignore_file(rel.name()) {
            out.push(Dirty::Tree(rel.parent()));
            continue;
        }
        if content_only {
            out.push(Dirty::File(rel));
        } else {
            out.push(Dirty::Dir(rel.parent()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RenameMode};

    fn ev(kind: EventKind, p: &str) -> Event {
        Event::new(kind).add_path(PathBuf::from("/r").join(p))
    }

    #[test]
    fn classification() {
        let r = Path::new("/r");
        let rp = |s: &str| RelPath::new(s).unwrap();
        assert_eq!(
            classify(
                r,
                &ev(
                    EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                    "a/b.py"
                )
            ),
            [Dirty::File(rp("a/b.py"))]
        );
        assert_eq!(
            classify(r, &ev(EventKind::Create(CreateKind::File), "a/b.py")),
            [Dirty::Dir(Some(rp("a")))]
        );
        assert_eq!(
            classify(
                r,
                &ev(
                    EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                    "top.py"
                )
            ),
            [Dirty::Dir(None)]
        );
        assert_eq!(
            classify(
                r,
                &ev(
                    EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                    "a/.gitignore"
                )
            ),
            [Dirty::Tree(Some(rp("a")))]
        );
        assert!(classify(r, &ev(EventKind::Create(CreateKind::File), "a/.b.py.swp")).is_empty());
        assert!(classify(r, &ev(EventKind::Create(CreateKind::File), "a/4913")).is_empty());
        assert!(classify(r, &ev(EventKind::Create(CreateKind::File), ".git/index")).is_empty());
        let open = EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any));
        assert!(
            classify(r, &ev(open, ".gitignore")).is_empty(),
            "our own reads"
        );
    }

    #[test]
    fn a_whole_file_in_place_settles_and_one_still_open_or_gone_does_not() {
        use notify::event::RemoveKind;
        assert!(settles(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(settles(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(!settles(&EventKind::Modify(ModifyKind::Name(
            RenameMode::Both
        ))));
        assert!(!settles(&EventKind::Modify(ModifyKind::Name(
            RenameMode::From
        ))));
        assert!(!settles(&EventKind::Remove(RemoveKind::File)));
        assert!(settles(&EventKind::Create(CreateKind::Folder)));
        assert!(!settles(&EventKind::Create(CreateKind::File)));
        assert!(!settles(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
    }
}
