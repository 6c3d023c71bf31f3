//! What can be wrong with a job file, and where.
//!
//! Every error names its [`Origin`]: a line and column in the job file (with
//! the line printed under the message), the job file as a whole, or the one
//! `--set` override that caused it, so the user knows what to edit.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// Why a job file could not be turned into a job.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The job file does not exist (the most common mistake: wrong directory).
    #[error(
        "{}: no such file (run from the repository, or give the path to the job file)",
        path.display()
    )]
    NotFound { path: PathBuf },

    /// The job file exists but could not be read.
    #[error("{}: cannot read the job file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Not valid TOML, or a value of the wrong type.
    #[error("{origin}: {message}{}", origin.excerpt())]
    Syntax { origin: Origin, message: String },

    /// A key the format does not have, with the closest known one when there
    /// is a plausible one (typos are the usual cause).
    #[error("{origin}: unknown key `{key}`{}{hint}{}", in_table(table), origin.excerpt())]
    UnknownKey {
        origin: Origin,
        key: String,
        /// The table it is in ("" at the top level).
        table: String,
        hint: KeyHint,
    },

    /// A well-typed value that is not acceptable: an empty command, a path that
    /// leaves the repository, two Python environments, …
    #[error("{origin}: `{key}` {problem}{}", origin.excerpt())]
    Invalid {
        origin: Origin,
        /// Dotted key path, e.g. `outputs.paths`.
        key: String,
        problem: String,
    },

    /// A `--set` argument that is not `KEY=VALUE` or names no settable key.
    #[error("--set {set}: {problem}")]
    BadOverride { set: String, problem: String },
}

fn in_table(table: &str) -> String {
    if table.is_empty() {
        String::new()
    } else {
        format!(" in [{table}]")
    }
}

/// What to tell about an unknown key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyHint {
    /// A known key close enough to be the one meant.
    DidYouMean(String),
    /// Nothing close: the keys the table accepts.
    Known(Vec<String>),
}

impl fmt::Display for KeyHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyHint::DidYouMean(k) => write!(f, ", did you mean `{k}`?"),
            KeyHint::Known(keys) if keys.is_empty() => Ok(()),
            KeyHint::Known(keys) => write!(f, " (known keys: {})", keys.join(", ")),
        }
    }
}

/// Where a problem was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// In the job file; `at` is `None` for problems with no single place
    /// (a missing key).
    File {
        path: PathBuf,
        /// Boxed to keep `Result<_, SpecError>` small on the happy path.
        at: Option<Box<Position>>,
    },
    /// In the `--set` argument with this text.
    Set(String),
}

impl Origin {
    /// A place in the job file `path` whose text is `text`.
    pub fn in_file(path: PathBuf, text: &str, span: Option<Range<usize>>) -> Origin {
        Origin::File {
            path,
            at: span.map(|s| Box::new(Position::new(text, s))),
        }
    }

    /// The offending line with a caret under the span, on lines of its own
    /// below the message; empty when there is no line to show.
    pub fn excerpt(&self) -> String {
        match self {
            Origin::File { at: Some(p), .. } => {
                let number = p.line.to_string();
                let pad = " ".repeat(number.len());
                // Keep tabs before the caret so it lines up under the text.
                let lead: String = p
                    .text
                    .chars()
                    .take(p.column - 1)
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                format!(
                    "\n {number} | {}\n {pad} | {lead}{}",
                    p.text,
                    "^".repeat(p.width)
                )
            }
            _ => String::new(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, at: Some(p) } => {
                write!(f, "{}:{}:{}", path.display(), p.line, p.column)
            }
            Origin::File { path, at: None } => write!(f, "{}", path.display()),
            Origin::Set(s) => write!(f, "--set {s}"),
        }
    }
}

/// A 1-based line and column (in characters) with the text of that line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
    /// The whole line, without its newline.
    pub text: String,
    /// How many characters of the line the problem covers (at least 1).
    pub width: usize,
}

impl Position {
    /// The position of byte range `span` in `text`; spans past the end (an
    /// unterminated string) point just after the last character.
    pub fn new(text: &str, span: Range<usize>) -> Position {
        let start = floor_char_boundary(text, span.start.min(text.len()));
        let end = floor_char_boundary(text, span.end.clamp(start, text.len()));
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        let width = text[start..end.min(line_end)].chars().count().max(1);
        Position {
            line,
            column,
            text: text[line_start..line_end]
                .trim_end_matches('\r')
                .to_string(),
            width,
        }
    }
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        let p = Position::new(text, 12..15);
        assert_eq!((p.line, p.column, p.width), (2, 6, 3));
        assert_eq!(p.text, "bé = \"x\"");
        // An error at the very end still has a line to show.
        let p = Position::new("run = \"x", 8..8);
        assert_eq!((p.line, p.column, p.width), (1, 9, 1));
    }

    #[test]
    fn excerpt_puts_a_caret_under_the_span() {
        let o = Origin::in_file("train.toml".into(), "x = 1\n\trn = 2\n", Some(7..9));
        assert_eq!(o.to_string(), "train.toml:2:2");
        assert_eq!(o.excerpt(), "\n 2 | \trn = 2\n   | \t^^");
    }
}
