//! Job snapshots taken under the state lock, and the spare snapshot the job
//! poller prepares ahead for each mirror jobs were submitted against (see
//! [`snapshot::Spare`]): a submit then renames a tree that is almost always
//! current instead of linking every file while `bridge run` waits.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bridge_proto::v1::JobState;
use tonic::Status;

use super::{Jobs, snapshot, state_of, store};
use crate::mirror::RelinkQueue;
use crate::service::State;

/// The spare snapshot of one mirror.
pub(super) enum SpareSlot {
    /// Being built by a thread (its number).
    Building(u64),
    Ready(snapshot::Spare),
    /// Taken by a submit at this time.
    Used(Instant),
    /// The last build failed; not tried again before then.
    Failed(Instant),
}

/// While a job is setting up or running, no spare is built within this long
/// of the last submit: the `link()`s would compete with the job's first
/// seconds (a `bridge run`'s first lines). With no job active, one is built
/// once the submit is done.
const SPARE_QUIET: Duration = Duration::from_secs(5);
/// A submit is done well within this.
const SPARE_SUBMITTED: Duration = Duration::from_millis(300);
/// After a failed spare build, submits take snapshots the slow way this long.
const SPARE_RETRY: Duration = Duration::from_secs(60);
/// Spare trees live in the job store as `.spare-<mirror>-<n>`.
pub(super) const SPARE_PREFIX: &str = ".spare-";

impl Jobs {
    /// Takes job `id`'s snapshot of `mirror` into `dir/tree` (from the
    /// spare when one is ready), releasing the agent state `st` as soon as
    /// the mirror is no longer read. Returns the tree's path.
    pub(super) fn snapshot(
        &self,
        id: u64,
        dir: &Path,
        mirror_name: &str,
        mut st: std::sync::MutexGuard<'_, State>,
    ) -> Result<PathBuf, Status> {
        let State { store: _, mirrors } = &mut *st;
        let mirror = mirrors
            .get_mut(mirror_name)
            .ok_or_else(|| Status::failed_precondition("the mirror closed"))?;
        self.submitted_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(mirror_name.to_string())
            .or_insert_with(|| mirror.relinks.clone());
        let spare = self.ready_spare(mirror_name);
        let snap = (|| {
            fs::create_dir_all(dir)?;
            let (tree, manifest) = (dir.join("tree"), dir.join("snapshot.index"));
            if let Some(spare) = spare {
                let at = spare.dir().to_path_buf();
                match snapshot::take_spare(mirror, spare, &tree, &manifest) {
                    Ok(t) => return Ok(t),
                    Err(e) => {
                        tracing::warn!(job = id, error = %e, "cannot use the spare snapshot");
                        let _ = fs::remove_dir_all(&at);
                        let _ = fs::remove_file(snapshot::Spare::manifest_path(&at));
                        let _ = fs::remove_dir_all(&tree);
                    }
                }
            }
            snapshot::take(mirror, &tree, &manifest)
        })();
        drop(st);
        let taken = snap.map_err(|e| {
            let _ = fs::remove_dir_all(dir);
            Status::internal(format!("cannot snapshot the mirror for job {id}: {e}"))
        })?;
        tracing::info!(
            job = id,
            files = taken.files,
            copied = taken.copied,
            from_spare = taken.from_spare,
            "job snapshot taken"
        );
        Ok(dir.join("tree"))
    }

    /// The mirror's spare snapshot, when one is ready.
    fn ready_spare(&self, mirror: &str) -> Option<snapshot::Spare> {
        let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
        match spares.insert(mirror.to_string(), SpareSlot::Used(Instant::now())) {
            Some(SpareSlot::Ready(s)) => Some(s),
            Some(b @ SpareSlot::Building(_)) => {
                spares.insert(mirror.to_string(), b);
                None
            }
            _ => None,
        }
    }

    /// Starts building a spare snapshot for each mirror jobs were submitted
    /// against that has none, unless a job started moments ago. The tree is
    /// copied under the state lock; the links are made on a thread without
    /// any lock.
    pub(super) fn build_spares(&self, state: &Mutex<State>) {
        // Looked at only for a spare just used (this runs every poll).
        let running = std::cell::LazyCell::new(|| {
            self.inner.lock().map_or(true, |i| {
                i.records
                    .values()
                    .any(|r| matches!(state_of(r), JobState::Setup | JobState::Running))
            })
        });
        let wanted: Vec<(String, RelinkQueue)> = {
            let spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
            self.submitted_to
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(m, _)| match spares.get(*m) {
                    None => true,
                    Some(SpareSlot::Failed(at)) => at.elapsed() > SPARE_RETRY,
                    Some(SpareSlot::Used(at)) => {
                        at.elapsed() > SPARE_SUBMITTED && (!*running || at.elapsed() > SPARE_QUIET)
                    }
                    Some(_) => false,
                })
                .map(|(m, q)| (m.clone(), q.clone()))
                .collect()
        };
        for (name, relinks) in wanted {
            let plan = {
                let Ok(st) = state.lock() else { return };
                match st.mirrors.get(&name) {
                    Some(m) => snapshot::plan(m),
                    None => continue,
                }
            };
            let seq = self.spare_seq.fetch_add(1, Ordering::Relaxed);
            let dir = self.store.dir().join(format!("{SPARE_PREFIX}{name}-{seq}"));
            let root = self.mirrors_dir.join(&name);
            let spares = self.spares.clone();
            let slot = name.clone();
            spares
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), SpareSlot::Building(seq));
            let spawned = crate::background::spawn("spare-snapshot", move || {
                let t = Instant::now();
                let built = snapshot::build(plan, &root, &dir, &relinks);
                let mut spares = spares.lock().unwrap_or_else(|e| e.into_inner());
                let wanted = matches!(spares.get(&name), Some(SpareSlot::Building(s)) if *s == seq);
                match built {
                    Ok(spare) if wanted => {
                        tracing::debug!(
                            mirror = %name,
                            ms = t.elapsed().as_secs_f64() * 1e3,
                            "spare snapshot built"
                        );
                        spares.insert(name, SpareSlot::Ready(spare));
                    }
                    Ok(_) => {
                        let index = snapshot::Spare::manifest_path(&dir);
                        store::delete_in_background(vec![dir, index]);
                    }
                    Err(e) => {
                        tracing::warn!(mirror = %name, error = %e, "cannot build a spare snapshot");
                        if wanted {
                            spares.insert(name, SpareSlot::Failed(Instant::now()));
                        }
                        let index = snapshot::Spare::manifest_path(&dir);
                        store::delete_in_background(vec![dir, index]);
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to build a spare snapshot");
                self.spares
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(slot, SpareSlot::Failed(Instant::now()));
            }
        }
    }
}
