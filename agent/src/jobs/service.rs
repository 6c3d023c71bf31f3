//! The `bridge.v1.Jobs` gRPC service: a thin layer over [`Jobs`], with file
//! work on tokio's blocking pool.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bridge_proto::v1::jobs_server::Jobs as JobsRpc;
use bridge_proto::v1::{self, JobInfo};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Jobs;
use crate::joblog;
use crate::service::State;

/// A follower that caught up waits for its job's directory to change (the
/// shim's next write, `exit.json`), and looks again after this long anyway
/// (a job that ends with no shim: cancelled in its queue, lost).
const FOLLOW_WAIT: Duration = Duration::from_millis(50);
/// Without an inotify watch, a follower re-reads the log this often.
const FOLLOW_POLL: Duration = Duration::from_millis(10);
/// After sending part of a running job's log, a follower lets the job write
/// this long before it reads again: a job printing as fast as it can then
/// goes out in chunks of hundreds of KiB instead of one per pipe read (8 KiB
/// for Python), each a wake-up of the agent, the daemon and the CLI. Output
/// after a quiet spell still goes at once: the wait follows a send only.
const FOLLOW_GATHER: Duration = Duration::from_millis(2);
/// A `Hold` looks at its kernel's state and ports this often.
const HOLD_POLL: Duration = Duration::from_millis(20);
/// Upper bound on one log chunk message.
const LOG_CHUNK_BYTES: usize = 1024 * 1024;
/// A long-polling `Outputs` looks for the job's end this often.
const OUTPUTS_POLL: Duration = Duration::from_millis(10);
/// Longest `Outputs` long poll, whatever the daemon asks.
const OUTPUTS_MAX_WAIT: Duration = Duration::from_secs(5);
/// Chunk messages of a whole-file read queued ahead of the connection
/// (~64 KiB each): the file is read while earlier chunks are on the wire.
const WHOLE_READ_AHEAD: usize = 64;
/// Chunks smaller than this go raw even to a reader that accepts zstd: a few
/// lines gain little and a follower's first line should not wait for it.
const COMPRESS_MIN_BYTES: usize = 4 * 1024;

/// Wakes a log follower when its job's directory changes: a write to the
/// log, `exit.json` put in place. It polled every 10 ms before, 5 ms of a
/// job's first line on average (issue 25).
struct DirWake {
    /// `None` when inotify is not available: the follower polls.
    watcher: Option<notify::RecommendedWatcher>,
    rx: mpsc::Receiver<()>,
}

impl DirWake {
    /// Watches the directory of `log`; made before the first read, so no
    /// write after it goes unseen.
    fn new(log: &std::path::Path) -> DirWake {
        use notify::event::{AccessKind, AccessMode};
        use notify::{EventKind, RecursiveMode, Watcher as _};
        // One pending wake is enough: the follower reads everything there is.
        let (tx, rx) = mpsc::channel(1);
        let handler = move |res: notify::Result<notify::Event>| {
            let wakes = match res {
                // Opens and reads (the follower's own among them) change
                // nothing.
                Ok(ev) => match ev.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) => false,
                    _ => true,
                },
                Err(_) => true,
            };
            if wakes {
                let _ = tx.try_send(());
            }
        };
        let watcher = log.parent().and_then(|dir| {
            let mut w = notify::recommended_watcher(handler).ok()?;
            w.watch(dir, RecursiveMode::NonRecursive).ok()?;
            Some(w)
        });
        DirWake { watcher, rx }
    }

    /// Until the directory changes, or [`FOLLOW_WAIT`] (polling:
    /// [`FOLLOW_POLL`]).
    async fn wait(&mut self) {
        if self.watcher.is_none() {
            // (Its sender went with the handler: nothing would ever wake it.)
            return tokio::time::sleep(FOLLOW_POLL).await;
        }
        let _ = tokio::time::timeout(FOLLOW_WAIT, self.rx.recv()).await;
    }
}

#[derive(Clone)]
pub struct JobsService {
    pub jobs: Arc<Jobs>,
    pub state: Arc<Mutex<State>>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Runs `f` on tokio's blocking pool (file work, locks held a while).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
}

/// A chunk as sent. With `zstd` (the reader accepts it), data of at least
/// [`COMPRESS_MIN_BYTES`] is compressed at level 1 when that saves a tenth,
/// like the sync's chunks: log text usually shrinks several times, and every
/// byte saved is one the remote link (an SSH tunnel: encryption, its window)
/// does not carry. Level 1 runs at hundreds of MB/s, above any log rate.
fn to_wire(c: joblog::Chunk, zstd: bool) -> v1::LogChunk {
    let raw_len = c.data.len();
    let packed = (zstd && raw_len >= COMPRESS_MIN_BYTES)
        .then(|| zstd::bulk::compress(&c.data, 1).ok())
        .flatten()
        .filter(|z| z.len() <= raw_len - raw_len / 10);
    let (data, zstd, raw_len) = match packed {
        Some(z) => (z, true, raw_len as u32),
        None => (c.data, false, 0),
    };
    v1::LogChunk {
        stream: c.stream as i32,
        timestamp_ns: c.timestamp_ns,
        data: data.into(),
        next_offset: c.next_offset,
        zstd,
        raw_len,
    }
}

#[tonic::async_trait]
impl JobsRpc for JobsService {
    async fn submit(&self, req: Request<v1::SubmitRequest>) -> Result<Response<JobInfo>, Status> {
        let (jobs, state) = (self.jobs.clone(), self.state.clone());
        let req = req.into_inner();
        blocking(move || jobs.submit(&state, req))
            .await
            .map(Response::new)
    }

    async fn list(&self, req: Request<v1::ListRequest>) -> Result<Response<v1::JobList>, Status> {
        let req = req.into_inner();
        let jobs = self.jobs.list(&req.mirror, req.all, req.unsettled)?;
        Ok(Response::new(v1::JobList { jobs }))
    }

    async fn get(&self, req: Request<v1::JobRef>) -> Result<Response<JobInfo>, Status> {
        self.jobs.get(&req.into_inner().id).map(Response::new)
    }

    type LogsStream = BoxStream<v1::LogChunk>;

    async fn logs(
        &self,
        req: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        let id = Jobs::parse_id(&req.id)?;
        self.jobs.ended(id)?; // NOT_FOUND for an unknown job, before streaming
        let jobs = self.jobs.clone();
        let path = jobs.log_path(id);
        let zstd = req.accept_zstd;
        let (tx, rx) = mpsc::channel::<Result<v1::LogChunk, Status>>(8);
        tokio::spawn(async move {
            let mut offset = req.offset;
            if req.offset == 0 && req.tail_lines > 0 {
                let p = path.clone();
                let lines = req.tail_lines as usize;
                match blocking(move || {
                    joblog::tail_start(&p, lines)
                        .map(|cs| cs.into_iter().map(|c| to_wire(c, zstd)).collect::<Vec<_>>())
                        .map_err(|e| Status::internal(e.to_string()))
                })
                .await
                {
                    Ok(chunks) => {
                        for c in chunks {
                            offset = c.next_offset;
                            if tx.send(Ok(c)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            let mut wake = req.follow.then(|| DirWake::new(&path));
            let mut reader = Some(joblog::LogReader::new(&path));
            loop {
                // Whether the job had ended *before* this read: then an
                // empty read means the log is complete. Its record, not its
                // `exit.json`: the poller appends a line about in-place
                // writes after the shim's last byte, then ends the record
                // (a follower that stopped at `exit.json` missed that line).
                let ended = jobs.ended(id).unwrap_or(true);
                let mut r = reader.take().expect("put back after each read");
                // Read and compress on the blocking pool.
                let read = blocking(move || {
                    let read = r.read_chunks(offset, LOG_CHUNK_BYTES).map(|cs| {
                        let raw = cs.iter().map(|c| c.data.len()).sum::<usize>();
                        (cs.into_iter().map(|c| to_wire(c, zstd)).collect(), raw)
                    });
                    Ok((r, read))
                })
                .await
                .and_then(|(r, read)| {
                    reader = Some(r);
                    read.map_err(|e| Status::internal(e.to_string()))
                });
                let (chunks, raw): (Vec<v1::LogChunk>, usize) = match read {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if chunks.is_empty() {
                    if ended || !req.follow || tx.is_closed() {
                        return;
                    }
                    match wake.as_mut() {
                        Some(w) => w.wait().await,
                        None => tokio::time::sleep(FOLLOW_POLL).await,
                    }
                    continue;
                }
                for c in chunks {
                    offset = c.next_offset;
                    if tx.send(Ok(c)).await.is_err() {
                        return;
                    }
                }
                // A full read: more is waiting, read on. Otherwise gather.
                if req.follow && !ended && raw < LOG_CHUNK_BYTES {
                    tokio::time::sleep(FOLLOW_GATHER).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(&self, req: Request<v1::JobRef>) -> Result<Response<JobInfo>, Status> {
        let jobs = self.jobs.clone();
        blocking(move || jobs.cancel(&req.into_inner().id))
            .await
            .map(Response::new)
    }

    async fn outputs(
        &self,
        req: Request<v1::OutputsRequest>,
    ) -> Result<Response<v1::OutputManifest>, Status> {
        let req = req.into_inner();
        let id = Jobs::parse_id(&req.id)?;
        // Long poll: answer as soon as the job has ended (its final
        // manifest), or with what has settled when the wait is over.
        let wait = Duration::from_millis(req.wait_ms.into()).min(OUTPUTS_MAX_WAIT);
        let until = tokio::time::Instant::now() + wait;
        while !self.jobs.ended(id)? && tokio::time::Instant::now() < until {
            tokio::time::sleep(OUTPUTS_POLL).await;
        }
        let jobs = self.jobs.clone();
        blocking(move || jobs.outputs(&req.id, req.defer_hashing))
            .await
            .map(Response::new)
    }

    type ReadChunksStream = BoxStream<v1::ChunkBody>;

    async fn read_chunks(
        &self,
        req: Request<v1::ReadChunksRequest>,
    ) -> Result<Response<Self::ReadChunksStream>, Status> {
        let jobs = self.jobs.clone();
        let req = req.into_inner();
        if req.whole {
            // Read on the blocking pool into a bounded channel: disk, hashing
            // and the connection overlap, and memory stays bounded.
            let (tx, rx) = mpsc::channel::<Result<v1::ChunkBody, Status>>(WHOLE_READ_AHEAD);
            tokio::task::spawn_blocking(move || {
                let sent = jobs.read_whole(&req, |b| tx.blocking_send(Ok(b)).is_ok());
                if let Err(e) = sent {
                    let _ = tx.blocking_send(Err(e));
                }
            });
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let bodies = blocking(move || jobs.read_chunks(&req)).await?;
        let msgs: Vec<Result<v1::ChunkBody, Status>> = bodies
            .into_iter()
            .map(|(index, data)| {
                Ok(v1::ChunkBody {
                    index,
                    data: data.into(),
                    ..Default::default()
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn mark_pulled(&self, req: Request<v1::JobRef>) -> Result<Response<JobInfo>, Status> {
        let jobs = self.jobs.clone();
        blocking(move || jobs.mark_pulled(&req.into_inner().id))
            .await
            .map(Response::new)
    }

    async fn interrupt(&self, req: Request<v1::JobRef>) -> Result<Response<JobInfo>, Status> {
        let jobs = self.jobs.clone();
        let id = req.into_inner().id;
        blocking(move || jobs.interrupt(&id))
            .await
            .map(Response::new)
    }

    type HoldStream = BoxStream<v1::KernelEvent>;

    async fn hold(&self, req: Request<v1::JobRef>) -> Result<Response<Self::HoldStream>, Status> {
        let id = req.into_inner().id;
        let guard = self.jobs.hold(&id)?;
        let n = Jobs::parse_id(&id)?;
        let jobs = self.jobs.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _guard = guard;
            let mut ports: Vec<u32> = Vec::new();
            let mut last: Option<(i32, usize, u32)> = None;
            loop {
                let info = match jobs.get(&id) {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                if ports.is_empty()
                    && let Some(p) = jobs.kernel_ports(n)
                {
                    ports = p;
                }
                let ended = bridge_proto::jobs::is_terminal(info.state());
                let now = (info.state, ports.len(), info.restarts);
                if last != Some(now) {
                    last = Some(now);
                    let ev = v1::KernelEvent {
                        job: Some(info),
                        ports: ports.clone(),
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                if ended {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(HOLD_POLL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn gpus(&self, _req: Request<v1::GpusRequest>) -> Result<Response<v1::GpuList>, Status> {
        let jobs = self.jobs.clone();
        blocking(move || Ok(jobs.gpus())).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: Vec<u8>) -> joblog::Chunk {
        joblog::Chunk {
            stream: joblog::STDERR,
            timestamp_ns: 7,
            data,
            next_offset: 99,
        }
    }

    #[test]
    fn log_text_is_compressed_only_for_readers_that_accept_it() {
        let text: Vec<u8> = (0..2000)
            .flat_map(|i| format!("step {i} loss 0.{:04}\n", i * 37 % 10_000).into_bytes())
            .collect();
        let w = to_wire(chunk(text.clone()), true);
        assert!(w.zstd);
        assert_eq!(w.raw_len as usize, text.len());
        assert!(w.data.len() < text.len() / 2, "{} bytes", w.data.len());
        assert_eq!((w.stream, w.timestamp_ns, w.next_offset), (2, 7, 99));
        let back = zstd::bulk::decompress(&w.data, w.raw_len as usize).unwrap();
        assert_eq!(back, text);

        let raw = to_wire(chunk(text.clone()), false);
        assert!(!raw.zstd);
        assert_eq!((raw.data.as_ref(), raw.raw_len), (&text[..], 0));
    }

    #[test]
    fn small_or_incompressible_chunks_go_raw() {
        let small = b"one line\n".repeat(10);
        let w = to_wire(chunk(small.clone()), true);
        assert!(!w.zstd);
        assert_eq!(w.data.as_ref(), &small[..]);

        // A xorshift stream: zstd cannot shrink it by a tenth.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let w = to_wire(chunk(noise.clone()), true);
        assert!(!w.zstd);
        assert_eq!(w.data.as_ref(), &noise[..]);
    }
}
