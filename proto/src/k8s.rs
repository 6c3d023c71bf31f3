//! What the daemon and the agent both do with Kubernetes (feature `k8s`):
//! a client on kube's own stack, `exec` into a pod, and the scripts that
//! bring the static agent into a pod that does not carry it.
//!
//! A pod made by bridge runs its image's `/bin/sh` in a loop
//! ([`wait_then`]) until the agent binary and its start marker are in the
//! `emptyDir` at [`MOUNT`]: the daemon delivers the head pod's, and the head
//! agent those of the pods of `placement = "cluster"` jobs.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Where a pod keeps bridge's files: `bin/bridge-agent`, `run/` (the
/// agent's hash, its secrets, the start marker) and, in the head pod,
/// `agent/` (the agent's root: mirrors, chunk store, jobs, environments; a
/// volume claim with `--volume`).
pub const MOUNT: &str = "/bridge";
/// The head pod's container.
pub const CONTAINER: &str = "agent";

/// Container states that will not get better by waiting (a pull failure
/// may, after a while: a registry briefly down).
pub const HOPELESS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// A container's command: wait (10 minutes at most, then fail: no pod waits
/// forever) until the agent and its start marker were delivered, then run
/// `then` (`exec`).
pub fn wait_then(then: &str) -> String {
    format!(
        r#"mkdir -p {MOUNT}/bin {MOUNT}/run
i=0
while [ ! -e {MOUNT}/run/start ]; do
  i=$((i+1)); [ $i -le 6000 ] || {{ echo "bridge did not deliver its agent within 10 minutes" >&2; exit 1; }}
  sleep 0.1
done
{then}
"#
    )
}

/// The script that takes the agent binary (`len` bytes on stdin) into
/// `MOUNT/bin/bridge-agent`, whole or not at all, and records its `hash`.
pub fn upload_script(len: u64, hash: &str) -> String {
    format!(
        "set -e; mkdir -p {MOUNT}/bin {MOUNT}/run; t={MOUNT}/bin/.bridge-agent.$$; \
         head -c {len} > \"$t\"; \
         [ \"$(wc -c < \"$t\")\" -eq {len} ] || {{ echo \"short upload\" >&2; rm -f \"$t\"; exit 1; }}; \
         chmod 755 \"$t\"; mv \"$t\" {MOUNT}/bin/bridge-agent; echo {hash} > {MOUNT}/run/agent.hash"
    )
}

/// The start of a script that writes a secret (`len` bytes on stdin) to
/// `MOUNT/run/NAME`, mode 0600, whole or not at all; more commands may
/// follow it after `; `.
pub fn secret_script(name: &str, len: usize) -> String {
    format!(
        "set -e; umask 077; mkdir -p {MOUNT}/run; head -c {len} > {MOUNT}/run/.{name}; \
         mv {MOUNT}/run/.{name} {MOUNT}/run/{name}"
    )
}

/// kube's own client stack (base URI, authentication with token refresh
/// and exec plugins, extra headers, rustls with ring), on TCP connections
/// with Nagle's algorithm off: a port-forward carries gRPC as small
/// websocket frames, and with Nagle on each request waited for the API
/// server's delayed ACK (40 ms), ~10x the warm `bridge run` -> first line.
pub fn client_for(config: &kube::Config) -> Result<kube::Client, kube::Error> {
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let hyper_client: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(|e: hyper_util::client::legacy::Error| {
            Box::new(e) as Box<dyn std::error::Error + Send + Sync>
        })
        .service(hyper_client);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

/// What an `exec` printed and how it ended.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    /// "command terminated with exit code 3", when it failed.
    pub status: String,
}

/// What an `exec` feeds the command: the bytes, and a callback told how
/// many were sent so far.
pub type Input<'a> = (
    &'a mut (dyn AsyncRead + Send + Unpin),
    &'a (dyn Fn(u64) + Sync),
);

/// Runs `sh -c script` in the pod's `container`; `stdin`: bytes to feed it
/// (the v4 exec protocol cannot close stdin, so scripts read a known length
/// with `head -c`).
pub async fn exec(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    script: &str,
    stdin: Option<Input<'_>>,
) -> Result<Output, String> {
    let params = AttachParams::default()
        .container(container)
        .stdin(stdin.is_some())
        .stdout(true)
        .stderr(true);
    let mut p = pods
        .exec(pod, ["/bin/sh", "-c", script], &params)
        .await
        .map_err(|e| format!("cannot run a command in pod {pod}: {e}"))?;
    let status = p.take_status().expect("status taken once");
    let mut out = p.stdout().expect("stdout requested");
    let mut err = p.stderr().expect("stderr requested");
    let read_out = async {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s).await;
        s
    };
    let read_err = async {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s).await;
        s
    };
    let feed = async {
        if let (Some((input, progress)), Some(mut w)) = (stdin, p.stdin()) {
            let mut buf = vec![0u8; 256 * 1024];
            let mut sent = 0u64;
            loop {
                let n = input
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("cannot read what to send: {e}"))?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])
                    .await
                    .map_err(|e| format!("the upload to pod {pod} broke: {e}"))?;
                sent += n as u64;
                progress(sent);
            }
            let _ = w.flush().await;
        }
        Ok::<_, String>(())
    };
    let (o, e, fed, st) = tokio::join!(read_out, read_err, feed, status);
    fed?;
    let st = st.ok_or_else(|| format!("the command in pod {pod} ended without a status"))?;
    let ok = st.status.as_deref() == Some("Success");
    Ok(Output {
        ok,
        stdout: String::from_utf8_lossy(&o).into_owned(),
        stderr: String::from_utf8_lossy(&e).into_owned(),
        status: st.message.unwrap_or_default(),
    })
}
