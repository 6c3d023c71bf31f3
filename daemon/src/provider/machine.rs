//! Providers that own a machine: AWS launches an EC2 instance for the
//! repository (and Kubernetes, a pod). Before the daemon starts, `bridge up`
//! has the machine [`Machine::prepare`]d; `bridge status` asks for its
//! [`Machine::status`]; `bridge down`, after the daemon stopped, takes it
//! [`Machine::down`]. The daemon itself then reaches the agent there through
//! the provider's transport like any other ([`super::ProviderSpec::open`]).
//!
//! The command line only supplies a [`Ui`]: the lines, progress and the
//! question a launch asks. Everything that talks to the cloud lives here.

use std::time::Duration;

use super::{BoxFuture, ProviderSpec};

/// How a machine's lifecycle talks to the person at the terminal.
pub trait Ui: Send + Sync {
    /// A step that takes a while: a spinner on a terminal, a line for each
    /// new message otherwise. Dropping it ends it.
    fn step(&self) -> Box<dyn Step + '_>;
    /// A note on what happens ("reusing i-0abc"); `-q` silences it.
    fn note(&self, line: &str);
    /// A warning, always shown (on stderr).
    fn warn(&self, line: &str);
    /// The command's result, on stdout ("terminated i-0abc").
    fn out(&self, line: &str);
    /// Shows `lines` and asks `question` (yes/no). `yes`: already answered
    /// (shows the lines only). Without a terminal to ask on, it refuses with
    /// `refusal`.
    fn confirm(
        &self,
        lines: &[String],
        question: &str,
        yes: bool,
        refusal: &str,
    ) -> anyhow::Result<bool>;
}

/// A step in progress (see [`Ui::step`]).
pub trait Step: Send {
    fn say(&mut self, message: String);
}

/// A machine bridge starts and stops for the repository.
pub trait Machine: Send {
    /// What the machine is called in `bridge status` ("instance", "pod").
    fn noun(&self) -> &'static str;

    /// The spec as it stands now (with the launched instance or pod).
    fn spec(&self) -> &ProviderSpec;

    /// Makes sure the machine runs and its agent's transport answers:
    /// reuses a running one, starts a stopped one, or launches a new one
    /// (after showing what it costs and asking, unless `yes`). Saves the spec
    /// to `.bridge/provider.toml` as soon as a machine exists, so that
    /// `bridge down` finds it whatever happens next. On an error, nothing
    /// this call launched is left running.
    fn prepare<'a>(&'a mut self, ui: &'a dyn Ui, yes: bool) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Takes back what the last [`Machine::prepare`] launched, when the rest
    /// of `bridge up` failed. Keeps a machine it only reused.
    fn undo<'a>(&'a mut self, ui: &'a dyn Ui) -> BoxFuture<'a, ()>;

    /// `bridge down`, after the daemon stopped: ends the machine, waits for
    /// it to be gone, removes what bridge created for it, and forgets it
    /// (keeping how to launch it again). `purge` (`--purge`): also what
    /// outlives the machine on purpose (a volume that keeps the agent's
    /// files). Idempotent.
    fn down<'a>(&'a mut self, ui: &'a dyn Ui, purge: bool) -> BoxFuture<'a, anyhow::Result<()>>;

    /// The machine's state for `bridge status --json` (under the provider's
    /// name).
    fn status(&self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>>;

    /// [`Machine::status`]'s value as one line of `bridge status`.
    fn status_line(&self, status: &serde_json::Value) -> String;

    /// Whether [`Machine::status`] says the machine is gone for good (a
    /// deleted or evicted pod): then `bridge up` replaces it even while the
    /// daemon still runs (stopping that daemon first).
    fn gone(&self, _status: &serde_json::Value) -> bool {
        false
    }
}

/// `90s`, `30m`, `2h`, `1h30m` or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: use e.g. 90s, 30m, 2h or 1h30m");
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(s) = t.parse::<u64>() {
        return Ok(Duration::from_secs(s));
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        total = total.checked_add(n * unit).ok_or_else(bad)?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// `1h 02m`, `12m 30s`, `45s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `user@host`, who starts a machine, from where: the owner tag (AWS) or label (Kubernetes).
pub fn owner() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        for bad in ["", "m", "30x", "5m3", "h1"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(human_duration(Duration::from_secs(750)), "12m 30s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h 02m");
    }
}
