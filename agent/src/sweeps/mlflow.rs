//! A sweep's runs on the MLflow tracking server its trials log to: one
//! parent run for the sweep and one child run per attempt of a trial, with
//! the trial's parameters logged, so MLflow's compare view works with no
//! code in the trial. The trial gets its child as `MLFLOW_RUN_ID`, which
//! MLflow's `start_run()` resumes.
//!
//! The server is the one in the trials' `MLFLOW_TRACKING_URI`: for a laptop's
//! server, the agent's end of the daemon's reverse forward. Calls are plain
//! MLflow REST (`/api/2.0/mlflow/…`); each has [`CALL_TIMEOUT`], and a server
//! that does not answer makes the sweep go on without runs, saying why.

use std::collections::HashMap;
use std::time::Duration;

use bridge_proto::http::{Server, encode};
use serde_json::{Value, json};

/// How long one REST call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const API: &str = "/api/2.0/mlflow";

/// The tracking server of a trial environment.
#[derive(Debug, Clone)]
pub struct Tracking {
    server: Server,
    /// As written, for messages.
    uri: String,
    /// MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME of the environment.
    experiment_id: Option<String>,
    experiment_name: Option<String>,
}

impl Tracking {
    /// The server `env` names; `Ok(None)` when it names none (or a file
    /// store), `Err` with the reason when bridge cannot make runs there.
    pub fn from_env(env: &HashMap<String, String>) -> Result<Option<Tracking>, String> {
        let Some(uri) = env.get("MLFLOW_TRACKING_URI").map(|u| u.trim()) else {
            return Ok(None);
        };
        if uri.starts_with("https://") {
            return Err(format!(
                "the tracking server {uri} is reached over HTTPS, which bridge's own runs do not use: the trials' code logs as usual, without a parent run"
            ));
        }
        let Some(mut server) = Server::parse(uri) else {
            return Ok(None);
        };
        if server.authorization.is_none() {
            if let Some(t) = env.get("MLFLOW_TRACKING_TOKEN") {
                server.authorization = Some(format!("Bearer {t}"));
            } else if let (Some(u), Some(p)) = (
                env.get("MLFLOW_TRACKING_USERNAME"),
                env.get("MLFLOW_TRACKING_PASSWORD"),
            ) {
                let with = uri.replacen("http://", &format!("http://{u}:{p}@"), 1);
                server.authorization = Server::parse(&with).and_then(|s| s.authorization);
            }
        }
        Ok(Some(Tracking {
            server,
            uri: uri.to_string(),
            experiment_id: env.get("MLFLOW_EXPERIMENT_ID").cloned(),
            experiment_name: env.get("MLFLOW_EXPERIMENT_NAME").cloned(),
        }))
    }

    /// One REST call; an answer other than 200 is an error with the
    /// server's message.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (status, v) = self
            .server
            .json(method, &format!("{API}{path}"), body.as_ref(), CALL_TIMEOUT)
            .await
            .map_err(|e| format!("the MLflow server at {} does not answer ({e})", self.uri))?;
        if status != 200 {
            let msg = v["message"].as_str().unwrap_or("no message");
            return Err(format!(
                "the MLflow server at {} answered {status} to {path}: {msg}",
                self.uri
            ));
        }
        Ok(v)
    }

    /// The experiment the trials log to, as MLflow itself picks it: the
    /// environment's id, else its name (made when missing), else Default.
    pub async fn experiment(&self) -> Result<String, String> {
        if let Some(id) = &self.experiment_id {
            return Ok(id.clone());
        }
        let Some(name) = &self.experiment_name else {
            return Ok("0".into());
        };
        let got = self
            .server
            .json(
                "GET",
                &format!(
                    "{API}/experiments/get-by-name?experiment_name={}",
                    encode(name)
                ),
                None,
                CALL_TIMEOUT,
            )
            .await
            .map_err(|e| format!("the MLflow server at {} does not answer ({e})", self.uri))?;
        if let (200, Some(id)) = (got.0, got.1["experiment"]["experiment_id"].as_str()) {
            return Ok(id.to_string());
        }
        let made = self
            .call("POST", "/experiments/create", Some(json!({ "name": name })))
            .await?;
        made["experiment_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "experiments/create answered no experiment_id".into())
    }

    /// Makes a run in `experiment` named `name` with `tags`; returns its id.
    pub async fn create_run(
        &self,
        experiment: &str,
        name: &str,
        tags: &[(String, String)],
        start_ms: u64,
    ) -> Result<String, String> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        let v = self
            .call(
                "POST",
                "/runs/create",
                Some(json!({
                    "experiment_id": experiment,
                    "run_name": name,
                    "start_time": start_ms,
                    "tags": tags,
                })),
            )
            .await?;
        v["run"]["info"]["run_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "runs/create answered no run id".into())
    }

    /// Logs `params` and `tags` into `run` in one call.
    pub async fn log(
        &self,
        run: &str,
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<(), String> {
        let kv = |l: &[(String, String)]| -> Vec<Value> {
            l.iter()
                .map(|(k, v)| json!({ "key": k, "value": v }))
                .collect()
        };
        self.call(
            "POST",
            "/runs/log-batch",
            Some(json!({ "run_id": run, "params": kv(params), "tags": kv(tags) })),
        )
        .await
        .map(|_| ())
    }

    /// Sets `run`'s status (`RUNNING`, `FINISHED`, `FAILED`, `KILLED`), with
    /// its end time when it has ended.
    pub async fn set_status(
        &self,
        run: &str,
        status: &str,
        end_ms: Option<u64>,
    ) -> Result<(), String> {
        let mut body = json!({ "run_id": run, "status": status });
        if let Some(t) = end_ms {
            body["end_time"] = json!(t);
        }
        self.call("POST", "/runs/update", Some(body))
            .await
            .map(|_| ())
    }

    /// The latest value of metric `key` in `run`, if it was logged.
    pub async fn metric(&self, run: &str, key: &str) -> Result<Option<f64>, String> {
        let v = self
            .call("GET", &format!("/runs/get?run_id={}", encode(run)), None)
            .await?;
        Ok(v["run"]["data"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["key"] == key)
            .and_then(|m| m["value"].as_f64()))
    }
}

/// The tags bridge's runs carry from the trials' environment: what
/// `MLFLOW_RUN_CONTEXT` holds (the git commit the daemon added), which
/// MLflow would put on a run the trial made itself.
pub fn context_tags(env: &HashMap<String, String>) -> Vec<(String, String)> {
    env.get("MLFLOW_RUN_CONTEXT")
        .and_then(|c| serde_json::from_str::<serde_json::Map<String, Value>>(c).ok())
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect()
}

/// MLflow's word for how a job ended.
pub fn status_of(state: bridge_proto::v1::JobState) -> &'static str {
    use bridge_proto::v1::JobState;
    match state {
        JobState::Succeeded => "FINISHED",
        JobState::Cancelled => "KILLED",
        _ => "FAILED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_server_and_its_credentials_come_from_the_environment() {
        assert!(Tracking::from_env(&env(&[])).unwrap().is_none());
        assert!(
            Tracking::from_env(&env(&[("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")]))
                .unwrap()
                .is_none()
        );
        assert!(Tracking::from_env(&env(&[("MLFLOW_TRACKING_URI", "https://x:5000")])).is_err());
        let t = Tracking::from_env(&env(&[
            ("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001"),
            ("MLFLOW_TRACKING_TOKEN", "tok"),
            ("MLFLOW_EXPERIMENT_NAME", "mnist"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t.server.port, 5001);
        assert_eq!(t.server.authorization.as_deref(), Some("Bearer tok"));
        assert_eq!(t.experiment_name.as_deref(), Some("mnist"));
        let t = Tracking::from_env(&env(&[
            ("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001"),
            ("MLFLOW_TRACKING_USERNAME", "u"),
            ("MLFLOW_TRACKING_PASSWORD", "p"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t.server.authorization.as_deref(), Some("Basic dTpw"));
    }

    #[test]
    fn context_tags_are_the_run_contexts_keys() {
        let tags = context_tags(&env(&[(
            "MLFLOW_RUN_CONTEXT",
            r#"{"mlflow.source.git.commit":"abc","n":1}"#,
        )]));
        assert!(tags.contains(&("mlflow.source.git.commit".into(), "abc".into())));
        assert!(tags.contains(&("n".into(), "1".into())));
        assert!(context_tags(&env(&[("MLFLOW_RUN_CONTEXT", "{bad")])).is_empty());
    }
}
