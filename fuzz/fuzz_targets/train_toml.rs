//! The job file: any text, with any `--set` overrides, is a job or an error;
//! never a panic, and every error about the file names a line and a column
//! inside it (but a missing key, which has no place: it names the key).
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bridge_cli::spec::error::{Origin, SpecError};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    text: &'a str,
    sets: Vec<&'a str>,
}

/// A repository with a few files a job file may name.
fn repo() -> &'static PathBuf {
    static REPO: OnceLock<PathBuf> = OnceLock::new();
    REPO.get_or_init(|| {
        let r = bridge_fuzz::fresh("train_toml");
        fs::create_dir_all(r.join("src")).unwrap();
        fs::write(r.join("train.py"), "print(1)\n").unwrap();
        fs::write(r.join("requirements.txt"), "numpy\n").unwrap();
        fs::write(r.join("src/setup.sh"), "true\n").unwrap();
        r
    })
}

fuzz_target!(|input: Input| {
    let sets: Vec<String> = input.sets.iter().take(4).map(|s| s.to_string()).collect();
    let Err(e) = bridge_cli::spec::from_str(input.text, Path::new("train.toml"), repo(), &sets)
    else {
        return;
    };
    let origin = match &e {
        SpecError::Syntax { origin, .. }
        | SpecError::UnknownKey { origin, .. }
        | SpecError::Invalid { origin, .. } => origin,
        SpecError::BadOverride { .. } => return,
        other => panic!("an error reading no file: {other}"),
    };
    match origin {
        Origin::Set(_) => assert!(!sets.is_empty()),
        Origin::File { at: None, .. } => {
            let SpecError::Invalid { problem, .. } = &e else {
                panic!("an error without a position: {e}");
            };
            assert!(problem.starts_with("is missing"), "no position: {e}");
        }
        Origin::File { at: Some(p), .. } => {
            let lines = input.text.split('\n').count();
            assert!(
                p.line >= 1 && p.line <= lines,
                "line {} of {lines}: {e}",
                p.line
            );
            assert!(p.column >= 1, "{e}");
        }
    }
    // The message names the place.
    let _ = e.to_string();
});
