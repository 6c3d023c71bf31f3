//! How the CLI talks to the user, the same way in every command: notes on
//! stderr (`bridge: …`), which `-q` silences (errors, warnings and a job's own
//! output stay); progress bars only when stderr is a terminal and `-q` is not
//! given (plain lines otherwise); and `-v`/`-vv` for bridge's own debug and
//! trace log on stderr, coloured only on a terminal without `NO_COLOR`.
//! bridge's own lines have no colour.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

/// Sets `-q` and `-v` for the process, and with `-v` logs bridge's own
/// events on stderr (`BRIDGE_LOG` still wins when set).
pub fn init(quiet: bool, verbose: u8) {
    QUIET.store(quiet, Ordering::Relaxed);
    if verbose == 0 {
        return;
    }
    let level = if verbose == 1 { "debug" } else { "trace" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BRIDGE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "warn,bridge={level},bridge_cli={level},bridge_daemon={level},bridge_proto={level}"
        ))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .try_init();
}

/// `-q`: print only errors, warnings and what was asked for.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Progress bars and spinners: stderr is a terminal and `-q` was not given.
pub fn progress() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// A spinner on stderr with the elapsed time and a message cut to the
/// terminal's width (never wrapped), ticking by itself.
pub fn spinner(message: impl Into<std::borrow::Cow<'static, str>>) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
            .expect("valid template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Colour in stderr: a terminal, and no `NO_COLOR` (<https://no-color.org>).
pub fn colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// A note for the user on stderr, unless `-q`: `note!("bridge: job {id} …")`.
#[macro_export]
macro_rules! note {
    ($($t:tt)*) => {
        if !$crate::out::quiet() {
            eprintln!($($t)*);
        }
    };
}

/// The terminal side of a provider's machine lifecycle (`bridge up`, `down`
/// and `status` of AWS): notes, spinners, results and the launch question.
pub struct Terminal;

impl bridge_daemon::provider::machine::Ui for Terminal {
    fn step(&self) -> Box<dyn bridge_daemon::provider::machine::Step + '_> {
        Box::new(Step {
            bar: progress().then(|| spinner("")),
            last: String::new(),
        })
    }

    fn note(&self, line: &str) {
        crate::note!("{line}");
    }

    fn warn(&self, line: &str) {
        eprintln!("{line}");
    }

    fn out(&self, line: &str) {
        println!("{line}");
    }

    fn confirm(
        &self,
        lines: &[String],
        question: &str,
        yes: bool,
        refusal: &str,
    ) -> anyhow::Result<bool> {
        use std::io::{BufRead, Write};
        lines.iter().for_each(|l| eprintln!("{l}"));
        if yes {
            return Ok(true);
        }
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("{refusal}");
        }
        eprint!("{question} [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
    }
}

/// A spinner on a terminal, one line per new message otherwise.
struct Step {
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl bridge_daemon::provider::machine::Step for Step {
    fn say(&mut self, message: String) {
        if message == self.last {
            return;
        }
        match &self.bar {
            Some(b) => b.set_message(message.clone()),
            None => crate::note!("bridge: {message}"),
        }
        self.last = message;
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
