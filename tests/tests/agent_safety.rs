//! A raw gRPC client against a real `bridge-agent`: everything the agent must
//! refuse, refused with the right code, and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use bridge_proto::v1::agent_client::AgentClient;
use bridge_proto::v1::{self, sync_down, sync_up};
use bridge_tests::*;
use tonic::transport::Channel;

struct Agent {
    dir: tempfile::TempDir,
    child: Child,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "right-token").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        let child = Command::new(agent_bin())
            .args(["serve", "--root"])
            .arg(dir.path().join("root"))
            .arg("--listen")
            .arg(format!("unix:{}", dir.path().join("agent.sock").display()))
            .arg("--token-file")
            .arg(&token)
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || dir
            .path()
            .join("agent.sock")
            .exists()));
        Agent { dir, child }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    async fn channel(&self) -> Channel {
        let sock = self.dir.path().join("agent.sock");
        match unix_channel(&sock, Duration::from_secs(2)).await {
            Some(c) => c,
            None => panic!(
                "cannot connect to the agent:\n{}",
                std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
            ),
        }
    }

    async fn client(
        &self,
        token: Option<&str>,
    ) -> AgentClient<
        tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor>,
    > {
        let token =
            token.map(|t| tonic::metadata::MetadataValue::try_from(format!("Bearer {t}")).unwrap());
        AgentClient::with_interceptor(self.channel().await, move |mut req: tonic::Request<()>| {
            if let Some(t) = &token {
                req.metadata_mut().insert("authorization", t.clone());
            }
            Ok(req)
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hello(mirror: &str) -> v1::HelloRequest {
    v1::HelloRequest {
        protocol_version: bridge_proto::PROTOCOL_VERSION,
        client_version: "test".into(),
        mirror: mirror.into(),
        exclude_lines: vec![],
    }
}

fn put(path: &str, data: &[u8]) -> v1::Op {
    v1::Op {
        op: Some(v1::op::Op::Put(v1::Put {
            path: path.into(),
            executable: false,
            chunks: vec![v1::ChunkRef {
                id: blake3::hash(data).as_bytes().to_vec().into(),
                len: data.len() as u32,
            }],
            ..Default::default()
        })),
    }
}

fn msg(m: sync_up::Msg) -> v1::SyncUp {
    v1::SyncUp { msg: Some(m) }
}

/// Runs one round: a plan of `ops`, the bodies the agent asks for taken from
/// `bodies` (id order), a commit. Returns the final status or Done.
async fn round<T>(
    c: &mut AgentClient<T>,
    ops: Vec<v1::Op>,
    bodies: &[&[u8]],
) -> Result<v1::Done, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: tonic::transport::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::transport::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(msg(sync_up::Msg::Begin(v1::Begin {
        mirror: "m".into(),
        generation: 1,
    })))
    .await
    .unwrap();
    tx.send(msg(sync_up::Msg::Plan(v1::Plan {
        ops: ops.clone(),
        eager: false,
    })))
    .await
    .unwrap();
    let mut down = c
        .sync(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let need = match down.message().await? {
        Some(v1::SyncDown {
            msg: Some(sync_down::Msg::Need(n)),
        }) => n,
        other => panic!("expected Need, got {other:?}"),
    };
    let mut bodies = bodies.iter();
    for (op, n) in ops.iter().zip(&need.ops) {
        let Some(v1::op::Op::Put(p)) = &op.op else {
            continue;
        };
        for &i in &n.chunks {
            let data = bodies.next().expect("a body for every needed chunk");
            // A spliced Put lists no chunks: its bodies are sent as they are.
            let id = match p.chunks.get(i as usize) {
                Some(c) => c.id.clone(),
                None => blake3::hash(data).as_bytes().to_vec().into(),
            };
            let _ = tx
                .send(msg(sync_up::Msg::Chunk(v1::ChunkData {
                    id,
                    compression: 0,
                    data: data.to_vec().into(),
                })))
                .await;
        }
    }
    let _ = tx
        .send(msg(sync_up::Msg::Commit(v1::Commit { generation: 1 })))
        .await;
    match down.message().await? {
        Some(v1::SyncDown {
            msg: Some(sync_down::Msg::Done(d)),
        }) => Ok(d),
        other => panic!("expected Done, got {other:?}"),
    }
}

/// Every file under `dir`, for "nothing was written" checks.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_versions() {
    let a = Agent::start();
    let e = a.client(None).await.hello(hello("m")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = a
        .client(Some("wrong-token"))
        .await
        .hello(hello("m"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = a
        .client(Some("wrong-token"))
        .await
        .root(v1::RootRequest { mirror: "m".into() })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::Unauthenticated,
        "every call checks the token"
    );

    let mut c = a.client(Some("right-token")).await;
    let mut h = hello("m");
    h.protocol_version = 999;
    let e = c.hello(h).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("v999")
            && e.message()
                .contains(&format!("v{}", bridge_proto::PROTOCOL_VERSION)),
        "{}",
        e.message()
    );

    let e = c.hello(hello("../escape")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let r = c.hello(hello("m")).await.unwrap().into_inner();
    assert!(r.mirror_path.ends_with("mirrors/m"));
    assert!(!a.dir.path().join("escape").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_paths_write_nothing() {
    let a = Agent::start();
    let mut c = a.client(Some("right-token")).await;
    c.hello(hello("m")).await.unwrap();
    let mirror = a.root().join("mirrors/m");
    let bad = [
        "../x",
        "../../x",
        "/etc/x",
        "/tmp/bridge-abs-x",
        "a/../../x",
        "a//b",
        "./a",
        "a/.",
        "",
        "a\0b",
    ];
    for p in bad {
        let e = round(&mut c, vec![put(p, b"evil")], &[b"evil"])
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{p:?}: {e:?}");
    }
    for p in ["/etc/x", "/tmp/bridge-abs-x"] {
        assert!(!Path::new(p).exists(), "{p} was written");
    }
    let mkdir = v1::Op {
        op: Some(v1::op::Op::Mkdir(v1::Mkdir {
            path: "../dir".into(),
        })),
    };
    assert_eq!(
        round(&mut c, vec![mkdir], &[]).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let rm = v1::Op {
        op: Some(v1::op::Op::Remove(v1::Remove { path: "..".into() })),
    };
    assert_eq!(
        round(&mut c, vec![rm], &[]).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let link = v1::Op {
        op: Some(v1::op::Op::Symlink(v1::Symlink {
            path: "l".into(),
            target: "../../../etc".into(),
        })),
    };
    assert_eq!(
        round(&mut c, vec![link], &[]).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let link = v1::Op {
        op: Some(v1::op::Op::Symlink(v1::Symlink {
            path: "l".into(),
            target: "/etc".into(),
        })),
    };
    assert_eq!(
        round(&mut c, vec![link], &[]).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // A symlink planted in the mirror must not be written through.
    std::os::unix::fs::symlink(a.outside(), mirror.join("evil")).unwrap();
    let e = round(&mut c, vec![put("evil/x", b"payload")], &[b"payload"])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let rm = v1::Op {
        op: Some(v1::op::Op::Remove(v1::Remove {
            path: "evil/x".into(),
        })),
    };
    std::fs::write(a.outside().join("keep"), "keep").unwrap();
    let rm_keep = v1::Op {
        op: Some(v1::op::Op::Remove(v1::Remove {
            path: "evil/keep".into(),
        })),
    };
    assert_eq!(
        round(&mut c, vec![rm], &[]).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        round(&mut c, vec![rm_keep], &[]).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        files_under(&a.outside()),
        [a.outside().join("keep").display().to_string()],
        "wrote through the symlink"
    );

    // Nothing in the mirror, nothing left in tmp/.
    assert_eq!(
        files_under(&mirror)
            .into_iter()
            .filter(|f| !f.contains("/.git/") && !f.ends_with("/evil"))
            .count(),
        0
    );
    assert!(files_under(&a.root().join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_must_match_their_ids() {
    let a = Agent::start();
    let mut c = a.client(Some("right-token")).await;
    c.hello(hello("m")).await.unwrap();
    let mirror = a.root().join("mirrors/m");
    let e = round(&mut c, vec![put("model.py", b"hello")], &[b"jello"])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("does not match its id"),
        "{}",
        e.message()
    );
    assert!(!mirror.join("model.py").exists());
    assert!(
        files_under(&a.root().join("tmp")).is_empty(),
        "a half-written file was left"
    );

    // The same round with the right bytes is applied, and its root reported.
    let done = round(&mut c, vec![put("model.py", b"hello")], &[b"hello"])
        .await
        .unwrap();
    assert_eq!(std::fs::read(mirror.join("model.py")).unwrap(), b"hello");
    let root = c
        .root(v1::RootRequest { mirror: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(root.root, done.root);
    assert_eq!(root.files, 1);
    // Now the agent has the chunk: a second file with it needs no body.
    let done = round(&mut c, vec![put("copy.py", b"hello")], &[])
        .await
        .unwrap();
    assert!(done.failures.is_empty());
    assert_eq!(std::fs::read(mirror.join("copy.py")).unwrap(), b"hello");
}

/// A Put sent as a splice of the version the agent holds: only the new
/// chunks' bodies cross; a base the agent lacks fails the op (retryable),
/// and a splice that does not fit its base is refused. Nothing half-written.
#[tokio::test(flavor = "multi_thread")]
async fn spliced_puts_apply_against_the_held_version_only() {
    use bridge_proto::chunking::{ChunkRef, chunk_id, content_hash};
    let a = Agent::start();
    let mut c = a.client(Some("right-token")).await;
    c.hello(hello("m")).await.unwrap();
    let mirror = a.root().join("mirrors/m");
    let chunk = |k: &str| format!("chunk {k} ").repeat(10).into_bytes();
    let refs = |bodies: &[Vec<u8>]| -> Vec<ChunkRef> {
        bodies
            .iter()
            .map(|b| ChunkRef {
                id: chunk_id(b),
                len: b.len() as u32,
            })
            .collect()
    };
    let whole = |bodies: &[Vec<u8>]| v1::Op {
        op: Some(v1::op::Op::Put(v1::Put {
            path: "big.bin".into(),
            chunks: refs(bodies).iter().map(v1::ChunkRef::from).collect(),
            ..Default::default()
        })),
    };
    let spliced = |base: &[u8], steps: Vec<v1::Splice>| v1::Op {
        op: Some(v1::op::Op::Put(v1::Put {
            path: "big.bin".into(),
            base: base.to_vec().into(),
            splice: steps,
            ..Default::default()
        })),
    };

    let old: Vec<Vec<u8>> = (0..40).map(|k| chunk(&k.to_string())).collect();
    let bodies: Vec<&[u8]> = old.iter().map(|b| b.as_slice()).collect();
    round(&mut c, vec![whole(&old)], &bodies).await.unwrap();
    let base = content_hash(&refs(&old));

    // Chunks 20 and 21 rewritten: the agent asks for those two bodies only.
    let mut new = old.clone();
    new[20] = chunk("A");
    new[21] = chunk("B");
    let steps = bridge_proto::splice::encode(&refs(&old), &refs(&new)).expect("a splice");
    assert_eq!(steps.iter().map(|s| s.insert.len()).sum::<usize>(), 2);
    let done = round(
        &mut c,
        vec![spliced(base.as_bytes(), steps.clone())],
        &[&new[20], &new[21]],
    )
    .await
    .unwrap();
    assert!(done.failures.is_empty(), "{:?}", done.failures);
    assert_eq!(std::fs::read(mirror.join("big.bin")).unwrap(), new.concat());

    // The same splice again: its base is no longer the mirror's version.
    let done = round(&mut c, vec![spliced(base.as_bytes(), steps)], &[])
        .await
        .unwrap();
    assert_eq!(done.failures.len(), 1, "{:?}", done.failures);
    assert_eq!(done.failures[0].path, "big.bin");
    assert_eq!(std::fs::read(mirror.join("big.bin")).unwrap(), new.concat());

    // A splice copying past the end of its base is refused.
    let cur = content_hash(&refs(&new));
    let past = vec![v1::Splice {
        skip: 30,
        copy: 11,
        ..Default::default()
    }];
    let e = round(&mut c, vec![spliced(cur.as_bytes(), past)], &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("past the end"), "{}", e.message());
    assert_eq!(std::fs::read(mirror.join("big.bin")).unwrap(), new.concat());
    assert!(files_under(&a.root().join("tmp")).is_empty());
}

/// One eager round (`Plan.eager`): the plan, then every body of every Put in
/// op order (`bodies`, one per Put here), then a commit, sent without waiting
/// for anything; the agent answers Done only.
async fn eager_round<T>(
    c: &mut AgentClient<T>,
    ops: Vec<v1::Op>,
    bodies: &[&[u8]],
    commit: bool,
) -> Result<v1::Done, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: tonic::transport::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::transport::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let mut up = vec![
        msg(sync_up::Msg::Begin(v1::Begin {
            mirror: "m".into(),
            generation: 1,
        })),
        msg(sync_up::Msg::Plan(v1::Plan { ops, eager: true })),
    ];
    for b in bodies {
        up.push(msg(sync_up::Msg::Chunk(v1::ChunkData {
            id: blake3::hash(b).as_bytes().to_vec().into(),
            compression: 0,
            data: b.to_vec().into(),
        })));
    }
    if commit {
        up.push(msg(sync_up::Msg::Commit(v1::Commit { generation: 1 })));
    }
    let mut down = c.sync(tokio_stream::iter(up)).await?.into_inner();
    match down.message().await? {
        Some(v1::SyncDown {
            msg: Some(sync_down::Msg::Done(d)),
        }) => Ok(d),
        None => Err(tonic::Status::aborted("the round ended without Done")),
        other => panic!("expected Done, got {other:?}"),
    }
}

/// An eager round lands in one trip: bodies the agent lacks are used, those it
/// holds are dropped, no Need is sent; a body too many, a commit before the
/// last body, or a splice in an eager plan is refused and writes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_eager_round_uses_the_bodies_it_lacks_and_refuses_a_wrong_stream() {
    let a = Agent::start();
    let mut c = a.client(Some("right-token")).await;
    c.hello(hello("m")).await.unwrap();
    let mirror = a.root().join("mirrors/m");
    round(&mut c, vec![put("held.py", b"held")], &[b"held"])
        .await
        .unwrap();

    let mkdir = v1::Op {
        op: Some(v1::op::Op::Mkdir(v1::Mkdir { path: "d".into() })),
    };
    let done = eager_round(
        &mut c,
        vec![put("d/copy.py", b"held"), mkdir, put("d/new.py", b"new")],
        &[b"held", b"new"],
        true,
    )
    .await
    .unwrap();
    assert!(done.failures.is_empty(), "{:?}", done.failures);
    assert_eq!(std::fs::read(mirror.join("d/copy.py")).unwrap(), b"held");
    assert_eq!(std::fs::read(mirror.join("d/new.py")).unwrap(), b"new");
    let root = c
        .root(v1::RootRequest { mirror: "m".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(root.root, done.root);
    assert_eq!(root.files, 3);

    // A body more than the plan holds: refused. The Put before it is whole
    // (its only body came first), as every op of a broken round is whole or
    // absent.
    let e = eager_round(
        &mut c,
        vec![put("extra.py", b"extra")],
        &[b"extra", b"more"],
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("more chunk bodies"), "{}", e.message());
    assert_eq!(std::fs::read(mirror.join("extra.py")).unwrap(), b"extra");
    // A commit before the bodies: refused, nothing written.
    let e = eager_round(&mut c, vec![put("early.py", b"early")], &[], true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("commit before"), "{}", e.message());
    assert!(!mirror.join("early.py").exists());
    // A daemon gone before its bodies: no Done, nothing written.
    let e = eager_round(&mut c, vec![put("gone.py", b"gone")], &[], false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(!mirror.join("gone.py").exists());
    let spliced = v1::Op {
        op: Some(v1::op::Op::Put(v1::Put {
            path: "held.py".into(),
            base: blake3::hash(b"held").as_bytes().to_vec().into(),
            splice: vec![v1::Splice {
                skip: 0,
                insert: vec![],
                copy: 1,
            }],
            ..Default::default()
        })),
    };
    let e = eager_round(&mut c, vec![spliced], &[], true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("splice in an eager plan"),
        "{}",
        e.message()
    );
    assert_eq!(std::fs::read(mirror.join("held.py")).unwrap(), b"held");
    assert!(files_under(&a.root().join("tmp")).is_empty());
}
