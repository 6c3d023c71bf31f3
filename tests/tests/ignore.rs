use std::fs;

use bridge_tests::*;

#[test]
fn ignored_paths_never_reach_the_mirror() {
    let r = Repo::new();
    r.write(
        ".gitignore",
        "*.log\n!keep.log\n/build/\n__pycache__/\n.venv/\n",
    );
    r.write("src/.gitignore", "secret.txt\n!important.log\n");
    r.write(".bridgeignore", "data/raw/\n");
    r.write(".git/info/exclude", "*.local\n");
    r.write("train.py", "x\n");
    r.write("train.log", "ignored\n");
    r.write("keep.log", "kept by negation\n");
    r.write("build/out.o", "ignored\n");
    r.write("src/build/kept.py", "only /build/ at the top is ignored\n");
    r.write("src/secret.txt", "ignored by nested .gitignore\n");
    r.write("src/important.log", "re-included by nested negation\n");
    r.write("src/__pycache__/m.pyc", "ignored\n");
    r.write("data/raw/big.csv", "ignored by .bridgeignore\n");
    r.write("data/clean.csv", "kept\n");
    r.write("notes.local", "ignored by info/exclude\n");
    for i in 0..300 {
        r.write(&format!(".venv/lib/site-packages/pkg{i}/__init__.py"), "x");
    }
    r.up();
    r.assert_mirror_exact();
    let m = r.mirror();
    for gone in [
        "train.log",
        "build",
        "src/secret.txt",
        "src/__pycache__",
        "data/raw",
        "notes.local",
        ".venv",
    ] {
        assert!(!m.join(gone).exists(), "{gone} reached the mirror");
    }
    for kept in [
        "keep.log",
        "src/build/kept.py",
        "src/important.log",
        "data/clean.csv",
        ".gitignore",
        ".bridgeignore",
    ] {
        assert!(m.join(kept).exists(), "{kept} missing from the mirror");
    }
    // Ignored directories cost no watch: .venv's 300 directories are not watched.
    let watches = r.status()["watches"].as_u64().unwrap();
    assert!(watches < 20, "{watches} directories watched");

    // Live: new ignored files stay out; an ignore-rule change is applied.
    r.write("more.log", "ignored\n");
    r.write("src/new.py", "kept\n");
    r.wait_mirror("src/new.py", |m| m.join("src/new.py").exists());
    assert!(!m.join("more.log").exists());
    // A path that becomes ignored is left alone on the agent, like rsync
    // --delete without --delete-excluded.
    r.write(
        ".gitignore",
        "*.log\n!keep.log\n/build/\n__pycache__/\n.venv/\ntrain.py\n",
    );
    r.wait_mirror("the new rules", |m| {
        fs::read_to_string(m.join(".gitignore")).is_ok_and(|c| c.contains("train.py"))
    });
    r.sync_wait();
    assert!(
        m.join("train.py").exists(),
        "a path that became ignored was deleted on the agent"
    );
    r.write(".gitignore", "/build/\n__pycache__/\n.venv/\n");
    r.wait_mirror("logs synced once no longer ignored", |m| {
        m.join("more.log").exists() && m.join("train.py").exists()
    });
    r.sync_wait();
    r.assert_mirror_exact();
}

#[test]
fn remote_only_entries_are_deleted_except_ignored_ones() {
    let r = Repo::new();
    r.write(".gitignore", "*.ckpt\n");
    r.write("a.py", "a\n");
    r.up();
    let m = r.mirror();
    // Written on the agent's side: an ignored checkpoint and a stray file.
    fs::write(m.join("model.ckpt"), "remote output").unwrap();
    fs::write(m.join("stray.py"), "not in the local tree").unwrap();
    fs::create_dir_all(m.join("stray_dir/x")).unwrap();
    r.sync_wait();
    assert!(!m.join("stray.py").exists(), "a remote-only file survived");
    assert!(
        !m.join("stray_dir").exists(),
        "a remote-only directory survived"
    );
    assert_eq!(
        fs::read(m.join("model.ckpt")).unwrap(),
        b"remote output",
        "an ignored remote path was touched"
    );
    r.assert_mirror_exact();

    // A mirror file changed behind bridge's back is repaired by sync --wait.
    fs::write(m.join("a.py"), "tampered").unwrap();
    r.sync_wait();
    assert_eq!(fs::read(m.join("a.py")).unwrap(), b"a\n");
}

#[test]
fn removing_a_directory_keeps_ignored_outputs_inside_it() {
    let r = Repo::new();
    r.write(".gitignore", "*.ckpt\n");
    r.write("exp/run1/train.py", "train\n");
    r.write("exp/run1/sub/notes.md", "notes\n");
    r.up();
    let m = r.mirror();
    // Checkpoints written on the agent's side, ignored by the rules.
    fs::write(m.join("exp/run1/model.ckpt"), "weights").unwrap();
    fs::write(m.join("exp/run1/sub/best.ckpt"), "best").unwrap();

    r.remove("exp");
    r.wait_mirror("the synced files removed", |m| {
        !m.join("exp/run1/train.py").exists()
    });
    r.sync_wait();
    assert!(!m.join("exp/run1/sub/notes.md").exists());
    assert_eq!(
        fs::read(m.join("exp/run1/model.ckpt")).unwrap(),
        b"weights",
        "an ignored output was deleted"
    );
    assert_eq!(fs::read(m.join("exp/run1/sub/best.ckpt")).unwrap(), b"best");
    let st = r.status();
    assert_eq!(st["in_sync"], true, "{st}");
    assert_eq!(st["local_root"], st["remote_root"]);

    // The directory comes back locally: synced again, the outputs still there.
    r.write("exp/run1/train.py", "train v2\n");
    r.wait_mirror("the recreated directory", |m| {
        m.join("exp/run1/train.py").exists()
    });
    r.sync_wait();
    assert!(m.join("exp/run1/model.ckpt").exists());
    // Everything synced matches; the only extra is `sub/`, kept on the agent
    // for its ignored checkpoint alone (no synced entry inside).
    let mut mirror = r.mirror_tree();
    assert_eq!(mirror.remove("exp/run1/sub"), Some(Entry::Dir));
    assert_trees_eq(&r.local_tree(), &mirror);
    assert_eq!(fs::read_dir(m.join("exp/run1/sub")).unwrap().count(), 1);
}
