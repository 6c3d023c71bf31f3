//! A job's private copy of one generation of a mirror.
//!
//! The snapshot is taken under the agent's state lock, so it is exactly the
//! generation the daemon verified. Files are hard links to the mirror's files:
//! the agent never modifies a mirror file in place (a sync writes a new file
//! and renames it over the old one), so a link keeps the old content for the
//! job while the mirror moves on, and taking a snapshot costs one `link()` per
//! file instead of a copy. Those links are mostly made ahead, off the lock, in a
//! [`Spare`] that a submit brings up to date and renames.
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

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bridge_proto::chunking::{ChunkRef, chunk_id};
use bridge_proto::index::{self, Cached, Index};
use bridge_proto::path::RelPath;
use bridge_proto::scan::Stat;
use bridge_proto::tree::{Node, Tree};

use crate::mirror::{Mirror, RelinkQueue};
use crate::service::State;
use crate::store::FileCache;

/// What a snapshot cost, for the job's log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Taken {
    pub files: u64,
    pub linked: u64,
    pub copied: u64,
    /// Taken from a spare: its entries that were already current.
    pub from_spare: Option<u64>,
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
        add(mirror, dest, &p, &n, &mut taken, &mut linked)?;
    }
    save_manifest(&linked.encode(), manifest)?;
    Ok(taken)
}

/// Creates one entry of the mirror's tree in a snapshot at `dest`.
fn add(
    mirror: &mut Mirror,
    dest: &Path,
    p: &RelPath,
    n: &Node,
    taken: &mut Taken,
    linked: &mut Index,
) -> io::Result<()> {
    let to = p.to_fs(dest);
    match n {
        Node::Dir => fs::create_dir(&to)?,
        Node::Symlink { target } => std::os::unix::fs::symlink(target, &to)?,
        Node::File { .. } => {
            taken.files += 1;
            let from = p.to_fs(&mirror.root);
            match fs::hard_link(&from, &to) {
                Ok(()) => {
                    taken.linked += 1;
                    // link() moved the inode's ctime: refresh the mirror's
                    // stat cache so the link does not cost a rehash.
                    if let Ok(st) = Stat::lstat(&from)
                        && let Some(c) = mirror.relinked(p, &st)
                    {
                        linked.entries.insert(p.clone(), c);
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
    Ok(())
}

/// The manifest only serves to notice a job's in-place writes: it is written
/// without an fsync (after a crash an unreadable one is an empty one, and the
/// job's in-place writes go unnoticed, as for a copied file), which keeps a
/// journal commit out of every `bridge run`.
fn save_manifest(encoded: &[u8], manifest: &Path) -> io::Result<()> {
    let tmp = manifest.with_extension("tmp");
    fs::write(&tmp, encoded)?;
    fs::rename(&tmp, manifest)
}

/// Makes `dest` (which must not exist) a copy of the snapshot at `base`
/// whose files are hard links to `base`'s, and gives it `base`'s manifest
/// (the same inodes, so a job's in-place writes are noticed the same way):
/// a sweep's trial gets its own tree of the sweep's generation. A linked
/// inode the mirror at `mirror_root` still has moves its ctime, so its stat
/// goes to `relinks` as for any snapshot.
pub fn take_from(
    base: &Path,
    base_manifest: &Path,
    dest: &Path,
    manifest: &Path,
    mirror_root: &Path,
    relinks: Option<&RelinkQueue>,
) -> io::Result<Taken> {
    let linked = Index::load(base_manifest);
    let mut taken = Taken::default();
    fs::create_dir(dest)?;
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in fs::read_dir(base.join(&rel))? {
            let e = e?;
            let rel = rel.join(e.file_name());
            let (from, to) = (base.join(&rel), dest.join(&rel));
            let kind = e.file_type()?;
            if kind.is_dir() {
                fs::create_dir(&to)?;
                dirs.push(rel);
            } else if kind.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            } else {
                taken.files += 1;
                match fs::hard_link(&from, &to) {
                    Ok(()) => taken.linked += 1,
                    Err(_) => {
                        fs::copy(&from, &to)?;
                        taken.copied += 1;
                        continue;
                    }
                }
                let Some(q) = relinks else { continue };
                if let Some(p) = rel.to_str().and_then(|r| RelPath::new(r).ok())
                    && let Some(c) = linked.entries.get(&p)
                    && let Ok(st) = Stat::lstat(&p.to_fs(mirror_root))
                    && st.ino == c.ino
                {
                    queue_relink(q, p, st);
                }
            }
        }
    }
    save_manifest(&linked.encode(), manifest)?;
    Ok(taken)
}

/// What a [`Spare`] holds at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    Dir,
    Symlink(String),
    /// A link to (or, across filesystems, a copy of) the mirror file with
    /// this inode.
    File {
        ino: u64,
    },
}

/// A snapshot prepared ahead of the next submit, off the state lock: a
/// hard-linked tree of a recent state of the mirror. Taking it brings it up
/// to the mirror's current tree (usually a handful of paths, compared in
/// memory against the stat cache) and renames it into place, instead of one
/// `link()` per file while the submit waits: 0.45 s for 20,000 files here.
///
/// A held file is current when the mirror's file still has the inode the
/// spare linked: the agent never writes a mirror file in place, so the same
/// inode is the same content (a job's in-place write into a shared inode is
/// noticed when it ends, and spares are dropped then).
#[derive(Debug)]
pub struct Spare {
    dir: PathBuf,
    held: BTreeMap<RelPath, Held>,
    /// The [`Tree::stamp`] of the tree it was built from.
    stamp: u64,
    /// Every entry of that tree is held.
    complete: bool,
    /// That tree's stat cache was written next to the spare (see
    /// [`Spare::manifest_path`]): the manifest of a job that takes the spare
    /// while the mirror's tree still has the same stamp.
    manifest_written: bool,
}

impl Spare {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the spare at `dir` keeps its manifest: `dir` with `.index`
    /// appended (deleted with it).
    pub fn manifest_path(dir: &Path) -> PathBuf {
        let mut p = dir.as_os_str().to_owned();
        p.push(".index");
        PathBuf::from(p)
    }
}

/// One entry of the mirror's tree, as copied under the lock for a spare.
pub type Planned = (RelPath, Node);

/// The mirror's tree, to build a spare from outside the lock (a clone shares
/// its directories' lists until the mirror changes one).
pub fn plan(mirror: &Mirror) -> Tree {
    mirror.tree.clone()
}

/// Builds a spare of `plan` at `dir` (which must not exist) from the mirror
/// files under `mirror_root`, without any lock: a path the mirror replaced or
/// removed meanwhile is held as found, or not at all, and [`take_spare`]
/// corrects it. The stat of each linked mirror inode after its link goes to
/// `relinks`, for [`Mirror::relinked`].
pub fn build(
    plan: Tree,
    mirror_root: &Path,
    dir: &Path,
    relinks: &RelinkQueue,
) -> io::Result<Spare> {
    fs::create_dir(dir)?;
    let mut held = BTreeMap::new();
    for (p, n) in plan.iter() {
        let to = p.to_fs(dir);
        if p.parent().is_some_and(|d| held.get(&d) != Some(&Held::Dir)) {
            continue; // under a directory that could not be made
        }
        match n {
            Node::Dir => {
                if fs::create_dir(&to).is_ok() {
                    held.insert(p, Held::Dir);
                }
            }
            Node::Symlink { target } => {
                if std::os::unix::fs::symlink(&target, &to).is_ok() {
                    held.insert(p, Held::Symlink(target));
                }
            }
            Node::File { .. } => {
                let from = p.to_fs(mirror_root);
                match fs::hard_link(&from, &to) {
                    Ok(()) => {
                        let st = Stat::lstat(&to)?;
                        held.insert(p.clone(), Held::File { ino: st.ino });
                        queue_relink(relinks, p, st);
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => {
                        // Another filesystem or the link limit: a copy, of
                        // the inode that was opened.
                        let mut src = fs::File::open(&from)?;
                        let ino = std::os::unix::fs::MetadataExt::ino(&src.metadata()?);
                        let mut out = fs::File::create(&to)?;
                        io::copy(&mut src, &mut out)?;
                        out.set_permissions(src.metadata()?.permissions())?;
                        held.insert(p, Held::File { ino });
                    }
                }
            }
        }
    }
    let manifest_written =
        save_manifest(&index::encode_tree(&plan), &Spare::manifest_path(dir)).is_ok();
    Ok(Spare {
        dir: dir.to_path_buf(),
        complete: held.len() == plan.len(),
        stamp: plan.stamp(),
        manifest_written,
        held,
    })
}

/// Queued at once, so that a refresh that sees the new ctime finds why.
fn queue_relink(relinks: &RelinkQueue, p: RelPath, st: Stat) {
    relinks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((p, st));
}

/// Deletes a job tree that shared `mirror_root`'s inodes, per its
/// `manifest`: each unlink moves a mirror inode's ctime, so the mirror file's
/// stat is queued right after (see [`Mirror::relinks`]) and the next refresh
/// does not rehash the whole mirror.
pub fn delete_relinking(
    tree: &Path,
    manifest: &Path,
    mirror_root: &Path,
    relinks: &RelinkQueue,
) -> io::Result<()> {
    for (p, c) in Index::load(manifest).entries {
        if fs::remove_file(p.to_fs(tree)).is_ok()
            && let Ok(st) = Stat::lstat(&p.to_fs(mirror_root))
            && st.ino == c.ino
        {
            queue_relink(relinks, p, st);
        }
    }
    fs::remove_dir_all(tree)
}

/// Like [`take`], from a spare: removes what the spare holds that the mirror
/// no longer has, adds what it lacks, and renames it to `dest`.
pub fn take_spare(
    mirror: &mut Mirror,
    spare: Spare,
    dest: &Path,
    manifest: &Path,
) -> io::Result<Taken> {
    let Spare {
        dir,
        mut held,
        stamp,
        complete,
        manifest_written,
    } = spare;
    let built_manifest = Spare::manifest_path(&dir);
    if complete && manifest_written && stamp == mirror.tree.stamp() {
        // Nothing changed since the tree the spare was built from: it holds
        // exactly the mirror's tree, and that tree's stat cache is the
        // manifest (a ctime a relink moved since is no matter to it).
        fs::rename(&dir, dest)?;
        fs::rename(&built_manifest, manifest)?;
        let files = mirror.tree.files();
        tracing::debug!("snapshot taken from a spare of the current tree");
        return Ok(Taken {
            files,
            linked: files,
            copied: 0,
            from_spare: Some(held.len() as u64),
        });
    }
    let _ = fs::remove_file(&built_manifest);
    let current = |p: &RelPath, h: &Held| match (h, mirror.tree.get(p)) {
        (Held::Dir, Some(Node::Dir)) => true,
        (Held::Symlink(t), Some(Node::Symlink { target })) => *t == target,
        (Held::File { ino }, Some(Node::File { .. })) => {
            mirror.tree.hashed(p).is_some_and(|c| c.seen.ino == *ino)
        }
        _ => false,
    };
    let stale: Vec<RelPath> = held
        .iter()
        .filter(|(p, h)| !current(p, h))
        .map(|(p, _)| p.clone())
        .collect();
    // Deepest first: what a stale directory holds is stale too.
    for p in stale.iter().rev() {
        let at = p.to_fs(&dir);
        let gone = match held.remove(p) {
            Some(Held::Dir) => fs::remove_dir_all(&at),
            _ => fs::remove_file(&at),
        };
        match gone {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let missing: Vec<Planned> = mirror
        .tree
        .iter()
        .filter(|(p, _)| !held.contains_key(p))
        .map(|(p, n)| (p, n.clone()))
        .collect();
    // What is held now is current: every file a link of its mirror file.
    let held_files = held
        .values()
        .filter(|h| matches!(h, Held::File { .. }))
        .count() as u64;
    let mut taken = Taken {
        files: held_files,
        linked: held_files,
        from_spare: Some(held.len() as u64),
        ..Taken::default()
    };
    let mut linked = Index::default();
    for (p, n) in &missing {
        add(mirror, &dir, p, n, &mut taken, &mut linked)?;
    }
    fs::rename(&dir, dest)?;
    // The snapshot is the mirror's tree, so its manifest is the tree's stat
    // cache: a file `add` had to copy is in it too, harmlessly (another
    // inode: `modified_in_place` and `affected` match inodes).
    save_manifest(&index::encode_tree(&mirror.tree), manifest)?;
    tracing::debug!(
        stale = stale.len(),
        added = missing.len(),
        "snapshot taken from a spare"
    );
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
/// (chunks from the agent's store, or a mirror file of one chunk), breaking
/// the shared link. False when a chunk is not available (yet: the daemon
/// resends it when it repairs the mirror).
pub fn restore(st: &mut State, tree: &Path, path: &RelPath, want: &Cached) -> io::Result<bool> {
    let State { store, mirrors } = st;
    let dest = path.to_fs(tree);
    let tmp = dest.with_file_name(format!(".{}.bridge-restore", path.name()));
    let mut files = FileCache::default();
    let mut out = fs::File::create(&tmp)?;
    for r in want.chunks.iter() {
        let body = store
            .read(&r.id, &mut files)
            .or_else(|| whole_in_mirrors(mirrors, path, r));
        match body {
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

/// Chunk `r` from a mirror file of one chunk, which the store keeps no
/// location for: the file at `path` (the one the daemon repairs), else any
/// file with that content. Checked against its id.
fn whole_in_mirrors(
    mirrors: &HashMap<String, Mirror>,
    path: &RelPath,
    r: &ChunkRef,
) -> Option<Vec<u8>> {
    let holds = |m: &Mirror, p: &RelPath| {
        m.tree
            .hashed(p)
            .is_some_and(|h| h.is_one_chunk() && h.hash == r.id)
    };
    let at = mirrors
        .values()
        .find(|m| holds(m, path))
        .map(|m| path.to_fs(&m.root))
        .or_else(|| {
            mirrors.values().find_map(|m| {
                let (p, _) = m
                    .tree
                    .hashed_files()
                    .find(|(_, h)| h.is_one_chunk() && h.hash == r.id)?;
                Some(p.to_fs(&m.root))
            })
        })?;
    let body = fs::read(at).ok()?;
    (body.len() == r.len as usize && chunk_id(&body) == r.id).then_some(body)
}

/// Files of the snapshot at `tree` that still share their inode with the
/// snapshot-time file but whose content changed: written in place by the job.
///
/// One `lstat` per file of the job, between the job's end and its record's
/// (what `bridge run` waits for): each directory is opened once and its
/// files stat'ed by name, by up to [`CHECK_THREADS`] threads (20,000 files:
/// 60 ms by path on one thread before).
pub fn modified_in_place(tree: &Path, manifest: &Path) -> Vec<Damage> {
    let mut linked: Vec<(RelPath, Cached)> = Vec::new();
    Index::visit(manifest, |p, c| linked.push((p, c)));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(CHECK_THREADS)
        .min(linked.len().div_ceil(CHECK_PER_THREAD))
        .max(1);
    let part = linked.len().div_ceil(threads).max(1);
    let mut out: Vec<Damage> = std::thread::scope(|s| {
        let parts: Vec<_> = linked
            .chunks(part)
            .map(|part| s.spawn(move || changed_of(tree, part)))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Most threads [`modified_in_place`] uses.
const CHECK_THREADS: usize = 8;
/// Fewest files worth a thread of their own.
const CHECK_PER_THREAD: usize = 2_000;

/// [`modified_in_place`] of some of the files: each directory opened once
/// while its files follow one another (the manifest's order).
fn changed_of(tree: &Path, linked: &[(RelPath, Cached)]) -> Vec<Damage> {
    use nix::fcntl::{AtFlags, OFlag, open};
    use nix::sys::stat::{Mode, fstatat};
    let mut out = Vec::new();
    let mut dir: Option<(&str, Option<std::os::fd::OwnedFd>)> = None;
    for (p, c) in linked {
        let (parent, name) = p.as_str().rsplit_once('/').unwrap_or(("", p.as_str()));
        if dir.as_ref().is_none_or(|(d, _)| *d != parent) {
            let fd = open(
                &tree.join(parent),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            );
            dir = Some((parent, fd.ok()));
        }
        let Some((_, Some(fd))) = &dir else { continue };
        let Ok(st) = fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let st = Stat::from_raw(&st);
        if st.ino == c.ino && (st.size != c.size || st.mtime_ns != c.mtime_ns) {
            out.push(Damage {
                path: p.clone(),
                ino: c.ino,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;

    /// What a tree on disk holds: kind, content or target, mode, and inode.
    fn listing(dir: &Path) -> BTreeMap<String, (String, u32, u64)> {
        fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, (String, u32, u64)>) {
            for e in fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let m = fs::symlink_metadata(&p).unwrap();
                let what = if m.is_dir() {
                    walk(root, &p, out);
                    "dir".to_string()
                } else if m.file_type().is_symlink() {
                    format!("-> {}", fs::read_link(&p).unwrap().display())
                } else {
                    fs::read_to_string(&p).unwrap()
                };
                let ino = if m.is_file() { m.ino() } else { 0 };
                out.insert(rel, (what, m.mode() & 0o111, ino));
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    /// Writes a mirror file the way the agent does: a new file renamed over.
    fn replace(path: &Path, text: &str) {
        let tmp = path.with_extension("bridge-tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    /// A mirror `m` under `d` of three files in nested directories, an
    /// empty directory and a symlink.
    fn small_mirror(d: &Path) -> (Mirror, PathBuf) {
        let mut store = Store::open(&d.join("store"), 1 << 20).unwrap();
        let m = d.join("mirrors/m");
        for (p, text) in [("a.py", "a"), ("pkg/b.py", "b"), ("pkg/deep/c.py", "c")] {
            fs::create_dir_all(m.join(p).parent().unwrap()).unwrap();
            fs::write(m.join(p), text).unwrap();
        }
        fs::create_dir_all(m.join("empty")).unwrap();
        std::os::unix::fs::symlink("a.py", m.join("link")).unwrap();
        (Mirror::open(d, "m", &mut store).unwrap(), m)
    }

    /// Every file of the job's `tree` is a link to the mirror's at `m`, and
    /// its `manifest` (of `files` entries) knows it: an in-place write into
    /// `written` is noticed through it.
    fn manifest_links_the_mirror(
        m: &Path,
        tree: &Path,
        manifest: &Path,
        files: usize,
        written: &str,
    ) {
        let linked = Index::load(manifest);
        assert_eq!(linked.entries.len(), files);
        for (p, c) in &linked.entries {
            assert_eq!(c.ino, fs::metadata(p.to_fs(m)).unwrap().ino(), "{p}");
        }
        fs::OpenOptions::new()
            .append(true)
            .open(tree.join(written))
            .unwrap()
            .write_all(b" and more")
            .unwrap();
        let damaged = modified_in_place(tree, manifest);
        assert_eq!(damaged.len(), 1);
        assert_eq!(damaged[0].path.as_str(), written);
    }

    #[test]
    fn a_spare_brought_up_to_date_equals_a_fresh_snapshot() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        for (p, text) in [
            ("same.py", "same"),
            ("edited.py", "old"),
            ("gone.py", "gone"),
            ("becomes_dir", "file first"),
            ("pkg/a.py", "a"),
            ("pkg/old/b.py", "b"),
            ("run.sh", "#!/bin/sh"),
        ] {
            fs::create_dir_all(m.join(p).parent().unwrap()).unwrap();
            fs::write(m.join(p), text).unwrap();
        }
        std::os::unix::fs::symlink("same.py", m.join("link")).unwrap();
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();

        let relinks = RelinkQueue::default();
        let spare = build(plan(&mirror), &m, &d.path().join("spare"), &relinks).unwrap();
        assert_eq!(
            relinks.lock().unwrap().len(),
            7,
            "every linked file's stat is queued for the mirror's stat cache"
        );

        // The mirror moves on: an edit, a deletion, a file that becomes a
        // directory, a directory that goes, a new file, a new symlink target,
        // an exec bit.
        replace(&m.join("edited.py"), "new");
        fs::remove_file(m.join("gone.py")).unwrap();
        fs::remove_file(m.join("becomes_dir")).unwrap();
        fs::create_dir(m.join("becomes_dir")).unwrap();
        fs::write(m.join("becomes_dir/inner.py"), "inner").unwrap();
        fs::remove_dir_all(m.join("pkg/old")).unwrap();
        fs::write(m.join("pkg/new.py"), "new file").unwrap();
        fs::remove_file(m.join("link")).unwrap();
        std::os::unix::fs::symlink("pkg/a.py", m.join("link")).unwrap();
        fs::set_permissions(m.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        mirror.refresh(&mut store).unwrap();

        let from_spare = d.path().join("job1/tree");
        fs::create_dir_all(d.path().join("job1")).unwrap();
        let taken = take_spare(
            &mut mirror,
            spare,
            &from_spare,
            &d.path().join("job1/index"),
        )
        .unwrap();
        let fresh = d.path().join("job2/tree");
        fs::create_dir_all(d.path().join("job2")).unwrap();
        take(&mut mirror, &fresh, &d.path().join("job2/index")).unwrap();

        let (got, want) = (listing(&from_spare), listing(&fresh));
        assert_eq!(got, want, "same entries, contents, modes and inodes");
        assert_eq!(got["edited.py"].0, "new");
        assert_eq!(got["link"].0, "-> pkg/a.py");
        assert_eq!(got["run.sh"].1, 0o111);
        assert!(!d.path().join("spare").exists(), "the spare was renamed");
        assert_eq!((taken.files, taken.copied), (6, 0));
        manifest_links_the_mirror(&m, &from_spare, &d.path().join("job1/index"), 6, "same.py");
        assert!(
            !Spare::manifest_path(&d.path().join("spare")).exists(),
            "the manifest built with the spare was for another tree: deleted"
        );
    }

    #[test]
    fn a_spare_of_the_current_tree_is_taken_whole_with_its_manifest() {
        let d = tempfile::tempdir().unwrap();
        let (mut mirror, m) = small_mirror(d.path());
        let relinks = RelinkQueue::default();
        let spare_dir = d.path().join("spare");
        let spare = build(plan(&mirror), &m, &spare_dir, &relinks).unwrap();
        assert!(Spare::manifest_path(&spare_dir).exists());
        // Only ctimes moved since (the links themselves, applied).
        mirror.apply_relinks();

        fs::create_dir_all(d.path().join("job1")).unwrap();
        let (tree, index) = (d.path().join("job1/tree"), d.path().join("job1/index"));
        let taken = take_spare(&mut mirror, spare, &tree, &index).unwrap();
        assert_eq!((taken.files, taken.linked, taken.copied), (3, 3, 0));
        assert!(!spare_dir.exists() && !Spare::manifest_path(&spare_dir).exists());
        let fresh = d.path().join("job2/tree");
        fs::create_dir_all(d.path().join("job2")).unwrap();
        take(&mut mirror, &fresh, &d.path().join("job2/index")).unwrap();
        assert_eq!(listing(&tree), listing(&fresh), "same entries and inodes");
        manifest_links_the_mirror(&m, &tree, &index, 3, "pkg/b.py");
    }

    #[test]
    fn a_tree_made_from_a_snapshot_shares_its_inodes_and_notices_in_place_writes() {
        let d = tempfile::tempdir().unwrap();
        let (mut mirror, m) = small_mirror(d.path());
        fs::create_dir_all(d.path().join("base")).unwrap();
        let (base, base_index) = (d.path().join("base/tree"), d.path().join("base/index"));
        take(&mut mirror, &base, &base_index).unwrap();
        // The mirror moves on; a trial made later still gets the base's tree.
        replace(&m.join("a.py"), "new");
        fs::create_dir_all(d.path().join("t1")).unwrap();
        let (tree, index) = (d.path().join("t1/tree"), d.path().join("t1/index"));
        let relinks = RelinkQueue::default();
        let taken = take_from(&base, &base_index, &tree, &index, &m, Some(&relinks)).unwrap();
        assert_eq!((taken.files, taken.linked, taken.copied), (3, 3, 0));
        assert_eq!(listing(&tree), listing(&base), "same entries and inodes");
        assert_eq!(fs::read_to_string(tree.join("a.py")).unwrap(), "a");
        assert_eq!(
            relinks.lock().unwrap().len(),
            2,
            "the stats of the two mirror files it still shares"
        );
        // An in-place write is noticed through the copied manifest, and the
        // base it damaged is found to share it.
        fs::OpenOptions::new()
            .append(true)
            .open(tree.join("pkg/b.py"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        let damage = modified_in_place(&tree, &index);
        assert_eq!(damage.len(), 1);
        let hit = affected(&base, &base_index, &damage);
        assert_eq!(hit.len(), 1);
        assert_eq!(hit[0].0.as_str(), "pkg/b.py");
    }

    #[test]
    fn in_place_writes_are_found_among_many_files_by_every_thread() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        // More files than one thread takes, in directories whose files the
        // manifest's order splits ("d/c.txt", "d/c/…", "d/e.txt").
        let mut paths = Vec::new();
        for i in 0..30 {
            for name in ["c.txt", "c/x.py", "c/y/z.py", "e.txt"] {
                for j in 0..20 {
                    paths.push(format!("d{i}/{j}{name}"));
                }
            }
        }
        paths.push("top.py".into());
        for p in &paths {
            fs::create_dir_all(m.join(p).parent().unwrap()).unwrap();
            fs::write(m.join(p), p).unwrap();
        }
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        fs::create_dir_all(d.path().join("job")).unwrap();
        let (tree, index) = (d.path().join("job/tree"), d.path().join("job/index"));
        take(&mut mirror, &tree, &index).unwrap();
        assert!(paths.len() > CHECK_PER_THREAD, "two threads");
        let written = [
            "d0/0c.txt",
            "d7/3c/y/z.py",
            "d21/19e.txt",
            "d29/19e.txt",
            "top.py",
        ];
        for p in written {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(tree.join(p))
                .unwrap();
            f.write_all(b"!").unwrap();
        }
        // Replaced (a new inode) or removed: not written in place.
        fs::remove_file(tree.join("d3/1c.txt")).unwrap();
        fs::write(tree.join("d3/1c.txt"), "new").unwrap();
        fs::remove_file(tree.join("d4/2e.txt")).unwrap();
        fs::remove_dir_all(tree.join("d5")).unwrap();
        let found: Vec<String> = modified_in_place(&tree, &index)
            .iter()
            .map(|d| d.path.as_str().to_string())
            .collect();
        let mut want: Vec<String> = written.iter().map(|p| p.to_string()).collect();
        want.sort();
        assert_eq!(found, want);
    }

    #[test]
    fn linking_and_unlinking_snapshots_costs_the_mirror_no_rehash() {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("store"), 1 << 20).unwrap();
        let m = d.path().join("mirrors/m");
        fs::create_dir_all(m.join("src")).unwrap();
        for i in 0..20 {
            fs::write(m.join(format!("src/f{i}.py")), format!("{i}")).unwrap();
        }
        // Out of the racy window: a file hashed within 2 s of its last
        // change is rehashed by every refresh anyway.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let mut mirror = Mirror::open(d.path(), "m", &mut store).unwrap();
        let hashed = mirror.files_hashed;

        // A spare built without the lock, then a job tree deleted: both move
        // the shared inodes' ctime; the queued stats keep the cache right.
        let spare = build(plan(&mirror), &m, &d.path().join("spare"), &mirror.relinks).unwrap();
        fs::create_dir_all(d.path().join("job")).unwrap();
        let tree = d.path().join("job/tree");
        let manifest = d.path().join("job/index");
        take_spare(&mut mirror, spare, &tree, &manifest).unwrap();
        // ctime has a coarse clock on some file systems: let it tick.
        std::thread::sleep(std::time::Duration::from_millis(20));
        delete_relinking(&tree, &manifest, &m, &mirror.relinks).unwrap();
        assert!(!tree.exists());
        mirror.refresh(&mut store).unwrap();
        assert_eq!(mirror.files_hashed, hashed, "no file was rehashed");

        // Without the queued stats, the same deletion costs a rehash of all.
        let spare = build(plan(&mirror), &m, &d.path().join("spare2"), &mirror.relinks).unwrap();
        mirror.refresh(&mut store).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::remove_dir_all(spare.dir()).unwrap();
        mirror.refresh(&mut store).unwrap();
        assert_eq!(mirror.files_hashed, hashed + 20);
    }
}
