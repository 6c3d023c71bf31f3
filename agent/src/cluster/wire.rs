//! The worker's connection to its head: frames over one TCP stream.
//!
//! A frame is `[kind: u8][len: u32 LE][payload]`, at most [`MAX_FRAME`]
//! bytes of payload. Control frames carry JSON; [`Kind::Data`] and
//! [`Kind::Log`] carry bytes. The stream is the pod network's, unencrypted:
//! the worker proves itself with its job's key (a fresh random one per job,
//! never the agent's token), first thing.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Worker → head, first: [`Hello`].
    Hello = 1,
    /// Head → worker: [`Welcome`].
    Welcome = 2,
    /// Head → worker: one [`Entry`] of the job's tree; a file's bytes follow
    /// as `Data` frames.
    Entry = 3,
    Data = 4,
    /// Head → worker: the tree is complete; the [`Job`] to run.
    Job = 5,
    /// Worker → head: `[stream: u8][next_offset: u64 LE][bytes]`, a chunk
    /// of the worker's log that ends at `next_offset` of it.
    Log = 6,
    /// Worker → head: an output file ([`Entry`]), its bytes as `Data`.
    Output = 7,
    /// Worker → head: the job ended ([`Exit`]).
    Exit = 8,
    /// Head → worker: everything up to the exit is home.
    Done = 9,
}

impl Kind {
    fn of(b: u8) -> Option<Kind> {
        use Kind::*;
        [Hello, Welcome, Entry, Data, Job, Log, Output, Exit, Done]
            .into_iter()
            .find(|k| *k as u8 == b)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub key: String,
    /// The worker's pod.
    pub pod: String,
    /// It already has the tree and the job (a reconnect).
    pub has_job: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// How much of this pod's log the head has: the worker resumes there.
    pub log_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Relative, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub size: u64,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
}

/// What the worker's shim runs; paths relative to the tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub workdir: String,
    pub command: String,
    pub env: std::collections::BTreeMap<String, String>,
    /// `(kind, file)`: the Python environment.
    pub python: Option<(crate::shim::PythonKind, String)>,
    /// `(command, inputs)`.
    pub setup: Option<(String, Vec<String>)>,
    /// Declared outputs, relative to the workdir (directories end in '/').
    pub outputs: Vec<String>,
    pub grace_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Exit {
    /// The command's exit code (128 + the signal when killed); `None` when
    /// it never ran (setup failed).
    pub code: Option<i32>,
    pub reason: String,
}

/// One frame as read.
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> std::io::Result<T> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad {:?} frame: {e}", self.kind),
            )
        })
    }
}

pub async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    debug_assert!(payload.len() <= MAX_FRAME);
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await
}

pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    kind: Kind,
    value: &T,
) -> std::io::Result<()> {
    write(
        w,
        kind,
        &serde_json::to_vec(value).map_err(std::io::Error::other)?,
    )
    .await
}

/// The next frame; `None` at a clean end of the stream.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let kind = Kind::of(head[0]).ok_or_else(|| bad(format!("unknown frame kind {}", head[0])))?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(bad(format!("frame of {len} bytes (at most {MAX_FRAME})")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { kind, payload }))
}

/// Reads the next frame, which must be of `kind`.
pub async fn expect<R: AsyncRead + Unpin>(r: &mut R, kind: Kind) -> std::io::Result<Frame> {
    match read(r).await? {
        Some(f) if f.kind == kind => Ok(f),
        Some(f) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("expected a {kind:?} frame, got {:?}", f.kind),
        )),
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

/// A relative path that stays inside the directory it is joined to: no
/// absolute path, no `..`, no empty or `.` component.
pub fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_json(
            &mut buf,
            Kind::Exit,
            &Exit {
                code: Some(3),
                reason: "x".into(),
            },
        )
        .await
        .unwrap();
        write(&mut buf, Kind::Data, b"abc").await.unwrap();
        let mut r = &buf[..];
        let e: Exit = expect(&mut r, Kind::Exit).await.unwrap().json().unwrap();
        assert_eq!(e.code, Some(3));
        assert!(expect(&mut r, Kind::Exit).await.is_err());
        assert!(read(&mut r).await.unwrap().is_none());
        let mut huge = vec![Kind::Data as u8];
        huge.extend_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(read(&mut &huge[..]).await.is_err());
        assert!(read(&mut &[77u8, 0, 0, 0, 0][..]).await.is_err());
    }

    #[test]
    fn only_paths_inside_are_safe() {
        for ok in ["a", "a/b.txt", "runs/1/ckpt.pt", "..a/b"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/."] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }
}
