//! MLflow for jobs that run on the agent, as if they ran on the laptop.
//!
//! - **The laptop's tracking server.** A job whose tracking URI names a
//!   server on this machine's loopback ([`LocalServer`]) gets a reverse
//!   forward to it, and its `MLFLOW_TRACKING_URI` names the agent's end
//!   ([`LocalServer::via`]): the job's code needs no change. Artifacts go
//!   through the server (`mlflow-artifacts:` URIs, `mlflow server`'s
//!   default); an experiment whose artifact location is a path of this
//!   machine is reported before the job starts ([`artifact_notes`]).
//! - **Tags.** MLflow's own run-context variable, `MLFLOW_RUN_CONTEXT`,
//!   carries the repository's git commit and whether the tree was dirty
//!   ([`run_context`]); the agent adds the job id and its host name.
//! - **Runs that come home as outputs.** A file store (`mlruns/`) written on
//!   the agent records the agent's absolute paths; [`relocate_meta`] rewrites
//!   them in each pulled `meta.yaml` so a local `mlflow ui` finds the
//!   artifacts.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use bridge_proto::http::encode;

/// The variable MLflow reads its tracking server from.
pub const TRACKING_VAR: &str = "MLFLOW_TRACKING_URI";
/// MLflow's `SystemEnvironmentContext`: JSON tags for every run started.
pub const RUN_CONTEXT_VAR: &str = "MLFLOW_RUN_CONTEXT";
/// How long a question to the laptop's server may take before the job is
/// submitted without its answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// A tracking URI naming an HTTP(S) server on this machine's loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalServer {
    pub https: bool,
    /// As written (`localhost`, `127.0.0.1`, `[::1]`).
    pub host: String,
    pub port: u16,
    /// `user:password@` when the URI had it.
    pub userinfo: String,
    /// Path, query and fragment after the authority ("" or "/…").
    pub rest: String,
}

impl LocalServer {
    /// Parses `uri`; `None` when it is not an http(s) URI of a loopback host.
    pub fn parse(uri: &str) -> Option<LocalServer> {
        let (https, after) = if let Some(r) = uri.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = uri.strip_prefix("https://") {
            (true, r)
        } else {
            return None;
        };
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(end);
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (&authority[..=i], &authority[i + 1..]),
            None => ("", authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let close = v6.find(']')?;
            let host = &hostport[..close + 2];
            (host, v6[close + 1..].strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().ok()?,
            None if https => 443,
            None => 80,
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = bare.eq_ignore_ascii_case("localhost")
            || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        loopback.then(|| LocalServer {
            https,
            host: host.to_string(),
            port,
            userinfo: userinfo.to_string(),
            rest: rest.to_string(),
        })
    }

    /// The URI the job uses: the same server through the agent's end of
    /// the forward. Plain HTTP goes to 127.0.0.1 (where the forward
    /// listens); HTTPS keeps its host name, which its certificate names.
    pub fn via(&self, agent_port: u16) -> String {
        let (scheme, host) = if self.https {
            ("https", self.host.as_str())
        } else {
            ("http", "127.0.0.1")
        };
        format!(
            "{scheme}://{}{host}:{agent_port}{}",
            self.userinfo, self.rest
        )
    }

    /// The path prefix the server lives under ("" for the root).
    fn prefix(&self) -> &str {
        let path = self.rest.split(['?', '#']).next().unwrap_or("");
        path.trim_end_matches('/')
    }

    /// `GET path` on the server, as JSON, with its HTTP status.
    async fn get_json(&self, path: &str) -> Result<(u16, serde_json::Value), String> {
        let server = bridge_proto::http::Server {
            host: self
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: self.port,
            host_header: format!("{}:{}", self.host, self.port),
            prefix: self.prefix().to_string(),
            authorization: None,
        };
        server.json("GET", path, None, ASK_TIMEOUT).await
    }
}

/// Whether an artifact location is a path on the machine that wrote it
/// (rather than the server's `mlflow-artifacts:` or an object store).
fn is_machine_path(location: &str) -> bool {
    location.starts_with("file:")
        || location.starts_with('/')
        || location.starts_with('.')
        || !location.contains(':')
}

/// What the user should know before a job logs to `server`: that it does
/// not answer, or that the experiment the job logs to keeps its artifacts
/// on a path of this machine, which the agent cannot write. `env` is the
/// job's environment (MLFLOW_EXPERIMENT_NAME / _ID pick the experiment).
pub async fn artifact_notes(
    server: &LocalServer,
    env: &std::collections::HashMap<String, String>,
) -> Vec<String> {
    let uri = format!(
        "{}://{}:{}{}",
        if server.https { "https" } else { "http" },
        server.host,
        server.port,
        server.rest
    );
    if server.https {
        // Not asked over TLS: the forward still carries it.
        return Vec::new();
    }
    let api = "/api/2.0/mlflow/experiments";
    let by_id = |id: &str| format!("{api}/get?experiment_id={}", encode(id));
    let asked = if let Some(id) = env.get("MLFLOW_EXPERIMENT_ID") {
        server.get_json(&by_id(id)).await
    } else if let Some(name) = env.get("MLFLOW_EXPERIMENT_NAME") {
        match server
            .get_json(&format!(
                "{api}/get-by-name?experiment_name={}",
                encode(name)
            ))
            .await
        {
            // Not created yet: it will get the server's default location,
            // which the Default experiment shows.
            Ok((404, _)) => server.get_json(&by_id("0")).await,
            other => other,
        }
    } else {
        server.get_json(&by_id("0")).await
    };
    let (status, json) = match asked {
        Ok(a) => a,
        Err(e) => {
            return vec![format!(
                "the MLflow server at {uri} does not answer ({e}); the job's MLflow calls will fail until it runs (mlflow server --host 127.0.0.1 --port {})",
                server.port
            )];
        }
    };
    let exp = &json["experiment"];
    let (Some(location), 200) = (exp["artifact_location"].as_str(), status) else {
        return Vec::new();
    };
    if !is_machine_path(location) {
        return Vec::new();
    }
    let name = exp["name"].as_str().unwrap_or("?");
    vec![format!(
        "MLflow experiment {name:?} stores artifacts at {location}, a path on this machine: \
         the job on the agent would write them to the agent's disk, not the server. \
         Let the server keep them: run `mlflow server --artifacts-destination DIR` (serving \
         artifacts is its default) and log to a new experiment, whose location is then \
         mlflow-artifacts:/…"
    )]
}

/// The last [`run_context`] answer and what it depended on (see
/// [`run_context_cached`]).
#[derive(Default)]
pub struct ContextCache(std::sync::Mutex<Option<(String, Option<String>)>>);

/// [`run_context`], answered again without asking git while nothing it
/// depends on changed: the synced tree's root (`tree_root`, every file git
/// can see that bridge syncs), `.git/HEAD`, the branch it names and the
/// index. Two `git` calls cost a warm `bridge run` 10–40 ms at 5,000–20,000
/// files (issue 25). What it cannot see: a file git tracks that
/// `.bridgeignore` leaves out, changed since; then `bridge.git_dirty` is the
/// value of the last run until anything else changes. No cache for a `.git`
/// that is not a directory (a worktree's file).
pub async fn run_context_cached(
    cache: &ContextCache,
    repo: &Path,
    given: Option<String>,
    tree_root: &str,
) -> Option<String> {
    let key = git_state(repo).map(|g| format!("{tree_root}\n{given:?}\n{g}"));
    if let Some(k) = &key
        && let Some((old, v)) = &*cache.0.lock().unwrap_or_else(|e| e.into_inner())
        && old == k
    {
        return v.clone();
    }
    let v = run_context(repo, given).await;
    if let Some(k) = key {
        *cache.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((k, v.clone()));
    }
    v
}

/// What a commit, a checkout or a staging changes in `repo/.git`: HEAD's
/// text and the identity of HEAD, the branch file it names and the index.
fn git_state(repo: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let git = repo.join(".git");
    if !std::fs::symlink_metadata(&git).ok()?.is_dir() {
        return None;
    }
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let mut files = vec![git.join("HEAD"), git.join("index"), git.join("packed-refs")];
    if let Some(r) = head.trim().strip_prefix("ref: ") {
        files.push(git.join(r));
    }
    let mut out = head;
    for f in files {
        match std::fs::metadata(&f) {
            Ok(m) => out.push_str(&format!(
                "\n{} {} {} {}",
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            )),
            Err(_) => out.push_str("\n-"),
        }
    }
    Some(out)
}

/// The job's `MLFLOW_RUN_CONTEXT`: `given` (the user's own JSON, whose keys
/// win) plus the commit of `repo`'s HEAD and whether its tree differs from
/// it. `None` outside a git checkout with a commit.
pub async fn run_context(repo: &Path, given: Option<String>) -> Option<String> {
    let git = |args: &'static [&'static str]| {
        let mut c = tokio::process::Command::new("git");
        c.arg("-C")
            .arg(repo)
            .args(args)
            // No index refresh written back: a read-only look.
            .env("GIT_OPTIONAL_LOCKS", "0")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.output()
    };
    let head = git(&["rev-parse", "--verify", "--quiet", "HEAD"])
        .await
        .ok()?;
    let commit = String::from_utf8_lossy(&head.stdout).trim().to_string();
    if !head.status.success() || commit.is_empty() {
        return None;
    }
    let status = git(&["status", "--porcelain", "--untracked-files=normal"])
        .await
        .ok()?;
    let dirty = !status.status.success() || !status.stdout.is_empty();
    let mut tags = given
        .and_then(|g| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&g).ok())
        .unwrap_or_default();
    for (k, v) in [
        ("mlflow.source.git.commit", commit.clone()),
        ("bridge.git_commit", commit),
        ("bridge.git_dirty", dirty.to_string()),
    ] {
        tags.entry(k.to_string())
            .or_insert(serde_json::Value::String(v));
    }
    Some(serde_json::Value::Object(tags).to_string())
}

/// Rewrites a pulled MLflow `meta.yaml` at `dest` whose `artifact_uri` or
/// `artifact_location` names `agent_base` (the job's workdir on the agent)
/// to name `local_base` (where its outputs land here). True when it
/// changed. Other files and other values are left alone.
pub fn relocate_meta(dest: &Path, agent_base: &str, local_base: &Path) -> io::Result<bool> {
    if dest.file_name().is_none_or(|n| n != "meta.yaml") || agent_base.is_empty() {
        return Ok(false);
    }
    let text = match std::fs::read_to_string(dest) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => return Ok(false),
        Err(e) => return Err(e),
    };
    let agent = agent_base.trim_end_matches('/');
    let local = local_base.display().to_string();
    let local = local.trim_end_matches('/');
    let mut changed = false;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let fixed = ["artifact_uri: ", "artifact_location: "]
            .iter()
            .find_map(|key| {
                let value = line.strip_prefix(key)?;
                let (scheme, path) = match value.strip_prefix("file://") {
                    Some(p) => ("file://", p),
                    None => ("", value),
                };
                let tail = path.strip_prefix(agent)?;
                (tail.starts_with('/') || tail.trim_end().is_empty())
                    .then(|| format!("{key}{scheme}{local}{tail}"))
            });
        match fixed {
            Some(f) => {
                changed = true;
                out.push_str(&f);
            }
            None => out.push_str(line),
        }
    }
    if changed {
        bridge_proto::index::write_atomic(dest, out.as_bytes())?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_are_recognised() {
        let s = LocalServer::parse("http://127.0.0.1:5000").unwrap();
        assert_eq!((s.port, s.https, s.rest.as_str()), (5000, false, ""));
        assert_eq!(s.via(41234), "http://127.0.0.1:41234");
        let s = LocalServer::parse("http://localhost:5000/mlflow/").unwrap();
        assert_eq!(s.via(7), "http://127.0.0.1:7/mlflow/");
        assert_eq!(s.prefix(), "/mlflow");
        let s = LocalServer::parse("http://[::1]:8080").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("[::1]", 8080));
        let s = LocalServer::parse("https://u:p@localhost/x?y=1").unwrap();
        assert_eq!(s.port, 443);
        assert_eq!(s.via(9), "https://u:p@localhost:9/x?y=1");
        assert_eq!(LocalServer::parse("http://127.0.0.1").unwrap().port, 80);
        for not in [
            "http://mlflow.example.com:5000",
            "http://10.0.0.2:5000",
            "file:///tmp/mlruns",
            "databricks",
            "sqlite:///mlflow.db",
            "http://127.0.0.1:notaport",
            "./mlruns",
        ] {
            assert_eq!(LocalServer::parse(not), None, "{not}");
        }
    }

    #[test]
    fn machine_paths() {
        for p in [
            "file:///home/me/mlruns/0",
            "/srv/mlruns",
            "./mlruns",
            "mlruns",
        ] {
            assert!(is_machine_path(p), "{p}");
        }
        for p in ["mlflow-artifacts:/0", "s3://bucket/x", "gs://b/x"] {
            assert!(!is_machine_path(p), "{p}");
        }
    }

    #[test]
    fn pulled_meta_files_name_the_local_tree() {
        let d = tempfile::tempdir().unwrap();
        let meta = d.path().join("meta.yaml");
        std::fs::write(
            &meta,
            "artifact_uri: file:///agent/jobs/7/tree/ex/mlruns/0/abc/artifacts\nend_time: 1\nname: file:///agent/jobs/7/tree/ex\n",
        )
        .unwrap();
        let local = d.path().join("repo/ex");
        assert!(relocate_meta(&meta, "/agent/jobs/7/tree/ex", &local).unwrap());
        let text = std::fs::read_to_string(&meta).unwrap();
        assert_eq!(
            text,
            format!(
                "artifact_uri: file://{}/mlruns/0/abc/artifacts\nend_time: 1\nname: file:///agent/jobs/7/tree/ex\n",
                local.display()
            )
        );
        // Once is enough; other prefixes and files are left alone.
        assert!(!relocate_meta(&meta, "/agent/jobs/7/tree/ex", &local).unwrap());
        std::fs::write(
            &meta,
            "artifact_location: /agent/jobs/70/tree/ex/mlruns/0\n",
        )
        .unwrap();
        assert!(!relocate_meta(&meta, "/agent/jobs/7/tree/ex", &local).unwrap());
        let other = d.path().join("params.yaml");
        std::fs::write(&other, "artifact_uri: /agent/jobs/7/tree/ex/x\n").unwrap();
        assert!(!relocate_meta(&other, "/agent/jobs/7/tree/ex", &local).unwrap());
        std::fs::write(&meta, "artifact_location: /agent/jobs/7/tree/ex/mlruns/0\n").unwrap();
        assert!(relocate_meta(&meta, "/agent/jobs/7/tree/ex/", &local).unwrap());
        assert_eq!(
            std::fs::read_to_string(&meta).unwrap(),
            format!("artifact_location: {}/mlruns/0\n", local.display())
        );
    }

    /// The git state is asked again when the tree or `.git` changed, and
    /// reused otherwise.
    #[tokio::test]
    async fn run_context_is_reused_until_the_tree_or_git_changes() {
        let d = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(d.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(d.path().join("a.py"), "a").unwrap();
        git(&["add", "a.py"]);
        git(&["commit", "-qm", "one"]);
        let cache = ContextCache::default();
        let dirty = |v: Option<String>| {
            let v: serde_json::Value = serde_json::from_str(&v.unwrap()).unwrap();
            v["bridge.git_dirty"].as_str().unwrap().to_string()
        };
        let ctx = |root: &'static str| run_context_cached(&cache, d.path(), None, root);
        assert_eq!(dirty(ctx("r1").await), "false");
        std::fs::write(d.path().join("b.py"), "b").unwrap();
        assert_eq!(
            dirty(ctx("r1").await),
            "false",
            "nothing it keys on changed"
        );
        assert_eq!(dirty(ctx("r2").await), "true", "the tree's root changed");
        git(&["add", "b.py"]);
        git(&["commit", "-qm", "two"]);
        assert_eq!(dirty(ctx("r2").await), "false", "a commit changes .git");
    }

    #[tokio::test]
    async fn run_context_outside_git_is_none() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(run_context(d.path(), None).await, None);
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("my exp/1"), "my%20exp%2F1");
    }
}
