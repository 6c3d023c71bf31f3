//! One HTTP/1.1 exchange of JSON with a server (hyper's client), for an
//! MLflow tracking server's REST API: the daemon asks the laptop's server
//! about a job's experiment, the agent makes a sweep's parent and child runs
//! on the server its trials log to. Plain HTTP only: a server behind TLS is
//! left to the job's own MLflow client.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Connected to (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header (the name as the URI wrote it, with its port).
    pub host_header: String,
    /// Path the server lives under ("" for the root, else "/…" without a
    /// trailing '/').
    pub prefix: String,
    /// An `Authorization` header value, when the server wants one.
    pub authorization: Option<String>,
}

impl Server {
    /// `http://[user:pass@]host[:port][/prefix]`; `None` for anything else
    /// (https included). A `user:pass@` becomes basic authentication.
    pub fn parse(uri: &str) -> Option<Server> {
        let after = uri.strip_prefix("http://")?;
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(end);
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let close = v6.find(']')?;
            (&v6[..close], v6[close + 1..].strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return None;
        }
        let port = match port {
            Some(p) => p.parse().ok()?,
            None => 80,
        };
        let path = rest.split(['?', '#']).next().unwrap_or("");
        Some(Server {
            host: host.to_string(),
            port,
            host_header: hostport.to_string(),
            prefix: path.trim_end_matches('/').to_string(),
            authorization: userinfo.map(|u| format!("Basic {}", STANDARD.encode(u.as_bytes()))),
        })
    }

    /// `method path` with `body` as JSON; the answer's status and JSON body
    /// (`Null` when it is not JSON). Errors are the transport's, in words.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<(u16, serde_json::Value), String> {
        let ask = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.prefix))
                .header("host", &self.host_header)
                .header("accept", "application/json");
            if let Some(a) = &self.authorization {
                req = req.header("authorization", a);
            }
            let bytes = match body {
                Some(b) => {
                    req = req.header("content-type", "application/json");
                    serde_json::to_vec(b).map_err(|e| e.to_string())?
                }
                None => Vec::new(),
            };
            let req = req
                .body(http_body_util::Full::new(hyper::body::Bytes::from(bytes)))
                .map_err(|e| e.to_string())?;
            let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = res.status().as_u16();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            Ok::<_, String>((status, json))
        };
        tokio::time::timeout(timeout, ask)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
    }
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_uris_parse_and_others_do_not() {
        let s = Server::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.prefix.as_str()),
            ("127.0.0.1", 5000, "")
        );
        assert_eq!(s.host_header, "127.0.0.1:5000");
        let s = Server::parse("http://u:p@[::1]:81/mlflow/?x=1").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.prefix.as_str()),
            ("::1", 81, "/mlflow")
        );
        assert_eq!(s.authorization.as_deref(), Some("Basic dTpw"));
        assert_eq!(Server::parse("http://tracking").unwrap().port, 80);
        assert!(Server::parse("https://127.0.0.1:5000").is_none());
        assert!(Server::parse("file:///tmp/mlruns").is_none());
        assert!(Server::parse("http://:5000").is_none());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("a b/ü"), "a%20b%2F%C3%BC");
    }
}
