//! A job's private copy of one generation of a mirror.
//!
//! The snapshot is taken under the agent's state lock, so it is exactly the
//! generation the daemon verified. Files are hard links to the mirror's files:
//! the agent never modifies a mirror file in place (a sync writes a new file
//! and renames it over the old one), so a link keeps the old content for the
//! job while the mirror moves on, and taking a snapshot costs one `link()` per
//! file instead of a copy.
//!
//! The one way a link can leak is a job writing *in place* into a file of its
//! own tree (opening it for writing instead of replacing it): that changes the
//! inode the mirror shares. [`modified_in_place`] finds such files when the job
//! ends, by comparing each linked file with the stat it had at snapshot time
//! (kept in `snapshot.index`); the caller then has the mirror rehash them, so
//! the daemon's next verification sees the damage and sends the right content
//! again. Queued jobs whose snapshots share a damaged inode are held back
//! until [`restore`] has rewritten their copy from the chunk store (the
//! daemon's repair of the mirror brings the chunks back).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bridge_proto::index::{Cached, Index};
use bridge_proto::path::RelPath;
use bridge_proto::scan::Stat;
use bridge_proto::tree::Node;

use crate::mirror::Mirror;
use crate::store::{FileCache, Store};

/// What a snapshot cost, for the job's log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Taken {
    pub files: u64,
    pub linked: u64,
    pub copied: u64,
}

/// Materialises `mirror`'s synced tree at `dest` (which must not exist) and
/// writes the linked files' stats to `manifest`.
pub fn take(mirror: &mut Mirror, dest: &Path, manifest: &Path) -> io::Result<Taken> {
    fs::create_dir_all(dest)?;
    let mut taken = Taken::default();
    let mut linked = Index::default();
    // Tree order puts every directory before what it contains.
    let entries: Vec<(RelPath, Node)> = mirror
        .tree
        .iter()
        .map(|(p, n)| (p.clone(), n.clone()))
        .collect();
    for (p, n) in entries {
        let to = p.to_fs(dest);
        match n {
            Node::Dir => fs::create_dir(&to)?,
            Node::Symlink { target } => std::os::unix::fs::symlink(&target, &to)?,
            Node::File { .. } => {
                taken.files += 1;
                let from = p.to_fs(&mirror.root);
                match fs::hard_link(&from, &to) {
                    Ok(()) => {
                        taken.linked += 1;
                        // link() moved the inode's ctime: refresh the mirror's
                        // stat cache so the link does not cost a rehash.
                        if let Ok(st) = Stat::lstat(&from)
                            && let Some(c) = mirror.relinked(&p, &st)
                        {
                            linked.entries.insert(p, c);
                        }
                    }
                    Err(_) => {
                        // Another filesystem or the link limit: a real copy.
                        fs::copy(&from, &to)?;
                        taken.copied += 1;
                    }
                }
            }
        }
    }
    linked.save(manifest)?;
    Ok(taken)
}

/// A damaged shared file: its path, the inode the write went to, and the
/// content the snapshots that share that inode should have.
#[derive(Debug, Clone)]
pub struct Damage {
    pub path: RelPath,
    pub ino: u64,
}

/// Files of `tree` (a queued job's snapshot, per its `manifest`) that share an
/// inode another job wrote into: what they should contain.
pub fn affected(tree: &Path, manifest: &Path, damage: &[Damage]) -> Vec<(RelPath, Cached)> {
    let linked = Index::load(manifest);
    damage
        .iter()
        .filter_map(|d| {
            let c = linked.entries.get(&d.path)?;
            let st = Stat::lstat(&d.path.to_fs(tree)).ok()?;
            (c.ino == d.ino && st.ino == d.ino).then(|| (d.path.clone(), c.clone()))
        })
        .collect()
}

/// Rewrites `tree`'s `path` as a file of its own with the content `want`
/// (chunks from the agent's store), breaking the shared link. False when a
/// chunk is not available (yet: the daemon resends it when it repairs the
/// mirror).
pub fn restore(store: &mut Store, tree: &Path, path: &RelPath, want: &Cached) -> io::Result<bool> {
    let dest = path.to_fs(tree);
    let tmp = dest.with_file_name(format!(".{}.bridge-restore", path.name()));
    let mut files = FileCache::default();
    let mut out = fs::File::create(&tmp)?;
    for r in want.chunks.iter() {
        match store.read(&r.id, &mut files) {
            Some(b) => out.write_all(&b)?,
            None => {
                drop(out);
                let _ = fs::remove_file(&tmp);
                return Ok(false);
            }
        }
    }
    let mode = if want.exec { 0o755 } else { 0o644 };
    out.set_permissions(fs::Permissions::from_mode(mode))?;
    drop(out);
    fs::rename(&tmp, &dest)?;
    Ok(true)
}

/// Files of the snapshot at `tree` that still share their inode with the
/// snapshot-time file but whose content changed: written in place by the job.
pub fn modified_in_place(tree: &Path, manifest: &Path) -> Vec<Damage> {
    let linked = Index::load(manifest);
    let mut out: Vec<Damage> = linked
        .entries
        .iter()
        .filter(|(p, c)| {
            Stat::lstat(&p.to_fs(tree))
                .is_ok_and(|st| st.ino == c.ino && (st.size != c.size || st.mtime_ns != c.mtime_ns))
        })
        .map(|(p, c)| Damage {
            path: p.clone(),
            ino: c.ino,
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}
