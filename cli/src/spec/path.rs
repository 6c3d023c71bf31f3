//! Paths in a job file, made canonical and checked.
//!
//! Paths are resolved lexically, without touching the disk: the job runs in a
//! snapshot on another machine, so what matters is where a path lands in the
//! synced tree, not what a local symlink points at.

use std::fmt;

/// Directories that are never synced (see `bridge_proto::scan`): nothing in
/// them can be an input or an output of a job.
const NEVER_SYNCED: &[&str] = &[".git", ".bridge"];

/// A normalised path: components from the repository root, no `.`, `..` or
/// empty ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Norm {
    pub parts: Vec<String>,
    /// Written with a trailing '/' (or ending in `.`/`..`): a directory.
    pub dir: bool,
}

impl Norm {
    pub fn root() -> Norm {
        Norm {
            parts: Vec::new(),
            dir: true,
        }
    }

    /// '/'-joined, "" for the root, without a trailing '/'.
    pub fn joined(&self) -> String {
        self.parts.join("/")
    }

    /// Like [`Norm::joined`], with a trailing '/' for directories.
    pub fn with_slash(&self) -> String {
        let mut s = self.joined();
        if self.dir && !s.is_empty() {
            s.push('/');
        }
        s
    }

    /// True when `self` is `other` or lies inside it.
    pub fn within(&self, other: &Norm) -> bool {
        self.parts.starts_with(&other.parts)
    }
}

/// What is wrong with a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Empty,
    Absolute,
    Home,
    Nul,
    /// `..` climbs out of the repository.
    Escapes,
    /// Inside `.git/` or `.bridge/`.
    NeverSynced(&'static str),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Empty => f.write_str("is empty"),
            Problem::Absolute => f.write_str("is absolute"),
            Problem::Home => f.write_str("starts with `~`, which is not expanded"),
            Problem::Nul => f.write_str("contains a NUL byte"),
            Problem::Escapes => f.write_str("leaves the repository (too many `..`)"),
            Problem::NeverSynced(d) => write!(f, "is inside {d}/, which is never synced"),
        }
    }
}

/// Resolves `input` relative to `base` (a directory inside the repository).
/// The result may be the repository root itself; callers that need a file or
/// a proper subdirectory check for that.
pub fn resolve(base: &Norm, input: &str) -> Result<Norm, Problem> {
    if input.is_empty() {
        return Err(Problem::Empty);
    }
    if input.starts_with('/') {
        return Err(Problem::Absolute);
    }
    if input.starts_with('~') {
        return Err(Problem::Home);
    }
    if input.contains('\0') {
        return Err(Problem::Nul);
    }
    let mut parts = base.parts.clone();
    for c in input.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop().ok_or(Problem::Escapes)?;
            }
            c => parts.push(c.to_string()),
        }
    }
    if let Some(d) = parts
        .iter()
        .find_map(|p| NEVER_SYNCED.iter().find(|d| *d == p))
    {
        return Err(Problem::NeverSynced(d));
    }
    let last = input.rsplit('/').next().unwrap_or("");
    Ok(Norm {
        dir: matches!(last, "" | "." | ".."),
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: &str) -> Norm {
        resolve(&Norm::root(), base).unwrap()
    }

    #[test]
    fn normalises_lexically() {
        let wd = at("examples/quickstart");
        let cases = [
            ("requirements.txt", "examples/quickstart/requirements.txt"),
            ("./outputs//", "examples/quickstart/outputs/"),
            ("../shared/x.sh", "examples/shared/x.sh"),
            ("a/./b/../c", "examples/quickstart/a/c"),
            (".", "examples/quickstart/"),
            ("../..", ""),
        ];
        for (input, want) in cases {
            assert_eq!(resolve(&wd, input).unwrap().with_slash(), want, "{input}");
        }
        assert_eq!(at("./").joined(), "");
    }

    #[test]
    fn refuses_what_leaves_or_is_never_synced() {
        let wd = at("sub");
        let cases = [
            ("", Problem::Empty),
            ("/etc/passwd", Problem::Absolute),
            ("~/data", Problem::Home),
            ("../../x", Problem::Escapes),
            ("../.git/config", Problem::NeverSynced(".git")),
            ("vendor/.git/", Problem::NeverSynced(".git")),
            ("../.bridge", Problem::NeverSynced(".bridge")),
            ("a\0b", Problem::Nul),
        ];
        for (input, want) in cases {
            assert_eq!(resolve(&wd, input), Err(want), "{input:?}");
        }
        // A name that merely starts like one is fine.
        assert!(resolve(&wd, ".github/x").is_ok());
    }

    #[test]
    fn within_is_by_component() {
        assert!(at("out/a").within(&at("out")));
        assert!(at("out").within(&at("out")));
        assert!(!at("outputs").within(&at("out")));
    }
}
