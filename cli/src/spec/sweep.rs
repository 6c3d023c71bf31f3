//! `[sweep]`: run the job many times, one trial per set of parameters.
//!
//! ```toml
//! run = "python train.py --lr {lr} --depth {depth}"
//! [sweep]
//! method = "grid"                 # grid (default) | random | list | workers
//! max_parallel = 2                # default: as many as fit on the agent
//! gpus_per_trial = 1              # default: resources.gpus
//! retries = 1                     # per trial (default 0)
//! fail_fast = false               # the first failure cancels the rest
//! report = "val_acc"              # a metric for the summary
//! [sweep.params]
//! lr = [1e-3, 3e-4]               # grid: lists; the cartesian product
//! depth = [4, 8, 16]
//! ```
//!
//! `method = "random"` draws `trials` sets with `seed` from lists (a
//! choice) and ranges (`{ uniform = [a, b] }`, `{ loguniform = [a, b] }`,
//! `{ int = [a, b] }`, both ends included); `method = "list"` takes
//! `[[sweep.trial]]` tables as they are; `workers = N` runs N copies of the
//! command, for search libraries that coordinate themselves (Optuna).
//!
//! Random draws use ChaCha8 (its output is specified) seeded with
//! `seed_from_u64`; each trial draws its parameters in the order they are
//! written, a float as `lo + u × (hi − lo)` with `u` the top 53 bits of a
//! draw over 2^53 (for `loguniform`, in log space), an integer or a choice by
//! multiplying a draw by the count and keeping the top 64 bits. So a seed
//! gives the same trials on every machine and in every bridge version.

use std::ops::Range;

use bridge_proto::sweep as rules;
use bridge_proto::v1::{Param, SweepSpec, TrialParams};
use rand::{Rng, SeedableRng};
use toml::Spanned;

use super::convert::Ctx;
use super::error::SpecError;
use super::raw::{Ordered, RawSweep};

/// A sweep larger than this needs `--yes`.
pub const CONFIRM_ABOVE: u64 = 10_000;
/// No sweep is larger than this (the agent's bound).
pub const MAX_TRIALS: u64 = 1_000_000;
/// At most this many `workers`.
const MAX_WORKERS: i64 = 4096;
/// At most this many retries per trial.
const MAX_RETRIES: i64 = 100;

/// How the trials are made.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Grid,
    /// `trials` draws with `seed`; `chosen`: bridge picked the seed.
    Random {
        trials: u64,
        seed: u64,
        chosen: bool,
    },
    List(Vec<Vec<(String, String)>>),
    Workers(u64),
}

/// What one parameter takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A list (each value in a grid, one at random otherwise).
    Values(Vec<String>),
    Uniform(f64, f64),
    LogUniform(f64, f64),
    Int(i64, i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamDef {
    pub name: String,
    pub kind: Kind,
}

/// A checked `[sweep]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepDef {
    pub method: Method,
    /// Grid and random: the parameters, in the order written.
    pub params: Vec<ParamDef>,
    pub cpus_per_trial: u32,
    /// 0: the agent's default (as many as fit).
    pub max_parallel: u32,
    pub retries: u32,
    pub fail_fast: bool,
    pub report: String,
    pub mlflow: bool,
}

impl SweepDef {
    /// How many trials it makes; `None` past `u64` (a grid can be huge).
    pub fn count(&self) -> Option<u64> {
        match &self.method {
            Method::Grid => self.params.iter().try_fold(1u64, |n, p| match &p.kind {
                Kind::Values(v) => n.checked_mul(v.len() as u64),
                _ => Some(n),
            }),
            Method::Random { trials, .. } => Some(*trials),
            Method::List(l) => Some(l.len() as u64),
            Method::Workers(n) => Some(*n),
        }
    }

    /// The parameters of every trial, in order.
    pub fn trials(&self) -> Vec<TrialParams> {
        let param = |n: &str, v: String| Param {
            name: n.to_string(),
            value: v,
        };
        match &self.method {
            Method::Grid => {
                let mut out: Vec<Vec<Param>> = vec![Vec::new()];
                for p in &self.params {
                    let Kind::Values(values) = &p.kind else {
                        continue;
                    };
                    out = out
                        .into_iter()
                        .flat_map(|prefix| {
                            values.iter().map(move |v| {
                                let mut t = prefix.clone();
                                t.push(param(&p.name, v.clone()));
                                t
                            })
                        })
                        .collect();
                }
                out.into_iter()
                    .map(|params| TrialParams { params })
                    .collect()
            }
            Method::Random { trials, seed, .. } => {
                let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(*seed);
                (0..*trials)
                    .map(|_| TrialParams {
                        params: self
                            .params
                            .iter()
                            .map(|p| param(&p.name, draw(&mut rng, &p.kind)))
                            .collect(),
                    })
                    .collect()
            }
            Method::List(l) => l
                .iter()
                .map(|t| TrialParams {
                    params: t.iter().map(|(n, v)| param(n, v.clone())).collect(),
                })
                .collect(),
            Method::Workers(n) => (0..*n).map(|_| TrialParams::default()).collect(),
        }
    }

    /// The sweep to submit, around the job spec (its `gpus` per trial).
    pub fn to_spec(&self, job: bridge_proto::v1::JobSpec) -> SweepSpec {
        let (method, seed) = match &self.method {
            Method::Grid => ("grid", 0),
            Method::Random { seed, .. } => ("random", *seed),
            Method::List(_) => ("list", 0),
            Method::Workers(_) => ("workers", 0),
        };
        SweepSpec {
            job: Some(job),
            trials: self.trials(),
            method: method.into(),
            seed,
            cpus_per_trial: self.cpus_per_trial,
            max_parallel: self.max_parallel,
            retries: self.retries,
            fail_fast: self.fail_fast,
            report: self.report.clone(),
            no_mlflow_runs: !self.mlflow,
        }
    }

    /// How the trials were made, in words: "a grid over lr × depth".
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        match &self.method {
            Method::Grid => format!("a grid over {}", names.join(" × ")),
            Method::Random { seed, chosen, .. } => format!(
                "a random search over {} (seed {seed}{})",
                names.join(", "),
                if *chosen {
                    "; set sweep.seed to draw the same trials again"
                } else {
                    ""
                }
            ),
            Method::List(_) => "the listed trials".into(),
            Method::Workers(_) => "workers".into(),
        }
    }
}

/// A uniform draw in [0, 1) from the top 53 bits.
fn unit(rng: &mut impl Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A draw in `0..n` (multiply-shift; `n` > 0).
fn below(rng: &mut impl Rng, n: u64) -> u64 {
    ((u128::from(rng.next_u64()) * u128::from(n)) >> 64) as u64
}

fn draw(rng: &mut impl Rng, k: &Kind) -> String {
    match k {
        Kind::Values(v) => v[below(rng, v.len() as u64) as usize].clone(),
        Kind::Uniform(lo, hi) => float(lo + unit(rng) * (hi - lo)),
        Kind::LogUniform(lo, hi) => {
            let (a, b) = (lo.ln(), hi.ln());
            float((a + unit(rng) * (b - a)).exp().clamp(*lo, *hi))
        }
        Kind::Int(lo, hi) => {
            let n = (*hi as i128 - *lo as i128 + 1) as u64;
            (*lo as i128 + i128::from(below(rng, n))).to_string()
        }
    }
}

/// A float as the trial gets it: the shortest text that reads back as the
/// same number, with a `.0` on whole numbers (as Python writes them).
pub fn float(f: f64) -> String {
    let s = f.to_string();
    if s.contains(['.', 'e', 'n', 'i']) {
        s
    } else {
        format!("{s}.0")
    }
}

/// A scalar TOML value as the trial gets it.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(float(*f)),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

fn kind_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// What the rest of the job file says that a sweep must agree with.
pub struct JobFacts<'a> {
    pub run: &'a Spanned<String>,
    /// `resources.gpus`: the default per trial.
    pub gpus: u32,
}

/// Checks `[sweep]` and returns it with the GPUs each trial takes.
pub fn convert(
    ctx: &Ctx,
    raw: &Spanned<RawSweep>,
    job: JobFacts,
) -> Result<(SweepDef, u32), SpecError> {
    let span = raw.span();
    let r = raw.get_ref();
    let count = |key: &str, v: &Option<Spanned<i64>>, min: i64, max: i64, what: &str| {
        v.as_ref()
            .map(|n| {
                let x = *n.get_ref();
                if x < min || x > max {
                    Err(ctx.invalid(
                        &["sweep", key],
                        Some(n.span()),
                        format!("= {x}: {what} ({min} to {max})"),
                    ))
                } else {
                    Ok(x as u64)
                }
            })
            .transpose()
    };
    let workers = count(
        "workers",
        &r.workers,
        1,
        MAX_WORKERS,
        "how many copies of the command run",
    )?;
    let method_name = match &r.method {
        Some(m) => {
            let name = m.get_ref().trim();
            match name {
                "grid" | "random" | "list" | "workers" => name.to_string(),
                other => {
                    return Err(ctx.invalid(
                        &["sweep", "method"],
                        Some(m.span()),
                        format!(
                            "= {other:?}: use \"grid\" (every combination of the lists in [sweep.params]), \"random\" (`trials` draws), \"list\" ([[sweep.trial]] tables) or \"workers\" (copies of one command)"
                        ),
                    ));
                }
            }
        }
        None if workers.is_some() => "workers".into(),
        None if !r.trial.is_empty() => "list".into(),
        None if r.trials.is_some() => "random".into(),
        None => "grid".into(),
    };
    let method_span = r.method.as_ref().map_or(span.clone(), |m| m.span());
    let not_with = |key: &str, key_span: Option<Range<usize>>, why: &str| {
        Err(ctx.invalid(&["sweep", key], key_span, why.to_string()))
    };
    if method_name != "workers"
        && let Some(w) = &r.workers
    {
        return not_with(
            "workers",
            Some(w.span()),
            &format!("is for method = \"workers\", not \"{method_name}\""),
        );
    }
    if method_name != "random" {
        if let Some(t) = &r.trials {
            return not_with(
                "trials",
                Some(t.span()),
                &format!("(how many to draw) is for method = \"random\", not \"{method_name}\""),
            );
        }
        if let Some(s) = &r.seed {
            return not_with(
                "seed",
                Some(s.span()),
                &format!("is for method = \"random\", not \"{method_name}\""),
            );
        }
    }
    if method_name != "list"
        && let Some(t) = r.trial.first()
    {
        return not_with(
            "trial",
            Some(t.span()),
            &format!("tables are for method = \"list\", not \"{method_name}\""),
        );
    }
    let params = match method_name.as_str() {
        "grid" | "random" => params(ctx, &r.params, method_name == "grid", span.clone())?,
        _ => {
            if let Some((k, _)) = r.params.0.first() {
                return not_with(
                    "params",
                    Some(k.span()),
                    &format!(
                        "is for method = \"grid\" or \"random\"; {}",
                        if method_name == "list" {
                            "a list sweep takes its values from [[sweep.trial]] tables"
                        } else {
                            "workers run the same command, told apart by BRIDGE_TRIAL"
                        }
                    ),
                );
            }
            Vec::new()
        }
    };
    let method = match method_name.as_str() {
        "grid" => Method::Grid,
        "random" => {
            let trials = count("trials", &r.trials, 1, MAX_TRIALS as i64, "how many trials to draw")?
                .ok_or_else(|| {
                    ctx.invalid(
                        &["sweep", "trials"],
                        Some(method_span.clone()),
                        "is missing: method = \"random\" needs how many trials to draw, e.g. trials = 20".into(),
                    )
                })?;
            let given = count("seed", &r.seed, 0, i64::MAX, "the seed of the draws")?;
            let seed = given.unwrap_or_else(|| {
                let mut b = [0u8; 4];
                let _ = getrandom::fill(&mut b);
                u64::from(u32::from_le_bytes(b))
            });
            Method::Random {
                trials,
                seed,
                chosen: given.is_none(),
            }
        }
        "list" => Method::List(list(ctx, &r.trial, method_span.clone())?),
        _ => Method::Workers(workers.ok_or_else(|| {
            ctx.invalid(
                &["sweep", "workers"],
                Some(method_span.clone()),
                "is missing: method = \"workers\" needs how many copies run, e.g. workers = 3"
                    .into(),
            )
        })?),
    };
    // Every placeholder of the command needs a value in every trial.
    let names: Vec<Vec<&str>> = match &method {
        Method::List(l) => l
            .iter()
            .map(|t| t.iter().map(|(n, _)| n.as_str()).collect())
            .collect(),
        _ => vec![params.iter().map(|p| p.name.as_str()).collect()],
    };
    let run = job.run.get_ref();
    let mut seen: Vec<String> = Vec::new();
    for ph in rules::placeholders(run) {
        if rules::BUILTIN.contains(&ph.name.as_str()) {
            continue;
        }
        let nth = seen.iter().filter(|n| **n == ph.name).count();
        seen.push(ph.name.clone());
        if let Some((i, _)) = names
            .iter()
            .enumerate()
            .find(|(_, t)| !t.contains(&ph.name.as_str()))
        {
            let known: Vec<&str> = names
                .get(i)
                .into_iter()
                .flatten()
                .copied()
                .chain(rules::BUILTIN)
                .collect();
            let close = known
                .iter()
                .filter(|k| strsim::damerau_levenshtein(k, &ph.name) <= 2)
                .min_by_key(|k| strsim::damerau_levenshtein(k, &ph.name));
            let hint = match close {
                Some(k) => format!(", did you mean {{{k}}}?"),
                None => format!(" (known: {})", braced(&known)),
            };
            let whose = if matches!(method, Method::List(_)) {
                format!(
                    "trial {i} of [[sweep.trial]] has no parameter {:?}",
                    ph.name
                )
            } else {
                format!("no parameter of [sweep.params] is named {:?}", ph.name)
            };
            return Err(ctx.invalid(
                &["run"],
                placeholder_span(ctx, job.run, &ph.name, nth),
                format!(
                    "has the placeholder {{{}}} but {whose}{hint}; write {{{{ and }}}} for literal braces",
                    ph.name
                ),
            ));
        }
    }
    let gpus = count(
        "gpus_per_trial",
        &r.gpus_per_trial,
        0,
        1024,
        "GPUs per trial",
    )?
    .map_or(job.gpus, |n| n as u32);
    let cpus = count(
        "cpus_per_trial",
        &r.cpus_per_trial,
        1,
        4096,
        "CPUs per trial",
    )?
    .unwrap_or(1);
    let max_parallel = count(
        "max_parallel",
        &r.max_parallel,
        1,
        MAX_TRIALS as i64,
        "how many trials run at once",
    )?
    .unwrap_or(0);
    let retries = count(
        "retries",
        &r.retries,
        0,
        MAX_RETRIES,
        "how many times a failed trial runs again",
    )?
    .unwrap_or(0);
    let report = match &r.report {
        None => String::new(),
        Some(m) => {
            let v = m.get_ref().trim();
            if v.is_empty() || v.contains(char::is_whitespace) || v.contains('=') {
                return Err(ctx.invalid(
                    &["sweep", "report"],
                    Some(m.span()),
                    format!("= {v:?} is not a metric name (the key of `BRIDGE_METRIC name=value`, or of an MLflow metric)"),
                ));
            }
            v.to_string()
        }
    };
    let def = SweepDef {
        method,
        params,
        cpus_per_trial: cpus as u32,
        max_parallel: max_parallel as u32,
        retries: retries as u32,
        fail_fast: r.fail_fast.unwrap_or(false),
        report,
        mlflow: r.mlflow.unwrap_or(true),
    };
    match def.count() {
        Some(n) if n <= MAX_TRIALS => {}
        n => {
            return Err(ctx.invalid(
                &["sweep"],
                Some(span),
                format!(
                    "makes {} trials; a sweep has at most {MAX_TRIALS}: fewer values, or method = \"random\" with `trials`",
                    n.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
                ),
            ));
        }
    }
    Ok((def, gpus))
}

fn braced(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{{{n}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the `nth` `{name}` of the `run` value is in the file: its text
/// appears there as written (a name has nothing to escape).
fn placeholder_span(
    ctx: &Ctx,
    run: &Spanned<String>,
    name: &str,
    nth: usize,
) -> Option<Range<usize>> {
    let span = run.span();
    let needle = format!("{{{name}}}");
    let source = ctx.text.get(span.clone())?;
    let mut from = 0;
    for _ in 0..nth {
        from += source[from..].find(&needle)? + needle.len();
    }
    let at = from + source[from..].find(&needle)?;
    Some(span.start + at..span.start + at + needle.len())
}

/// Checks a parameter's name: usable as a placeholder and a variable, not
/// one bridge gives every trial, and not the same variable as another's.
fn check_name(
    ctx: &Ctx,
    key: &Spanned<String>,
    table: &str,
    earlier: &[String],
) -> Result<(), SpecError> {
    let name = key.get_ref();
    let path = ["sweep", table, name.as_str()];
    if !rules::valid_param_name(name) {
        let why = if rules::BUILTIN.contains(&name.as_str()) {
            format!("is reserved: every trial has {{{name}}} already")
        } else {
            "is not a parameter name: letters, digits and '_', not starting with a digit (it is a placeholder and part of a variable name)".into()
        };
        return Err(ctx.invalid(&path, Some(key.span()), why));
    }
    if let Some(other) = earlier.iter().find(|o| o.eq_ignore_ascii_case(name)) {
        return Err(ctx.invalid(
            &path,
            Some(key.span()),
            format!(
                "names the parameter {other:?} a second time (both would be {})",
                rules::param_env(name)
            ),
        ));
    }
    Ok(())
}

/// `[sweep.params]` of a grid (lists only) or a random search (lists and
/// ranges).
fn params(
    ctx: &Ctx,
    raw: &Ordered,
    grid: bool,
    sweep_span: Range<usize>,
) -> Result<Vec<ParamDef>, SpecError> {
    if raw.0.is_empty() {
        return Err(ctx.invalid(
            &["sweep", "params"],
            Some(sweep_span),
            "is missing or empty: give each parameter its values, e.g. [sweep.params] with lr = [0.1, 0.01]".into(),
        ));
    }
    let mut out: Vec<ParamDef> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (k, v) in &raw.0 {
        check_name(ctx, k, "params", &names)?;
        let name = k.get_ref().clone();
        let key = ["sweep", "params", name.as_str()];
        let at = Some(v.span());
        let bad = |why: String| Err(ctx.invalid(&key, at.clone(), why));
        let kind = match v.get_ref() {
            toml::Value::Array(a) if a.is_empty() => {
                return bad("is an empty list: give at least one value".into());
            }
            toml::Value::Array(a) => {
                let mut values = Vec::new();
                for x in a {
                    match scalar(x) {
                        Some(s) => values.push(s),
                        None => {
                            return bad(format!(
                                "holds {}: values are strings, numbers or booleans",
                                kind_name(x)
                            ));
                        }
                    }
                }
                Kind::Values(values)
            }
            toml::Value::Table(_) if grid => {
                return bad(
                    "is a range, and a grid needs a list of values: lr = [0.1, 0.01] (ranges are for method = \"random\")"
                        .into(),
                );
            }
            toml::Value::Table(t) => range(t).map_err(|why| ctx.invalid(&key, at.clone(), why))?,
            other => Kind::Values(vec![scalar(other).expect("a scalar")]),
        };
        names.push(name.clone());
        out.push(ParamDef { name, kind });
    }
    Ok(out)
}

/// `{ uniform = [a, b] }`, `{ loguniform = [a, b] }` or `{ int = [a, b] }`.
fn range(t: &toml::Table) -> Result<Kind, String> {
    const HOW: &str = "a range is one of { uniform = [lo, hi] }, { loguniform = [lo, hi] } or { int = [lo, hi] }, or a list of values";
    let mut it = t.iter();
    let (Some((kind, bounds)), None) = (it.next(), it.next()) else {
        return Err(format!("is not a range: {HOW}"));
    };
    let pair = bounds
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(|| format!("`{kind}` needs two bounds, [lo, hi]"))?;
    let num = |v: &toml::Value| match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) if f.is_finite() => Some(*f),
        _ => None,
    };
    match kind.as_str() {
        "uniform" | "loguniform" => {
            let (Some(lo), Some(hi)) = (num(&pair[0]), num(&pair[1])) else {
                return Err(format!("`{kind}` bounds must be numbers"));
            };
            if lo >= hi {
                return Err(format!(
                    "`{kind}` = [{lo}, {hi}]: the low bound must be below the high one"
                ));
            }
            if kind == "loguniform" {
                if lo <= 0.0 {
                    return Err(format!(
                        "`loguniform` = [{lo}, {hi}]: both bounds must be above 0"
                    ));
                }
                Ok(Kind::LogUniform(lo, hi))
            } else {
                Ok(Kind::Uniform(lo, hi))
            }
        }
        "int" => {
            let (Some(lo), Some(hi)) = (pair[0].as_integer(), pair[1].as_integer()) else {
                return Err("`int` bounds must be integers".into());
            };
            if lo > hi {
                return Err(format!(
                    "`int` = [{lo}, {hi}]: the low bound must not be above the high one"
                ));
            }
            Ok(Kind::Int(lo, hi))
        }
        other => Err(format!("{other:?} is not a range: {HOW}")),
    }
}

/// `[[sweep.trial]]` tables: each a trial's parameters, as written.
fn list(
    ctx: &Ctx,
    raw: &[Spanned<Ordered>],
    method_span: Range<usize>,
) -> Result<Vec<Vec<(String, String)>>, SpecError> {
    if raw.is_empty() {
        return Err(ctx.invalid(
            &["sweep", "trial"],
            Some(method_span),
            "is missing: method = \"list\" needs [[sweep.trial]] tables, one per trial, e.g. [[sweep.trial]] with lr = 0.1".into(),
        ));
    }
    let mut out = Vec::new();
    for t in raw {
        let mut trial: Vec<(String, String)> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for (k, v) in &t.get_ref().0 {
            check_name(ctx, k, "trial", &names)?;
            let value = scalar(v.get_ref()).ok_or_else(|| {
                ctx.invalid(
                    &["sweep", "trial", k.get_ref()],
                    Some(v.span()),
                    format!(
                        "is {}: a trial's values are strings, numbers or booleans",
                        kind_name(v.get_ref())
                    ),
                )
            })?;
            names.push(k.get_ref().clone());
            trial.push((k.get_ref().clone(), value));
        }
        out.push(trial);
    }
    Ok(out)
}
