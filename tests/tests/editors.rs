use std::fs;
use std::io::Write;

use bridge_tests::*;

fn content(m: &std::path::Path, p: &str) -> Option<Vec<u8>> {
    fs::read(m.join(p)).ok()
}

/// No editor temporary may ever reach the mirror.
fn assert_no_temporaries(r: &Repo) {
    for (p, _) in r.mirror_tree() {
        let name = p.rsplit('/').next().unwrap();
        assert!(
            !(name == "4913"
                || name.ends_with('~')
                || name.ends_with(".swp")
                || name.starts_with(".#")
                || name.contains("___jb_")),
            "editor temporary {p} reached the mirror"
        );
    }
    let m = r.mirror();
    for e in walk_all(&m) {
        assert!(
            !e.contains("___jb_") && !e.ends_with(".swp") && !e.ends_with("/4913"),
            "{e} in mirror"
        );
    }
}

fn walk_all(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.display().to_string());
        if p.is_dir() && !p.ends_with(".git") {
            out.extend(walk_all(&p));
        }
    }
    out
}

#[test]
fn atomic_save_write_temp_then_rename() {
    let r = Repo::new();
    r.write("model.py", "v1\n");
    r.up();
    for i in 2..6 {
        let tmp = r.path(".model.py.tmp1234");
        fs::write(&tmp, format!("v{i}\n")).unwrap();
        fs::rename(&tmp, r.path("model.py")).unwrap();
        let want = format!("v{i}\n").into_bytes();
        r.wait_mirror("the atomic save", |m| {
            content(m, "model.py").as_ref() == Some(&want)
        });
    }
    r.wait_exact();
    assert!(!r.mirror().join(".model.py.tmp1234").exists());
}

#[test]
fn vim_style_save() {
    let r = Repo::new();
    r.write("src/train.py", "lr = 0.1\n");
    r.up();
    // vim: probe file 4913, swap file, backup by rename, write new, delete backup.
    fs::write(r.path("src/.train.py.swp"), b"swap").unwrap();
    fs::write(r.path("src/4913"), b"").unwrap();
    fs::remove_file(r.path("src/4913")).unwrap();
    r.rename("src/train.py", "src/train.py~");
    fs::write(r.path("src/train.py"), "lr = 0.01\n").unwrap();
    fs::remove_file(r.path("src/train.py~")).unwrap();
    r.wait_mirror("vim's save", |m| {
        content(m, "src/train.py").as_deref() == Some(b"lr = 0.01\n".as_slice())
    });
    r.sync_wait();
    assert_no_temporaries(&r);
    fs::remove_file(r.path("src/.train.py.swp")).unwrap();
    r.wait_exact();
}

#[test]
fn jetbrains_style_save() {
    let r = Repo::new();
    r.write("app.py", "old\n");
    r.up();
    fs::write(r.path("app.py___jb_tmp___"), "new\n").unwrap();
    r.rename("app.py", "app.py___jb_old___");
    r.rename("app.py___jb_tmp___", "app.py");
    fs::remove_file(r.path("app.py___jb_old___")).unwrap();
    r.wait_mirror("JetBrains' save", |m| {
        content(m, "app.py").as_deref() == Some(b"new\n".as_slice())
    });
    r.sync_wait();
    assert_no_temporaries(&r);
    r.assert_mirror_exact();
}

#[test]
fn emacs_lock_files_never_sync() {
    let r = Repo::new();
    r.write("a.py", "a\n");
    r.up();
    r.symlink("user@host.1234:1700000000", ".#a.py");
    r.write("a.py", "b\n");
    r.wait_mirror("the save", |m| {
        content(m, "a.py").as_deref() == Some(b"b\n".as_slice())
    });
    r.sync_wait();
    assert!(r.mirror().join(".#a.py").symlink_metadata().is_err());
}

#[test]
fn a_file_written_while_read_is_never_shipped_torn() {
    let r = Repo::new();
    r.write("ckpt.bin", vec![0u8; 8 << 20]);
    r.up();
    // The writer rewrites the file in place, version k = every byte k, in
    // 64 KiB pieces: a torn read would mix two versions.
    let path = r.path("ckpt.bin");
    let writer = std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
        for k in 1..=20u8 {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            for _ in 0..128 {
                f.write_all(&[k; 64 * 1024]).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let m = r.mirror();
    let mut observed = std::collections::BTreeSet::new();
    while !writer.is_finished() {
        if let Ok(c) = fs::read(m.join("ckpt.bin")) {
            assert_eq!(c.len(), 8 << 20);
            assert!(
                c.iter().all(|b| *b == c[0]),
                "the mirror showed a torn file mixing versions"
            );
            observed.insert(c[0]);
        }
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    writer.join().unwrap();
    r.wait_mirror("the last version", |m| {
        fs::read(m.join("ckpt.bin")).is_ok_and(|c| c.iter().all(|b| *b == 20))
    });
    assert!(!observed.is_empty());
}
