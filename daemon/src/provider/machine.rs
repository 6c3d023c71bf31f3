//! Providers that own a machine: AWS launches an EC2 instance for the
//! repository (and Kubernetes, a pod). Before the daemon starts, `bridge up`
//! has the machine [`Machine::prepare`]d; `bridge status` asks for its
//! [`Machine::status`]; `bridge down`, after the daemon stopped, takes it
//! [`Machine::down`]. The daemon itself then reaches the agent there through
//! the provider's transport like any other ([`super::ProviderSpec::open`]).
//!
//! The command line only supplies a [`Ui`]: the lines, progress and the
//! question a launch asks. Everything that talks to the cloud lives here.

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
    /// (keeping how to launch it again). Idempotent.
    fn down<'a>(&'a mut self, ui: &'a dyn Ui) -> BoxFuture<'a, anyhow::Result<()>>;

    /// The machine's state for `bridge status --json` (under the provider's
    /// name).
    fn status(&self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>>;

    /// [`Machine::status`]'s value as one line of `bridge status`.
    fn status_line(&self, status: &serde_json::Value) -> String;
}
