//! Where to connect: `[user@]host[:port]` and the matching `Host` blocks of
//! `~/.ssh/config` (read, never written).
//!
//! The subset of ssh_config(5) that matters for reaching a host is honoured:
//! `Host` patterns (`*`, `?`, `!negation`), `HostName` (with `%h`), `User`,
//! `Port`, `IdentityFile` (with `~` and `%d %u %h %r %%`), `HostKeyAlias` and
//! `Include`. As in OpenSSH the first value of a keyword wins, `IdentityFile`s
//! accumulate, and values given on the command line beat the file. `Match`
//! blocks are skipped. `ProxyJump` (a chain of hops, each resolved with its own
//! `Host` blocks) and `ProxyCommand` (with `%h %p %r %n %%`) are honoured: the
//! link then goes through them, never around them.

use std::path::{Path, PathBuf};

/// A parsed `[user@]host[:port]` (also `ssh://…` and `[v6addr]:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub user: Option<String>,
    /// The host as typed: a name, an address, or a `Host` alias.
    pub host: String,
    pub port: Option<u16>,
}

/// Characters no host or user name bridge takes may hold.
const SHELL_META: &str = "'`\"$\\;&<>|(){}";

impl HostSpec {
    pub fn parse(spec: &str) -> Result<HostSpec, String> {
        let s = spec.trim();
        let s = s.strip_prefix("ssh://").unwrap_or(s);
        let s = s.strip_suffix('/').unwrap_or(s);
        let (user, rest) = match s.rsplit_once('@') {
            Some(("", _)) => return Err(format!("empty user name in {spec:?}")),
            Some((u, r)) => (Some(u.to_string()), r),
            None => (None, s),
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("missing `]` in {spec:?}"))?;
            match after {
                "" => (addr, None),
                p => (
                    addr,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("expected `:PORT` after `]` in {spec:?}"))?,
                    ),
                ),
            }
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("no host name in {spec:?}"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(format!("invalid host name {host:?}"));
        }
        // They may reach a shell: an ssh_config `ProxyCommand`'s %h, %r and
        // %n. Refused as OpenSSH (9.6) refuses them.
        for (what, v) in [("host name", Some(host)), ("user name", user.as_deref())] {
            if let Some(v) = v
                && (v.starts_with('-')
                    || v.chars().any(|c| c.is_control() || SHELL_META.contains(c)))
            {
                return Err(format!(
                    "invalid {what} {v:?}: shell metacharacters ({SHELL_META}) and a leading '-' are refused"
                ));
            }
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(format!("invalid port {p:?} in {spec:?}")),
            },
        };
        Ok(HostSpec {
            user,
            host: host.to_string(),
            port,
        })
    }
}

/// What a `Host` alias resolves to in the config file; every field is the
/// first value found, `None` when no matching block set it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostConfig {
    pub host_name: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// As written (expanded later, once the user is known).
    pub identity_files: Vec<String>,
    pub host_key_alias: Option<String>,
    /// `ProxyJump`/`ProxyCommand` with its value, when set to anything but `none`.
    pub proxy: Option<(String, String)>,
}

/// Reads `path` (missing file: empty config) and collects the settings of
/// every `Host` block that matches `alias`.
pub fn read_config(path: &Path, alias: &str, home: &Path) -> Result<HostConfig, String> {
    let mut out = HostConfig::default();
    let base = path.parent().unwrap_or(Path::new("."));
    match std::fs::read_to_string(path) {
        Ok(text) => apply_config(&text, path, alias, home, base, &mut out, 0)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    Ok(out)
}

/// Applies one config file's text. `base` is the directory relative
/// `Include`s are resolved against (`~/.ssh` for user configs).
fn apply_config(
    text: &str,
    file: &Path,
    alias: &str,
    home: &Path,
    base: &Path,
    out: &mut HostConfig,
    depth: usize,
) -> Result<(), String> {
    // Before the first `Host` line everything applies.
    let mut active = true;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = split_keyword(line);
        let args = split_args(rest).map_err(|e| format!("{}:{}: {e}", file.display(), n + 1))?;
        let key = key.to_ascii_lowercase();
        match key.as_str() {
            "host" => active = host_matches(&args, alias),
            // Conditions we do not evaluate: ignore the block.
            "match" => active = false,
            _ if !active => {}
            "include" => {
                if depth >= 16 {
                    return Err(format!(
                        "{}:{}: Include nested too deeply",
                        file.display(),
                        n + 1
                    ));
                }
                for arg in &args {
                    for inc in expand_include(arg, home, base) {
                        if let Ok(text) = std::fs::read_to_string(&inc) {
                            apply_config(&text, &inc, alias, home, base, out, depth + 1)?;
                        }
                    }
                }
            }
            _ => {
                let Some(value) = args.first().cloned() else {
                    continue;
                };
                match key.as_str() {
                    "hostname" => {
                        out.host_name.get_or_insert(value);
                    }
                    "user" => {
                        out.user.get_or_insert(value);
                    }
                    "port" if out.port.is_none() => {
                        let port =
                            value
                                .parse::<u16>()
                                .ok()
                                .filter(|p| *p > 0)
                                .ok_or_else(|| {
                                    format!("{}:{}: bad Port {value:?}", file.display(), n + 1)
                                })?;
                        out.port = Some(port);
                    }
                    "identityfile" if !value.eq_ignore_ascii_case("none") => {
                        out.identity_files.push(value);
                    }
                    "hostkeyalias" => {
                        out.host_key_alias.get_or_insert(value);
                    }
                    // The first value wins, `none` included. A command is
                    // kept as written: it goes to the shell, quotes and all.
                    "proxyjump" if out.proxy.is_none() => {
                        out.proxy = Some(("ProxyJump".to_string(), value));
                    }
                    "proxycommand" if out.proxy.is_none() => {
                        out.proxy = Some(("ProxyCommand".to_string(), rest.to_string()));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// `Keyword value…` or `Keyword=value…`.
fn split_keyword(line: &str) -> (&str, &str) {
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    (key, rest)
}

/// Whitespace-separated arguments; double quotes group.
fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            c => {
                cur.push(c);
                in_arg = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_arg {
        args.push(cur);
    }
    Ok(args)
}

/// A `Host` line matches when one pattern matches and no negated one does.
fn host_matches(patterns: &[String], alias: &str) -> bool {
    let mut matched = false;
    for p in patterns {
        // A pattern list may also be comma-separated.
        for p in p.split(',').filter(|p| !p.is_empty()) {
            if let Some(neg) = p.strip_prefix('!') {
                if wildcard_match(neg, alias) {
                    return false;
                }
            } else if wildcard_match(p, alias) {
                matched = true;
            }
        }
    }
    matched
}

/// `*` any run, `?` one character; host names compare case-insensitively.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    glob(&pattern.to_lowercase(), &text.to_lowercase())
}

/// `*` any run, `?` one character, case-sensitive.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// An `Include` argument: `~` expanded, relative to `base`, and a wildcard
/// in the file name (not in directories) expanded, sorted as OpenSSH does.
fn expand_include(arg: &str, home: &Path, base: &Path) -> Vec<PathBuf> {
    let path = expand_tilde(arg, home);
    let path = if path.is_absolute() {
        path
    } else {
        base.join(path)
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![path];
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| glob(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// `~` and `~/…` → the home directory.
pub fn expand_tilde(s: &str, home: &Path) -> PathBuf {
    if s == "~" {
        home.to_path_buf()
    } else if let Some(rest) = s.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(s)
    }
}

/// `IdentityFile` tokens: `%d` home, `%u` local user, `%h` host name,
/// `%r` remote user, `%%`; then `~`.
pub fn expand_identity(s: &str, home: &Path, local_user: &str, host: &str, user: &str) -> PathBuf {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&home.to_string_lossy()),
            Some('u') => out.push_str(local_user),
            Some('h') => out.push_str(host),
            Some('r') => out.push_str(user),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    expand_tilde(&out, home)
}

/// Everything needed to open the connection, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// What the user typed (for messages).
    pub alias: String,
    /// The address connected to (`HostName`, else the alias).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The name looked up in known_hosts (`HostKeyAlias`, else `host`).
    pub host_key_name: String,
    /// `IdentityFile`s from the config, expanded, in order.
    pub identity_files: Vec<PathBuf>,
    /// How the connection gets there: directly (`None`), or through
    /// `ProxyJump` hops or a `ProxyCommand`.
    pub via: Option<Via>,
}

/// A link to the target other than a direct TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `ProxyJump`: the hops in order, each resolved like a host of its own
    /// (its own `Host` blocks, its own `ProxyJump`); the last one opens a
    /// `direct-tcpip` channel to the target.
    Jump(Vec<Target>),
    /// `ProxyCommand`, tokens expanded: run by `sh -c`; its stdin and stdout
    /// carry the SSH connection.
    Command(String),
}

/// Bound on nested `ProxyJump`s (a hop whose config names a jump host …),
/// which also ends a loop of aliases.
const MAX_HOPS: usize = 8;

/// Resolves a `[user@]host[:port]` against the config file at `config`.
pub fn resolve(spec: &str, config: &Path, home: &Path, local_user: &str) -> Result<Target, String> {
    resolve_at(spec, config, home, local_user, 0)
}

fn resolve_at(
    spec: &str,
    config: &Path,
    home: &Path,
    local_user: &str,
    depth: usize,
) -> Result<Target, String> {
    if depth > MAX_HOPS {
        return Err(format!(
            "more than {MAX_HOPS} nested ProxyJump hops reaching {spec:?} in {} (a loop of Host blocks?)",
            config.display()
        ));
    }
    let spec = HostSpec::parse(spec)?;
    let cfg = read_config(config, &spec.host, home)?;
    let host = cfg
        .host_name
        .map(|h| h.replace("%h", &spec.host).replace("%%", "%"))
        .unwrap_or_else(|| spec.host.clone());
    let user = spec
        .user
        .or(cfg.user)
        .unwrap_or_else(|| local_user.to_string());
    let port = spec.port.or(cfg.port).unwrap_or(22);
    let identity_files = cfg
        .identity_files
        .iter()
        .map(|f| expand_identity(f, home, local_user, &host, &user))
        .collect();
    let via = match cfg.proxy {
        None => None,
        Some((_, v)) if v.eq_ignore_ascii_case("none") => None,
        Some((key, v)) if key == "ProxyJump" => {
            let hops = v
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| {
                    resolve_at(h, config, home, local_user, depth + 1)
                        .map_err(|e| format!("ProxyJump {h} (for {}): {e}", spec.host))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if hops.is_empty() {
                return Err(format!(
                    "empty ProxyJump for {} in {}",
                    spec.host,
                    config.display()
                ));
            }
            Some(Via::Jump(hops))
        }
        Some((_, cmd)) => Some(Via::Command(expand_proxy_command(
            &cmd, &host, port, &user, &spec.host,
        )?)),
    };
    Ok(Target {
        alias: spec.host,
        host_key_name: cfg.host_key_alias.unwrap_or_else(|| host.clone()),
        host,
        port,
        user,
        identity_files,
        via,
    })
}

/// `ProxyCommand`'s tokens: `%h` host, `%p` port, `%r` remote user, `%n` the
/// name as typed, `%%`.
fn expand_proxy_command(
    cmd: &str,
    host: &str,
    port: u16,
    user: &str,
    alias: &str,
) -> Result<String, String> {
    let mut out = String::with_capacity(cmd.len());
    let mut chars = cmd.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('p') => out.push_str(&port.to_string()),
            Some('r') => out.push_str(user),
            Some('n') => out.push_str(alias),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(format!(
                    "ProxyCommand {cmd:?}: bridge expands %h, %p, %r, %n and %%, not %{other}"
                ));
            }
            None => return Err(format!("ProxyCommand {cmd:?} ends with a lone %")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(user: Option<&str>, host: &str, port: Option<u16>) -> HostSpec {
        HostSpec {
            user: user.map(str::to_string),
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn names_that_could_reach_a_shell_are_refused() {
        for bad in [
            "h;touch",
            "$(id)@h",
            "`id`",
            "u@h|x",
            "-oProxyCommand=x",
            "a&b",
            "h'x",
        ] {
            let e = HostSpec::parse(bad).unwrap_err();
            assert!(e.contains("shell metacharacters"), "{bad}: {e}");
        }
        assert!(HostSpec::parse("me@gpu-box.example.com:2222").is_ok());
        assert!(HostSpec::parse("[::1]:22").is_ok());
    }

    #[test]
    fn parses_host_specs() {
        assert_eq!(
            HostSpec::parse("gpu-box").unwrap(),
            spec(None, "gpu-box", None)
        );
        assert_eq!(
            HostSpec::parse("alice@gpu-box").unwrap(),
            spec(Some("alice"), "gpu-box", None)
        );
        assert_eq!(
            HostSpec::parse("alice@gpu-box:2222").unwrap(),
            spec(Some("alice"), "gpu-box", Some(2222))
        );
        assert_eq!(
            HostSpec::parse("10.0.0.7:22").unwrap(),
            spec(None, "10.0.0.7", Some(22))
        );
        assert_eq!(
            HostSpec::parse("ssh://bob@h.example.com:2200/").unwrap(),
            spec(Some("bob"), "h.example.com", Some(2200))
        );
        assert_eq!(
            HostSpec::parse("root@[::1]:2222").unwrap(),
            spec(Some("root"), "::1", Some(2222))
        );
        assert_eq!(
            HostSpec::parse("[fe80::1]").unwrap(),
            spec(None, "fe80::1", None)
        );
        // The last `@` separates: user names may contain one.
        assert_eq!(
            HostSpec::parse("a@corp@h").unwrap(),
            spec(Some("a@corp"), "h", None)
        );
        for bad in [
            "", "@h", "alice@", "h:0", "h:x", "h:70000", "h:", "[::1", "a b",
        ] {
            assert!(HostSpec::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", "anything"));
        assert!(wildcard_match("gpu-*", "gpu-box"));
        assert!(wildcard_match("GPU-?", "gpu-1"));
        assert!(!wildcard_match("gpu-?", "gpu-12"));
        assert!(wildcard_match("*.example.com", "a.b.example.com"));
        assert!(!wildcard_match("*.example.com", "example.com"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("a*b*c", "aXXbYY"));
        assert!(wildcard_match("", ""));
        assert!(!wildcard_match("", "x"));
    }

    fn resolve_with(config: &str, spec: &str) -> Result<Target, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, config).unwrap();
        resolve(spec, &path, Path::new("/home/me"), "me")
    }

    #[test]
    fn defaults_without_config() {
        let t = resolve(
            "gpu-box",
            Path::new("/nonexistent/config"),
            Path::new("/home/me"),
            "me",
        )
        .unwrap();
        assert_eq!(
            t,
            Target {
                alias: "gpu-box".into(),
                host: "gpu-box".into(),
                port: 22,
                user: "me".into(),
                host_key_name: "gpu-box".into(),
                identity_files: vec![],
                via: None,
            }
        );
    }

    #[test]
    fn aliases_first_match_wins_and_command_line_beats_config() {
        let config = "\
# comment
Host gpu
    HostName 10.1.2.3
    User trainer
    Port 2200
    IdentityFile ~/.ssh/gpu_key

Host gpu other
    User ignored
    IdentityFile %d/.ssh/second_%r

Host *
    User fallback
    Port 22
    IdentityFile ~/.ssh/id_all
";
        let t = resolve_with(config, "gpu").unwrap();
        assert_eq!(t.host, "10.1.2.3");
        assert_eq!(t.user, "trainer");
        assert_eq!(t.port, 2200);
        assert_eq!(t.host_key_name, "10.1.2.3");
        assert_eq!(
            t.identity_files,
            vec![
                PathBuf::from("/home/me/.ssh/gpu_key"),
                PathBuf::from("/home/me/.ssh/second_trainer"),
                PathBuf::from("/home/me/.ssh/id_all"),
            ]
        );
        let t = resolve_with(config, "root@gpu:22").unwrap();
        assert_eq!((t.user.as_str(), t.port), ("root", 22));
        let t = resolve_with(config, "other").unwrap();
        assert_eq!((t.host.as_str(), t.user.as_str()), ("other", "ignored"));
        let t = resolve_with(config, "elsewhere").unwrap();
        assert_eq!((t.user.as_str(), t.port), ("fallback", 22));
    }

    #[test]
    fn wildcard_hosts_negation_equals_and_quotes() {
        let config = "\
Host !gpu-secret gpu-*
  HostName=%h.cluster.internal
  User \"data team\"
Host *.internal
  Port=2222
Match host foo
  User never
Host gpu-3
  HostKeyAlias gpu-three
";
        let t = resolve_with(config, "gpu-3").unwrap();
        assert_eq!(t.host, "gpu-3.cluster.internal");
        assert_eq!(t.user, "data team");
        // `Host *.internal` matches the alias, not the HostName.
        assert_eq!(t.port, 22);
        assert_eq!(t.host_key_name, "gpu-three");
        let t = resolve_with(config, "gpu-secret").unwrap();
        assert_eq!((t.host.as_str(), t.user.as_str()), ("gpu-secret", "me"));
        let t = resolve_with(config, "db.internal").unwrap();
        assert_eq!(t.port, 2222);
    }

    #[test]
    fn settings_before_the_first_host_apply_to_all() {
        let t = resolve_with("User early\nHost x\n  User late\n", "x").unwrap();
        assert_eq!(t.user, "early");
    }

    #[test]
    fn proxy_jump_hops_are_resolved_with_their_own_blocks() {
        let t = resolve_with(
            "Host gpu\n  HostName 10.0.0.7\n  ProxyJump bastion,alice@inner:2200\n\
             Host bastion\n  HostName 192.0.2.9\n  User ops\n  Port 2022\n",
            "gpu",
        )
        .unwrap();
        let Some(Via::Jump(hops)) = &t.via else {
            panic!("{t:?}");
        };
        let hops: Vec<(&str, &str, u16)> = hops
            .iter()
            .map(|h| (h.host.as_str(), h.user.as_str(), h.port))
            .collect();
        assert_eq!(hops, [("192.0.2.9", "ops", 2022), ("inner", "alice", 2200)]);
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.7", 22));
        // `none` first disables a later wildcard proxy.
        let t = resolve_with("Host gpu\n  ProxyJump none\nHost *\n  ProxyJump b\n", "gpu");
        assert_eq!(t.unwrap().via, None);
        // A loop is an error, not a hang.
        let err = resolve_with("Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n", "a").unwrap_err();
        assert!(err.contains("nested ProxyJump"), "{err}");
    }

    #[test]
    fn proxy_command_tokens_are_expanded_and_quotes_kept() {
        let t = resolve_with(
            "Host gpu\n  HostName 10.0.0.7\n  User u\n  ProxyCommand ssh -W '%h:%p' -l %r bastion # %n %%\n",
            "gpu",
        )
        .unwrap();
        assert_eq!(
            t.via,
            Some(Via::Command(
                "ssh -W '10.0.0.7:22' -l u bastion # gpu %".into()
            ))
        );
        let err = resolve_with("Host *\n  ProxyCommand nc %C\n", "gpu").unwrap_err();
        assert!(err.contains("not %C"), "{err}");
    }

    #[test]
    fn includes_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config.d")).unwrap();
        std::fs::write(
            dir.path().join("config.d/10-gpu.conf"),
            "Host gpu\n  HostName 192.0.2.1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.d/notes.txt"),
            "Host gpu\n  User no\n",
        )
        .unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, "Include config.d/*.conf\nHost gpu\n  User u\n").unwrap();
        let t = resolve("gpu", &path, Path::new("/home/me"), "me").unwrap();
        assert_eq!((t.host.as_str(), t.user.as_str()), ("192.0.2.1", "u"));
    }

    #[test]
    fn tilde_and_tokens() {
        let home = Path::new("/home/me");
        assert_eq!(expand_tilde("~", home), PathBuf::from("/home/me"));
        assert_eq!(expand_tilde("~/k", home), PathBuf::from("/home/me/k"));
        assert_eq!(expand_tilde("/abs/k", home), PathBuf::from("/abs/k"));
        assert_eq!(
            expand_identity("~/.ssh/%h_%r_%u_100%%", home, "me", "gpu", "root"),
            PathBuf::from("/home/me/.ssh/gpu_root_me_100%")
        );
    }
}
