use std::time::Duration;

use bridge_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn stop_daemon(r: &Repo) {
    let pid = r.daemon_pid();
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || kill(Pid::from_raw(pid), None)
            .is_err()),
        "the daemon did not stop on SIGTERM"
    );
}

#[test]
fn a_daemon_restart_rehashes_only_changed_files() {
    let r = Repo::new();
    for i in 0..200 {
        r.write(&format!("src/m{i}.py"), format!("value = {i:04}\n"));
    }
    r.up();
    // Past the racy window, every entry of the index can vouch for its file.
    std::thread::sleep(Duration::from_millis(2600));
    let agent = r.agent_pid().unwrap();
    stop_daemon(&r);

    // Unchanged tree: nothing rehashed, the running agent reused.
    r.up();
    let st = r.status();
    assert_eq!(
        st["files_hashed"], 0,
        "unchanged files were rehashed after a restart"
    );
    assert_eq!(r.agent_pid(), Some(agent));
    std::thread::sleep(Duration::from_millis(2600));
    stop_daemon(&r);

    // An in-place edit keeping the size, while the daemon is down.
    {
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(r.path("src/m7.py"))
            .unwrap();
        f.seek(std::io::SeekFrom::Start(8)).unwrap();
        f.write_all(b"9").unwrap();
    }
    r.up();
    // Only the edited file is read; it may be read again while it is racy
    // (modified less than the racy window before it was hashed).
    let hashed = r.status()["files_hashed"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&hashed),
        "{hashed} files hashed for one edit among 200"
    );
    assert_eq!(
        std::fs::read(r.mirror().join("src/m7.py")).unwrap(),
        b"value = 9007\n"
    );
    r.assert_mirror_exact();
}

#[test]
fn an_in_place_edit_in_the_same_second_is_detected() {
    let r = Repo::new();
    r.write("f.txt", "aaaa\n");
    r.up();
    stop_daemon(&r);
    // Same size, within the racy window of the last hash.
    std::fs::write(r.path("f.txt"), "bbbb\n").unwrap();
    r.up();
    assert_eq!(std::fs::read(r.mirror().join("f.txt")).unwrap(), b"bbbb\n");
}

#[test]
fn an_agent_killed_mid_sync_converges_after_restart() {
    let r = Repo::new();
    for i in 0..3000 {
        r.write(
            &format!("pkg{}/f{i}.txt", i % 30),
            format!("file {i}\n").repeat(20),
        );
    }
    for i in 0..4 {
        r.write(&format!("blobs/b{i}.bin"), random_bytes(24 << 20, 100 + i));
    }
    let up = std::process::Command::new(bridge_bin())
        .arg("-C")
        .arg(&r.root)
        .arg("up")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the mirror is partly written, then kill the agent hard.
    let mirrors = r.path(".bridge/agent/mirrors");
    assert!(
        eventually(Duration::from_secs(30), || {
            std::fs::read_dir(&mirrors)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|m| m.ok())
                .is_some_and(|m| std::fs::read_dir(m.path()).map(|d| d.count()).unwrap_or(0) > 3)
        }),
        "the initial sync never started"
    );
    let first = r.agent_pid().expect("agent pid");
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();

    let out = up.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "bridge up did not recover: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.daemon_log(),
        r.agent_log()
    );
    assert_ne!(r.agent_pid(), Some(first), "the agent was not restarted");
    r.assert_mirror_exact();
    r.sync_wait();
    let tmp = r.path(".bridge/agent/tmp");
    assert_eq!(
        std::fs::read_dir(tmp).unwrap().count(),
        0,
        "temporary files left behind"
    );
}

/// `bridge up` on a fresh daemon is answered from its first scan and the
/// agent's verification made while it ran: a mirror file changed behind
/// bridge's back while no daemon ran is still repaired before `up` returns,
/// and a local edit made just before `up` is in the mirror when it returns.
#[test]
fn up_after_a_restart_repairs_the_mirror_and_sees_the_last_edit() {
    let r = Repo::new();
    for i in 0..50 {
        r.write(&format!("src/m{i}.py"), format!("value = {i:04}\n"));
    }
    r.up();
    let mirror = r.mirror();
    stop_daemon(&r);
    std::fs::write(mirror.join("src/m3.py"), "tampered\n").unwrap();
    r.write("src/m4.py", "edited just before up\n");
    r.up();
    assert_eq!(
        std::fs::read(r.mirror().join("src/m3.py")).unwrap(),
        b"value = 0003\n"
    );
    assert_eq!(
        std::fs::read(r.mirror().join("src/m4.py")).unwrap(),
        b"edited just before up\n"
    );
    r.assert_mirror_exact();
}
