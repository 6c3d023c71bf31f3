//! Network helpers for the port-forward tests: a real HTTP server (Python's
//! `http.server`) on 127.0.0.1, a plain HTTP/1.0 client, and the listening
//! sockets of a process read from `/proc`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Python's `http.server` serving a directory on 127.0.0.1, threaded and with
/// a listen backlog deep enough for a hundred clients at once (the module's
/// command line keeps 5, and the kernel then drops connection attempts);
/// killed on drop.
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

const SERVER: &str = r#"import functools, http.server, sys
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
Server(("127.0.0.1", int(sys.argv[2])), handler).serve_forever()
"#;

impl HttpServer {
    pub fn start(dir: &Path) -> HttpServer {
        let port = crate::sshd::free_port();
        let child = Command::new("python3")
            .args(["-c", SERVER])
            .arg(dir)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        let s = HttpServer { child, port };
        assert!(
            crate::eventually(Duration::from_secs(10), || TcpStream::connect((
                Ipv4Addr::LOCALHOST,
                port
            ))
            .is_ok()),
            "http.server did not start on port {port}"
        );
        s
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on 127.0.0.1:`port` over HTTP/1.0; the body of a 200 answer,
/// or why there is none (refused, closed early, another status, timeout).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), timeout)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer ({} bytes)", buf.len()))?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {}", head.lines().next().unwrap_or("")));
    }
    Ok(buf[head_end + 4..].to_vec())
}

/// Retries [`http_get`] until it answers or `within` passes; returns the body
/// and when it first answered.
pub fn http_get_eventually(
    port: u16,
    path: &str,
    within: Duration,
) -> Result<(Vec<u8>, Instant), String> {
    let t = Instant::now();
    loop {
        match http_get(port, path, Duration::from_secs(5)) {
            Ok(b) => return Ok((b, Instant::now())),
            Err(e) if t.elapsed() >= within => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The local addresses a process listens on (TCP, IPv4 and IPv6), from
/// `/proc/PID/net/tcp{,6}` matched against the socket inodes of its open
/// descriptors.
pub fn listening(pid: i32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .collect();
    let mut out = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.iter().any(|i| i == f[9]) {
                continue;
            }
            let Some((addr, port)) = f[1].split_once(':') else {
                continue;
            };
            let port = u16::from_str_radix(port, 16).unwrap_or(0);
            let ip: std::net::IpAddr = if v6 {
                // Four 32-bit words, each in host (little-endian) order.
                let mut b = [0u8; 16];
                for w in 0..4 {
                    let word = u32::from_str_radix(&addr[w * 8..w * 8 + 8], 16).unwrap_or(0);
                    b[w * 4..w * 4 + 4].copy_from_slice(&word.to_le_bytes());
                }
                Ipv6Addr::from(b).into()
            } else {
                let word = u32::from_str_radix(addr, 16).unwrap_or(0);
                Ipv4Addr::from(word.to_le_bytes()).into()
            };
            out.push(SocketAddr::new(ip, port));
        }
    }
    out
}

/// Whether an address is loopback (IPv4-mapped loopback included).
pub fn is_loopback(a: &SocketAddr) -> bool {
    match a.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}
