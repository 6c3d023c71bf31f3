//! `bridge forward [LOCAL:]REMOTE... | --reverse [REMOTE:]LOCAL... | --list | --stop PORT`:
//! port forwards between this machine's loopback and the agent's, over the
//! agent connection. They live in the daemon: they stay up after this
//! command returns, heal with the link, and go with `bridge down`.

use std::path::Path;

use anyhow::anyhow;
use bridge_daemon::status::ForwardStatus;
use bridge_proto::v1::{
    ForwardRequest, ForwardSpec, ForwardsRequest, UnforwardRequest, forward_spec,
};

use crate::client;

#[derive(clap::Args)]
pub struct Args {
    /// Ports: `6006` (laptop 127.0.0.1:6006 → agent 127.0.0.1:6006) or
    /// `8888:9999` (laptop 8888 → agent 9999, the order of `ssh -L`); with
    /// --reverse `5000` (agent → laptop 5000) or `5001:5000` (agent port
    /// 5001 → laptop 5000, the order of `ssh -R`). A local port of 0 takes
    /// any free one.
    #[arg(value_name = "PORTS", value_parser = parse_pair)]
    ports: Vec<(u16, u16)>,
    /// From the agent to this machine (a job reaching a server on the laptop).
    #[arg(long, short = 'R')]
    reverse: bool,
    /// A label shown in the list (e.g. TensorBoard).
    #[arg(long)]
    name: Option<String>,
    /// List the forwards (also the jobs' own).
    #[arg(long, short = 'l', conflicts_with_all = ["ports", "stop"])]
    list: bool,
    /// With --list: JSON, {"schema_version": 1, "forwards": [...]} (docs/json.md).
    #[arg(long)]
    json: bool,
    /// Stop the forward on this laptop port (with --reverse: the reverse
    /// forwards to it).
    #[arg(long, value_name = "PORT", conflicts_with = "ports")]
    stop: Option<u16>,
}

/// `A` or `A:B`, each a port number from 0 to 65535.
fn parse_pair(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| -> Result<u16, String> {
        p.trim().parse::<u16>().map_err(|_| {
            format!("{p:?} is not a port number (0-65535); write PORT or LOCAL:REMOTE, e.g. 6006 or 8888:9999")
        })
    };
    match s.split(':').collect::<Vec<_>>().as_slice() {
        [one] => port(one).map(|p| (p, p)),
        [a, b] => Ok((port(a)?, port(b)?)),
        _ => Err(format!(
            "{s:?} has too many ':'; write PORT or LOCAL:REMOTE (forwards bind 127.0.0.1 only, so no address is given)"
        )),
    }
}

pub async fn run(cwd: &Path, args: Args) -> anyhow::Result<u8> {
    let layout = client::repo(cwd)?;
    let mut c = client::require_daemon(&layout).await?;
    if let Some(port) = args.stop {
        let gone = c
            .unforward(UnforwardRequest {
                port: port as u32,
                reverse: args.reverse,
            })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner()
            .forwards;
        for f in &gone {
            crate::note!("bridge: stopped {}", line(&ForwardStatus::from(f)));
        }
        return Ok(0);
    }
    if args.list || args.ports.is_empty() {
        let list: Vec<ForwardStatus> = c
            .forwards(ForwardsRequest {})
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner()
            .forwards
            .iter()
            .map(ForwardStatus::from)
            .collect();
        if args.json {
            let v = serde_json::json!({ "schema_version": 1, "forwards": list });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else if list.is_empty() {
            eprintln!("no forwards (add one with `bridge forward 6006`)");
        } else {
            for f in &list {
                println!("{}", line(f));
            }
        }
        return Ok(0);
    }
    for &(a, b) in &args.ports {
        // Local: LOCAL:REMOTE. Reverse: REMOTE:LOCAL (agent side first, as
        // `ssh -R`).
        let (local, remote) = if args.reverse { (b, a) } else { (a, b) };
        if args.reverse && local == 0 {
            anyhow::bail!(
                "a reverse forward needs the laptop's port (0 is not one): `bridge forward --reverse 5000`"
            );
        }
        if !args.reverse && remote == 0 {
            anyhow::bail!("a forward needs the agent's port (0 is not one): `bridge forward 6006`");
        }
        let spec = ForwardSpec {
            direction: if args.reverse {
                forward_spec::Direction::Reverse
            } else {
                forward_spec::Direction::Local
            } as i32,
            local_port: local as u32,
            remote_port: remote as u32,
            name: args.name.clone().unwrap_or_default(),
            ..Default::default()
        };
        let f = c
            .forward(ForwardRequest { spec: Some(spec) })
            .await
            .map_err(|s| anyhow!("{}", s.message()))?
            .into_inner();
        let st = ForwardStatus::from(&f);
        let mut msg = format!("bridge: {}", line(&st));
        if args.reverse && remote != 0 && st.remote_port != remote {
            msg.push_str(&format!(
                " (agent port {remote} was taken; the agent picked {})",
                st.remote_port
            ));
        }
        eprintln!("{msg}");
    }
    Ok(0)
}

/// One forward, for people.
pub fn line(f: &ForwardStatus) -> String {
    let name = f
        .name
        .as_deref()
        .map(|n| format!("{n}: "))
        .unwrap_or_default();
    let owner = f
        .job
        .as_deref()
        .map(|j| format!(", job {j}"))
        .unwrap_or_default();
    let state = if f.state == "listening" {
        String::new()
    } else {
        format!(" [{}]", f.state)
    };
    let conns = if f.connections > 0 {
        format!(", {} connection(s), {} open", f.connections, f.open)
    } else {
        String::new()
    };
    if f.direction == "reverse" {
        let agent = if f.remote_port == 0 {
            "agent 127.0.0.1:?".to_string()
        } else {
            format!("agent 127.0.0.1:{}", f.remote_port)
        };
        format!(
            "{name}{agent} → 127.0.0.1:{} here (reverse{owner}{conns}){state}",
            f.local_port
        )
    } else {
        format!(
            "{name}http://127.0.0.1:{} → agent 127.0.0.1:{} (forward{owner}{conns}){state}",
            f.local_port, f.remote_port
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pairs() {
        assert_eq!(parse_pair("6006"), Ok((6006, 6006)));
        assert_eq!(parse_pair("8888:9999"), Ok((8888, 9999)));
        assert_eq!(parse_pair("0:9999"), Ok((0, 9999)));
        assert!(parse_pair("70000").unwrap_err().contains("not a port"));
        assert!(parse_pair("tb").unwrap_err().contains("not a port"));
        assert!(
            parse_pair("127.0.0.1:8888:9999")
                .unwrap_err()
                .contains("too many")
        );
        assert!(parse_pair("").is_err());
    }
}
