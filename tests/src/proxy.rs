//! A TCP proxy on 127.0.0.1 that the tests can cut, take down and slow down,
//! standing for the network between the daemon and a remote machine.
//!
//! Plain threads: one accepts, and each connection has a reader and a writer
//! per direction joined by a bounded channel. The channel is the delay line:
//! the reader stamps each chunk with when it may leave, the writer sleeps
//! until then, so order is kept and the delay is one-way per direction.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks a direction holds in flight before the reader waits: 16 MiB, room
/// for a fast link's worth of delay while still pushing back on the sender.
const IN_FLIGHT: usize = 256;
/// How long connecting to the target may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running proxy from `127.0.0.1:port()` to `127.0.0.1:target`.
pub struct Proxy {
    /// Where clients connect.
    port: u16,
    /// State shared with the accept and forwarding threads.
    shared: Arc<Shared>,
    /// The accept loop, joined on drop.
    accept: Option<JoinHandle<()>>,
}

/// What the threads share with the test's handle.
struct Shared {
    target: SocketAddr,
    /// Set by drop: the accept loop ends.
    stopping: AtomicBool,
    /// While set, accepted connections are closed at once.
    down: AtomicBool,
    /// The one-way delay per direction, in nanoseconds.
    delay_ns: AtomicU64,
    /// Bytes written to the target (client→server) and to the client.
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    /// Connections accepted, including those closed because the link was down.
    accepted: AtomicUsize,
    /// Live connections by id: both sockets, so [`Proxy::cut`] can shut them.
    live: Mutex<HashMap<usize, (TcpStream, TcpStream)>>,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }

    /// Shuts both sockets of every live connection; returns how many.
    fn cut_all(&self) -> usize {
        let live: Vec<_> = self.live.lock().unwrap().drain().collect();
        for (_, (client, server)) in &live {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
        live.len()
    }

    /// Shuts one connection's sockets (a thread could not be started).
    fn cut_one(&self, id: usize) {
        if let Some((c, s)) = self.live.lock().unwrap().remove(&id) {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            target: SocketAddr::from((Ipv4Addr::LOCALHOST, target_port)),
            stopping: AtomicBool::new(false),
            down: AtomicBool::new(false),
            delay_ns: AtomicU64::new(0),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            accepted: AtomicUsize::new(0),
            live: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, s))
            .expect("spawn proxy thread");
        Proxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every live connection at once, as a broken link would (both
    /// sockets shut down both ways: each side sees EOF or a reset); returns
    /// how many. New connections are still accepted.
    pub fn cut(&self) -> usize {
        self.shared.cut_all()
    }

    /// While `down`, new connections are accepted and closed at once. Live
    /// connections are left alone: call [`Proxy::cut`] too for a link that
    /// drops and stays down.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Delays every chunk by `delay` in each direction (a round trip gains
    /// twice that), keeping order. Applies to what is read from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_ns.store(ns, Ordering::SeqCst);
    }

    /// Bytes forwarded so far: (client→server, server→client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.shared.up_bytes.load(Ordering::SeqCst),
            self.shared.down_bytes.load(Ordering::SeqCst),
        )
    }

    /// Connections accepted so far, including those closed while down.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections being forwarded now.
    pub fn live(&self) -> usize {
        self.shared.live.lock().unwrap().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from((Ipv4Addr::LOCALHOST, self.port)),
            Duration::from_secs(1),
        );
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.shared.cut_all();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0;
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else {
            // EMFILE and friends: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.down.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        next_id += 1;
        let id = next_id;
        let s = shared.clone();
        let _ = std::thread::Builder::new()
            .name(format!("proxy-conn-{id}"))
            .spawn(move || connect(id, client, s));
    }
}

/// Connects to the target and starts the four forwarding threads.
fn connect(id: usize, client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    shared.live.lock().unwrap().insert(id, (c, s));
    // The last of the two writers to finish forgets the connection.
    let remaining = Arc::new(AtomicUsize::new(2));
    for (from, to, up) in [(&client, &server, true), (&server, &client, false)] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            shared.cut_one(id);
            return;
        };
        let (tx, rx) = sync_channel(IN_FLIGHT);
        let s = shared.clone();
        let _ = std::thread::Builder::new()
            .name(format!("proxy-read-{id}"))
            .spawn(move || read_side(from, tx, s));
        let (s, remaining) = (shared.clone(), remaining.clone());
        let _ = std::thread::Builder::new()
            .name(format!("proxy-write-{id}"))
            .spawn(move || {
                write_side(to, rx, &s, up);
                if remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                    s.live.lock().unwrap().remove(&id);
                }
            });
    }
}

/// A chunk in the delay line; `None` data is the sender's EOF.
struct Chunk {
    due: Instant,
    data: Option<Vec<u8>>,
}

/// Reads from one socket into the delay line until EOF or an error.
fn read_side(mut from: TcpStream, tx: SyncSender<Chunk>, shared: Arc<Shared>) {
    let mut buf = vec![0; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let due = Instant::now() + shared.delay();
                let _ = tx.send(Chunk { due, data: None });
                return;
            }
            Ok(n) => {
                let due = Instant::now() + shared.delay();
                let data = Some(buf[..n].to_vec());
                if tx.send(Chunk { due, data }).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // A reset: dropping `tx` makes the writer break the connection.
            Err(_) => return,
        }
    }
}

/// Writes the delay line to the other socket, each chunk when due. A clean
/// EOF is passed on as a half-close; anything else breaks the connection.
fn write_side(mut to: TcpStream, rx: Receiver<Chunk>, shared: &Shared, up: bool) {
    let counter = if up {
        &shared.up_bytes
    } else {
        &shared.down_bytes
    };
    loop {
        let Ok(chunk) = rx.recv() else {
            // The reader failed: the link is broken both ways.
            let _ = to.shutdown(Shutdown::Both);
            return;
        };
        let wait = chunk.due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let Some(data) = chunk.data else {
            let _ = to.shutdown(Shutdown::Write);
            return;
        };
        if to.write_all(&data).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        counter.fetch_add(data.len() as u64, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port; runs until the test process ends.
    fn echo_server() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0; 4096];
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        if c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    fn dial(proxy: &Proxy) -> TcpStream {
        let c = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    fn round_trip(c: &mut TcpStream, msg: &[u8]) {
        c.write_all(msg).unwrap();
        let mut got = vec![0; msg.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }

    /// Waits until `f` holds (the forwarding threads run on their own).
    fn until(mut f: impl FnMut() -> bool) -> bool {
        crate::eventually(Duration::from_secs(5), &mut f)
    }

    #[test]
    fn forwards_both_ways_and_counts() {
        let proxy = Proxy::start(echo_server());
        let mut c = dial(&proxy);
        round_trip(&mut c, b"hello");
        let big = crate::random_bytes(1 << 20, 7);
        let mut r = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0; 1 << 20];
            r.read_exact(&mut got).unwrap();
            got
        });
        c.write_all(&big).unwrap();
        assert_eq!(reader.join().unwrap(), big);
        // The writer counts after the write returns: the echo may be first.
        let n = 5 + (1 << 20);
        assert!(until(|| proxy.bytes() == (n, n)), "{:?}", proxy.bytes());
        assert_eq!(proxy.connections(), 1);
        assert_eq!(proxy.live(), 1);
        // A half-close is passed on, and the connection ends cleanly.
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(c.read(&mut [0; 1]).unwrap(), 0);
        assert!(until(|| proxy.live() == 0));
    }

    #[test]
    fn cut_breaks_live_connections_and_new_ones_work() {
        let proxy = Proxy::start(echo_server());
        let mut a = dial(&proxy);
        let mut b = dial(&proxy);
        round_trip(&mut a, b"a");
        round_trip(&mut b, b"b");
        assert_eq!(proxy.cut(), 2);
        for c in [&mut a, &mut b] {
            // EOF or a reset, never a hang.
            let r = c.read(&mut [0; 1]);
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
        assert_eq!(proxy.cut(), 0);
        let mut c = dial(&proxy);
        round_trip(&mut c, b"after the cut");
        assert_eq!(proxy.connections(), 3);
    }

    #[test]
    fn delay_slows_each_direction() {
        let proxy = Proxy::start(echo_server());
        let mut c = dial(&proxy);
        round_trip(&mut c, b"warm");
        let delay = Duration::from_millis(100);
        proxy.set_delay(delay);
        let t = Instant::now();
        round_trip(&mut c, b"slow");
        let rtt = t.elapsed();
        assert!(rtt >= 2 * delay, "round trip {rtt:?}");
        assert!(
            rtt < 2 * delay + Duration::from_secs(2),
            "round trip {rtt:?}"
        );
        // Order survives many small writes in flight.
        let msgs: Vec<u8> = (0..200u8).collect();
        for m in &msgs {
            c.write_all(&[*m]).unwrap();
        }
        let mut got = vec![0; msgs.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, msgs);
        proxy.set_delay(Duration::ZERO);
        let t = Instant::now();
        round_trip(&mut c, b"fast");
        assert!(t.elapsed() < delay, "{:?}", t.elapsed());
    }

    #[test]
    fn down_closes_new_connections_until_up() {
        let proxy = Proxy::start(echo_server());
        let mut live = dial(&proxy);
        round_trip(&mut live, b"before");
        proxy.set_down(true);
        let mut c = dial(&proxy);
        let _ = c.write_all(b"anyone?");
        let r = c.read(&mut [0; 1]);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // Live connections are left alone.
        round_trip(&mut live, b"still here");
        proxy.set_down(false);
        let mut c = dial(&proxy);
        round_trip(&mut c, b"back up");
        assert_eq!(proxy.connections(), 3);
    }

    #[test]
    fn target_down_closes_the_client() {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = Proxy::start(port);
        let mut c = dial(&proxy);
        let r = c.read(&mut [0; 1]);
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
}
