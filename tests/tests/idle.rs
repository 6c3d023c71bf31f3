//! Idle autostop against a real `bridge-agent serve --idle-timeout 2
//! --idle-command 'touch MARKER'`: a pinging client, a running job and a
//! connected daemon hold the machine; the command runs about one timeout
//! after the last of them is gone.
//!
//! The idle clock starts with the agent, so a slow start may run the command
//! once before a test holds the machine: each test removes the marker once it
//! holds it, and asserts from there.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bridge_proto::v1::agent_client::AgentClient;
use bridge_proto::v1::jobs_client::JobsClient;
use bridge_proto::v1::{self, JobState};
use bridge_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(2);
const TOKEN: &str = "idle-test-token";

/// Adds the test token to every call.
#[derive(Clone)]
struct Token;

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(
            "authorization",
            tonic::metadata::MetadataValue::from_static("Bearer idle-test-token"),
        );
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Token>;

/// Writes `token` as a private token file.
fn write_token(path: &Path, token: &str) {
    std::fs::write(path, token).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `bridge-agent serve` with a 2 s idle timeout whose command touches `marker`.
fn spawn_agent(root: &Path, socket: &Path, token: &Path, marker: &Path, log: &Path) -> Child {
    Command::new(agent_bin())
        .arg("serve")
        .arg("--root")
        .arg(root)
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--token-file")
        .arg(token)
        .arg("--idle-timeout")
        .arg(TIMEOUT.as_secs().to_string())
        .arg("--idle-command")
        .arg(format!("touch '{}'", marker.display()))
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start bridge-agent")
}

/// Kills and reaps the agent, whatever the test's outcome.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent of our own in a temporary directory.
struct Agent {
    dir: tempfile::TempDir,
    child: Reaped,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        write_token(&token, TOKEN);
        let child = spawn_agent(
            &dir.path().join("root"),
            &dir.path().join("agent.sock"),
            &token,
            &dir.path().join("marker"),
            &dir.path().join("agent.log"),
        );
        Agent {
            dir,
            child: Reaped(child),
        }
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    async fn channel(&self) -> Channel {
        let sock = self.dir.path().join("agent.sock");
        match unix_channel(&sock, Duration::from_secs(5)).await {
            Some(c) => c,
            None => panic!("cannot connect to the agent:\n{}", self.log()),
        }
    }

    async fn agent(&self) -> AgentClient<Authed> {
        AgentClient::with_interceptor(self.channel().await, Token)
    }

    async fn jobs(&self) -> JobsClient<Authed> {
        JobsClient::with_interceptor(self.channel().await, Token)
    }
}

/// An `Attach` stream held the way a daemon holds it.
struct Attached {
    pings: mpsc::Sender<v1::AttachPing>,
    answers: tonic::Streaming<v1::IdleStatus>,
}

impl Attached {
    /// Opens the stream; returns it with the agent's answer to the opening.
    async fn open(agent: &Agent) -> (Attached, v1::IdleStatus) {
        let (pings, rx) = mpsc::channel(4);
        let mut answers = agent
            .agent()
            .await
            .attach(ReceiverStream::new(rx))
            .await
            .expect("attach")
            .into_inner();
        let first = answers
            .message()
            .await
            .expect("an answer")
            .expect("the stream stays open");
        (Attached { pings, answers }, first)
    }

    async fn ping(&mut self) -> v1::IdleStatus {
        self.pings
            .send(v1::AttachPing {
                mirror: "test".into(),
            })
            .await
            .unwrap();
        self.answers
            .message()
            .await
            .expect("an answer")
            .expect("the stream stays open")
    }
}

/// Lets a command the agent may have started before the machine was held
/// finish, then removes its marker.
async fn forget_earlier_runs(marker: &Path) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::fs::remove_file(marker);
}

/// Waits (up to 10 s) for the marker; how long that took.
async fn wait_marker(marker: &Path, log: impl Fn() -> String) -> Duration {
    let t = Instant::now();
    while !marker.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the idle command never ran:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinging_client_holds_the_machine_and_its_detach_starts_the_clock() {
    let agent = Agent::start();
    let (mut att, first) = Attached::open(&agent).await;
    assert_eq!(first.idle_timeout_s, 2);
    assert_eq!(
        first.idle_command,
        format!("touch '{}'", agent.marker().display())
    );
    assert_eq!(
        (first.shutdown_in_s, first.daemons, first.jobs_active),
        (2, 1, 0)
    );
    forget_earlier_runs(&agent.marker()).await;

    // Held for twice the timeout and more: the command never runs.
    let held = Instant::now();
    while held.elapsed() < TIMEOUT * 2 + Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let st = att.ping().await;
        assert_eq!((st.daemons, st.shutdown_in_s), (1, 2));
        assert!(
            !agent.marker().exists(),
            "the idle command ran while a client was attached:\n{}",
            agent.log()
        );
    }

    // Gone: it runs one timeout later (not before).
    drop(att);
    let took = wait_marker(&agent.marker(), || agent.log()).await;
    assert!(
        took >= TIMEOUT - Duration::from_millis(200),
        "ran {took:?} after the client detached, before the {TIMEOUT:?} timeout"
    );
    assert!(agent.log().contains("running the idle command"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attached_client_does_not_keep_the_agent_from_stopping() {
    let mut agent = Agent::start();
    let (mut att, _) = Attached::open(&agent).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The agent ends the stream rather than wait for it in its graceful
    // shutdown.
    let end = tokio::time::timeout(Duration::from_secs(5), att.answers.message()).await;
    assert!(
        matches!(end, Ok(Ok(None) | Err(_))),
        "the attach stream outlived the agent's shutdown: {end:?}\n{}",
        agent.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            agent.child.0.try_wait(),
            Ok(Some(_))
        )),
        "the agent did not stop on SIGTERM while a client was attached:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_holds_the_machine_and_the_clock_starts_when_it_ends() {
    let agent = Agent::start();
    // Attached while the job is set up, so nothing runs in between.
    let (mut att, _) = Attached::open(&agent).await;
    let mut c = agent.agent().await;
    c.hello(v1::HelloRequest {
        protocol_version: bridge_proto::PROTOCOL_VERSION,
        client_version: "test".into(),
        mirror: "m".into(),
        exclude_lines: vec![],
    })
    .await
    .unwrap();
    let root = c
        .root(v1::RootRequest { mirror: "m".into() })
        .await
        .unwrap()
        .into_inner()
        .root;
    let generation: String = root.iter().map(|b| format!("{b:02x}")).collect();
    let mut jobs = agent.jobs().await;
    let job = jobs
        .submit(v1::SubmitRequest {
            mirror: "m".into(),
            generation,
            spec: Some(v1::JobSpec {
                run: "sleep 4".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("submit")
        .into_inner();
    let st = att.ping().await;
    assert_eq!((st.jobs_active, st.daemons), (1, 1));
    forget_earlier_runs(&agent.marker()).await;
    drop(att);

    // The job alone holds it for longer than the timeout.
    let ended = loop {
        let fired = agent.marker().exists();
        let info = jobs
            .get(v1::JobRef { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if bridge_proto::jobs::is_terminal(info.state()) {
            assert_eq!(info.state(), JobState::Succeeded, "{info:?}");
            break Instant::now();
        }
        assert!(
            !fired,
            "the idle command ran while job {} was {:?}:\n{}",
            job.id,
            info.state(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_marker(&agent.marker(), || agent.log()).await;
    let took = ended.elapsed();
    // The policy looks once a second, so the clock starts up to 1 s before
    // the job's end.
    assert!(
        took >= TIMEOUT - Duration::from_secs(1) - Duration::from_millis(200),
        "ran {took:?} after the job ended"
    );
}

#[test]
fn a_connected_daemon_holds_the_agent_and_shows_autostop_in_status() {
    let r = Repo::new();
    r.write("a.txt", "a\n");
    // The local provider reuses an agent already serving on its socket with
    // its token: start one with autostop there.
    let state = r.path(".bridge");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(state.join(".gitignore"), "*\n").unwrap();
    write_token(&state.join("token"), TOKEN);
    let marker = r.scratch("marker");
    let agent = Reaped(spawn_agent(
        &state.join("agent"),
        &state.join("agent.sock"),
        &state.join("token"),
        &marker,
        &state.join("agent.log"),
    ));
    // `bridge down` (and the harness) stop it through the pid file.
    std::fs::write(state.join("agent.pid"), agent.0.id().to_string()).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(state.join("agent.sock")).is_ok()
        }),
        "the agent did not start:\n{}",
        r.agent_log()
    );
    r.up();

    let mut st = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            st = r.status();
            !st["autostop"].is_null()
        }),
        "no autostop in the status: {st:#}\ndaemon log:\n{}",
        r.daemon_log()
    );
    let a = &st["autostop"];
    assert_eq!(a["timeout_s"], 2, "{a}");
    assert_eq!(a["daemons"], 1, "{a}");
    assert_eq!(a["jobs_active"], 0, "{a}");
    assert_eq!(a["shutdown_in_s"], 2, "{a}");
    assert_eq!(a["command"], format!("touch '{}'", marker.display()));
    let text = r.ok(&["status"]);
    assert!(
        text.contains(&format!(
            "autostop     after 2s idle runs `touch '{}'`; held by this daemon (",
            marker.display()
        )),
        "{text}"
    );

    // The daemon holds the agent for longer than the timeout...
    std::thread::sleep(Duration::from_millis(300));
    let _ = std::fs::remove_file(&marker);
    std::thread::sleep(TIMEOUT + Duration::from_millis(500));
    assert!(
        !marker.exists(),
        "the idle command ran while the daemon was attached:\n{}",
        r.agent_log()
    );
    // ...and a killed daemon (its connection closes) lets go at once.
    let daemon: i32 = std::fs::read_to_string(r.path(".bridge/daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || marker.exists()),
        "the idle command never ran after the daemon was killed:\n{}",
        r.agent_log()
    );
    let took = killed.elapsed();
    assert!(
        took >= TIMEOUT - Duration::from_millis(200),
        "ran {took:?} after the daemon was killed"
    );
}
