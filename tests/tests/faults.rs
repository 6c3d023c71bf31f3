//! The fault suite: processes killed at the worst moment, two of everything
//! at once. Each test does the damage to real processes and then checks
//! what survived.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use bridge_tests::{Repo, alive, bridge_bin, eventually, random_bytes, wait_pids};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn kill9(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !alive(pid)),
        "{pid} outlived SIGKILL"
    );
}

/// Pids of processes whose command line has every one of `needles`.
fn pids_with(needles: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if needles.iter().all(|n| cmd.contains(n)) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// A daemon killed with SIGKILL leaves its job running on the agent;
/// `bridge down` with no daemon still cancels it (the job and its
/// children end) and stops the local agent, and the next `up` reports the
/// job as cancelled.
#[test]
fn down_with_no_daemon_cancels_the_jobs_and_stops_the_agent() {
    let r = Repo::new();
    let pids = r.scratch("pids");
    r.write(
        "spawn.sh",
        format!(
            "echo $$ >> {p}\nsleep 1000 &\necho $! >> {p}\nwait\n",
            p = pids.display()
        ),
    );
    r.write("spawn.toml", "run = \"sh spawn.sh\"\n");
    r.up();
    let id = r.ok(&["run", "spawn.toml", "--detach"]).trim().to_string();
    let pids = wait_pids(&pids, 2);
    let agent = r.agent_pid().expect("agent pid");
    kill9(r.daemon_pid());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pids.iter().all(|&p| alive(p)),
        "the job died with the daemon"
    );

    let out = r.ok(&["down"]);
    assert!(
        out.contains("cancelled 1 job(s)") && out.contains("was not running"),
        "{out}"
    );
    assert!(
        eventually(Duration::from_secs(15), || pids.iter().all(|&p| !alive(p))),
        "the job outlived `bridge down`"
    );
    assert!(
        eventually(Duration::from_secs(10), || !alive(agent)),
        "the agent outlived `bridge down`"
    );
    assert!(!r.path(".bridge/daemon.sock").exists());

    r.up();
    let jobs = r.ps_json(true);
    let job = jobs
        .iter()
        .find(|j| j["id"] == id.as_str())
        .expect("the job");
    assert_eq!(job["state"], "cancelled", "{job}");
    // Nothing to cancel the second time: a plain stop.
    r.ok(&["down"]);
    let out = r.ok(&["down"]);
    assert!(
        !out.contains("cancelled") && out.contains("was not running"),
        "{out}"
    );
    // Where nothing ever ran, `down` starts nothing to stop it.
    let fresh = Repo::new();
    fresh.write("a.txt", "a");
    let out = fresh.ok(&["down"]);
    assert!(out.contains("was not running"), "{out}");
    assert!(
        !fresh.path(".bridge/agent").exists(),
        "down started an agent"
    );
    assert!(fresh.agent_pid().is_none());
}

/// Two `bridge up`s started at the same instant: one daemon wins, the other
/// command succeeds against it or says bridge is already up (as a second
/// `up` does), one agent runs. Then two `bridge run`s at
/// the same instant in a repository with nothing running: both jobs run
/// to the end with their own output.
#[test]
fn two_daemons_at_once_one_wins_and_two_runs_at_once_both_run() {
    let r = Repo::new();
    for i in 0..200 {
        r.write(&format!("src/f{i}.py"), format!("x = {i}\n"));
    }
    let start = |args: &[&str]| {
        Command::new(bridge_bin())
            .arg("-C")
            .arg(&r.root)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(&["up"]), start(&["up"]));
    let mut won = 0;
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        let err = String::from_utf8_lossy(&o.stderr);
        // The loser either finds the winner's daemon ready or says, as a
        // second `up` does, that bridge is already up (and whose it is).
        if o.status.success() {
            won += 1;
        } else {
            assert!(
                err.contains("already up") && err.contains(&r.daemon_pid().to_string()),
                "{err}\n{}",
                r.daemon_log()
            );
        }
    }
    assert!(won >= 1, "neither `up` succeeded:\n{}", r.daemon_log());
    let root = r.root.display().to_string();
    assert_eq!(pids_with(&["bridge", " daemon", &root]).len(), 1, "daemons");
    assert_eq!(
        pids_with(&["bridge-agent", &root]).len(),
        1,
        "agents: {:?}",
        pids_with(&["bridge-agent", &root])
    );
    r.assert_mirror_exact();
    r.ok(&["down"]);

    // Nothing runs: each `run` would start bridge itself.
    r.write("a.toml", "run = \"echo job-a; sleep 0.5; echo a-done\"\n");
    r.write("b.toml", "run = \"echo job-b; sleep 0.5; echo b-done\"\n");
    let (a, b) = (start(&["run", "a.toml"]), start(&["run", "b.toml"]));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for (o, want) in [(&a, "job-a\na-done\n"), (&b, "job-b\nb-done\n")] {
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            r.daemon_log()
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), want);
    }
    assert_eq!(pids_with(&["bridge", " daemon", &root]).len(), 1, "daemons");
    let jobs = r.ps_json(true);
    assert_eq!(
        jobs.iter().filter(|j| j["state"] == "succeeded").count(),
        2,
        "{jobs:?}"
    );
}

/// The agent killed with SIGKILL while it applies a large update (5,000
/// files and one of 32 MB, all changed): at that moment every file in the
/// mirror is whole, its old content or its new one, never a mix, a
/// truncation or a visible temporary; the restarted agent converges.
#[test]
fn an_agent_killed_mid_update_leaves_every_file_old_or_new() {
    let r = Repo::new();
    let n = 5000;
    let name = |i: usize| format!("d{:02}/f{i:04}.txt", i % 50);
    let body = |era: &str, i: usize| format!("{era} {i}\n").repeat(40);
    for i in 0..n {
        r.write(&name(i), body("old", i));
    }
    let old_big = random_bytes(32 << 20, 1);
    r.write("big.bin", &old_big);
    r.up();
    r.sync_wait();
    let mirror = r.mirror();

    let new_big = random_bytes(32 << 20, 2);
    for i in 0..n {
        r.write(&name(i), body("new", i));
    }
    r.write("big.bin", &new_big);
    // Kill as soon as the first new file lands (looked at every 0.2 ms):
    // the rest is being applied.
    let first = mirror.join(name(0));
    let t = std::time::Instant::now();
    while !fs::read_to_string(&first).is_ok_and(|s| s.starts_with("new")) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the update never started"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    let agent = r.agent_pid().expect("agent pid");
    kill9(agent);

    let (mut old, mut new) = (0, 0);
    for i in 0..n {
        let got = fs::read_to_string(mirror.join(name(i))).unwrap();
        if got == body("old", i) {
            old += 1;
        } else if got == body("new", i) {
            new += 1;
        } else {
            panic!("{} is neither old nor new: {got:?}", name(i));
        }
    }
    let big = fs::read(mirror.join("big.bin")).unwrap();
    assert!(big == old_big || big == new_big, "big.bin is torn");
    // Nothing but the repository's own names is visible in the mirror
    // (and `.git/info/exclude`, the agent's copy of the ignore rules).
    for d in fs::read_dir(&mirror).unwrap().flatten() {
        let f = d.file_name().to_string_lossy().into_owned();
        if f == ".git" {
            continue;
        }
        assert!(f.starts_with('d') || f == "big.bin", "{f} in the mirror");
        if d.file_type().unwrap().is_dir() {
            for e in fs::read_dir(d.path()).unwrap().flatten() {
                let e = e.file_name().to_string_lossy().into_owned();
                assert!(e.starts_with('f') && e.ends_with(".txt"), "{f}/{e}");
            }
        }
    }
    eprintln!("killed with {new} of {n} files new, {old} old");
    assert!(old > 0, "the kill came after the whole update ({new} new)");

    // The daemon starts the agent again and the mirror converges.
    assert!(
        eventually(Duration::from_secs(30), || r
            .agent_pid()
            .is_some_and(|p| p != agent && alive(p))),
        "the agent was not started again:\n{}",
        r.daemon_log()
    );
    r.sync_wait();
    r.assert_mirror_exact();
    assert_eq!(
        fs::read_dir(r.path(".bridge/agent/tmp")).unwrap().count(),
        0,
        "temporary files left behind"
    );
}

/// A tmpfs mounted for a test, unmounted (lazily: the agent may still hold
/// it) when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("mount")
            .success();
        assert!(
            ok,
            "cannot mount a tmpfs at {} (the suite runs as root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The agent's disk full (a small tmpfs as its root): a sync says so, with
/// the file and the space it needs; no mirror file is truncated or torn;
/// once space is freed the daemon finishes the sync by itself. A job that
/// fills the disk fails with the reason in its log and its result, and the
/// agent keeps serving.
#[test]
fn a_full_agent_disk_is_a_clear_error_truncates_nothing_and_heals_by_itself() {
    let r = Repo::new();
    let mut old = Vec::new();
    for i in 0..10 {
        let body = random_bytes(200_000, i);
        r.write(&format!("f{i}.bin"), &body);
        old.push(body);
    }
    fs::create_dir_all(r.path(".bridge")).unwrap();
    fs::set_permissions(
        r.path(".bridge"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let disk = Tmpfs::mount(&r.path(".bridge/agent"), "24m");
    r.up();
    let mirror = r.mirror();
    // Leave 1 MiB free.
    let ballast = r.path(".bridge/agent/ballast");
    fs::write(&ballast, vec![0u8; (disk.free() - (1 << 20)) as usize]).unwrap();

    let new0 = random_bytes(200_000, 100);
    r.write("f0.bin", &new0);
    let big = random_bytes(4 << 20, 101);
    r.write("big.bin", &big);
    let err = r.fails(&["sync", "--wait"]);
    assert!(
        err.contains("the agent's disk is full")
            && err.contains("big.bin needs 4.0 MiB")
            && err.contains("free in"),
        "{err}"
    );
    let status = r.status();
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("disk is full")),
        "{status}"
    );
    // Every mirror file is whole: its old content or its new one.
    let f0 = fs::read(mirror.join("f0.bin")).unwrap();
    assert!(f0 == old[0] || f0 == new0, "f0.bin is torn");
    for (i, body) in old.iter().enumerate().skip(1) {
        assert_eq!(&fs::read(mirror.join(format!("f{i}.bin"))).unwrap(), body);
    }
    assert!(
        fs::read(mirror.join("big.bin")).map_or(true, |b| b == big),
        "big.bin is torn"
    );

    // Space freed: the daemon's retry finishes the sync, nobody asks.
    fs::remove_file(&ballast).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || fs::read(mirror.join("big.bin"))
            .is_ok_and(|b| b == big)),
        "the sync did not finish by itself after space was freed:\n{}",
        r.daemon_log()
    );
    r.sync_wait();
    r.assert_mirror_exact();

    // A job that fills the disk fails, and says why.
    r.write(
        "fill.toml",
        "run = \"head -c 100000000 /dev/zero > fill.bin\"\n",
    );
    let o = r.bridge(&["run", "fill.toml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // The note comes from the log, after the writes that failed: no torn
    // record stopped the reader there.
    assert!(
        err.contains("the agent's disk is full")
            && err.contains("of the job's output could not be written to its log")
            && err.contains("failed"),
        "{err}"
    );
    let jobs = r.ps_json(true);
    let job = jobs.iter().find(|j| j["name"] == "fill").expect("the job");
    assert_eq!(job["state"], "failed", "{job}");
    // The agent keeps serving.
    let o = r.bridge(&["exec", "--", "true"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    r.ok(&["down"]);
}

/// The daemon killed with SIGKILL mid-sync, then mid-job: the next `up`
/// reports the truth and repairs the mirror; the job, which ended while
/// no daemon ran, is reported as it ended, its log is whole and its outputs
/// come home byte-exact.
#[test]
fn a_daemon_killed_mid_sync_and_mid_job_loses_nothing() {
    let r = Repo::new();
    for i in 0..3000 {
        r.write(
            &format!("p{}/f{i}.txt", i % 30),
            format!("{i}\n").repeat(50),
        );
    }
    for i in 0..2 {
        r.write(&format!("blobs/b{i}.bin"), random_bytes(16 << 20, 10 + i));
    }
    let up = r.spawn(&["up"], &[], "up.out");
    let mirrors = r.path(".bridge/agent/mirrors");
    assert!(
        eventually(Duration::from_secs(30), || {
            fs::read_dir(&mirrors)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|m| m.ok())
                .is_some_and(|m| fs::read_dir(m.path()).map(|d| d.count()).unwrap_or(0) > 3)
        }),
        "the initial sync never started"
    );
    let first = r.daemon_pid();
    kill9(first);
    // `up` notices at once (it used to wait 30 s for the socket to go).
    let t = std::time::Instant::now();
    let status = { up }.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let err = fs::read_to_string(r.scratch("up.err")).unwrap();
    assert!(
        status.success() || err.contains("the daemon died while it synced"),
        "{err}"
    );
    r.up();
    assert_ne!(r.daemon_pid(), first);
    let st = r.status();
    assert_eq!(st["connection"], "connected", "{st}");
    r.assert_mirror_exact();

    let release = r.scratch("release");
    r.write(
        "job.sh",
        format!(
            "mkdir -p outputs\nhead -c 1000000 /dev/urandom > outputs/a.bin\necho started\n\
             while [ ! -e {} ]; do sleep 0.05; done\n\
             head -c 3000000 /dev/urandom > outputs/b.bin\nseq 1 5000\n",
            release.display()
        ),
    );
    r.write(
        "job.toml",
        "run = \"sh job.sh\"\n[outputs]\npaths = [\"outputs/\"]\n",
    );
    let id = r.ok(&["run", "job.toml", "--detach"]).trim().to_string();
    let tree = r.path(&format!(".bridge/agent/jobs/{id}/tree"));
    assert!(
        eventually(Duration::from_secs(20), || tree
            .join("outputs/a.bin")
            .exists()),
        "the job never started"
    );
    kill9(r.daemon_pid());
    // The job ends while no daemon runs.
    fs::write(&release, "").unwrap();
    assert!(
        eventually(Duration::from_secs(20), || r
            .path(&format!(".bridge/agent/jobs/{id}/exit.json"))
            .exists()),
        "the job did not end on its own"
    );
    r.up();
    let home = eventually(Duration::from_secs(30), || {
        ["a.bin", "b.bin"].iter().all(|f| {
            fs::read(r.path(&format!("outputs/{f}"))).ok()
                == fs::read(tree.join(format!("outputs/{f}"))).ok()
        })
    });
    assert!(home, "the outputs did not come home:\n{}", r.daemon_log());
    let jobs = r.ps_json(true);
    let job = jobs
        .iter()
        .find(|j| j["id"] == id.as_str())
        .expect("the job");
    assert_eq!(job["state"], "succeeded", "{job}");
    let want: String = std::iter::once("started\n".to_string())
        .chain((1..=5000).map(|i| format!("{i}\n")))
        .collect();
    assert_eq!(r.ok(&["logs", &id]), want);
}
