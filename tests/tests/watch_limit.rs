use std::process::Command;

use bridge_tests::*;

/// Runs `bridge up` in a user namespace whose inotify watch limit is 10 (the
/// limit is per user namespace), so the real kernel refuses the 11th watch.
#[test]
fn running_out_of_watches_falls_back_to_polling() {
    let r = Repo::new();
    for i in 0..30 {
        r.write(&format!("d{i}/f.txt"), "x");
    }
    let script = format!(
        "echo 10 > /proc/sys/user/max_inotify_watches && exec {} -C {} up",
        bridge_bin().display(),
        r.root.display()
    );
    let out = Command::new("unshare")
        .args(["-Ur", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert!(
        out.status.success(),
        "bridge up in a user namespace failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        r.daemon_log()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fs.inotify.max_user_watches"),
        "bridge up did not warn: {stderr}"
    );
    let st = r.status();
    let mode = st["watcher"].to_string();
    assert!(
        mode.contains("polling") && mode.contains("fs.inotify.max_user_watches"),
        "{st}"
    );
    let log = r.daemon_log();
    assert_eq!(
        log.matches("inotify watch limit reached").count(),
        1,
        "one clear message:\n{log}"
    );
    // Changes still arrive, through the periodic rescan.
    r.write("d29/new.txt", "new");
    r.write("d0/f.txt", "changed");
    r.wait_exact();
}
