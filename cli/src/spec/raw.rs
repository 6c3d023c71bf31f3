//! The job file as written: the serde model of `train.toml`.
//!
//! Values keep their spans ([`Spanned`]) so that checks after parsing can
//! still point at a line. Everything is optional here, `run` included: a
//! required key could be supplied by a `--set` override, so its absence is a
//! check in [`super::convert`], not a parse error.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub name: Option<Spanned<String>>,
    pub run: Option<Spanned<String>>,
    pub workdir: Option<Spanned<String>>,
    /// A container image to run the job in.
    pub image: Option<Spanned<String>>,
    pub setup: Option<Spanned<String>>,
    #[serde(default)]
    pub setup_inputs: Vec<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<Spanned<String>, Spanned<String>>,
    pub python: Option<Spanned<RawPython>>,
    #[serde(default)]
    pub resources: RawResources,
    #[serde(default)]
    pub outputs: RawOutputs,
    /// "snapshot" (the default) or "live".
    pub mode: Option<Spanned<String>>,
    /// "agent" (the default) or "cluster": a Kubernetes Job per job or trial.
    pub placement: Option<Spanned<String>>,
    /// `[[forward]]` tables.
    #[serde(default)]
    pub forward: Vec<Spanned<RawForward>>,
    #[serde(default)]
    pub mlflow: RawMlflow,
    /// `[sweep]`: the job run many times.
    pub sweep: Option<Spanned<RawSweep>>,
}

/// `[sweep]` (see [`super::sweep`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSweep {
    /// "grid", "random", "list" or "workers".
    pub method: Option<Spanned<String>>,
    /// Parameter name → a list of values, or a range (random only).
    #[serde(default)]
    pub params: Ordered,
    /// `[[sweep.trial]]`: the trials of a list sweep.
    #[serde(default)]
    pub trial: Vec<Spanned<Ordered>>,
    /// Random: how many to draw.
    pub trials: Option<Spanned<i64>>,
    pub seed: Option<Spanned<i64>>,
    pub workers: Option<Spanned<i64>>,
    pub gpus_per_trial: Option<Spanned<i64>>,
    pub cpus_per_trial: Option<Spanned<i64>>,
    pub max_parallel: Option<Spanned<i64>>,
    pub retries: Option<Spanned<i64>>,
    pub fail_fast: Option<bool>,
    pub report: Option<Spanned<String>>,
    /// MLflow parent and child runs (default true).
    pub mlflow: Option<bool>,
}

/// A table whose keys keep their order (a grid's) and their place in the
/// file (for messages).
#[derive(Debug, Default)]
pub struct Ordered(pub Vec<(Spanned<String>, Spanned<toml::Value>)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = map.next_entry::<Spanned<String>, Spanned<toml::Value>>()? {
                    out.push(kv);
                }
                // The deserializer hands keys over sorted: back to the
                // order of the file.
                out.sort_by_key(|(k, _): &(Spanned<String>, _)| k.span().start);
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `[[forward]]`: a port forward for the job's lifetime.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    /// Both ports at once (the usual case).
    pub port: Option<Spanned<i64>>,
    /// The laptop's port.
    pub local: Option<Spanned<i64>>,
    /// The agent's port.
    pub remote: Option<Spanned<i64>>,
    /// Agent → laptop instead of laptop → agent.
    #[serde(default)]
    pub reverse: bool,
    pub name: Option<Spanned<String>>,
    /// Reverse only: a variable that gets the agent's port.
    pub env: Option<Spanned<String>>,
}

/// `[mlflow]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMlflow {
    pub tracking_uri: Option<Spanned<String>>,
}

/// `[python]`: exactly one of the three kinds.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPython {
    pub requirements: Option<Spanned<String>>,
    pub pyproject: Option<Spanned<String>>,
    pub conda: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    #[serde(default)]
    pub gpus: Gpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutputs {
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    pub local: Option<Spanned<String>>,
}

/// A GPU count. Its own type so that a negative or non-integer value is
/// reported in words ("a whole number ≥ 0") rather than as "expected u32".
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Gpus(pub u32);

impl<'de> Deserialize<'de> for Gpus {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Gpus;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number ≥ 0")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Gpus, E> {
                u32::try_from(v)
                    .map(Gpus)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Gpus, E> {
                u32::try_from(v)
                    .map(Gpus)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// Keys whose value is a string: a `--set` of one of these takes the text
/// literally even when it would parse as another TOML type (`--set name=2024`,
/// `--set run=true`).
pub const STRING_KEYS: &[&str] = &[
    "name",
    "run",
    "workdir",
    "image",
    "setup",
    "python.requirements",
    "python.pyproject",
    "python.conda",
    "outputs.local",
    "mode",
    "placement",
    "mlflow.tracking_uri",
    "sweep.method",
    "sweep.report",
];

/// Keys of the sub-tables, to suggest `resources.gpus` for a top-level `gpus`.
pub const NESTED_KEYS: &[&str] = &[
    "python.requirements",
    "python.pyproject",
    "python.conda",
    "resources.gpus",
    "outputs.paths",
    "outputs.local",
    "mlflow.tracking_uri",
    "sweep.method",
    "sweep.params",
    "sweep.trials",
    "sweep.seed",
    "sweep.workers",
    "sweep.gpus_per_trial",
    "sweep.cpus_per_trial",
    "sweep.max_parallel",
    "sweep.retries",
    "sweep.fail_fast",
    "sweep.report",
    "sweep.mlflow",
];

/// Rewrites serde's "invalid type: X, expected Y" for the value at `key` into
/// "`key` must be Y, found X", with the type names a TOML user knows.
/// Anything else is returned unchanged, prefixed with the key when known.
pub fn describe_type_error(key: Option<&str>, message: &str) -> String {
    let Some(key) = key else {
        return message.to_string();
    };
    let parsed = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.split_once(", expected "));
    let Some((found, expected)) = parsed else {
        return format!("`{key}`: {message}");
    };
    let expected = match expected {
        "a sequence" => "an array of strings, e.g. [\"a\", \"b\"]".to_string(),
        "a map" => "a table".to_string(),
        e if e.starts_with("struct ") => format!("a table ([{key}])"),
        e => e.to_string(),
    };
    let found = found.replace("sequence", "array").replace("map", "table");
    let mut out = format!("`{key}` must be {expected}, found {found}");
    if key.starts_with("env.") && expected == "a string" {
        let name = &key["env.".len()..];
        out.push_str(&format!(
            " (environment values are strings: quote it, {name} = \"…\")"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hint lists must name keys the model really has.
    #[test]
    fn key_lists_match_the_model() {
        for key in STRING_KEYS.iter().chain(NESTED_KEYS) {
            let value = match *key {
                "resources.gpus"
                | "sweep.trials"
                | "sweep.seed"
                | "sweep.workers"
                | "sweep.gpus_per_trial"
                | "sweep.cpus_per_trial"
                | "sweep.max_parallel"
                | "sweep.retries" => "1",
                "outputs.paths" => "[]",
                "sweep.params" => "{}",
                "sweep.fail_fast" | "sweep.mlflow" => "true",
                _ => "\"x\"",
            };
            let toml = match key.split_once('.') {
                Some((table, k)) => format!("[{table}]\n{k} = {value}"),
                None => format!("{key} = {value}"),
            };
            let r: Result<RawSpec, _> = toml::from_str(&toml);
            assert!(r.is_ok(), "{key}: {:?}", r.err());
        }
    }

    #[test]
    fn type_errors_in_words() {
        assert_eq!(
            describe_type_error(
                Some("resources.gpus"),
                "invalid value: integer `-1`, expected a whole number ≥ 0"
            ),
            "`resources.gpus` must be a whole number ≥ 0, found integer `-1`"
        );
        assert_eq!(
            describe_type_error(
                Some("python"),
                "invalid type: string \"x\", expected struct RawPython"
            ),
            "`python` must be a table ([python]), found string \"x\""
        );
    }
}
