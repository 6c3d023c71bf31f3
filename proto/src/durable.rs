//! Durable connections: one TCP connection carried by a sequence of
//! `Tunnels.Resume` calls instead of one, so that a link cut (a laptop that
//! sleeps, a Wi-Fi switch) stalls the connection rather than breaking it.
//! A kernel's ZMQ channels ride on these: the front end's and the kernel's
//! sockets stay connected through the cut, and what either sent meanwhile is
//! delivered after the heal.
//!
//! Both ends run the same [`run`]. Each keeps what it read from its socket
//! until the other side acknowledges it (at most [`WINDOW`] bytes: beyond
//! that it stops reading, and TCP's flow control pushes back on the writer,
//! a ZMQ socket, which then applies its own high-water mark). Offsets count
//! data bytes from the connection's start, plus one for the `eof`; each
//! attachment starts with both sides' `resume_from`, the offset up to which
//! it has the other's stream, and the sender replays from there.
//!
//! The daemon's end dials (a [`Connect`]); the agent's end is handed each
//! new call as an [`Attachment`].

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use prost::bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::tunnel::READ_CHUNK;
use crate::v1::DurableFrame;

/// Unacknowledged bytes a side keeps before it stops reading its socket.
pub const WINDOW: u64 = 16 * 1024 * 1024;

/// A side acknowledges at least every this many bytes received …
const ACK_EVERY: u64 = 256 * 1024;
/// … and whatever it has received at this tick.
const ACK_TICK: Duration = Duration::from_millis(100);

/// How long a dialing side waits between attempts to reattach.
const RETRY: Duration = Duration::from_millis(250);

/// Frames queued towards a call before the sender waits.
pub const QUEUE: usize = 16;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One call carrying the connection for a while.
pub struct Attachment {
    /// The other side's frames after its first.
    pub inbound: tonic::Streaming<DurableFrame>,
    /// This side's frames.
    pub out: mpsc::Sender<DurableFrame>,
    /// The other side's `resume_from`.
    pub peer_received: u64,
    /// This side still has to send its first frame on `out` (the agent: the
    /// daemon's came with the call). The dialing side sends its own.
    pub send_hello: bool,
}

/// Why an attempt to attach failed.
pub enum ConnectError {
    /// The other side no longer has the connection: give it up.
    Gone(String),
    /// The link is down or the call failed: try again.
    Retry(String),
}

/// The dialing side's way to make a new attachment, given what this side
/// has received so far (its `resume_from`).
pub type Connect = Box<dyn FnMut(u64) -> BoxFuture<Result<Attachment, ConnectError>> + Send>;

/// Holds back bytes read from the socket until something has happened (the
/// kernel relay's sync barrier before an `execute_request`).
pub trait Gate: Send {
    /// Looks at the next bytes read from the socket, in order. `Some(k)`:
    /// `data[..k]` may go, the rest waits for [`Gate::barrier`] and is then
    /// offered again.
    fn scan(&mut self, data: &[u8]) -> Option<usize>;
    fn barrier(&mut self) -> BoxFuture<()>;
}

/// How a durable connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions finished and were acknowledged.
    Closed,
    /// This side's socket failed, or the other side dropped the connection.
    Reset(String),
    /// Detached for longer than the grace period.
    Expired,
    /// Detached, and no attachment can come any more.
    Abandoned,
}

/// Options of one end.
pub struct Options {
    /// How long the connection may stay detached.
    pub grace: Duration,
    pub gate: Option<Box<dyn Gate>>,
    /// The dialing side's connector; `None`: attachments arrive on the channel.
    pub connect: Option<Connect>,
}

struct Current {
    inbound: tonic::Streaming<DurableFrame>,
    out: mpsc::Sender<DurableFrame>,
}

/// This side's sending state: what it read from its socket and the other
/// has not acknowledged.
#[derive(Default)]
struct Outgoing {
    unacked: VecDeque<Bytes>,
    /// Offset of `unacked`'s first byte.
    base: u64,
    /// Data bytes read from the socket.
    sent: u64,
    /// The socket's read side ended.
    eof: bool,
    eof_acked: bool,
}

impl Outgoing {
    fn pending(&self) -> u64 {
        self.sent - self.base
    }

    /// The highest offset the other side may acknowledge.
    fn end(&self) -> u64 {
        self.sent + u64::from(self.eof)
    }

    /// Forgets everything before `to`; false if `to` is out of range.
    fn ack(&mut self, to: u64) -> bool {
        if to > self.end() {
            return false;
        }
        while self.base < to && self.base < self.sent {
            let Some(front) = self.unacked.front_mut() else {
                break;
            };
            let n = (to - self.base).min(front.len() as u64) as usize;
            front.advance(n);
            self.base += n as u64;
            if front.is_empty() {
                self.unacked.pop_front();
            }
        }
        if self.eof && to == self.end() {
            self.eof_acked = true;
        }
        true
    }
}

/// Carries `tcp` until it ends (see [`End`]): attachments come from
/// `attach` (or `opts.connect`), one at a time; a new one replaces the
/// current. Dropping the future drops the socket.
pub async fn run(tcp: TcpStream, mut attach: mpsc::Receiver<Attachment>, mut opts: Options) -> End {
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let mut out = Outgoing::default();
    let mut recv = 0u64;
    let mut acked_recv = 0u64;
    let mut peer_eof = false;
    let mut cur: Option<Current> = None;
    let mut detached_at = Instant::now();
    let mut attach_open = true;
    let mut connecting: Option<BoxFuture<Result<Attachment, ConnectError>>> = None;
    let mut retry_at: Option<Instant> = Some(Instant::now());
    let mut gate_wait: Option<BoxFuture<()>> = None;
    let mut held: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut tick = tokio::time::interval(ACK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        if out.eof_acked && peer_eof {
            return End::Closed;
        }
        if cur.is_none() {
            if detached_at.elapsed() >= opts.grace {
                return End::Expired;
            }
            if opts.connect.is_none() && !attach_open {
                return End::Abandoned;
            }
            if let Some(c) = opts.connect.as_mut()
                && connecting.is_none()
                && retry_at.is_some_and(|t| Instant::now() >= t)
            {
                retry_at = None;
                connecting = Some(c(recv));
            }
        }
        let can_read = !out.eof && gate_wait.is_none() && out.pending() < WINDOW;
        if buf.capacity() - buf.len() < READ_CHUNK / 16 {
            buf.reserve(READ_CHUNK);
        }
        // What a branch decided, acted on after the select (its futures
        // borrow the state).
        enum Step {
            Read(std::io::Result<usize>),
            Frame(Result<Option<DurableFrame>, tonic::Status>),
            Attach(Option<Attachment>),
            Connected(Result<Attachment, ConnectError>),
            Released,
            Tick,
        }
        let step = tokio::select! {
            r = rd.read_buf(&mut buf), if can_read => Step::Read(r),
            f = async { cur.as_mut().expect("attached").inbound.message().await }, if cur.is_some() => Step::Frame(f),
            a = attach.recv(), if attach_open => Step::Attach(a),
            c = async { connecting.as_mut().expect("connecting").await }, if connecting.is_some() => Step::Connected(c),
            () = async { gate_wait.as_mut().expect("gated").await }, if gate_wait.is_some() => Step::Released,
            _ = tick.tick() => Step::Tick,
        };
        let was_attached = cur.is_some();
        match step {
            Step::Read(Err(e)) => {
                send(&mut cur, reset()).await;
                return End::Reset(format!("the socket failed: {e}"));
            }
            Step::Read(Ok(0)) => {
                out.eof = true;
                let f = DurableFrame {
                    eof: true,
                    ..Default::default()
                };
                send(&mut cur, f).await;
            }
            Step::Read(Ok(_)) => {
                let data = buf.split().freeze();
                pass(
                    data,
                    &mut opts.gate,
                    &mut out,
                    &mut cur,
                    &mut held,
                    &mut gate_wait,
                )
                .await;
            }
            Step::Released => {
                gate_wait = None;
                if let Some(data) = held.take() {
                    pass(
                        data,
                        &mut opts.gate,
                        &mut out,
                        &mut cur,
                        &mut held,
                        &mut gate_wait,
                    )
                    .await;
                }
            }
            Step::Frame(Ok(Some(f))) => {
                if f.reset {
                    return End::Reset("the other side dropped the connection".into());
                }
                if f.ack > 0 && !out.ack(f.ack) {
                    send(&mut cur, reset()).await;
                    return End::Reset(format!("acknowledgement {} is beyond the stream", f.ack));
                }
                if !f.data.is_empty() {
                    if peer_eof {
                        send(&mut cur, reset()).await;
                        return End::Reset("data after the end of the stream".into());
                    }
                    if let Err(e) = wr.write_all(&f.data).await {
                        send(&mut cur, reset()).await;
                        return End::Reset(format!("the socket failed: {e}"));
                    }
                    recv += f.data.len() as u64;
                }
                if f.eof && !peer_eof {
                    peer_eof = true;
                    recv += 1;
                    let _ = wr.shutdown().await;
                }
                if recv - acked_recv >= ACK_EVERY || (f.eof && recv > acked_recv) {
                    acked_recv = recv;
                    send(&mut cur, ack(recv)).await;
                }
            }
            // The call ended or failed: wait for the next one.
            Step::Frame(_) => cur = None,
            Step::Attach(None) => attach_open = false,
            Step::Attach(Some(a)) => {
                if let Err(e) = attach_to(a, &mut cur, &mut out, recv).await {
                    return End::Reset(e);
                }
                acked_recv = recv;
            }
            Step::Connected(r) => {
                connecting = None;
                match r {
                    Ok(a) => {
                        if let Err(e) = attach_to(a, &mut cur, &mut out, recv).await {
                            return End::Reset(e);
                        }
                        acked_recv = recv;
                    }
                    Err(ConnectError::Gone(why)) => return End::Reset(why),
                    Err(ConnectError::Retry(why)) => {
                        tracing::debug!(why, "durable connection: reattaching failed");
                        retry_at = Some(Instant::now() + RETRY);
                    }
                }
            }
            Step::Tick => {
                if cur.is_some() && recv > acked_recv {
                    acked_recv = recv;
                    send(&mut cur, ack(recv)).await;
                }
            }
        }
        if was_attached && cur.is_none() {
            detached_at = Instant::now();
            retry_at = Some(Instant::now());
        }
    }
}

fn reset() -> DurableFrame {
    DurableFrame {
        reset: true,
        ..Default::default()
    }
}

fn ack(to: u64) -> DurableFrame {
    DurableFrame {
        ack: to,
        ..Default::default()
    }
}

/// Sends on the current call; a call that cannot take it is dropped (the
/// frame is replayed on the next one if it carried data).
async fn send(cur: &mut Option<Current>, f: DurableFrame) {
    if let Some(c) = cur
        && c.out.send(f).await.is_err()
    {
        *cur = None;
    }
}

/// Makes `a` the current call: this side's hello if it owes one, then
/// everything the other side has not received.
async fn attach_to(
    a: Attachment,
    cur: &mut Option<Current>,
    out: &mut Outgoing,
    recv: u64,
) -> Result<(), String> {
    if a.peer_received < out.base || !out.ack(a.peer_received) {
        let _ = a.out.send(reset()).await;
        return Err(format!(
            "the other side resumes at {}, outside {}..={}",
            a.peer_received,
            out.base,
            out.end()
        ));
    }
    *cur = Some(Current {
        inbound: a.inbound,
        out: a.out,
    });
    if a.send_hello {
        let hello = DurableFrame {
            resume_from: recv,
            ..Default::default()
        };
        send(cur, hello).await;
    }
    let replay: Vec<Bytes> = out.unacked.iter().cloned().collect();
    for data in replay {
        send(cur, data_frame(data)).await;
    }
    if out.eof && !out.eof_acked {
        let f = DurableFrame {
            eof: true,
            ..Default::default()
        };
        send(cur, f).await;
    }
    Ok(())
}

fn data_frame(data: Bytes) -> DurableFrame {
    DurableFrame {
        data,
        ..Default::default()
    }
}

/// Offers `data` to the gate and sends what it lets through; the rest is
/// held until the barrier it asked for is done.
async fn pass(
    mut data: Bytes,
    gate: &mut Option<Box<dyn Gate>>,
    out: &mut Outgoing,
    cur: &mut Option<Current>,
    held: &mut Option<Bytes>,
    gate_wait: &mut Option<BoxFuture<()>>,
) {
    if let Some(g) = gate.as_mut()
        && let Some(k) = g.scan(&data)
    {
        let rest = data.split_off(k.min(data.len()));
        *held = Some(rest);
        *gate_wait = Some(g.barrier());
    }
    if data.is_empty() {
        return;
    }
    out.sent += data.len() as u64;
    out.unacked.push_back(data.clone());
    send(cur, data_frame(data)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_forget_whole_and_partial_buffers_and_the_eof() {
        let mut o = Outgoing::default();
        for s in [&b"hello"[..], b" ", b"world"] {
            o.sent += s.len() as u64;
            o.unacked.push_back(Bytes::copy_from_slice(s));
        }
        assert!(o.ack(3));
        assert_eq!(o.base, 3);
        assert_eq!(&o.unacked[0][..], b"lo");
        assert!(o.ack(6));
        assert_eq!(o.unacked.len(), 1);
        assert!(!o.ack(12), "beyond what was sent");
        o.eof = true;
        assert!(o.ack(11));
        assert!(!o.eof_acked && o.unacked.is_empty());
        assert!(o.ack(12));
        assert!(o.eof_acked);
    }
}
