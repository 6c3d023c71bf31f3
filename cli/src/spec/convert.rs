//! From the job file as written ([`RawSpec`]) to the [`JobSpec`] the daemon
//! submits: defaults filled in, paths normalised, and every check that needs
//! more than a type.
//!
//! Paths in the file are relative to `workdir`, and `workdir` to the
//! repository root. In the [`JobSpec`], `workdir`, the Python environment file
//! and `setup_inputs` are repository-relative; outputs stay workdir-relative
//! (the agent collects them from the job's workdir) with a trailing '/' on
//! directories. Files the job needs must exist locally: a typo is cheaper to
//! catch here than after a sync and a queue on the remote machine.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use bridge_proto::v1::{ForwardSpec, JobSpec, PythonEnv, forward_spec, python_env};
use toml::Spanned;

use super::error::{Origin, SpecError};
use super::path::{self, Norm, Problem};
use super::raw::RawSpec;
use super::set::Override;
use super::sweep::SweepDef;

/// The name bridge reserves for the variables it sets in a job.
const RESERVED_ENV_PREFIX: &str = "BRIDGE_";

/// What the checks need to word and place their errors.
pub struct Ctx<'a> {
    /// The job file, for messages and the default name.
    pub path: &'a Path,
    pub text: &'a str,
    pub sets: &'a [Override<'a>],
    pub repo_root: &'a Path,
}

impl Ctx<'_> {
    /// Where a problem with `key` is: the last override that set it, else
    /// the file at `span`.
    fn origin(&self, key: &[&str], span: Option<Range<usize>>) -> Origin {
        match self.sets.iter().rev().find(|o| o.touches(key)) {
            Some(o) => Origin::Set(o.text.to_string()),
            None => Origin::in_file(self.path.to_path_buf(), self.text, span),
        }
    }

    pub(super) fn invalid(
        &self,
        key: &[&str],
        span: Option<Range<usize>>,
        problem: String,
    ) -> SpecError {
        SpecError::Invalid {
            origin: self.origin(key, span),
            key: key.join("."),
            problem,
        }
    }

    /// Resolves the path value `v` of `key` against `base`.
    fn resolve(
        &self,
        key: &[&str],
        base: &Norm,
        relative_to: &str,
        v: &Spanned<String>,
    ) -> Result<Norm, SpecError> {
        path::resolve(base, v.get_ref()).map_err(|p| {
            let hint = match p {
                Problem::Absolute | Problem::Home => format!("; give it relative to {relative_to}"),
                _ => String::new(),
            };
            self.invalid(
                key,
                Some(v.span()),
                format!("= {:?} {p}{hint}", v.get_ref()),
            )
        })
    }

    /// Checks that `norm` (the value `v` of `key`) exists in the repository.
    fn must_exist(
        &self,
        key: &[&str],
        v: &Spanned<String>,
        norm: &Norm,
        file: bool,
    ) -> Result<(), SpecError> {
        let fs = self.repo_root.join(norm.joined());
        let ok = if file { fs.is_file() } else { fs.exists() };
        if ok {
            return Ok(());
        }
        let what = if file && fs.exists() {
            "is not a file"
        } else {
            "does not exist"
        };
        Err(self.invalid(
            key,
            Some(v.span()),
            format!("= {:?} {what} (looked for {})", v.get_ref(), fs.display()),
        ))
    }
}

/// A checked job file: the job, and its sweep when it has `[sweep]`.
#[derive(Debug)]
pub struct Job {
    /// The job (a sweep's trial template: `gpus` is per trial).
    pub spec: JobSpec,
    pub sweep: Option<SweepDef>,
}

pub fn convert(raw: RawSpec, ctx: &Ctx) -> Result<Job, SpecError> {
    let name = match &raw.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(ctx.invalid(&["name"], Some(n.span()), "is empty".into()));
        }
        Some(n) => n.get_ref().trim().to_string(),
        None => ctx
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "job".into()),
    };

    let run = match &raw.run {
        None => {
            return Err(ctx.invalid(
                &["run"],
                None,
                "is missing: add the command the job runs, e.g. run = \"python train.py\"".into(),
            ));
        }
        Some(r) if r.get_ref().trim().is_empty() => {
            return Err(ctx.invalid(
                &["run"],
                Some(r.span()),
                "is empty: give the command the job runs, e.g. run = \"python train.py\"".into(),
            ));
        }
        Some(r) => r.get_ref().clone(),
    };

    let image = match &raw.image {
        None => String::new(),
        Some(i) => {
            let v = i.get_ref();
            if v.trim().is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ctx.invalid(
                    &["image"],
                    Some(i.span()),
                    format!(
                        "= {v:?} is not an image reference: give one like \"pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime\""
                    ),
                ));
            }
            v.clone()
        }
    };

    let root = Norm::root();
    let workdir = match &raw.workdir {
        None => root.clone(),
        Some(w) if w.get_ref().is_empty() => root.clone(),
        Some(w) => {
            let norm = ctx.resolve(&["workdir"], &root, "the repository root", w)?;
            if !ctx.repo_root.join(norm.joined()).is_dir() {
                return Err(ctx.invalid(
                    &["workdir"],
                    Some(w.span()),
                    format!(
                        "= {:?} is not a directory of the repository {}",
                        w.get_ref(),
                        ctx.repo_root.display()
                    ),
                ));
            }
            Norm { dir: true, ..norm }
        }
    };

    let setup = raw
        .setup
        .as_ref()
        .map(|s| s.get_ref().trim().to_string())
        .filter(|s| !s.is_empty());
    if setup.is_none()
        && let Some(first) = raw.setup_inputs.first()
    {
        return Err(ctx.invalid(
            &["setup_inputs"],
            Some(first.span()),
            "is set but there is no `setup` command (setup inputs only decide when setup reruns)"
                .into(),
        ));
    }
    let mut inputs = Vec::new();
    for v in &raw.setup_inputs {
        let key = ["setup_inputs"];
        let norm = ctx.resolve(&key, &workdir, "the workdir", v)?;
        if norm.parts.is_empty() {
            return Err(ctx.invalid(
                &key,
                Some(v.span()),
                format!(
                    "= {:?} is the whole repository; name the files setup reads",
                    v.get_ref()
                ),
            ));
        }
        inputs.push((v, norm));
    }

    let mut env = HashMap::new();
    for (k, v) in &raw.env {
        let name = k.get_ref();
        let key = ["env", name.as_str()];
        if !valid_env_name(name) {
            return Err(ctx.invalid(
                &key,
                Some(k.span()),
                "is not a valid variable name (letters, digits and '_', not starting with a digit)"
                    .into(),
            ));
        }
        if name.starts_with(RESERVED_ENV_PREFIX) {
            return Err(ctx.invalid(
                &key,
                Some(k.span()),
                format!("is reserved: bridge sets the {RESERVED_ENV_PREFIX}* variables itself"),
            ));
        }
        if v.get_ref().contains('\0') {
            return Err(ctx.invalid(&key, Some(v.span()), "contains a NUL byte".into()));
        }
        env.insert(name.clone(), v.get_ref().clone());
    }

    let python = match &raw.python {
        None => None,
        Some(p) => {
            use python_env::Kind;
            let given: Vec<(Kind, &str, &Spanned<String>)> = [
                (
                    Kind::Requirements,
                    "requirements",
                    &p.get_ref().requirements,
                ),
                (Kind::Pyproject, "pyproject", &p.get_ref().pyproject),
                (Kind::Conda, "conda", &p.get_ref().conda),
            ]
            .into_iter()
            .filter_map(|(kind, key, v)| v.as_ref().map(|v| (kind, key, v)))
            .collect();
            let (kind, key, v) = match given.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ctx.invalid(
                        &["python"],
                        Some(p.span()),
                        "needs one of `requirements`, `pyproject` or `conda`, e.g. requirements = \"requirements.txt\"".into(),
                    ));
                }
                [a, b, ..] => {
                    return Err(ctx.invalid(
                        &["python"],
                        Some(b.2.span()),
                        format!(
                            "has both `{}` and `{}`: give exactly one environment",
                            a.1, b.1
                        ),
                    ));
                }
            };
            let norm = ctx.resolve(&["python", key], &workdir, "the workdir", v)?;
            if norm.dir {
                return Err(ctx.invalid(
                    &["python", key],
                    Some(v.span()),
                    format!("= {:?} must name a file", v.get_ref()),
                ));
            }
            Some((kind, key, v, norm))
        }
    };

    // Outputs are checked in repository terms (to compare with inputs), then
    // stored relative to the workdir.
    let mut outputs: Vec<(&Spanned<String>, Norm)> = Vec::new();
    for v in &raw.outputs.paths {
        let key = ["outputs", "paths"];
        let norm = ctx.resolve(&key, &workdir, "the workdir", v)?;
        if !norm.within(&workdir) {
            return Err(ctx.invalid(
                &key,
                Some(v.span()),
                format!(
                    "= {:?} leaves the workdir: outputs are relative to the workdir and inside it",
                    v.get_ref()
                ),
            ));
        }
        if norm.parts.len() == workdir.parts.len() {
            return Err(ctx.invalid(
                &key,
                Some(v.span()),
                format!(
                    "= {:?} is the whole workdir, which would keep it all out of the sync; \
                     name the directories the job writes, e.g. \"outputs/\"",
                    v.get_ref()
                ),
            ));
        }
        if let Some((other, _)) = outputs
            .iter()
            .find(|(_, o)| o.within(&norm) || norm.within(o))
        {
            return Err(ctx.invalid(
                &key,
                Some(v.span()),
                format!(
                    "= {:?} overlaps {:?}: list each output once (the outer directory only)",
                    v.get_ref(),
                    other.get_ref()
                ),
            ));
        }
        outputs.push((v, norm));
    }
    // What the job reads must be in the synced tree: outputs are never synced
    // up, so an input inside one would be missing on the agent.
    let needed = inputs
        .iter()
        .map(|(v, n)| (vec!["setup_inputs"], *v, n, false))
        .chain(
            python
                .iter()
                .map(|(_, key, v, n)| (vec!["python", *key], *v, n, true)),
        );
    for (key, v, norm, file) in needed {
        if let Some((out, _)) = outputs
            .iter()
            .find(|(_, o)| norm.within(o) || o.within(norm))
        {
            return Err(ctx.invalid(
                &key,
                Some(v.span()),
                format!(
                    "= {:?} overlaps the output {:?}, and outputs are not synced to the agent",
                    v.get_ref(),
                    out.get_ref()
                ),
            ));
        }
        ctx.must_exist(&key, v, norm, file)?;
    }

    let outputs_local = match &raw.outputs.local {
        None => String::new(),
        Some(l) if l.get_ref().trim().is_empty() => String::new(),
        Some(l) => local_destination(ctx, l, raw.outputs.paths.is_empty(), raw.sweep.is_some())?,
    };

    let live = match &raw.mode {
        None => false,
        Some(m) => match m.get_ref().trim() {
            "" | "snapshot" => false,
            "live" => true,
            other => {
                return Err(ctx.invalid(
                    &["mode"],
                    Some(m.span()),
                    format!(
                        "= {other:?}: use \"snapshot\" (the default: the job sees the tree as saved when it was submitted) or \"live\" (it runs in the live mirror and sees every save)"
                    ),
                ));
            }
        },
    };
    if live && let Some(first) = raw.outputs.paths.first() {
        return Err(ctx.invalid(
            &["outputs", "paths"],
            Some(first.span()),
            "is set but mode = \"live\": a live job runs in the mirror itself, so there is no snapshot to bring outputs home from; drop [outputs] or use mode = \"snapshot\"".into(),
        ));
    }
    let forwards = forwards(ctx, &raw.forward)?;
    let placement = match &raw.placement {
        None => String::new(),
        Some(p) => match p.get_ref().trim() {
            "" | "agent" => String::new(),
            "cluster" => {
                let refuse = |why: &str| ctx.invalid(&["placement"], Some(p.span()), why.into());
                if live {
                    return Err(refuse(
                        "= \"cluster\" but mode = \"live\": a live job runs in the agent's mirror; use one or the other",
                    ));
                }
                if !forwards.is_empty() {
                    return Err(refuse(
                        "= \"cluster\" with [[forward]]: forwards reach the agent's pod, not the job's; drop one or the other",
                    ));
                }
                "cluster".to_string()
            }
            other => {
                return Err(ctx.invalid(
                    &["placement"],
                    Some(p.span()),
                    format!(
                        "= {other:?}: use \"agent\" (the default: the job runs on the agent) or \"cluster\" (a Kubernetes Job of its own, with an agent on Kubernetes)"
                    ),
                ));
            }
        },
    };
    let mlflow_tracking_uri = match &raw.mlflow.tracking_uri {
        None => String::new(),
        Some(u) => {
            let v = u.get_ref().trim();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(ctx.invalid(
                    &["mlflow", "tracking_uri"],
                    Some(u.span()),
                    format!(
                        "= {v:?} is not the URL of a tracking server, e.g. \"http://127.0.0.1:5000\" (a file store on the agent needs no setting: add \"mlruns/\" to [outputs] paths)"
                    ),
                ));
            }
            v.to_string()
        }
    };

    let mut gpus = raw.resources.gpus.0;
    let sweep = match &raw.sweep {
        None => None,
        Some(sw) => {
            let run = raw.run.as_ref().expect("checked above");
            let (def, per_trial) =
                super::sweep::convert(ctx, sw, super::sweep::JobFacts { run, gpus })?;
            gpus = per_trial;
            if live {
                return Err(ctx.invalid(
                    &["sweep"],
                    Some(sw.span()),
                    "runs each trial in a snapshot of the tree, and mode = \"live\" runs one job in the mirror: drop one of them".into(),
                ));
            }
            if outputs_local.is_empty() {
                if let Some((v, _)) = outputs.iter().find(|(_, n)| !n.dir) {
                    return Err(ctx.invalid(
                        &["outputs", "paths"],
                        Some(v.span()),
                        format!(
                            "= {:?} is a file; a sweep's trials bring each output directory D/ home as D/<sweep>/<trial>/, so list directories (\"results/\"), or place them yourself with outputs.local = \"runs/{{sweep}}/{{trial}}/\"",
                            v.get_ref()
                        ),
                    ));
                }
            } else if !outputs_local.contains("{trial}") && !outputs_local.contains("{job}") {
                let l = raw.outputs.local.as_ref().expect("set");
                return Err(ctx.invalid(
                    &["outputs", "local"],
                    Some(l.span()),
                    format!(
                        "= {:?} is one place for every trial of the sweep: add {{trial}} (or {{job}}), e.g. \"runs/{{sweep}}/{{trial}}/\"",
                        l.get_ref()
                    ),
                ));
            }
            if let Some(f) = raw.forward.iter().find(|f| !f.get_ref().reverse) {
                return Err(ctx.invalid(
                    &["forward"],
                    Some(f.span()),
                    "forwards a laptop port to one agent port, which a sweep's trials cannot share: forward one trial's port with `bridge forward` (reverse forwards are fine)".into(),
                ));
            }
            Some(def)
        }
    };

    let spec = JobSpec {
        name,
        run,
        workdir: workdir.joined(),
        setup: setup.unwrap_or_default(),
        setup_inputs: inputs.into_iter().map(|(_, n)| n.joined()).collect(),
        env,
        python: python.map(|(kind, _, _, norm)| PythonEnv {
            kind: kind as i32,
            file: norm.joined(),
        }),
        gpus,
        outputs: outputs
            .into_iter()
            .map(|(_, n)| {
                Norm {
                    parts: n.parts[workdir.parts.len()..].to_vec(),
                    dir: n.dir,
                }
                .with_slash()
            })
            .collect(),
        outputs_local,
        forwards,
        live,
        image,
        placement,
        debug: None,
        mlflow_tracking_uri,
        kernel: None,
        trial: None,
    };
    Ok(Job { spec, sweep })
}

/// `[[forward]]` tables: `port` names both ends unless `local` / `remote`
/// say otherwise; `reverse = true` goes from the agent to the laptop.
fn forwards(
    ctx: &Ctx,
    raw: &[Spanned<super::raw::RawForward>],
) -> Result<Vec<ForwardSpec>, SpecError> {
    let mut out: Vec<ForwardSpec> = Vec::new();
    for f in raw {
        let span = f.span();
        let f = f.get_ref();
        let key = ["forward"];
        let port = |v: &Option<Spanned<i64>>, what: &str| -> Result<Option<u16>, SpecError> {
            match v {
                None => Ok(None),
                Some(p) => u16::try_from(*p.get_ref()).map(Some).map_err(|_| {
                    ctx.invalid(
                        &["forward", what],
                        Some(p.span()),
                        format!("= {} is not a port (0 to 65535)", p.get_ref()),
                    )
                }),
            }
        };
        let both = port(&f.port, "port")?;
        let local = port(&f.local, "local")?.or(both);
        let remote = port(&f.remote, "remote")?.or(both);
        let name = f
            .name
            .as_ref()
            .map(|n| n.get_ref().trim().to_string())
            .unwrap_or_default();
        let (direction, local, remote) = if f.reverse {
            let local = local.filter(|&p| p != 0).ok_or_else(|| {
                ctx.invalid(
                    &key,
                    Some(span.clone()),
                    "with reverse = true needs the laptop's port: port = 5000 (or local = 5000, remote = 5001 for another agent port)".into(),
                )
            })?;
            (
                forward_spec::Direction::Reverse,
                local,
                remote.unwrap_or(local),
            )
        } else {
            let remote = remote.filter(|&p| p != 0).ok_or_else(|| {
                ctx.invalid(
                    &key,
                    Some(span.clone()),
                    "needs the agent's port: port = 6006 (or remote = 6006, local = 16006 for another laptop port)".into(),
                )
            })?;
            (
                forward_spec::Direction::Local,
                local.unwrap_or(remote),
                remote,
            )
        };
        let env = match &f.env {
            None => String::new(),
            Some(e) if !f.reverse => {
                return Err(ctx.invalid(
                    &["forward", "env"],
                    Some(e.span()),
                    "is only for reverse forwards (it names the variable that gets the agent's port)".into(),
                ));
            }
            Some(e)
                if !valid_env_name(e.get_ref()) || e.get_ref().starts_with(RESERVED_ENV_PREFIX) =>
            {
                return Err(ctx.invalid(
                    &["forward", "env"],
                    Some(e.span()),
                    format!("= {:?} is not a variable name the job can get (letters, digits, '_'; not BRIDGE_*)", e.get_ref()),
                ));
            }
            Some(e) => e.get_ref().clone(),
        };
        if direction == forward_spec::Direction::Local
            && local != 0
            && out.iter().any(|o| {
                o.direction() == forward_spec::Direction::Local && o.local_port == local as u32
            })
        {
            return Err(ctx.invalid(
                &key,
                Some(span),
                format!("uses laptop port {local} twice: give one of them local = <another port>"),
            ));
        }
        out.push(ForwardSpec {
            direction: direction as i32,
            local_port: local as u32,
            remote_port: remote as u32,
            name,
            env,
            ..Default::default()
        });
    }
    Ok(out)
}

/// Checks `outputs.local`: repository-relative, `{job}` as the only
/// placeholder (and `{sweep}`, `{trial}` in a sweep), and a fixed directory
/// first (the daemon keeps that directory out of the sync, so it cannot
/// depend on the job id).
fn local_destination(
    ctx: &Ctx,
    l: &Spanned<String>,
    no_paths: bool,
    sweep: bool,
) -> Result<String, SpecError> {
    let key = ["outputs", "local"];
    let s = l.get_ref();
    if no_paths {
        return Err(ctx.invalid(
            &key,
            Some(l.span()),
            "is set but `outputs.paths` is empty: there is nothing to bring back".into(),
        ));
    }
    let mut rest = s.replace("{job}", "");
    if sweep {
        rest = rest.replace("{sweep}", "").replace("{trial}", "");
    }
    if rest.contains(['{', '}']) {
        let known = if sweep {
            "the placeholders are {job} (the job id), {sweep} and {trial}"
        } else {
            "the only placeholder is {job} (the job id)"
        };
        return Err(ctx.invalid(&key, Some(l.span()), format!("= {s:?}: {known}")));
    }
    let norm = ctx.resolve(&key, &Norm::root(), "the repository root", l)?;
    if norm.parts.first().is_none_or(|p| p.contains('{')) {
        return Err(ctx.invalid(
            &key,
            Some(l.span()),
            format!("= {s:?} must start with a directory, e.g. \"runs/{{job}}/\""),
        ));
    }
    Ok(norm.with_slash())
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a POSIX shell accepts as a variable name.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
