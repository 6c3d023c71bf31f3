//! The `bridge.v1` wire schema and the rules both ends of a sync must compute
//! identically.
//!
//! # Layout
//! - [`v1`]: code generated from `bridge/v1/*.proto` (agent, jobs, sweeps,
//!   tunnels and control services).
//! - [`path`]: [`path::RelPath`], the only path type that crosses the wire, and
//!   the validation table the agent enforces.
//! - [`chunking`]: FastCDC parameters, chunk ids and content hashes.
//! - [`tree`]: entries and the Merkle tree root ("in sync" means equal roots).
//! - [`scan`]: which paths are synced (git's ignore semantics, `.bridgeignore`,
//!   editor temporaries) and the directory walk both sides use.
//! - [`splice`]: a chunk list sent as edits of the version the agent holds.
//! - [`jobs`]: job state names and which states are final.
//! - [`http`]: one JSON request to an HTTP server (an MLflow tracking
//!   server's REST API).
//! - [`sweep`]: a sweep's trial template (`{name}` placeholders), its
//!   parameters' variables and sweep ids.
//! - [`index`]: the persistent stat cache that keeps rescans from rehashing
//!   unchanged files.
//! - [`tunnel`]: one TCP connection over one `Tunnels` stream, the splice both
//!   ends of a port forward use.
//! - [`durable`]: one TCP connection over a sequence of `Tunnels.Resume`
//!   calls, which survives link cuts (a kernel's ZMQ channels).
//! - [`oldfiles`]: replacing a file by swapping names, and unlinking big old
//!   versions on a background thread (the agent's mirror, the daemon's pulls).
//!
//! Anything here that changes a hash or a chunk boundary changes what the two
//! sides agree on, so it bumps [`PROTOCOL_VERSION`].

pub mod chunking;
pub mod durable;
pub mod http;
pub mod index;
pub mod jobs;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod oldfiles;
pub mod path;
pub mod rechunk;
pub mod scan;
pub mod splice;
pub mod sweep;
pub mod tree;
pub mod tunnel;

/// Generated protobuf and gRPC code for `bridge.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("bridge.v1");
}

/// Formats a byte count for people: `512 B`, `7.6 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Version of the daemon ↔ agent protocol; both sides refuse a peer with another.
pub const PROTOCOL_VERSION: u32 = 4;

/// Metadata key carrying the agent token (`Bearer <token>`).
pub const AUTH_HEADER: &str = "authorization";

/// Largest gRPC message either side accepts: a plan for a 100 GiB file lists
/// ~1.6M chunk refs.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// A binary's identity for "is this build already there": the first 16 hex
/// digits of its BLAKE3 hash, and its length (the agent that the SSH and
/// Kubernetes providers upload, and that a head agent copies into the pods
/// of its cluster jobs).
pub fn binary_hash(path: &std::path::Path) -> std::io::Result<(String, u64)> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(file)?;
    Ok((hasher.finalize().to_hex()[..16].to_string(), len))
}
