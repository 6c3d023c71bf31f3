//! The job file (`train.toml`): what `bridge run` submits.
//!
//! ```toml
//! name = "digits"                       # display name (default: the file stem)
//! run = "python train.py --lr 0.1"      # required: run by /bin/sh -c in the workdir
//! workdir = "examples/quickstart"       # relative to the repository root (default ".")
//! mode = "live"                         # optional: run in the live mirror (dev servers)
//! setup = "sh scripts/setup.sh"         # optional, cached by command + inputs + env
//! setup_inputs = ["scripts/setup.sh"]   # files or directories, relative to workdir
//! [env]                                 # strings only; BRIDGE_* is reserved
//! SEED = "1"
//! [python]                              # one of requirements / pyproject / conda
//! requirements = "requirements.txt"     # relative to workdir
//! [resources]
//! gpus = 1                              # default 0
//! [outputs]
//! paths = ["outputs/", "mlruns/"]       # relative to workdir, brought back while it runs
//! local = "runs/{job}/"                 # optional other local destination
//! [[forward]]                           # port forwards for the job's lifetime
//! port = 6006                           # laptop 127.0.0.1:6006 → agent 127.0.0.1:6006
//! name = "TensorBoard"                  # printed as a URL by `bridge run`
//! [[forward]]
//! port = 5000                           # agent → laptop (the agent port may differ)
//! reverse = true
//! env = "LOCAL_API_PORT"                # the job gets the agent port here
//! [mlflow]
//! tracking_uri = "http://127.0.0.1:5000"  # the laptop's server (default: $MLFLOW_TRACKING_URI)
//! [sweep]                               # optional: many trials (see [`sweep`])
//! max_parallel = 2
//! [sweep.params]
//! lr = [0.1, 0.01]                      # `run` says {lr}; trials get BRIDGE_PARAM_LR
//! ```
//!
//! Every error names the line and column (or the `--set` argument) it is
//! about and says what to change; see [`SpecError`].
//!
//! # Layout
//! - [`error`]: [`SpecError`] and where a problem is ([`error::Origin`]).
//! - [`raw`]: the serde model of the file, spans kept for later checks.
//! - [`set`]: `--set KEY=VALUE` overrides, applied before deserialising.
//! - [`path`]: lexical path normalisation and the paths never allowed.
//! - [`convert`]: defaults, semantic checks, and the [`JobSpec`] itself.
//! - [`sweep`]: `[sweep]` — its checks, and the trials it makes.

mod convert;
pub mod error;
mod path;
mod raw;
mod set;
pub mod sweep;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use bridge_proto::v1::JobSpec;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub use convert::Job;
pub use error::SpecError;
use error::{KeyHint, Origin};
use raw::RawSpec;
use set::Override;

/// The file name `bridge run DIR` looks for.
pub const DEFAULT_FILE: &str = "train.toml";

/// A job file read and checked.
#[derive(Debug)]
pub struct Loaded {
    pub spec: JobSpec,
    /// Its `[sweep]`, when it has one.
    pub sweep: Option<sweep::SweepDef>,
    /// The file that was read: `path` as given, or `path/train.toml` when a
    /// directory was given.
    pub path: PathBuf,
}

/// Reads the job file at `path` (relative to the current directory, or a
/// directory holding a `train.toml`), applies `overrides` (`KEY=VALUE`, as
/// given to `--set`) and checks it against the repository at `repo_root`.
pub fn load(path: &Path, repo_root: &Path, overrides: &[String]) -> Result<Loaded, SpecError> {
    let path = if path.is_dir() {
        path.join(DEFAULT_FILE)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => SpecError::NotFound { path: path.clone() },
        _ => SpecError::Read {
            path: path.clone(),
            source,
        },
    })?;
    let Job { spec, sweep } = from_str(&text, &path, repo_root, overrides)?;
    Ok(Loaded { spec, sweep, path })
}

/// Parses job file text. `origin` names the file in messages and gives the
/// default job name (its stem); relative paths in the spec are checked
/// against `repo_root`.
pub fn from_str(
    text: &str,
    origin: &Path,
    repo_root: &Path,
    overrides: &[String],
) -> Result<Job, SpecError> {
    let at = |span| Origin::in_file(origin.to_path_buf(), text, span);
    let mut doc = DeTable::parse(text).map_err(|e| SpecError::Syntax {
        origin: at(e.span()),
        message: e.message().to_string(),
    })?;
    // Errors of the file itself first, with their positions ...
    let mut raw = deserialize(&doc).map_err(|e| {
        let located = e
            .span()
            .and_then(|s| locate(doc.get_ref(), &s, &mut Vec::new()));
        classify(&e, at(e.span()), located)
    })?;
    // ... then each override in turn, so an error names the one that caused it.
    let sets = overrides
        .iter()
        .map(|s| Override::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    for o in &sets {
        o.apply(doc.get_mut())?;
        raw = deserialize(&doc).map_err(|e| {
            let unknown = unknown_field(e.message()).map(|(k, _)| k);
            // An unknown key is one of the override's parts, or inside its
            // value (`--set python={x=1}`).
            let path = match unknown
                .as_deref()
                .and_then(|k| o.path.iter().position(|p| *p == k))
            {
                Some(i) => o.path[..=i].iter().map(|s| s.to_string()).collect(),
                None => o
                    .path
                    .iter()
                    .map(|s| s.to_string())
                    .chain(unknown)
                    .collect(),
            };
            classify(&e, Origin::Set(o.text.to_string()), Some(path))
        })?;
    }
    convert::convert(
        raw,
        &convert::Ctx {
            path: origin,
            text,
            sets: &sets,
            repo_root,
        },
    )
}

fn deserialize(doc: &Spanned<DeTable<'_>>) -> Result<RawSpec, toml::de::Error> {
    RawSpec::deserialize(toml::de::Deserializer::from(doc.clone()))
}

/// Turns a deserialisation error about the key path `key` (when known) into
/// an unknown-key error with a suggestion, or a type error in words.
fn classify(e: &toml::de::Error, origin: Origin, key: Option<Vec<String>>) -> SpecError {
    if let Some((name, expected)) = unknown_field(e.message()) {
        let table = key
            .as_deref()
            .and_then(|k| k.split_last())
            .map(|(_, t)| t.join("."))
            .unwrap_or_default();
        let hint = match suggest(&name, &expected, &table) {
            Some(s) => KeyHint::DidYouMean(s),
            None => KeyHint::Known(expected),
        };
        return SpecError::UnknownKey {
            origin,
            key: name,
            table,
            hint,
        };
    }
    SpecError::Syntax {
        origin,
        message: raw::describe_type_error(key.map(|k| k.join(".")).as_deref(), e.message()),
    }
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" into the key
/// and the keys the table has.
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    Some((name.to_string(), expected))
}

/// The known key `key` was most likely meant to be: a close spelling in the
/// same table, or at the top level the same key of a sub-table
/// (`gpus` → `resources.gpus`).
fn suggest(key: &str, expected: &[String], table: &str) -> Option<String> {
    let close = |k: &str| {
        let d = strsim::damerau_levenshtein(&key.to_lowercase(), k);
        let similar = strsim::normalized_damerau_levenshtein(&key.to_lowercase(), k) >= 0.7;
        (similar || (d <= 2 && d < key.chars().count())).then_some(d)
    };
    let best = expected
        .iter()
        .filter_map(|k| close(k).map(|d| (d, k)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone());
    if best.is_some() || !table.is_empty() {
        return best;
    }
    raw::NESTED_KEYS
        .iter()
        .filter_map(|full| {
            let (_, k) = full.split_once('.')?;
            close(k).map(|d| (d, full))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, full)| full.to_string())
}

/// The key path of the key or value at `span` in `table`.
fn locate(
    table: &DeTable<'_>,
    span: &std::ops::Range<usize>,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    for (k, v) in table.iter() {
        path.push(k.get_ref().to_string());
        if k.span() == *span || v.span() == *span {
            return Some(path.clone());
        }
        let found = match v.get_ref() {
            DeValue::Table(t) => locate(t, span, path),
            DeValue::Array(a) => a.iter().find_map(|item| match item.get_ref() {
                _ if item.span() == *span => Some(path.clone()),
                DeValue::Table(t) => locate(t, span, path),
                _ => None,
            }),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
        path.pop();
    }
    None
}
