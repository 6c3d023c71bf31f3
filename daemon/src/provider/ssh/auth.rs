//! Public-key login, in OpenSSH's spirit: `--identity`, then the keys of the
//! ssh-agent (`SSH_AUTH_SOCK`), then the config's `IdentityFile`s, then the
//! default key files. Each distinct key is offered once. bridge runs
//! unattended, so it never asks for a passphrase: an encrypted key is usable
//! only through the agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::client::{AuthResult, Handle};
use russh::keys::agent::AgentIdentity;
use russh::keys::agent::client::AgentClient;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{MethodKind, MethodSet};
use tokio::net::UnixStream;

use super::hostkey::{Client, describe};

/// Default key files under the ssh directory, in OpenSSH's order.
pub const DEFAULT_KEYS: [&str; 3] = ["id_ed25519", "id_ecdsa", "id_rsa"];

/// What to log in with.
pub struct Credentials<'a> {
    pub user: &'a str,
    /// For messages: `user@host:port`.
    pub label: &'a str,
    pub identity: Option<&'a Path>,
    pub config_identities: &'a [PathBuf],
    pub ssh_dir: &'a Path,
}

/// Why login failed.
#[derive(Debug)]
pub enum AuthError {
    /// Nothing retrying would change (no key, refused keys, encrypted key).
    Fatal(String),
    /// The connection broke while authenticating.
    Link(String),
}

/// One key offered, for the final report.
struct Offer {
    what: String,
    public: PublicKey,
}

struct Attempts<'h, 'c> {
    handle: &'h mut Handle<Client>,
    creds: &'c Credentials<'c>,
    tried: Vec<Offer>,
    skipped: Vec<String>,
    /// The server's preferred RSA signature hash, asked once.
    rsa_hash: Option<Option<HashAlg>>,
}

/// What one attempt tells the caller.
enum Step {
    Done,
    Next,
}

impl Attempts<'_, '_> {
    fn seen(&self, key: &PublicKey) -> bool {
        self.tried
            .iter()
            .any(|o| o.public.key_data() == key.key_data())
    }

    async fn hash_for(&mut self, key: &PublicKey) -> Option<HashAlg> {
        if !key.algorithm().is_rsa() {
            return None;
        }
        if self.rsa_hash.is_none() {
            // `Some(None)`: the server only knows SHA-1 `ssh-rsa`. Unknown
            // (no server-sig-algs): every server that still allows RSA
            // accepts SHA-256.
            let best = match self.handle.best_supported_rsa_hash().await {
                Ok(Some(h)) => h,
                _ => Some(HashAlg::Sha256),
            };
            self.rsa_hash = Some(best);
        }
        self.rsa_hash.flatten()
    }

    fn judge(&self, result: AuthResult) -> Result<Step, AuthError> {
        match result {
            AuthResult::Success => Ok(Step::Done),
            AuthResult::Failure {
                partial_success: true,
                remaining_methods,
            } => Err(AuthError::Fatal(format!(
                "{} accepted the key but requires more authentication ({}), which bridge cannot do unattended",
                self.creds.label,
                methods(&remaining_methods)
            ))),
            AuthResult::Failure {
                remaining_methods, ..
            } if !remaining_methods.is_empty()
                && !remaining_methods.contains(&MethodKind::PublicKey) =>
            {
                Err(AuthError::Fatal(format!(
                    "{} does not accept public-key login (it offers: {}); bridge logs in with keys only",
                    self.creds.label,
                    methods(&remaining_methods)
                )))
            }
            AuthResult::Failure { .. } => Ok(Step::Next),
        }
    }

    /// A connection error while authenticating: after refused keys it is
    /// most likely the server's MaxAuthTries.
    fn broken(&self, e: impl std::fmt::Display) -> AuthError {
        if self.tried.len() >= 2 {
            AuthError::Fatal(format!(
                "{} closed the connection after refusing {} keys ({e}); too many keys offered? Pass the right one with --identity. Tried: {}",
                self.creds.label,
                self.tried.len(),
                self.tried_list()
            ))
        } else {
            AuthError::Link(format!(
                "the connection to {} broke during login: {e}",
                self.creds.label
            ))
        }
    }

    fn tried_list(&self) -> String {
        self.tried
            .iter()
            .map(|o| format!("{} ({})", o.what, describe(&o.public)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn with_key(&mut self, key: PrivateKey, what: String) -> Result<Step, AuthError> {
        let public = key.public_key().clone();
        if self.seen(&public) {
            return Ok(Step::Next);
        }
        let hash = self.hash_for(&public).await;
        self.tried.push(Offer { what, public });
        let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
        match self
            .handle
            .authenticate_publickey(self.creds.user, key)
            .await
        {
            Ok(r) => self.judge(r),
            Err(e) => Err(self.broken(e)),
        }
    }

    async fn with_agent(
        &mut self,
        agent: &mut AgentClient<UnixStream>,
        public: PublicKey,
        what: String,
    ) -> Result<Step, AuthError> {
        if self.seen(&public) {
            return Ok(Step::Next);
        }
        let hash = self.hash_for(&public).await;
        self.tried.push(Offer {
            what,
            public: public.clone(),
        });
        match self
            .handle
            .authenticate_publickey_with(self.creds.user, public, hash, agent)
            .await
        {
            Ok(r) => self.judge(r),
            // The agent would not sign (a confirm-only key declined, …):
            // the handle stays usable, go on with the next key.
            Err(russh::AgentAuthError::Key(e)) => {
                self.skipped.push(format!(
                    "{} (ssh-agent refused to sign: {e})",
                    self.tried_what()
                ));
                Ok(Step::Next)
            }
            Err(e) => Err(self.broken(e)),
        }
    }

    fn tried_what(&self) -> String {
        self.tried
            .last()
            .map(|o| o.what.clone())
            .unwrap_or_default()
    }

    /// A key file: loaded unless encrypted (then only through the agent,
    /// which has had its turn already when this runs for config/default keys).
    async fn with_file(&mut self, path: &Path, kind: &str) -> Result<Step, AuthError> {
        match russh::keys::load_secret_key(path, None) {
            Ok(key) => {
                self.with_key(key, format!("{kind} {}", path.display()))
                    .await
            }
            Err(russh::keys::Error::KeyIsEncrypted) => {
                self.skipped.push(format!(
                    "{} (encrypted and not in ssh-agent)",
                    path.display()
                ));
                Ok(Step::Next)
            }
            Err(russh::keys::Error::IO(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                if kind == "IdentityFile" {
                    self.skipped
                        .push(format!("{} (IdentityFile: no such file)", path.display()));
                }
                Ok(Step::Next)
            }
            Err(e) => {
                self.skipped
                    .push(format!("{} (unreadable: {e})", path.display()));
                Ok(Step::Next)
            }
        }
    }
}

fn methods(set: &MethodSet) -> String {
    set.iter().map(<&str>::from).collect::<Vec<_>>().join(", ")
}

/// The public half of a key file: `FILE.pub`, for finding it in the agent.
fn public_of(path: &Path) -> Option<PublicKey> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    russh::keys::load_public_key(PathBuf::from(pub_path)).ok()
}

/// Logs in on `handle`, or says precisely why not.
pub async fn authenticate(
    handle: &mut Handle<Client>,
    creds: &Credentials<'_>,
) -> Result<(), AuthError> {
    let mut agent_note = None;
    let mut agent = match std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
        None => {
            agent_note = Some("no ssh-agent (SSH_AUTH_SOCK is not set)".to_string());
            None
        }
        Some(_) => match AgentClient::connect_env().await {
            Ok(a) => Some(a),
            Err(e) => {
                agent_note = Some(format!("the ssh-agent at SSH_AUTH_SOCK is unusable ({e})"));
                None
            }
        },
    };
    let mut agent_keys: Vec<(PublicKey, String)> = Vec::new();
    if let Some(a) = agent.as_mut() {
        match a.request_identities().await {
            Ok(ids) => {
                for id in ids {
                    // Certificates would need their own login method.
                    if let AgentIdentity::PublicKey { key, comment } = id {
                        agent_keys.push((key, comment));
                    }
                }
            }
            Err(e) => agent_note = Some(format!("the ssh-agent did not list its keys ({e})")),
        }
    }
    let mut at = Attempts {
        handle,
        creds,
        tried: Vec::new(),
        skipped: Vec::new(),
        rsa_hash: None,
    };

    // 1. --identity: the user chose it, so an unusable one is an error.
    if let Some(path) = creds.identity {
        let step = match russh::keys::load_secret_key(path, None) {
            Ok(key) => {
                at.with_key(key, format!("--identity {}", path.display()))
                    .await?
            }
            Err(russh::keys::Error::KeyIsEncrypted) => {
                let held = public_of(path)
                    .filter(|p| agent_keys.iter().any(|(k, _)| k.key_data() == p.key_data()));
                match (held, agent.as_mut()) {
                    (Some(public), Some(a)) => {
                        at.with_agent(
                            a,
                            public,
                            format!("--identity {} (via ssh-agent)", path.display()),
                        )
                        .await?
                    }
                    _ => {
                        return Err(AuthError::Fatal(format!(
                            "the identity file {p} is encrypted with a passphrase and {why}; bridge cannot ask for passphrases: \
                             add it to your agent with `ssh-add {p}` (with SSH_AUTH_SOCK set for bridge), or use a key without a passphrase",
                            p = path.display(),
                            why = match &agent_note {
                                Some(note) => note.clone(),
                                None => "the ssh-agent does not hold it".to_string(),
                            },
                        )));
                    }
                }
            }
            Err(russh::keys::Error::IO(e)) => {
                return Err(AuthError::Fatal(format!(
                    "cannot read the identity file {}: {e}",
                    path.display()
                )));
            }
            Err(e) => {
                return Err(AuthError::Fatal(format!(
                    "cannot use the identity file {}: {e}",
                    path.display()
                )));
            }
        };
        if let Step::Done = step {
            return Ok(());
        }
    }

    // 2. The agent's keys.
    if let Some(a) = agent.as_mut() {
        for (public, comment) in agent_keys.clone() {
            let what = if comment.is_empty() {
                "ssh-agent key".to_string()
            } else {
                format!("ssh-agent key {comment}")
            };
            if let Step::Done = at.with_agent(a, public, what).await? {
                return Ok(());
            }
        }
    }

    // 3. IdentityFile from the config, 4. the default files.
    for path in creds.config_identities {
        if let Step::Done = at.with_file(path, "IdentityFile").await? {
            return Ok(());
        }
    }
    for name in DEFAULT_KEYS {
        let path = creds.ssh_dir.join(name);
        if let Step::Done = at.with_file(&path, "key").await? {
            return Ok(());
        }
    }

    let mut msg = if at.tried.is_empty() {
        format!(
            "cannot log in to {}: no usable SSH key (no --identity, {}, no IdentityFile in the ssh config, none of {} in {})",
            creds.label,
            agent_note
                .clone()
                .unwrap_or_else(|| "the ssh-agent holds no key".to_string()),
            DEFAULT_KEYS.join(", "),
            creds.ssh_dir.display()
        )
    } else {
        format!(
            "cannot log in to {}: the server refused every key bridge offered: {}",
            creds.label,
            at.tried_list()
        )
    };
    if !at.skipped.is_empty() {
        msg.push_str(&format!("; skipped: {}", at.skipped.join(", ")));
    }
    if !at.tried.is_empty()
        && let Some(note) = agent_note
    {
        msg.push_str(&format!("; {note}"));
    }
    msg.push_str(if at.tried.is_empty() {
        ". Pass a key with --identity"
    } else {
        ". Pass the right key with --identity, or check the remote ~/.ssh/authorized_keys"
    });
    Err(AuthError::Fatal(msg))
}
