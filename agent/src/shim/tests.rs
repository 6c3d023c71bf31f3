//! Shim tests with real processes. The shim makes its process a subreaper and
//! reaps any child, which would disturb the other tests of this binary, so
//! each shim runs in a process of its own: this test binary again, running
//! only [`shim_process_entry`].

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};

use super::*;
use crate::joblog::{self, Chunk, STDERR, STDOUT, SYSTEM};

const CHILD_ENV: &str = "BRIDGE_SHIM_TEST_JOB_DIR";

/// Not a test of its own: the shim's `main` when [`spawn_shim`] re-runs this
/// binary with the job directory in the environment. Passes trivially
/// otherwise.
#[test]
fn shim_process_entry() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        std::process::exit(run(Path::new(&dir)));
    }
}

struct Job {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    tree: PathBuf,
    cache: PathBuf,
}

impl Job {
    fn new() -> Job {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("job");
        let tree = tmp.path().join("tree");
        let cache = tmp.path().join("cache");
        for d in [&dir, &tree, &cache] {
            fs::create_dir_all(d).unwrap();
        }
        Job {
            _tmp: tmp,
            dir,
            tree,
            cache,
        }
    }

    fn spec(&self, command: &str) -> ShimSpec {
        ShimSpec {
            job_id: "j1".into(),
            tree: self.tree.clone(),
            cwd: self.tree.clone(),
            command: command.into(),
            env: BTreeMap::from([("BRIDGE_JOB_ID".to_string(), "j1".to_string())]),
            python: None,
            setup: None,
            cache_dir: self.cache.clone(),
            grace_ms: 300,
            live: false,
            debugpy_port: None,
            kernel: None,
            cluster: None,
        }
    }

    /// A fresh job directory for another run against the same cache.
    fn next_run(&mut self, n: u32) {
        self.dir = self.dir.with_file_name(format!("job{n}"));
        fs::create_dir_all(&self.dir).unwrap();
    }

    fn spawn(&self, spec: &ShimSpec) -> Child {
        fs::write(self.dir.join(SPEC_FILE), serde_json::to_vec(spec).unwrap()).unwrap();
        let shim_log = fs::File::create(self.dir.join("shim.log")).unwrap();
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "shim::tests::shim_process_entry", "--nocapture"])
            .env(CHILD_ENV, &self.dir)
            .stdin(Stdio::null())
            .stdout(shim_log.try_clone().unwrap())
            .stderr(shim_log)
            .process_group(0)
            .spawn()
            .unwrap()
    }

    fn finish(&self, mut child: Child) -> (i32, ShimExit) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "shim hangs; shim.log: {}",
                fs::read_to_string(self.dir.join("shim.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let exit: ShimExit =
            serde_json::from_slice(&fs::read(self.dir.join(EXIT_FILE)).unwrap()).unwrap();
        (status.code().unwrap_or(-1), exit)
    }

    fn run(&self, spec: &ShimSpec) -> (i32, ShimExit) {
        self.finish(self.spawn(spec))
    }

    fn chunks(&self) -> Vec<Chunk> {
        joblog::read_chunks(&self.dir.join(LOG_FILE), 0, usize::MAX).unwrap()
    }

    fn stream_text(&self, stream: u8) -> String {
        self.chunks()
            .iter()
            .filter(|c| c.stream == stream)
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect()
    }

    fn state(&self) -> Option<ShimState> {
        serde_json::from_slice(&fs::read(self.dir.join(STATE_FILE)).ok()?).ok()
    }
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[test]
fn output_and_exit_code() {
    let job = Job::new();
    let t0 = Instant::now();
    let (code, exit) = job.run(&job.spec("echo hi; echo err >&2; echo $BRIDGE_JOB_ID; exit 3"));
    assert_eq!(code, 3);
    assert_eq!(
        exit,
        ShimExit {
            phase: Phase::Running,
            code: Some(3),
            signal: None,
            reason: "command failed (exit 3)".into(),
            finished_ms: exit.finished_ms,
        }
    );
    assert_eq!(job.stream_text(STDOUT), "hi\nj1\n");
    assert_eq!(job.stream_text(STDERR), "err\n");
    assert_eq!(job.stream_text(SYSTEM), "");
    let state = job.state().unwrap();
    assert_eq!(state.phase, Phase::Running);
    assert!(state.started_ms > 0 && state.child_pid.is_some());
    eprintln!("shim run of a trivial job took {:?}", t0.elapsed());
}

#[test]
fn missing_command_is_127() {
    let job = Job::new();
    let (code, exit) = job.run(&job.spec("bridge-no-such-command-xyz"));
    assert_eq!(code, 127);
    assert_eq!(exit.code, Some(127));
    assert_eq!(exit.reason, "command not found (exit 127)");
    assert!(job.stream_text(STDERR).contains("not found"));
}

#[test]
fn success_has_empty_reason_and_signals_are_128_plus() {
    let job = Job::new();
    let (code, exit) = job.run(&job.spec("true"));
    assert_eq!((code, exit.code, exit.reason.as_str()), (0, Some(0), ""));
    let job = Job::new();
    let (code, exit) = job.run(&job.spec("kill -9 $$"));
    assert_eq!(code, 137);
    assert_eq!(exit.signal, Some(9));
    assert_eq!(exit.reason, "killed by signal 9");
}

#[test]
fn no_process_outlives_the_job() {
    let job = Job::new();
    let pids = job.tree.join("pids");
    // A setsid daemon holding the output pipe, a double-forked orphan, and
    // one that ignores SIGTERM (needs the SIGKILL after the grace).
    let cmd = format!(
        "setsid sleep 1000 & echo $! >> {p}; \
         (sleep 1000 & echo $! >> {p}) ; \
         (trap '' TERM; exec sleep 1000) & echo $! >> {p}; \
         echo started",
        p = pids.display()
    );
    let t0 = Instant::now();
    let (code, exit) = job.run(&job.spec(&cmd));
    let took = t0.elapsed();
    assert_eq!((code, exit.reason.as_str()), (0, ""));
    assert_eq!(job.stream_text(STDOUT), "started\n");
    let pids: Vec<i32> = fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the job");
    }
    assert!(job.stream_text(SYSTEM).contains("stopped 3 processes"));
    // The SIGTERM-proof one cost the grace (300 ms), not more.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn cancel_stops_the_job() {
    let job = Job::new();
    let child = job.spawn(&job.spec("echo started; sleep 1000; echo never"));
    let t0 = Instant::now();
    while !job.stream_text(STDOUT).contains("started") {
        assert!(t0.elapsed() < Duration::from_secs(10), "no output");
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("first output after {:?}", t0.elapsed());
    // What the agent does, once the shim has recorded the job's pid (the
    // job's first line can come before that record).
    let child_pid = loop {
        if let Some(pid) = job.state().and_then(|s| s.child_pid) {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no child pid recorded"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    fs::write(job.dir.join(CANCEL_FILE), b"").unwrap();
    killpg(Pid::from_raw(child_pid as i32), Signal::SIGTERM).unwrap();
    let (code, exit) = job.finish(child);
    assert_eq!(exit.reason, "cancelled");
    assert_eq!(exit.phase, Phase::Running);
    assert_eq!(exit.code, Some(143));
    assert_eq!(exit.signal, Some(15));
    assert_eq!(code, 143);
    assert!(!job.stream_text(STDOUT).contains("never"));
}

#[test]
fn cancel_before_start_runs_nothing() {
    let job = Job::new();
    fs::write(job.dir.join(CANCEL_FILE), b"").unwrap();
    let (_, exit) = job.run(&job.spec("echo ran"));
    assert_eq!((exit.phase, exit.code), (Phase::Setup, None));
    assert_eq!(exit.reason, "cancelled");
    assert_eq!(job.stream_text(STDOUT), "");
}

#[test]
fn setup_runs_once_and_failures_stop_the_job() {
    let mut job = Job::new();
    let counter = job.cache.join("counter");
    let mut f = fs::File::create(job.tree.join("setup.sh")).unwrap();
    writeln!(
        f,
        "echo setting up; echo $BRIDGE_JOB_ID >> {}",
        counter.display()
    )
    .unwrap();
    let mut spec = job.spec("echo main");
    spec.setup = Some(SetupSpec {
        command: "sh setup.sh".into(),
        inputs: vec![job.tree.join("setup.sh")],
    });

    let (code, exit) = job.run(&spec);
    assert_eq!((code, exit.reason.as_str()), (0, ""));
    assert_eq!(job.stream_text(STDOUT), "setting up\nmain\n");
    assert!(job.stream_text(SYSTEM).contains("bridge: running setup"));

    job.next_run(2);
    let (code, _) = job.run(&spec);
    assert_eq!(code, 0);
    assert_eq!(job.stream_text(STDOUT), "main\n");
    assert!(
        job.stream_text(SYSTEM)
            .starts_with("bridge: setup cached (key ")
    );
    assert_eq!(fs::read_to_string(&counter).unwrap(), "j1\n");

    job.next_run(3);
    let mut bad = spec.clone();
    bad.setup.as_mut().unwrap().command = "echo broken >&2; exit 3".into();
    let (code, exit) = job.run(&bad);
    assert_eq!(code, 3);
    assert_eq!(exit.phase, Phase::Setup);
    assert_eq!(exit.code, Some(3));
    assert_eq!(exit.reason, "setup failed (exit 3)");
    assert_eq!(job.stream_text(STDERR), "broken\n");
    assert_eq!(job.stream_text(STDOUT), "", "the command must not run");
    assert!(
        job.stream_text(SYSTEM)
            .ends_with("bridge: setup failed with exit code 3\n")
    );

    job.next_run(4);
    let mut missing = spec.clone();
    missing.setup.as_mut().unwrap().inputs = vec![job.tree.join("nope.txt")];
    let (code, exit) = job.run(&missing);
    assert_eq!((code, exit.code), (1, None));
    assert_eq!(exit.reason, "setup input nope.txt does not exist");
}

#[test]
fn orphans_are_reaped_while_the_command_runs() {
    let job = Job::new();
    // The shim's children while the command still runs: the orphaned `true`
    // (reparented to the shim) must not linger as a zombie.
    // `cat` skips processes that exit between the glob and the read (awk
    // would fail on them).
    let cmd = "(true &); sleep 0.3; cat /proc/[0-9]*/stat 2>/dev/null | awk -v pp=$PPID '$4 == pp { print $2, $3 }'";
    let (code, _) = job.run(&job.spec(cmd));
    assert_eq!(code, 0);
    let out = job.stream_text(STDOUT);
    assert!(out.contains("(sh) R") || out.contains("(sh) S"), "{out}");
    assert!(!out.contains(" Z"), "zombie children: {out}");
}

#[test]
fn a_live_command_that_fails_is_started_again_until_it_succeeds() {
    let job = Job::new();
    // Fails twice (exit 4), then succeeds: counted in a file of the tree.
    let mut spec = job.spec(
        "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; echo run $n; [ $n -ge 3 ] || exit 4",
    );
    spec.live = true;
    let t0 = Instant::now();
    let (code, exit) = job.run(&spec);
    assert_eq!((code, exit.code), (0, Some(0)), "{exit:?}");
    // Backoff: 1 s, then 2 s.
    assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
    let out = job.stream_text(crate::joblog::STDOUT);
    assert_eq!(out, "run 1\nrun 2\nrun 3\n");
    let sys = job.stream_text(crate::joblog::SYSTEM);
    assert!(
        sys.contains("the live command exited with code 4; starting it again in 1 s (restart 1)"),
        "{sys}"
    );
    assert!(sys.contains("in 2 s (restart 2)"), "{sys}");
    assert_eq!(job.state().unwrap().restarts, 2);
}

#[test]
fn a_cancelled_live_command_is_not_started_again() {
    let job = Job::new();
    let mut spec = job.spec("exit 1");
    spec.live = true;
    let child = job.spawn(&spec);
    std::thread::sleep(Duration::from_millis(300));
    fs::write(job.dir.join(CANCEL_FILE), b"").unwrap();
    let (_, exit) = job.finish(child);
    assert_eq!(exit.reason, "cancelled");
    assert_eq!(job.state().unwrap().restarts, 1);
}
