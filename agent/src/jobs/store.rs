//! The job store: one protobuf record per job, `jobs/<id>/record.pb`, replaced
//! atomically (write, fsync, rename) on every state change, so an agent
//! restart finds every job where it was. Plain files keep the store
//! inspectable and need no database; the agent is its only writer (it holds
//! `agent.lock`).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use bridge_proto::index::write_atomic;
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

    pub fn save(&self, id: u64, rec: &JobRecord) -> io::Result<()> {
        write_atomic(&self.job_dir(id).join("record.pb"), &rec.encode_to_vec())
    }
}
