//! One sync round on the wire: `Begin`, plans in batches (the next one sent
//! before the agent's `Need` for the last arrives), the chunk bodies each batch
//! needs — read again from the files and verified — then `Commit` and `Done`.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bridge_proto::chunking::chunk_id;
use bridge_proto::path::RelPath;
use bridge_proto::scan::Stat;
use bridge_proto::tree::{Node, Seen};
use bridge_proto::v1::{self, sync_down, sync_up};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status as GrpcStatus;

use super::compress::Adaptive;
use super::plan::PlannedOp;
use super::{Engine, Progress, SyncError, rpc};

/// Ops per plan message.
const PLAN_OPS: usize = 1024;
/// Chunk refs per plan message (keeps messages well under the size limit).
const PLAN_CHUNKS: usize = 64 * 1024;

/// A save synced at once (`Engine::eager`) whose round puts at most this many
/// bytes goes eager (see `Plan.eager` in agent.proto): its bodies follow the
/// plan without waiting for the agent's `Need`, so an edit lands one trip
/// after it left instead of three (issue 25: 164 ms over a link of 50 ms each
/// way). What it may cost is bodies the agent already holds (a file copied or
/// put back): at most this much per burst, 21 ms at 100 Mbit/s, less than the
/// round trip it saves on any link worth saving it on.
const EAGER_BYTES: u64 = 256 * 1024;

/// Messages [`send_bodies`] hands to the stream's task at once, at most: it
/// wakes once per batch instead of once per chunk body (a cold sync of small
/// files sends one body per file).
const OUT_BATCH_MSGS: usize = 128;
/// Bytes of messages in one hand-over, at most (plus the last message's).
const OUT_BATCH_BYTES: usize = 256 * 1024;
/// Hand-overs queued towards the stream, at most.
const OUT_BATCHES: usize = 4;

/// Whether a batch can go eager: it puts something, and no put is a splice.
fn is_eager(batch: &[PlannedOp]) -> bool {
    let puts = || {
        batch.iter().filter_map(|op| match op {
            PlannedOp::Put { chunks, splice, .. } => Some((chunks, splice)),
            _ => None,
        })
    };
    puts().any(|(c, _)| !c.is_empty()) && puts().all(|(_, s)| s.is_none())
}

/// Counts what a round puts on the wire.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) bytes: AtomicU64,
    pub(super) chunks: AtomicU64,
}

impl Engine {
    /// One sync round. Returns the agent's root and the puts skipped because
    /// the local file changed while it was read.
    pub(super) async fn round(
        &mut self,
        ops: Vec<PlannedOp>,
    ) -> Result<(bridge_proto::chunking::Hash, Vec<RelPath>), SyncError> {
        self.generation += 1;
        let generation = self.generation;
        let files_total = ops.len() as u64;
        let bytes_total: u64 = ops
            .iter()
            .map(|o| match o {
                PlannedOp::Put {
                    node: Node::File { size, .. },
                    ..
                } => *size,
                _ => 0,
            })
            .sum();
        self.shared.progress.send_modify(|p| {
            p.phase = "syncing".into();
            p.files_done = 0;
            p.files_total = files_total;
            p.bytes_done = 0;
            p.bytes_total = bytes_total;
        });
        let mut client = self.client()?;
        let (tx, rx) = mpsc::channel::<Vec<v1::SyncUp>>(OUT_BATCHES);
        let counters = self.counters.clone();
        let send = Sender { tx, counters };
        send.send(sync_up::Msg::Begin(v1::Begin {
            mirror: self.repo.mirror.clone(),
            generation,
        }))
        .await?;
        // Split into plan batches.
        let mut batches: Vec<Vec<PlannedOp>> = Vec::new();
        let mut cur = Vec::new();
        let mut cur_chunks = 0usize;
        for op in ops {
            let n = match &op {
                PlannedOp::Put { chunks, .. } => chunks.len(),
                _ => 0,
            };
            if !cur.is_empty() && (cur.len() >= PLAN_OPS || cur_chunks + n > PLAN_CHUNKS) {
                batches.push(std::mem::take(&mut cur));
                cur_chunks = 0;
            }
            cur_chunks += n;
            cur.push(op);
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        let eager =
            self.eager && batches.len() == 1 && bytes_total <= EAGER_BYTES && is_eager(&batches[0]);
        let plan_msg = |b: &Vec<PlannedOp>| {
            sync_up::Msg::Plan(v1::Plan {
                ops: b.iter().map(PlannedOp::to_wire).collect(),
                eager,
            })
        };
        if let Some(b) = batches.first() {
            send.send(plan_msg(b)).await?;
        }
        let compression = self.compression.clone();
        if let Some(c) = &compression {
            c.lock().expect("compression state poisoned").new_round();
        }
        let mut skipped_all = Vec::new();
        let mut applied: Vec<PlannedOp> = Vec::new();
        // An eager plan's bodies follow it at once, queued by a thread while
        // the call starts.
        let bodies = eager.then(|| {
            let batch = std::mem::take(&mut batches[0]);
            let all = v1::Need {
                ops: batch
                    .iter()
                    .map(|op| v1::OpNeed {
                        chunks: match op {
                            PlannedOp::Put { chunks, .. } => (0..chunks.len() as u32).collect(),
                            _ => Vec::new(),
                        },
                    })
                    .collect(),
            };
            let root = self.repo.root.clone();
            let s = send.clone();
            let progress = self.shared.progress.clone();
            let compression = compression.clone();
            tokio::task::spawn_blocking(move || {
                let mut c = compression
                    .as_ref()
                    .map(|c| c.lock().expect("compression state poisoned"));
                send_bodies(&root, &batch, &all, &s, c.as_deref_mut(), &progress)
                    .map(|sk| (batch, sk))
            })
        });
        // Begin and the first plan (and an eager plan's bodies) are queued
        // before the call starts, so they leave with the request headers: one
        // round trip less per round on a slow link than waiting for the reply
        // headers first.
        let mut down = client
            .sync(Unbatch {
                rx,
                batch: Vec::new().into_iter(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        if let Some(task) = bodies {
            let (batch, sk) = task
                .await
                .map_err(|e| SyncError::Protocol(e.to_string()))??;
            applied.extend(batch.into_iter().filter(|op| !sk.contains(op.path())));
            skipped_all.extend(sk);
            batches.clear();
        }
        for k in 0..batches.len() {
            if let Some(next) = batches.get(k + 1) {
                send.send(plan_msg(next)).await?;
            }
            let need = match down.message().await.map_err(rpc)? {
                Some(v1::SyncDown {
                    msg: Some(sync_down::Msg::Need(n)),
                }) => n,
                other => return Err(SyncError::Protocol(format!("expected Need, got {other:?}"))),
            };
            if need.ops.len() != batches[k].len() {
                return Err(SyncError::Protocol("Need does not match the plan".into()));
            }
            let batch = std::mem::take(&mut batches[k]);
            let root = self.repo.root.clone();
            let s = send.clone();
            let progress = self.shared.progress.clone();
            let compression = compression.clone();
            let (batch, sk) = tokio::task::spawn_blocking(move || {
                let mut c = compression
                    .as_ref()
                    .map(|c| c.lock().expect("compression state poisoned"));
                send_bodies(&root, &batch, &need, &s, c.as_deref_mut(), &progress)
                    .map(|sk| (batch, sk))
            })
            .await
            .map_err(|e| SyncError::Protocol(e.to_string()))??;
            for op in batch {
                if !sk.contains(op.path()) {
                    applied.push(op);
                }
            }
            skipped_all.extend(sk);
        }
        send.send(sync_up::Msg::Commit(v1::Commit { generation }))
            .await?;
        let done = match down.message().await.map_err(rpc)? {
            Some(v1::SyncDown {
                msg: Some(sync_down::Msg::Done(d)),
            }) => d,
            other => return Err(SyncError::Protocol(format!("expected Done, got {other:?}"))),
        };
        let failed: BTreeSet<String> = done.failures.iter().map(|f| f.path.clone()).collect();
        for f in &done.failures {
            tracing::warn!(path = %f.path, error = %f.message, "agent could not apply");
        }
        let agent_root = bridge_proto::chunking::hash_from_bytes(&done.root)
            .ok_or_else(|| SyncError::Protocol("Done without a root".into()))?;
        // When the agent holds exactly the local tree, the belief becomes a
        // clone sharing its lists (below) instead of a copy with the ops
        // applied: the belief is half the daemon's memory otherwise.
        let share = failed.is_empty() && agent_root == self.local().tree.root();
        let mut sent = Vec::new();
        for op in &applied {
            if !failed.contains(op.path().as_str()) {
                if !share {
                    op.apply_to(&mut self.remote);
                }
                if let PlannedOp::Put { path, .. } = op {
                    sent.push(path.clone());
                }
            }
        }
        if !sent.is_empty() && !self.local().previous.is_empty() {
            let local = self.local.as_mut().expect("local tree is home");
            for p in &sent {
                local.forget_previous(p);
            }
        }
        self.remote_root = Some(agent_root);
        if share {
            self.remote = self.local().tree.clone();
        }
        self.shared.progress.send_modify(|p| {
            p.files_done = files_total;
            p.bytes_done = bytes_total;
        });
        if !failed.is_empty() {
            // The agent's state for those paths is unknown: ask it.
            self.fetch_manifest().await?;
        }
        let full: Vec<&v1::Failure> = done
            .failures
            .iter()
            .filter(|f| f.no_space_bytes > 0)
            .collect();
        if let Some(first) = full.first() {
            // Sending it again changes nothing until space is freed.
            let needs: u64 = full.iter().map(|f| f.no_space_bytes).sum();
            return Err(SyncError::NoSpace(format!(
                "{} file(s) need {} ({}); free space on the agent and sync again (the daemon retries meanwhile)",
                full.len(),
                bridge_proto::human_bytes(needs),
                first.message
            )));
        }
        Ok((agent_root, skipped_all))
    }
}

/// The round's outgoing half: counts bytes as it sends.
#[derive(Clone)]
struct Sender {
    tx: mpsc::Sender<Vec<v1::SyncUp>>,
    counters: Arc<Counters>,
}

fn stream_closed<T>(_: T) -> SyncError {
    SyncError::Rpc(GrpcStatus::unavailable("the agent closed the sync stream"))
}

impl Sender {
    fn counted(&self, msg: sync_up::Msg) -> (v1::SyncUp, usize) {
        let m = v1::SyncUp { msg: Some(msg) };
        let len = m.encoded_len();
        self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
        (m, len)
    }

    async fn send(&self, msg: sync_up::Msg) -> Result<(), SyncError> {
        let (m, _) = self.counted(msg);
        self.tx.send(vec![m]).await.map_err(stream_closed)
    }
}

/// Messages queued by a blocking thread and handed to the stream in batches
/// ([`OUT_BATCH_MSGS`]); [`Outbox::flush`] before anything waits on the agent.
struct Outbox<'a> {
    tx: &'a Sender,
    msgs: Vec<v1::SyncUp>,
    bytes: usize,
}

impl<'a> Outbox<'a> {
    fn new(tx: &'a Sender) -> Self {
        Outbox {
            tx,
            msgs: Vec::new(),
            bytes: 0,
        }
    }

    /// Queues `msg`; true when that handed the queue over.
    fn push(&mut self, msg: sync_up::Msg) -> Result<bool, SyncError> {
        let (m, len) = self.tx.counted(msg);
        self.msgs.push(m);
        self.bytes += len;
        let full = self.msgs.len() >= OUT_BATCH_MSGS || self.bytes >= OUT_BATCH_BYTES;
        if full {
            self.flush()?;
        }
        Ok(full)
    }

    fn flush(&mut self) -> Result<(), SyncError> {
        if self.msgs.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        self.tx
            .tx
            .blocking_send(std::mem::take(&mut self.msgs))
            .map_err(stream_closed)
    }
}

/// The round's messages one by one, out of the batches [`Sender`] queued.
struct Unbatch {
    rx: mpsc::Receiver<Vec<v1::SyncUp>>,
    batch: std::vec::IntoIter<v1::SyncUp>,
}

impl tokio_stream::Stream for Unbatch {
    type Item = v1::SyncUp;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<v1::SyncUp>> {
        loop {
            if let Some(m) = self.batch.next() {
                return std::task::Poll::Ready(Some(m));
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(b) => self.batch = b.into_iter(),
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// Sends the chunk bodies one batch needs, reading them from the files again.
/// A file whose bytes no longer match its chunk list (it changed after it was
/// hashed) gets a `SkipOp` and is returned for a rescan. A body read while the
/// file still has the trusted stat it was hashed under (`fstat` after the
/// read) is the hashed one; others are checked against their ids. Rehashing
/// every body cost the daemon ~8% of an initial sync's CPU (perf, scenario
/// 1), and the agent checks every id anyway.
fn send_bodies(
    root: &Path,
    batch: &[PlannedOp],
    need: &v1::Need,
    tx: &Sender,
    mut compression: Option<&mut Adaptive>,
    progress: &watch::Sender<Progress>,
) -> Result<Vec<RelPath>, SyncError> {
    let mut skipped = Vec::new();
    let mut out = Outbox::new(tx);
    // Progress not yet shown: published with each hand-over (a watch
    // update per file woke its readers 50,000 times in a cold sync).
    let (mut files, mut bytes) = (0u64, 0u64);
    let publish = |files: &mut u64, bytes: &mut u64| {
        if *files > 0 {
            progress.send_modify(|p| {
                p.files_done += std::mem::take(files);
                p.bytes_done += std::mem::take(bytes);
            });
        }
    };
    for (op, n) in batch.iter().zip(&need.ops) {
        let PlannedOp::Put {
            path,
            chunks,
            node,
            seen,
            ..
        } = op
        else {
            files += 1;
            continue;
        };
        if !n.chunks.is_empty() {
            let mut offsets = Vec::with_capacity(chunks.len());
            let mut off = 0u64;
            for c in chunks.iter() {
                offsets.push(off);
                off += c.len as u64;
            }
            let file = File::open(path.to_fs(root));
            // A file stops trying after two chunks that do not compress.
            let mut incompressible = 0;
            for &i in &n.chunks {
                let Some(c) = chunks.get(i as usize) else {
                    return Err(SyncError::Protocol(format!(
                        "agent asked for chunk {i} of {path}"
                    )));
                };
                let mut buf = vec![0u8; c.len as usize];
                let read = file.as_ref().is_ok_and(|f| {
                    f.read_exact_at(&mut buf, offsets[i as usize]).is_ok()
                        && match seen {
                            Some(s) => still_seen(f, s, node),
                            None => chunk_id(&buf) == c.id,
                        }
                });
                if !read {
                    out.push(sync_up::Msg::Skip(v1::SkipOp {}))?;
                    skipped.push(path.clone());
                    break;
                }
                let raw = buf.len() as u64;
                let packed = match compression.as_deref_mut() {
                    Some(a) if incompressible < 2 && a.on() => {
                        let z = a.compress(&buf).filter(|z| z.len() < buf.len() * 9 / 10);
                        incompressible = if z.is_some() { 0 } else { incompressible + 1 };
                        z
                    }
                    _ => None,
                };
                let (how, data) = match packed {
                    Some(z) => (v1::Compression::Zstd, z),
                    None => (v1::Compression::None, buf),
                };
                let handed = out.push(sync_up::Msg::Chunk(v1::ChunkData {
                    id: c.id.as_bytes().to_vec().into(),
                    compression: how as i32,
                    data: data.into(),
                }))?;
                if handed {
                    publish(&mut files, &mut bytes);
                }
                if let Some(a) = compression.as_deref_mut() {
                    a.sent(raw, Instant::now());
                }
                tx.counters.chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        let size = match node {
            Node::File { size, .. } => *size,
            _ => 0,
        };
        files += 1;
        bytes += size;
    }
    out.flush()?;
    publish(&mut files, &mut bytes);
    Ok(skipped)
}

/// True when the open `f` still has the stat its chunk list was hashed under.
fn still_seen(f: &File, s: &Seen, node: &Node) -> bool {
    let Node::File { size, .. } = node else {
        return false;
    };
    f.metadata().is_ok_and(|m| {
        let st = Stat::from_metadata(&m);
        st.size == *size
            && st.mtime_ns == s.mtime_ns
            && st.ctime_ns == s.ctime_ns
            && st.ino == s.ino
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn batched_messages_reach_the_stream_in_order_and_counted() {
        let (tx, rx) = mpsc::channel(OUT_BATCHES);
        let send = Sender {
            tx,
            counters: Arc::new(Counters::default()),
        };
        let chunk = |i: u32| {
            sync_up::Msg::Chunk(v1::ChunkData {
                id: i.to_le_bytes().to_vec().into(),
                compression: 0,
                data: vec![0u8; 3000].into(),
            })
        };
        let s = send.clone();
        // More than a batch holds, by count and by bytes; the last ones are
        // handed over only by the flush.
        let writer = tokio::task::spawn_blocking(move || {
            let mut out = Outbox::new(&s);
            let mut handed = 0;
            for i in 0..1000 {
                handed += usize::from(out.push(chunk(i)).unwrap());
            }
            assert!(!out.msgs.is_empty(), "a partial batch waits for the flush");
            out.flush().unwrap();
            handed
        });
        let counters = send.counters.clone();
        drop(send);
        // The stream ends when the writer's sender is gone.
        let mut stream = Unbatch {
            rx,
            batch: Vec::new().into_iter(),
        };
        let mut ids = Vec::new();
        let mut bytes = 0;
        while let Some(m) = stream.next().await {
            bytes += m.encoded_len() as u64;
            match m.msg {
                Some(sync_up::Msg::Chunk(c)) => {
                    ids.push(u32::from_le_bytes(c.id[..].try_into().unwrap()))
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let handed = writer.await.unwrap();
        assert!(handed >= 1000 / OUT_BATCH_MSGS, "{handed} full batches");
        assert_eq!(ids, (0..1000).collect::<Vec<_>>());
        assert_eq!(counters.bytes.load(Ordering::Relaxed), bytes);
    }

    #[test]
    fn a_file_is_still_seen_until_its_stat_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let st = Stat::lstat(&p).unwrap();
        let seen = Seen {
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
            ino: st.ino,
            racy: false,
        };
        let node = |size| Node::File {
            hash: chunk_id(b"hello"),
            size,
            exec: false,
        };
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        assert!(still_seen(&f, &seen, &node(5)));
        assert!(!still_seen(&f, &seen, &node(6)), "another size");
        assert!(!still_seen(&f, &seen, &Node::Dir));
        // The same length, other bytes, and the old mtime put back: the
        // ctime a clock tick later still tells.
        std::thread::sleep(Duration::from_millis(30));
        f.write_all_at(b"HELLO", 0).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_nanos(st.mtime_ns as u64))
            .unwrap();
        assert_eq!(Stat::lstat(&p).unwrap().mtime_ns, st.mtime_ns);
        assert!(!still_seen(&f, &seen, &node(5)));
        // Another file with every other field equal: its inode tells.
        let q = d.path().join("g");
        std::fs::write(&q, b"hello").unwrap();
        let g = File::open(&q).unwrap();
        let gs = Stat::lstat(&q).unwrap();
        let other = Seen {
            mtime_ns: gs.mtime_ns,
            ctime_ns: gs.ctime_ns,
            ino: gs.ino,
            racy: false,
        };
        assert!(still_seen(&g, &other, &node(5)));
        assert!(!still_seen(
            &g,
            &Seen {
                ino: st.ino,
                ..other
            },
            &node(5)
        ));
    }
}
