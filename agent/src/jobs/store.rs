//! The job store: one protobuf record per job, `jobs/<id>/record.pb`, replaced
//! atomically (write, rename; fsync once the job ended) on every state
//! change, so an agent restart finds every job where it was. Plain files keep the store
//! inspectable and need no database; the agent is its only writer (it holds
//! `agent.lock`).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use bridge_proto::v1::JobRecord;
use prost::Message;

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> io::Result<Store> {
        fs::create_dir_all(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// The store's directory (`jobs/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn job_dir(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Every readable record, by id. A directory without a readable record
    /// is a submit that never completed: removed.
    pub fn load_all(&self) -> io::Result<BTreeMap<u64, JobRecord>> {
        let mut out = BTreeMap::new();
        for e in fs::read_dir(&self.dir)?.flatten() {
            let Some(id) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            // A tree whose deletion an earlier agent did not finish.
            let aside = e.path().join(DELETING);
            if aside.exists() {
                delete_in_background(vec![aside]);
            }
            match fs::read(e.path().join("record.pb"))
                .ok()
                .and_then(|b| JobRecord::decode(b.as_slice()).ok())
            {
                Some(r) => {
                    out.insert(id, r);
                }
                None => {
                    tracing::warn!(job = id, "removing a job directory without a record");
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(out)
    }

    /// Replaces the job's record. Only an ended job's record is fsynced: an
    /// agent restart finds every record in the page cache anyway, a machine
    /// that crashes takes its queued and running jobs with it, and an fsync
    /// on `bridge run`'s path waits for every metadata change the journal
    /// holds (a spare snapshot's 20,000 links: seconds on a slow disk).
    pub fn save(&self, id: u64, rec: &JobRecord) -> io::Result<()> {
        let path = self.job_dir(id).join("record.pb");
        let ended = rec
            .info
            .as_ref()
            .is_some_and(|i| bridge_proto::jobs::is_terminal(i.state()));
        crate::envcache::write_atomic(&path, &rec.encode_to_vec(), ended)
    }
}

/// A job's tree renamed aside for deletion (`jobs/<id>/tree.deleting`).
pub const DELETING: &str = "tree.deleting";

/// Deletes `dirs` on a thread of their own (no lock held, nobody waits).
pub fn delete_in_background(dirs: Vec<PathBuf>) {
    if dirs.is_empty() {
        return;
    }
    let spawned = crate::background::spawn("tree-delete", move || {
        for d in dirs {
            // A spare's manifest is a file beside its tree.
            let gone = match fs::symlink_metadata(&d) {
                Ok(m) if !m.is_dir() => fs::remove_file(&d),
                Ok(_) => fs::remove_dir_all(&d),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = gone {
                tracing::warn!(dir = %d.display(), error = %e, "cannot delete an old job tree");
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to delete old job trees");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_set_aside_are_deleted_in_the_background_and_after_a_crash() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let record = JobRecord::default().encode_to_vec();
        for id in [1, 2] {
            let aside = store.job_dir(id).join(DELETING);
            fs::create_dir_all(aside.join("src/deep")).unwrap();
            fs::write(aside.join("src/deep/f.py"), "x").unwrap();
            fs::write(store.job_dir(id).join("record.pb"), &record).unwrap();
        }
        let gone = |id: u64| {
            let p = store.job_dir(id).join(DELETING);
            (0..500).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                !p.exists()
            })
        };
        // Set aside by a running agent.
        delete_in_background(vec![store.job_dir(1).join(DELETING)]);
        assert!(gone(1));
        // Left behind by an agent that stopped mid-deletion: removed at load,
        // and the job itself is kept.
        let jobs = store.load_all().unwrap();
        assert!(jobs.contains_key(&2));
        assert!(gone(2));
        assert!(store.job_dir(2).join("record.pb").exists());
    }
}
