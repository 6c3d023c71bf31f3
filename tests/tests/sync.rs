use bridge_tests::*;

#[test]
fn initial_sync_is_exact() {
    let r = Repo::new();
    r.write("train.py", "print('hi')\n");
    r.write("src/model/net.py", "class Net: pass\n");
    r.write("données/ünï cödé.txt", "unicode\n");
    r.write("with space/a file.txt", "space\n");
    r.mkdir("empty");
    r.mkdir("deep/a/b/c/d/e/f/g/h/i/j");
    r.write("deep/a/b/c/d/e/f/g/h/i/j/leaf", "leaf");
    r.write("run.sh", "#!/bin/sh\necho run\n");
    r.chmod("run.sh", 0o755);
    r.write("data/random.bin", random_bytes(3 * 1024 * 1024 + 17, 1));
    r.write("empty-file", "");
    let out = r.up();
    assert!(out.contains("in sync: generation"), "{out}");
    r.assert_mirror_exact();
    let st = r.status();
    assert_eq!(st["in_sync"], true);
    assert_eq!(st["connection"], "connected");
    assert_eq!(st["provider"], "local");
    assert_eq!(st["local_root"], st["remote_root"]);
}

#[test]
fn live_edits_reach_the_mirror_without_a_sync_command() {
    let r = Repo::new();
    r.write("a.txt", "one\n");
    r.write("dir/b.txt", "b\n");
    r.up();
    let m = r.mirror();

    // Create, modify, append.
    r.write("new.txt", "new\n");
    r.wait_mirror("a created file", |m| {
        std::fs::read(m.join("new.txt")).is_ok_and(|c| c == b"new\n")
    });
    r.write("a.txt", "two\n");
    r.wait_mirror("a modified file", |m| {
        std::fs::read(m.join("a.txt")).is_ok_and(|c| c == b"two\n")
    });
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(r.path("a.txt"))
            .unwrap();
        f.write_all(b"three\n").unwrap();
    }
    r.wait_mirror("an append", |m| {
        std::fs::read(m.join("a.txt")).is_ok_and(|c| c == b"two\nthree\n")
    });

    // Rename a file and a directory; delete both kinds.
    r.rename("new.txt", "renamed.txt");
    r.wait_mirror("a renamed file", |m| {
        m.join("renamed.txt").exists() && !m.join("new.txt").exists()
    });
    r.write("dir/sub/c.txt", "c\n");
    r.wait_mirror("a nested file", |m| m.join("dir/sub/c.txt").exists());
    r.rename("dir", "moved");
    r.wait_mirror("a renamed directory", |m| {
        m.join("moved/sub/c.txt").exists() && !m.join("dir").exists()
    });
    r.remove("renamed.txt");
    r.remove("moved/sub");
    r.wait_mirror("deletions", |m| {
        !m.join("renamed.txt").exists() && !m.join("moved/sub").exists()
    });

    // File ↔ directory swaps.
    r.remove("a.txt");
    r.write("a.txt/inner", "now a dir\n");
    r.wait_mirror("file became directory", |m| m.join("a.txt/inner").is_file());
    r.remove("moved");
    r.write("moved", "now a file\n");
    r.wait_mirror("directory became file", |m| m.join("moved").is_file());

    // Empty directories and the exec bit.
    r.mkdir("empty/nested");
    r.wait_mirror("an empty directory", |m| m.join("empty/nested").is_dir());
    r.write("tool.sh", "#!/bin/sh\n");
    r.wait_mirror("tool.sh", |m| m.join("tool.sh").exists());
    r.chmod("tool.sh", 0o755);
    r.wait_mirror("the exec bit", |m| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(m.join("tool.sh")).is_ok_and(|md| md.permissions().mode() & 0o100 != 0)
    });
    r.wait_exact();
    let (_, root) = r.sync_wait();
    assert_eq!(r.status()["local_root"], root);
    assert!(m.exists());
}

#[test]
fn a_rename_sends_no_content() {
    let r = Repo::new();
    r.write("big/weights.bin", random_bytes(8 * 1024 * 1024, 2));
    r.up();
    let before = r.status()["bytes_sent"].as_u64().unwrap();
    r.rename("big", "moved");
    r.wait_mirror("the renamed directory", |m| {
        m.join("moved/weights.bin").exists()
    });
    r.sync_wait();
    let sent = r.status()["bytes_sent"].as_u64().unwrap() - before;
    assert!(
        sent < 64 * 1024,
        "a rename of an 8 MiB file sent {sent} bytes"
    );
    r.assert_mirror_exact();
}

#[test]
fn replaced_files_keep_hardlinked_old_versions() {
    let r = Repo::new();
    r.write("ckpt.txt", "version 1\n");
    r.up();
    let m = r.mirror();
    let link = m.parent().unwrap().join("hardlink-to-v1");
    std::fs::hard_link(m.join("ckpt.txt"), &link).unwrap();
    r.write("ckpt.txt", "version 2\n");
    r.wait_mirror("version 2", |m| {
        std::fs::read(m.join("ckpt.txt")).is_ok_and(|c| c == b"version 2\n")
    });
    assert_eq!(
        std::fs::read(&link).unwrap(),
        b"version 1\n",
        "the file was modified in place"
    );
}

#[test]
fn many_small_files_in_one_burst() {
    let r = Repo::new();
    r.up();
    for i in 0..2000 {
        r.write(&format!("pkg{}/mod{i}.py", i % 20), format!("x = {i}\n"));
    }
    r.wait_exact();
    r.sync_wait();
    r.assert_mirror_exact();
    assert_eq!(r.status()["files"], 2000);
}
