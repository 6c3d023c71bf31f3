//! The agent's files on the remote and the POSIX `sh` scripts that manage
//! them. Each script is one SSH `exec` (`sh -c SCRIPT bridge ARGS…`), prints
//! `key=value` lines for us (anything else on stdout, say from a chatty
//! shell profile, is ignored) and signals failures by exit code.
//!
//! Layout under the remote directory `D`:
//!
//! ```text
//! D/bin/bridge-agent-<hash>   uploaded binaries (blake3 of the file, 16 hex)
//! D/run/                      0700: agent.sock, agent.pid, agent.version
//!                             (the hash it runs, and of its extra
//!                             arguments), token (0600), start.lock
//! D/agent/                    the agent's --root (mirrors, store, jobs)
//! D/agent.log                 the running agent's stdout and stderr
//! ```
//!
//! Starting and stopping hold `flock run/start.lock` (when `flock` exists),
//! so two daemons bringing up the same remote user's agent at once start
//! it once.

/// Exit codes of the scripts (anything else is unexpected).
pub const EXIT_NOT_WRITABLE: i32 = 10;
pub const EXIT_UPLOAD: i32 = 11;
pub const EXIT_LOCK: i32 = 12;
pub const EXIT_NOT_STARTED: i32 = 13;
pub const EXIT_REFUSED: i32 = 14;

/// `'…'`-quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line that runs `script` with positional arguments.
pub fn command(script: &str, args: &[&str]) -> String {
    let mut cmd = format!("sh -c {} bridge", quote(script));
    for a in args {
        cmd.push(' ');
        cmd.push_str(&quote(a));
    }
    cmd
}

/// The `key=value` lines of a script's output.
pub fn field<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// `$HOME` and the platform.
pub const INFO: &str = r#"printf 'home=%s\n' "$HOME"; printf 'uname=%s\n' "$(uname -sm)""#;

/// Helpers shared by the scripts that touch the running agent. `$D` is the
/// remote directory; the working directory is `$D`.
const PRELUDE: &str = r#"
alive() { [ -r "/proc/$1/stat" ] && read -r _ _ st _ < "/proc/$1/stat" && [ "$st" != Z ]; }
# The pid in run/agent.pid if it is a live bridge-agent (never signal a recycled pid).
agent_pid() {
  p=$(cat run/agent.pid 2>/dev/null) || return 1
  case $p in ''|*[!0-9]*) return 1 ;; esac
  alive "$p" || return 1
  case $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null) in *bridge-agent-*) ;; *) return 1 ;; esac
  echo "$p"
}
stop_agent() {
  if p=$(agent_pid); then
    kill -TERM "$p" 2>/dev/null
    i=0
    while alive "$p" && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    if alive "$p"; then kill -KILL "$p" 2>/dev/null; sleep 0.1; fi
    return 0
  fi
  return 1
}
lock() {
  exec 9> run/start.lock || exit 10
  if command -v flock > /dev/null 2>&1; then
    flock -w 60 9 || { echo "timed out waiting for $D/run/start.lock" >&2; exit 12; }
  fi
}
"#;

/// `DIR HASH VERSION [SERVE_ARG…]`: resolves `DIR` against `$HOME` as
/// `resolve_remote_dir` does and prints what [`INFO`] prints plus `dir=`, so a
/// connection needs one command, not two. Then it creates the layout
/// (private), and either reports that the binary is missing (`need=upload`)
/// or makes sure an agent running that binary with those extra `serve`
/// arguments (`VERSION` names the pair) serves `run/agent.sock`
/// (`state=reused|started|upgraded`) and prints the token (`token=…`).
pub fn ensure_script() -> String {
    format!(
        "{}{PRELUDE}{}",
        r#"R=$1 H=$2 V=$3
shift 3
home=${HOME%/}
while :; do case $R in */) R=${R%/} ;; *) break ;; esac; done
case $R in
  ''|'~') D=$home ;;
  '~/'*) D=$home/${R#??} ;;
  /*) D=$R ;;
  *) D=$home/$R ;;
esac
printf 'home=%s\nuname=%s\ndir=%s\n' "$HOME" "$(uname -sm)" "$D"
umask 077
mkdir -p "$D" || { echo "cannot create the remote directory $D" >&2; exit 10; }
[ -d "$D" ] && [ -w "$D" ] && [ -x "$D" ] || { echo "the remote directory $D is not writable by $(id -un)" >&2; exit 10; }
mkdir -p "$D/bin" "$D/run" "$D/agent" && chmod 700 "$D/run" || { echo "cannot create directories in $D" >&2; exit 10; }
cd "$D" || exit 10
[ -w bin ] && [ -w run ] || { echo "$D/bin or $D/run is not writable by $(id -un)" >&2; exit 10; }
# Uploads that died with their connection.
find bin -name '.upload-*' -mmin +60 -exec rm -f {} + 2>/dev/null
if [ ! -x "bin/bridge-agent-$H" ]; then echo need=upload; exit 0; fi
"#,
        r#"lock
if [ ! -s run/token ]; then
  od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > run/.token.$$ && mv -f run/.token.$$ run/token || { rm -f run/.token.$$; echo "cannot create $D/run/token" >&2; exit 10; }
fi
chmod 600 run/token
state=started
if p=$(agent_pid); then
  if [ "$(cat run/agent.version 2>/dev/null)" = "$V" ] && [ -S run/agent.sock ]; then
    echo state=reused
    echo "token=$(cat run/token)"
    exit 0
  fi
  stop_agent
  state=upgraded
fi
rm -f run/agent.sock
# 9>&-: the agent must not hold the start lock.
nohup setsid "bin/bridge-agent-$H" serve --root "$D/agent" --listen "unix:$D/run/agent.sock" --token-file "$D/run/token" "$@" > "$D/agent.log" 2>&1 < /dev/null 9>&- &
p=$!
echo "$p" > run/agent.pid
echo "$V" > run/agent.version
i=0
while [ ! -S run/agent.sock ]; do
  if ! alive "$p" || [ $i -ge 100 ]; then
    echo "the agent did not start (see $D/agent.log):" >&2
    tail -n 20 agent.log >&2
    alive "$p" && kill -KILL "$p" 2>/dev/null
    rm -f run/agent.pid run/agent.version
    exit 13
  fi
  sleep 0.1
  i=$((i+1))
done
echo "state=$state"
echo "token=$(cat run/token)"
"#
    )
}

/// `D TMPNAME SIZE HASH`, the binary on stdin: installs
/// `bin/bridge-agent-HASH` atomically (temp file, size check, chmod, mv).
pub const UPLOAD: &str = r#"t="$1/bin/.upload-$2"
umask 077
if ! cat > "$t"; then rm -f "$t"; echo "cannot write $t" >&2; exit 11; fi
n=$(wc -c < "$t")
if [ "$n" -ne "$3" ]; then rm -f "$t"; echo "upload incomplete: $n of $3 bytes" >&2; exit 11; fi
chmod 755 "$t" && mv -f "$t" "$1/bin/bridge-agent-$4" || { rm -f "$t"; echo "cannot install $1/bin/bridge-agent-$4" >&2; exit 11; }
echo installed=yes
"#;

/// `D`: stops the agent (TERM, up to 5 s, KILL) and removes its runtime
/// files. Jobs keep running under their shims.
pub fn stop_script() -> String {
    format!(
        "{}{PRELUDE}{}",
        r#"D=$1
cd "$D" 2>/dev/null && [ -d run ] || { echo state=absent; exit 0; }
"#,
        r#"lock
if stop_agent; then echo state=stopped; else echo state=not-running; fi
rm -f run/agent.sock run/agent.pid run/agent.version
"#
    )
}

/// `D`: stops the agent and removes `D`, unless it is `/` or `$HOME`.
pub fn purge_script() -> String {
    format!(
        "{}{PRELUDE}{}",
        r#"D=$1
r=$(cd "$D" 2>/dev/null && pwd -P) || { echo state=absent; exit 0; }
h=$(cd && pwd -P)
if [ "$r" = / ] || [ "$r" = "$h" ]; then echo "refusing to remove $r" >&2; exit 14; fi
cd "$r" || exit 10
"#,
        r#"if [ -d run ]; then lock; stop_agent; fi
cd / && rm -rf "$r" || { echo "cannot remove $r" >&2; exit 10; }
echo state=purged
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn quoting_survives_sh() {
        let nasty = "it's a \"dir\" with $HOME and `x` \\ and\nnewline";
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(nasty)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), nasty);
        let out = Command::new("sh")
            .arg("-c")
            .arg(command(r#"printf '%s|' "$@""#, &["a b", "c'd", ""]))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "a b|c'd||");
    }

    #[test]
    fn fields_ignore_noise() {
        let out = "Welcome!\nhome=/home/u\nuname=Linux x86_64\ntoken=ab=c\n";
        assert_eq!(field(out, "home"), Some("/home/u"));
        assert_eq!(field(out, "uname"), Some("Linux x86_64"));
        assert_eq!(field(out, "token"), Some("ab=c"));
        assert_eq!(field(out, "state"), None);
    }

    fn run(script: &str, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
        use std::io::Write;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command(script, args))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn scripts_layout_upload_and_purge_locally() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("remote dir");
        let d = d.to_str().unwrap();
        let (code, out, err) = run(&ensure_script(), &[d, "0123456789abcdef", "v"], b"");
        assert_eq!((code, field(&out, "need")), (0, Some("upload")), "{err}");
        let mode = |p: &str| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(format!("{d}/{p}"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("run"), 0o700);
        assert!(std::path::Path::new(&format!("{d}/agent")).is_dir());

        // A short upload is refused and leaves nothing behind.
        let (code, _, err) = run(UPLOAD, &[d, "x1", "10", "0123456789abcdef"], b"short");
        assert_eq!(code, EXIT_UPLOAD, "{err}");
        assert!(err.contains("5 of 10"), "{err}");
        let bin: Vec<_> = std::fs::read_dir(format!("{d}/bin")).unwrap().collect();
        assert!(bin.is_empty(), "{bin:?}");

        let (code, out, err) = run(UPLOAD, &[d, "x2", "5", "0123456789abcdef"], b"hello");
        assert_eq!((code, field(&out, "installed")), (0, Some("yes")), "{err}");
        assert_eq!(mode("bin/bridge-agent-0123456789abcdef"), 0o755);

        // Nothing runs: stopping is a no-op.
        let (code, out, err) = run(&stop_script(), &[d], b"");
        assert_eq!(
            (code, field(&out, "state")),
            (0, Some("not-running")),
            "{err}"
        );

        // Purge refuses $HOME, and removes the directory otherwise.
        let home = std::env::var("HOME").unwrap();
        let (code, _, err) = run(&purge_script(), &[&home], b"");
        assert_eq!(code, EXIT_REFUSED, "{err}");
        let (code, _, err) = run(&purge_script(), &["/"], b"");
        assert_eq!(code, EXIT_REFUSED, "{err}");
        let (code, out, err) = run(&purge_script(), &[d], b"");
        assert_eq!((code, field(&out, "state")), (0, Some("purged")), "{err}");
        assert!(!std::path::Path::new(d).exists());
    }

    #[test]
    fn unwritable_directory_is_named() {
        let (code, _, err) = run(&ensure_script(), &["/proc/bridge-test", "00", "v"], b"");
        assert_eq!(code, EXIT_NOT_WRITABLE, "{err}");
        assert!(err.contains("/proc/bridge-test"), "{err}");
    }
}
