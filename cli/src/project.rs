//! The project config a team commits: `bridge.toml` at the repository root,
//! or `[tool.bridge]` in its `pyproject.toml` (not both).
//!
//! It gives defaults for `bridge up` and `bridge run`: where the agent runs
//! (provider, host, …), how many GPUs it must have, and the default job file.
//! Precedence, highest first: command-line flags; this clone's last `bridge
//! up` choice (`.bridge/provider.toml`, which a plain `bridge up` reuses);
//! the project config; bridge's defaults (the local provider). Unknown keys
//! and bad values are errors with the file's line and column, like a job
//! file's.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::spec::error::{Origin, SpecError};

/// `bridge.toml`'s name.
pub const FILE: &str = "bridge.toml";

/// The providers a project may name.
const PROVIDERS: [&str; 4] = ["local", "ssh", "aws", "k8s"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// `local`, `ssh`, `aws` or `k8s`.
    pub provider: Option<Spanned<String>>,
    /// SSH: `[user@]host[:port]` or a `Host` alias of `~/.ssh/config`.
    pub host: Option<String>,
    /// SSH: the private key (`~` is the user's home).
    pub identity: Option<PathBuf>,
    /// SSH and AWS: where the agent keeps its files on the remote.
    pub remote_dir: Option<String>,
    /// `bridge up` fails unless the agent has at least this many GPUs (AWS:
    /// launches a type with this many).
    pub gpus: Option<u32>,
    /// The job file `bridge run` runs when given none (relative to the
    /// repository root).
    pub job: Option<PathBuf>,
    /// AWS defaults.
    #[serde(default)]
    pub aws: AwsDefaults,
    /// Kubernetes defaults.
    #[serde(default)]
    pub k8s: K8sDefaults,
    /// Where it was read from (not a key).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsDefaults {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub gpu_type: Option<String>,
    pub instance_type: Option<String>,
    pub spot: Option<bool>,
    pub idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sDefaults {
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub image: Option<String>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub volume: Option<String>,
    pub idle_timeout: Option<String>,
}

impl K8sDefaults {
    pub fn any(&self) -> bool {
        self.context.is_some()
            || self.namespace.is_some()
            || self.image.is_some()
            || self.cpu.is_some()
            || self.memory.is_some()
            || self.volume.is_some()
            || self.idle_timeout.is_some()
    }
}

/// pyproject.toml, where only `[tool.bridge]` is bridge's.
#[derive(Deserialize)]
struct Pyproject {
    #[serde(default)]
    tool: Tools,
}

#[derive(Deserialize, Default)]
struct Tools {
    bridge: Option<Project>,
}

impl Project {
    /// The repository's project config; the default (nothing set) when it has
    /// none.
    pub fn load(repo: &Path) -> Result<Project, SpecError> {
        let own = read(&repo.join(FILE))?;
        let py = repo.join("pyproject.toml");
        let from_py = match read(&py)? {
            Some(text) if text.contains("bridge") => {
                let p: Pyproject = parse(&py, &text)?;
                p.tool.bridge.map(|b| (b, text))
            }
            _ => None,
        };
        let (mut project, path, text) = match (own, from_py) {
            (Some(_), Some(_)) => {
                return Err(SpecError::Invalid {
                    origin: Origin::in_file(py, "", None),
                    key: "tool.bridge".into(),
                    problem: format!(
                        "is set, and so is {FILE}: keep bridge's settings in one of them"
                    ),
                });
            }
            (Some(text), None) => {
                let path = repo.join(FILE);
                (parse::<Project>(&path, &text)?, path, text)
            }
            (None, Some((b, text))) => (b, py, text),
            (None, None) => return Ok(Project::default()),
        };
        if let Some(p) = &project.provider
            && !PROVIDERS.contains(&p.get_ref().as_str())
        {
            return Err(SpecError::Invalid {
                origin: Origin::in_file(path, &text, Some(p.span())),
                key: "provider".into(),
                problem: format!(
                    "is {:?}: it is one of {}",
                    p.get_ref(),
                    PROVIDERS.join(", ")
                ),
            });
        }
        project.path = path;
        Ok(project)
    }

    pub fn provider(&self) -> Option<&str> {
        self.provider.as_ref().map(|p| p.get_ref().as_str())
    }

    /// Whether the file sets anything about where the agent runs.
    pub fn places(&self) -> bool {
        self.provider.is_some()
            || self.host.is_some()
            || self.identity.is_some()
            || self.remote_dir.is_some()
            || self.aws.any()
            || self.k8s.any()
    }
}

impl AwsDefaults {
    pub fn any(&self) -> bool {
        self.region.is_some()
            || self.profile.is_some()
            || self.gpu_type.is_some()
            || self.instance_type.is_some()
            || self.spot.is_some()
            || self.idle_timeout.is_some()
    }
}

fn read(path: &Path) -> Result<Option<String>, SpecError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SpecError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, text: &str) -> Result<T, SpecError> {
    toml::from_str(text).map_err(|e| SpecError::Syntax {
        origin: Origin::in_file(path.to_path_buf(), text, e.span()),
        message: e.message().trim_end().to_string(),
    })
}

/// `~/` at the start of a path is the user's home.
pub fn expand_home(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn bridge_toml_gives_the_defaults() {
        let d = repo(&[(
            FILE,
            "provider = \"ssh\"\nhost = \"me@gpubox\"\ngpus = 2\njob = \"jobs/train.toml\"\n",
        )]);
        let p = Project::load(d.path()).unwrap();
        assert_eq!(p.provider(), Some("ssh"));
        assert_eq!(p.host.as_deref(), Some("me@gpubox"));
        assert_eq!(p.gpus, Some(2));
        assert_eq!(p.job.as_deref(), Some(Path::new("jobs/train.toml")));
        assert!(p.places());
    }

    #[test]
    fn the_k8s_section_gives_pod_defaults_and_refuses_unknown_keys() {
        let d = repo(&[(
            FILE,
            "provider = \"k8s\"\n[k8s]\nnamespace = \"ml\"\nimage = \"pytorch/pytorch:2.5\"\nvolume = \"50Gi\"\n",
        )]);
        let p = Project::load(d.path()).unwrap();
        assert_eq!(p.provider(), Some("k8s"));
        assert_eq!(p.k8s.namespace.as_deref(), Some("ml"));
        assert_eq!(p.k8s.volume.as_deref(), Some("50Gi"));
        assert!(p.places());
        let d = repo(&[(FILE, "[k8s]\nnamepsace = \"ml\"\n")]);
        let e = Project::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("namepsace") && e.contains("bridge.toml:2:1"),
            "{e}"
        );
    }

    #[test]
    fn pyproject_tool_bridge_is_read_and_other_tools_left_alone() {
        let d = repo(&[(
            "pyproject.toml",
            "[project]\nname = \"x\"\n[tool.ruff]\nline-length = 100\n[tool.bridge]\ngpus = 1\n[tool.bridge.aws]\nregion = \"eu-west-1\"\n",
        )]);
        let p = Project::load(d.path()).unwrap();
        assert_eq!(p.gpus, Some(1));
        assert_eq!(p.aws.region.as_deref(), Some("eu-west-1"));
        assert!(p.path.ends_with("pyproject.toml"));
        // A pyproject without [tool.bridge] is no config.
        let d = repo(&[("pyproject.toml", "[tool.ruff]\nline-length = 100\n")]);
        assert!(!Project::load(d.path()).unwrap().places());
    }

    #[test]
    fn an_unknown_key_is_an_error_with_line_and_column() {
        let d = repo(&[(FILE, "gpus = 1\nhots = \"gpubox\"\n")]);
        let e = Project::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("bridge.toml:2:1"), "{e}");
        assert!(e.contains("unknown field `hots`"), "{e}");
        assert!(e.contains("^^^^"), "{e}");
        let d = repo(&[("pyproject.toml", "[tool.bridge]\nprovider = \"k9s\"\n")]);
        let e = Project::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("pyproject.toml:2:12"), "{e}");
        assert!(e.contains("one of local, ssh, aws, k8s"), "{e}");
        let d = repo(&[(FILE, "gpus = \"two\"\n")]);
        let e = Project::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("bridge.toml:1:8"), "{e}");
    }

    #[test]
    fn both_files_is_an_error() {
        let d = repo(&[
            (FILE, "gpus = 1\n"),
            ("pyproject.toml", "[tool.bridge]\ngpus = 2\n"),
        ]);
        let e = Project::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("keep bridge's settings in one of them"), "{e}");
    }
}
