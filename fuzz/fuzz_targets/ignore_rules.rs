//! `.gitignore` and `.bridgeignore` handling: with any rules in the root's
//! and a subdirectory's ignore files, bridge's own walk lists exactly what
//! the `ignore` crate's matchers (git's rules, as bridge's walk once used
//! them) keep: a path is synced when no ancestor directory is ignored and it
//! is not ignored itself; `.bridgeignore` rules win over `.gitignore` ones,
//! deeper files over shallower; `.git`, `.bridge` and editor temporaries
//! never appear.
#![no_main]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bridge_proto::scan::{Side, is_always_excluded, walk};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    root_git: &'a str,
    root_bridge: &'a str,
    sub_git: Option<&'a str>,
    sub_bridge: Option<&'a str>,
}

const FILES: &[&str] = &[
    "a.py",
    "b.log",
    "build/x.o",
    "build/keep.log",
    "sub/c.py",
    "sub/d.tmp",
    "sub/build/y.o",
    "sub/deep/e.txt",
    "sub/deep/f.log",
    ".hidden",
    "4913",
    "a.py~",
    "ünï.txt",
    "[x]",
    "a b",
    "empty/",
    ".git/HEAD",
];

/// One directory's rules: its `.bridgeignore` and its `.gitignore`.
struct Level {
    dir: PathBuf,
    bridge: Gitignore,
    git: Gitignore,
}

fn level(dir: &Path) -> Level {
    let build = |name: &str| {
        let f = dir.join(name);
        let text = fs::read_to_string(&f).ok();
        // A mutation changes one of the four files, mostly: the matchers of
        // the other three are the ones of the run before (compiling them
        // was a third of each run).
        thread_local! {
            static SEEN: std::cell::RefCell<HashMap<(PathBuf, Option<String>), Gitignore>> =
                Default::default();
        }
        let key = (f.clone(), text);
        if let Some(g) = SEEN.with(|m| m.borrow().get(&key).cloned()) {
            return g;
        }
        let mut b = GitignoreBuilder::new(dir);
        if key.1.is_some() {
            let _ = b.add(&f);
        }
        let g = b.build().unwrap_or_else(|_| Gitignore::empty());
        SEEN.with(|m| {
            let mut m = m.borrow_mut();
            if m.len() >= 64 {
                m.clear();
            }
            m.insert(key, g.clone());
        });
        g
    };
    Level {
        dir: dir.to_path_buf(),
        bridge: build(".bridgeignore"),
        git: build(".gitignore"),
    }
}

/// Whether `path` is ignored by its own name (not its parents'), as the
/// `ignore` crate decides: the deepest `.bridgeignore` with a matching rule,
/// else the deepest `.gitignore` with one.
fn ignored(levels: &[Level], path: &Path, is_dir: bool) -> bool {
    let picks: [fn(&Level) -> &Gitignore; 2] = [|l| &l.bridge, |l| &l.git];
    for pick in picks {
        for l in levels.iter().rev() {
            if path.starts_with(&l.dir) && path != l.dir {
                let m = pick(l).matched(path, is_dir);
                if !m.is_none() {
                    return m.is_ignore();
                }
            }
        }
    }
    false
}

/// The tree, made once per process: only the ignore files change between
/// runs (each run writes all four, removing the subdirectory's when the input
/// has none), so every run sees the same tree with its own rules.
fn tree() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = bridge_fuzz::fresh("ignore_rules").canonicalize().unwrap();
        for f in FILES {
            let p = root.join(f);
            if let Some(dir) = f.strip_suffix('/') {
                fs::create_dir_all(root.join(dir)).unwrap();
            } else {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, f).unwrap();
            }
        }
        root
    })
}

fn put(path: PathBuf, text: Option<&str>) {
    match text {
        Some(t) => fs::write(path, t).unwrap(),
        None => match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("{}: {e}", path.display()),
        },
    }
}

fuzz_target!(|input: Input| {
    let root = tree().to_path_buf();
    put(root.join(".gitignore"), Some(input.root_git));
    put(root.join(".bridgeignore"), Some(input.root_bridge));
    put(root.join("sub/.gitignore"), input.sub_git);
    put(root.join("sub/.bridgeignore"), input.sub_bridge);
    let levels = [level(&root), level(&root.join("sub"))];

    // What git's rules keep, path by path.
    let mut expected = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name();
            let is_dir = e.file_type().unwrap().is_dir();
            if is_always_excluded(&name.to_string_lossy()) || ignored(&levels, &p, is_dir) {
                continue;
            }
            if is_dir {
                stack.push(p.clone());
            }
            expected.push(p.strip_prefix(&root).unwrap().display().to_string());
        }
    }
    expected.sort();

    let (found, _bad) = walk(&root, None, None, Side::Agent);
    let mut got: Vec<String> = found.iter().map(|f| f.path.as_str().to_string()).collect();
    got.sort();
    assert_eq!(got, expected, "rules {input:?}");
});
