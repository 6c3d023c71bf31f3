//! The rules of a sweep's trial template that the CLI checks and the agent
//! applies: `{name}` placeholders in the command, the variables a trial's
//! parameters become, and sweep ids.
//!
//! A placeholder is `{` + a name (`[A-Za-z_][A-Za-z0-9_]*`) + `}`. Anything
//! else between braces is left as written, so shell and Python code keeps
//! working: `awk '{print $1}'`, `${HOME}` (a `$` before the brace), `{}`.
//! `{{` and `}}` are a literal `{` and `}`.

use std::ops::Range;

/// Placeholders every trial has besides its parameters.
pub const BUILTIN: [&str; 2] = ["trial", "sweep"];

/// Prefix of the variable each parameter becomes (`lr` → `BRIDGE_PARAM_LR`).
pub const PARAM_ENV_PREFIX: &str = "BRIDGE_PARAM_";

/// One `{name}` in a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    pub name: String,
    /// Byte range of `{name}` in the template.
    pub span: Range<usize>,
}

/// A piece of a parsed template.
enum Piece<'a> {
    Text(&'a str),
    Name(&'a str, Range<usize>),
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Splits `t` into literal text and placeholders.
fn pieces(t: &str) -> Vec<Piece<'_>> {
    let b = t.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut lit) = (0, 0);
    while i < b.len() {
        match b[i] {
            b'{' if b.get(i + 1) == Some(&b'{') => {
                out.push(Piece::Text(&t[lit..i + 1]));
                i += 2;
                lit = i;
            }
            b'}' if b.get(i + 1) == Some(&b'}') => {
                out.push(Piece::Text(&t[lit..i + 1]));
                i += 2;
                lit = i;
            }
            b'{' if i == 0 || b[i - 1] != b'$' => match t[i + 1..].find('}') {
                Some(len) if is_name(&t[i + 1..i + 1 + len]) => {
                    out.push(Piece::Text(&t[lit..i]));
                    let end = i + 2 + len;
                    out.push(Piece::Name(&t[i + 1..i + 1 + len], i..end));
                    i = end;
                    lit = i;
                }
                _ => i += 1,
            },
            _ => i += 1,
        }
    }
    out.push(Piece::Text(&t[lit..]));
    out
}

/// The placeholders of `template`, in order.
pub fn placeholders(template: &str) -> Vec<Placeholder> {
    pieces(template)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Name(n, span) => Some(Placeholder {
                name: n.to_string(),
                span,
            }),
            Piece::Text(_) => None,
        })
        .collect()
}

/// `template` with each placeholder replaced by `value(name)`; a name it
/// does not know stays as written (the CLI refuses those before submitting).
pub fn expand<'a>(template: &str, value: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(template.len());
    for p in pieces(template) {
        match p {
            Piece::Text(s) => out.push_str(s),
            Piece::Name(n, span) => match value(n) {
                Some(v) => out.push_str(v),
                None => out.push_str(&template[span]),
            },
        }
    }
    out
}

/// The variable a parameter's value is in: `BRIDGE_PARAM_` and its name in
/// upper case.
pub fn param_env(name: &str) -> String {
    format!("{PARAM_ENV_PREFIX}{}", name.to_ascii_uppercase())
}

/// Whether `name` can name a parameter: a placeholder name, and not one of
/// the [`BUILTIN`] ones.
pub fn valid_param_name(name: &str) -> bool {
    is_name(name) && !BUILTIN.contains(&name)
}

/// The number in a sweep id (`s12` → 12).
pub fn sweep_number(id: &str) -> Option<u64> {
    let n = id.trim().strip_prefix('s')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The id of sweep number `n`.
pub fn sweep_id(n: u64) -> String {
    format!("s{n}")
}

/// Splits `SWEEP/TRIAL` (`s3/2`, as `bridge logs` takes it).
pub fn trial_ref(s: &str) -> Option<(String, u32)> {
    let (sweep, trial) = s.trim().split_once('/')?;
    sweep_number(sweep)?;
    Some((sweep.to_string(), trial.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &str) -> Vec<String> {
        placeholders(t).into_iter().map(|p| p.name).collect()
    }

    #[test]
    fn placeholders_are_names_in_braces_and_nothing_else() {
        assert_eq!(
            names("python train.py --lr {lr} --depth {depth}"),
            ["lr", "depth"]
        );
        // Shell and Python braces stay as written.
        assert!(names("awk '{print $1}' f; echo ${HOME} {} {1:2} { lr }").is_empty());
        assert!(names("{{lr}} and }} {{").is_empty());
        let p = &placeholders("x {a_1} y")[0];
        assert_eq!((p.name.as_str(), p.span.clone()), ("a_1", 2..7));
        // An unclosed brace is text.
        assert!(names("echo {lr").is_empty());
    }

    #[test]
    fn expansion_fills_known_names_and_unescapes_braces() {
        let v = |n: &str| match n {
            "lr" => Some("0.001"),
            "trial" => Some("3"),
            _ => None,
        };
        assert_eq!(
            expand("run --lr {lr} --out runs/{trial} {{lr}} ${HOME} {x}", v),
            "run --lr 0.001 --out runs/3 {lr} ${HOME} {x}"
        );
        assert_eq!(
            expand("python -c 'print({{1: 2}})'", v),
            "python -c 'print({1: 2})'"
        );
        assert_eq!(expand("{lr}{lr}", v), "0.0010.001");
    }

    #[test]
    fn names_ids_and_trial_refs() {
        assert_eq!(param_env("lr"), "BRIDGE_PARAM_LR");
        assert!(valid_param_name("batch_size"));
        assert!(!valid_param_name("trial"));
        assert!(!valid_param_name("2x"));
        assert!(!valid_param_name("a-b"));
        assert_eq!(sweep_number("s12"), Some(12));
        assert_eq!(sweep_number("12"), None);
        assert_eq!(sweep_number("s"), None);
        assert_eq!(sweep_number("s1x"), None);
        assert_eq!(sweep_id(4), "s4");
        assert_eq!(trial_ref("s3/2"), Some(("s3".into(), 2)));
        assert_eq!(trial_ref("3/2"), None);
        assert_eq!(trial_ref("s3/x"), None);
    }
}
