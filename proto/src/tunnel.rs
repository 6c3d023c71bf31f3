//! Byte-stream tunnels: one TCP connection carried over one bidirectional
//! gRPC stream of [`TunnelFrame`]s (`bridge.v1.Tunnels`). Both ends, the
//! daemon's listeners and the agent's, use the same [`splice`], so a
//! connection behaves the same whichever side accepted it.
//!
//! The frames keep TCP's semantics: data in order, and `eof` for a
//! half-close (an HTTP client that shuts its write side after the request
//! still gets its answer). A stream that ends *without* `eof`, or fails,
//! means the other side's socket broke: this side's socket is dropped, so
//! its peer sees the connection close instead of waiting on it.

use prost::bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::v1::TunnelFrame;

/// How much a read may take from the socket at once: large enough that a
/// bulk transfer is a few big frames rather than many small ones, while a
/// small request is sent as soon as it is read (a read returns what is there).
pub const READ_CHUNK: usize = 256 * 1024;

/// Frames queued towards the gRPC stream per connection before reading the
/// socket waits: bounds a connection's memory to a few reads.
pub const QUEUE: usize = 8;

/// Why a spliced connection ended other than by both sides' `eof`.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("the socket failed: {0}")]
    Socket(#[from] std::io::Error),
    #[error("the tunnel failed: {}", .0.message())]
    Stream(tonic::Status),
    #[error("the other end of the tunnel went away")]
    PeerGone,
}

/// Bytes a spliced connection carried in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    /// From the socket into the tunnel.
    pub sent: u64,
    /// From the tunnel into the socket.
    pub received: u64,
}

/// Where a side's frames come from: the response stream of a call (daemon)
/// or the request stream of one (agent), both `tonic::Streaming`.
pub type Inbound = tonic::Streaming<TunnelFrame>;

/// Carries `tcp` over a tunnel until both directions have ended: what is
/// read from the socket goes to `out` as data frames (then an `eof` frame),
/// what arrives on `inbound` is written to the socket (its `eof` shuts the
/// socket's write side). `first` is data that arrived with the call's first
/// frame. Dropping the returned future (a shutdown) drops the socket.
pub async fn splice(
    tcp: TcpStream,
    first: TunnelFrame,
    mut inbound: Inbound,
    out: mpsc::Sender<TunnelFrame>,
) -> Result<Carried, SpliceError> {
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let upstream = async move {
        let mut sent = 0u64;
        let mut buf = BytesMut::new();
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 16 {
                buf.reserve(READ_CHUNK);
            }
            let n = rd.read_buf(&mut buf).await?;
            let frame = if n == 0 {
                TunnelFrame {
                    eof: true,
                    ..Default::default()
                }
            } else {
                sent += n as u64;
                TunnelFrame {
                    data: buf.split().freeze(),
                    ..Default::default()
                }
            };
            if out.send(frame).await.is_err() {
                return Err(SpliceError::PeerGone);
            }
            if n == 0 {
                return Ok::<u64, SpliceError>(sent);
            }
        }
    };
    let downstream = async move {
        let mut received = 0u64;
        let mut frame = Some(first);
        loop {
            let f = match frame.take() {
                Some(f) => f,
                None => match inbound.message().await {
                    Ok(Some(f)) => f,
                    Ok(None) => return Err(SpliceError::PeerGone),
                    Err(s) => return Err(SpliceError::Stream(s)),
                },
            };
            if !f.data.is_empty() {
                wr.write_all(&f.data).await?;
                received += f.data.len() as u64;
            }
            if f.eof {
                // The peer sends nothing more: tell the socket, while our
                // own direction may still be sending.
                let _ = wr.shutdown().await;
                return Ok::<u64, SpliceError>(received);
            }
        }
    };
    let (sent, received) = tokio::try_join!(upstream, downstream)?;
    Ok(Carried { sent, received })
}

/// Ports a tunnel may name: anything but 0.
pub fn valid_port(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::valid_port;

    #[test]
    fn ports() {
        assert_eq!(valid_port(0), None);
        assert_eq!(valid_port(1), Some(1));
        assert_eq!(valid_port(65535), Some(65535));
        assert_eq!(valid_port(65536), None);
    }
}
