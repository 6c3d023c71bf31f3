//! Relative paths as they cross the wire.
//!
//! A [`RelPath`] is '/'-separated, relative, non-empty, and has no empty, `.`,
//! `..` or NUL-containing component. The agent accepts nothing else, so a
//! hostile or buggy peer can never name a path outside the mirror lexically;
//! symlinks on the way are the agent's job (see `agent::fsops`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path {0:?}")]
    Absolute(String),
    #[error("path {0:?} has an empty component")]
    EmptyComponent(String),
    #[error("path {0:?} has a '.' or '..' component")]
    DotComponent(String),
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    #[error("path {0:?} is not valid UTF-8")]
    NotUtf8(String),
    #[error("path {0:?} is longer than {MAX_PATH_BYTES} bytes")]
    TooLong(String),
}

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// A validated relative path.
///
/// Shared, not copied, when cloned: the daemon's tree, its belief about the
/// agent's tree and its stat cache hold the same path, once per file.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Arc<str>);

impl RelPath {
    /// Validates `s` as a relative wire path.
    pub fn new(s: impl Into<String>) -> Result<Self, PathError> {
        let s = s.into();
        RelPath::check(&s)?;
        Ok(RelPath(s.into()))
    }

    /// What [`RelPath::new`] checks, without making the path.
    pub fn check(s: &str) -> Result<(), PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(s.to_owned()));
        }
        if s.contains('\0') {
            return Err(PathError::Nul(s.to_owned()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_owned()));
        }
        for c in s.split('/') {
            if c.is_empty() {
                return Err(PathError::EmptyComponent(s.to_owned()));
            }
            if c == "." || c == ".." {
                return Err(PathError::DotComponent(s.to_owned()));
            }
        }
        Ok(())
    }

    /// A path built from parts of valid paths (a directory and one of its
    /// entries' names): no validation.
    pub(crate) fn trusted(s: &str) -> Self {
        debug_assert!(RelPath::new(s).is_ok(), "{s:?}");
        RelPath(s.into())
    }

    /// The path of `path` relative to `root`, if it lies under it.
    pub fn from_fs(root: &Path, path: &Path) -> Result<Self, PathError> {
        let rel = path.strip_prefix(root).unwrap_or(path);
        let s = rel
            .to_str()
            .ok_or_else(|| PathError::NotUtf8(rel.to_string_lossy().into_owned()))?;
        RelPath::new(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parent directory, `None` at the top level.
    pub fn parent(&self) -> Option<RelPath> {
        self.0.rfind('/').map(|i| RelPath(self.0[..i].into()))
    }

    /// The last component.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.starts_with(&*other.0)
                && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The path under `root` on this machine.
    pub fn to_fs(&self, root: &Path) -> PathBuf {
        root.join(&*self.0)
    }

    /// Every proper ancestor, outermost first.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0
            .match_indices('/')
            .map(|(i, _)| RelPath(self.0[..i].into()))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

// Ordering and hashing are the string's, so maps keyed by RelPath can be
// searched with &str (prefix ranges in tree.rs rely on it).
impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for RelPath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Resolves a symlink `target` found at `link` lexically. Returns the resolved
/// path relative to the tree root when the target is relative and stays inside
/// the tree; `None` for absolute or escaping targets.
pub fn resolve_link_target(link: &RelPath, target: &str) -> Option<Vec<String>> {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return None;
    }
    let mut stack: Vec<String> = link
        .parent()
        .map(|p| p.as_str().split('/').map(str::to_owned).collect())
        .unwrap_or_default();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                stack.pop()?;
            }
            c => stack.push(c.to_owned()),
        }
    }
    Some(stack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        let ok = ["a", "a/b", "a b/ü.txt", ".hidden", "...", "a/.b/c..d"];
        for p in ok {
            assert!(RelPath::new(p).is_ok(), "{p} should be accepted");
        }
        type Check = fn(&PathError) -> bool;
        let bad: &[(&str, Check)] = &[
            ("", |e| matches!(e, PathError::Empty)),
            ("/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            ("../x", |e| matches!(e, PathError::DotComponent(_))),
            ("a/../../x", |e| matches!(e, PathError::DotComponent(_))),
            ("a/./b", |e| matches!(e, PathError::DotComponent(_))),
            (".", |e| matches!(e, PathError::DotComponent(_))),
            ("a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a/", |e| matches!(e, PathError::EmptyComponent(_))),
            ("a\0b", |e| matches!(e, PathError::Nul(_))),
        ];
        for (p, is) in bad {
            let e = RelPath::new(*p).expect_err(p);
            assert!(is(&e), "{p:?} gave {e:?}");
        }
        assert!(matches!(
            RelPath::new("a/".repeat(3000)),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn relations() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.name(), "c");
        assert_eq!(p.depth(), 3);
        let anc: Vec<_> = p.ancestors().map(|a| a.to_string()).collect();
        assert_eq!(anc, ["a", "a/b"]);
        assert!(p.starts_with(&RelPath::new("a/b").unwrap()));
        assert!(
            !RelPath::new("a/bc")
                .unwrap()
                .starts_with(&RelPath::new("a/b").unwrap())
        );
    }

    #[test]
    fn link_targets() {
        let l = RelPath::new("d/link").unwrap();
        assert_eq!(resolve_link_target(&l, "x").unwrap(), ["d", "x"]);
        assert_eq!(resolve_link_target(&l, "../x").unwrap(), ["x"]);
        assert_eq!(resolve_link_target(&l, "..").unwrap(), Vec::<String>::new());
        assert!(resolve_link_target(&l, "../../x").is_none());
        assert!(resolve_link_target(&l, "/etc/passwd").is_none());
        assert!(resolve_link_target(&l, "").is_none());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a peer sends, an accepted path joined to a root stays
        /// under it, component by component (no `..`, no root, no prefix).
        #[test]
        fn accepted_paths_stay_under_the_root(
            s in prop::collection::vec(
                prop_oneof![
                    Just("..".to_string()), Just(".".to_string()), Just("".to_string()),
                    Just("/".to_string()), Just("\0".to_string()), Just("a".to_string()),
                    "[a-z./\\\\\u{0}-\u{1f}\u{e9}]{0,6}",
                ],
                0..8,
            ).prop_map(|parts| parts.join("/"))
        ) {
            let root = Path::new("/srv/mirror");
            if let Ok(p) = RelPath::new(s.clone()) {
                let joined = p.to_fs(root);
                prop_assert!(joined.starts_with(root), "{s:?} -> {joined:?}");
                for c in joined.strip_prefix(root).unwrap().components() {
                    prop_assert!(matches!(c, std::path::Component::Normal(_)), "{s:?} -> {joined:?}");
                }
                prop_assert!(!s.contains('\0'));
            }
        }
    }
}
