//! Server host keys: checked against the user's `known_hosts` and bridge's
//! own file, learned only into bridge's file and only when asked to.
//!
//! Hashed (`|1|…`) entries and `[host]:port` entries are read by russh's
//! known_hosts helpers. Lines with markers (`@cert-authority`, `@revoked`)
//! are not understood and so never trust anything.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::known_hosts::known_host_keys_path;
use russh::keys::{Algorithm, HashAlg, PublicKey, PublicKeyOrCertificate};

/// The files and policy one connection's host key is checked with.
#[derive(Debug, Clone)]
pub struct HostKeyPolicy {
    /// For messages (`gpu-box` or `gpu-box:2222`).
    pub label: String,
    /// The name recorded in known_hosts (`HostKeyAlias`, else the host).
    pub name: String,
    pub port: u16,
    /// Read only, in order: the user's files.
    pub user_files: Vec<PathBuf>,
    /// Read, and the only file ever written.
    pub bridge_file: PathBuf,
    pub accept_new: bool,
}

/// Why a host key was refused; both are final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyError {
    Unknown(String),
    Changed(String),
    Other(String),
}

impl std::fmt::Display for HostKeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostKeyError::Unknown(m) | HostKeyError::Changed(m) | HostKeyError::Other(m) => {
                f.write_str(m)
            }
        }
    }
}

/// `ED25519 key fingerprint SHA256:…`, the way OpenSSH names a key to people.
pub fn describe(key: &PublicKey) -> String {
    format!(
        "{} key fingerprint {}",
        key_type_name(key),
        key.fingerprint(HashAlg::Sha256)
    )
}

/// `ED25519`, `ECDSA`, `RSA`, … (OpenSSH's short names).
fn key_type_name(key: &PublicKey) -> &'static str {
    match key.algorithm() {
        Algorithm::Ed25519 => "ED25519",
        Algorithm::Ecdsa { .. } => "ECDSA",
        Algorithm::Rsa { .. } => "RSA",
        Algorithm::Dsa => "DSA",
        Algorithm::SkEd25519 => "ED25519-SK",
        Algorithm::SkEcdsaSha2NistP256 => "ECDSA-SK",
        _ => "unknown-type",
    }
}

/// A recorded key for this host: where it is, and the key.
struct Recorded {
    file: PathBuf,
    line: usize,
    key: PublicKey,
}

impl HostKeyPolicy {
    fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.user_files
            .iter()
            .chain(std::iter::once(&self.bridge_file))
    }

    fn recorded(&self) -> Result<Vec<Recorded>, HostKeyError> {
        let mut out = Vec::new();
        for file in self.files() {
            let keys = known_host_keys_path(&self.name, self.port, file).map_err(|e| {
                HostKeyError::Other(format!(
                    "cannot read the known hosts file {}: {e}",
                    file.display()
                ))
            })?;
            out.extend(keys.into_iter().map(|(line, key)| Recorded {
                file: file.clone(),
                line,
                key,
            }));
        }
        Ok(out)
    }

    /// Host key algorithms already recorded for this host, so that the
    /// server is asked for a key we can check (as OpenSSH does).
    pub fn known_algorithms(&self) -> Vec<Algorithm> {
        let mut algs: Vec<Algorithm> = Vec::new();
        for r in self.recorded().unwrap_or_default() {
            let a = r.key.algorithm();
            if !algs.contains(&a) {
                algs.push(a);
            }
        }
        algs
    }

    /// Accepts a known key, learns an unknown one when allowed, refuses the rest.
    pub fn check(&self, key: &PublicKey) -> Result<(), HostKeyError> {
        let recorded = self.recorded()?;
        if recorded.iter().any(|r| r.key.key_data() == key.key_data()) {
            return Ok(());
        }
        if let Some(old) = recorded
            .iter()
            .find(|r| r.key.algorithm() == key.algorithm())
        {
            return Err(HostKeyError::Changed(format!(
                "WARNING: the host key for {label} has changed!\n\
                 Someone could be eavesdropping on you right now (a possible man-in-the-middle attack),\n\
                 or the host key has just been changed (the machine was reinstalled).\n\
                 The server presented the {new}; {file}:{line} records the {recorded}.\n\
                 bridge refuses to connect. If you know why the key changed, remove the old entry\n\
                 from {file}:{line} (e.g. `ssh-keygen -R '{host}' -f {file}`) and try again.",
                label = self.label,
                new = describe(key),
                file = old.file.display(),
                line = old.line,
                recorded = describe(&old.key),
                host = self.known_hosts_name(),
            )));
        }
        if self.accept_new {
            self.learn(key).map_err(|e| {
                HostKeyError::Other(format!(
                    "cannot record the host key of {} in {}: {e}",
                    self.label,
                    self.bridge_file.display()
                ))
            })?;
            tracing::info!(
                "recorded the host key of {} ({}) in {}",
                self.label,
                describe(key),
                self.bridge_file.display()
            );
            return Ok(());
        }
        let others = if recorded.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = recorded
                .iter()
                .map(|r| {
                    format!(
                        "{} at {}:{}",
                        key_type_name(&r.key),
                        r.file.display(),
                        r.line
                    )
                })
                .collect();
            format!(
                " (keys of other types are recorded for it: {}; the server offered none of them)",
                list.join(", ")
            )
        };
        Err(HostKeyError::Unknown(format!(
            "the authenticity of host {label} cannot be established{others}: the server presented the {desc}, \
             which is not in {files}. Check the fingerprint (on the server: `ssh-keygen -lf /etc/ssh/ssh_host_{short}_key.pub`), \
             then re-run with --accept-new-host-key to trust it (bridge records it in {bridge}, never in ~/.ssh/known_hosts)",
            label = self.label,
            desc = describe(key),
            files = self
                .files()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(" or "),
            short = key_type_name(key).to_lowercase().replace("-sk", "_sk"),
            bridge = self.bridge_file.display(),
        )))
    }

    /// Appends `name key` to bridge's file (russh's helper starts a new
    /// file with an empty line).
    fn learn(&self, key: &PublicKey) -> std::io::Result<()> {
        use std::io::{Read, Seek, SeekFrom, Write};
        if let Some(dir) = self.bridge_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.bridge_file)?;
        let mut last = [b'\n'];
        if f.seek(SeekFrom::End(0))? > 0 {
            f.seek(SeekFrom::End(-1))?;
            f.read_exact(&mut last)?;
        }
        let entry = key.to_openssh().map_err(std::io::Error::other)?;
        let sep = if last[0] == b'\n' { "" } else { "\n" };
        f.write_all(format!("{sep}{} {entry}\n", self.known_hosts_name()).as_bytes())
    }

    fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.name.clone()
        } else {
            format!("[{}]:{}", self.name, self.port)
        }
    }
}

/// The russh client handler: checks the host key, and keeps a refusal for
/// the connect error (russh only reports that the handshake failed).
pub struct Client {
    pub policy: Arc<HostKeyPolicy>,
    pub refusal: Arc<Mutex<Option<HostKeyError>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.policy.check(key),
            PublicKeyOrCertificate::Certificate(_) => Err(HostKeyError::Other(format!(
                "{} presented a host certificate; bridge checks plain host keys only",
                self.policy.label
            ))),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(e) => {
                *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::parse_public_key_base64;

    // `ssh-keygen -lf` on this key prints
    // 256 SHA256:T7SvZ2cslqpPj6nKzitCBHHlpVF3r3MvLwmFL0fk0IE (ED25519)
    const ED: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF";

    fn policy(dir: &std::path::Path, accept_new: bool) -> HostKeyPolicy {
        HostKeyPolicy {
            label: "gpu-box:2222".into(),
            name: "gpu-box".into(),
            port: 2222,
            user_files: vec![dir.join("known_hosts")],
            bridge_file: dir.join("bridge/known_hosts"),
            accept_new,
        }
    }

    #[test]
    fn fingerprint_formatting() {
        let key = parse_public_key_base64(ED).unwrap();
        assert_eq!(
            describe(&key),
            "ED25519 key fingerprint SHA256:T7SvZ2cslqpPj6nKzitCBHHlpVF3r3MvLwmFL0fk0IE"
        );
    }

    #[test]
    fn unknown_refused_then_learned_into_bridge_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = parse_public_key_base64(ED).unwrap();
        let err = policy(dir.path(), false).check(&key).unwrap_err();
        let HostKeyError::Unknown(msg) = err else {
            panic!("{err:?}")
        };
        assert!(msg.contains("--accept-new-host-key"), "{msg}");
        assert!(msg.contains("SHA256:T7SvZ2cslqpPj6"), "{msg}");
        assert!(!dir.path().join("bridge/known_hosts").exists());

        policy(dir.path(), true).check(&key).unwrap();
        let learned = std::fs::read_to_string(dir.path().join("bridge/known_hosts")).unwrap();
        assert!(
            learned.starts_with("[gpu-box]:2222 ssh-ed25519 "),
            "{learned}"
        );
        assert!(!dir.path().join("known_hosts").exists());
        // Now known without the flag.
        policy(dir.path(), false).check(&key).unwrap();
    }

    #[test]
    fn changed_key_is_refused_with_file_and_line_even_when_accepting_new() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("# comment\nother ssh-ed25519 {ED2}\n[gpu-box]:2222 ssh-ed25519 {ED2}\n"),
        )
        .unwrap();
        let key = parse_public_key_base64(ED).unwrap();
        let err = policy(dir.path(), true).check(&key).unwrap_err();
        let HostKeyError::Changed(msg) = err else {
            panic!("{err:?}")
        };
        assert!(
            msg.contains("WARNING: the host key for gpu-box:2222 has changed"),
            "{msg}"
        );
        assert!(msg.contains("man-in-the-middle"), "{msg}");
        let at = format!("{}:2", dir.path().join("known_hosts").display());
        assert!(msg.contains(&at), "{msg} lacks {at}");
    }

    #[test]
    fn hashed_entries_match() {
        let dir = tempfile::tempdir().unwrap();
        // `ssh-keygen -H` of "example.com" (from russh's own test vector).
        std::fs::write(
            dir.path().join("known_hosts"),
            format!(
                "|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak= ssh-ed25519 {ED2}\n"
            ),
        )
        .unwrap();
        let mut p = policy(dir.path(), false);
        p.name = "example.com".into();
        p.port = 22;
        p.check(&parse_public_key_base64(ED2).unwrap()).unwrap();
        assert!(matches!(
            p.check(&parse_public_key_base64(ED).unwrap()),
            Err(HostKeyError::Changed(_))
        ));
    }
}
