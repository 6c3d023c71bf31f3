//! The instance's lifecycle behind [`Machine`]: launch (after showing what
//! it costs), reuse, restart, the waits, terminate and cleanup, and its line
//! of `bridge status` (state, uptime, cost so far).

use std::time::Duration;

use anyhow::{Context, anyhow};

use super::ec2::{self, Account, Ec2};
use super::{Instance, Launch, access, catalog, instance};
use crate::provider::machine::{Machine, Ui};
use crate::provider::{BoxFuture, ProviderSpec};
use crate::repo::Layout;

/// Bounds on the waits of `bridge up` and `bridge down`.
const RUNNING_LIMIT: Duration = Duration::from_secs(300);
const SSH_LIMIT: Duration = Duration::from_secs(300);
const TERMINATE_LIMIT: Duration = Duration::from_secs(600);

/// The EC2 instance of one repository.
pub struct AwsMachine {
    layout: Layout,
    spec: ProviderSpec,
    /// The instance the last `prepare` launched (not one it reused).
    launched: Option<(Account, String)>,
}

impl AwsMachine {
    /// `None` unless `spec` is AWS.
    pub fn new(spec: &ProviderSpec, layout: &Layout) -> Option<AwsMachine> {
        matches!(spec, ProviderSpec::Aws { .. }).then(|| AwsMachine {
            layout: layout.clone(),
            spec: spec.clone(),
            launched: None,
        })
    }

    fn parts(
        &mut self,
    ) -> (
        &mut String,
        &mut Option<String>,
        &Launch,
        &mut Option<Instance>,
    ) {
        match &mut self.spec {
            ProviderSpec::Aws {
                region,
                profile,
                launch,
                instance,
            } => (region, profile, launch, instance),
            _ => unreachable!("an AwsMachine holds an AWS spec"),
        }
    }

    fn instance_mut(&mut self) -> &mut Option<Instance> {
        self.parts().3
    }

    fn save(&self) -> anyhow::Result<()> {
        self.spec
            .save(&self.layout.provider)
            .with_context(|| format!("cannot write {}", self.layout.provider.display()))
    }

    async fn prepare(&mut self, ui: &dyn Ui, yes: bool) -> anyhow::Result<()> {
        self.launched = None;
        let (region, profile, _, instance) = self.parts();
        let acct = account(region, profile);
        let saved = instance.clone();
        let ec2 = ec2::connect(&acct).await?;
        *region = ec2.region.clone();
        if let Some(inst) = saved {
            match instance::describe_one(&ec2, &inst.id).await? {
                Some(d)
                    if matches!(
                        d.state.as_str(),
                        "running" | "pending" | "stopped" | "stopping"
                    ) =>
                {
                    if matches!(d.state.as_str(), "stopped" | "stopping") {
                        ui.note(&format!(
                            "bridge: starting {} ({}), stopped when it was idle",
                            d.id, d.instance_type
                        ));
                        wait_stopped(ui, &ec2, &inst.id).await?;
                        instance::start(&ec2, &inst.id).await?;
                    } else {
                        ui.note(&format!(
                            "bridge: reusing {} ({}, {})",
                            d.id, d.instance_type, d.state
                        ));
                    }
                    // A restarted instance has a new address.
                    let ip = wait_running(ui, &ec2, &inst.id).await?;
                    let endpoint = ssh_endpoint(&inst, &ip);
                    *self.instance_mut() = Some(Instance {
                        ssh: endpoint.clone(),
                        ..inst
                    });
                    self.save()?;
                    return wait_ssh(ui, &endpoint).await;
                }
                other => {
                    let state = other.map(|d| d.state).unwrap_or_else(|| "gone".into());
                    ui.note(&format!(
                        "bridge: the previous instance {} is {state}; launching a new one",
                        inst.id
                    ));
                    *self.instance_mut() = None;
                }
            }
        }
        let (region, profile, launch, _) = self.parts();
        let acct = account(region, profile);
        let launch = launch.clone();
        let id = self.launch_new(ui, &ec2, &launch, yes).await?;
        self.launched = Some((acct, id));
        Ok(())
    }

    /// Checks, shows, asks, launches; then waits for SSH. On a failure after
    /// the launch, terminates what it launched.
    async fn launch_new(
        &mut self,
        ui: &dyn Ui,
        ec2: &Ec2,
        launch: &Launch,
        yes: bool,
    ) -> anyhow::Result<String> {
        instance::check_offered(ec2, &launch.instance_type).await?;
        let image = instance::find_image(ec2, launch.ami.as_deref()).await?;
        confirm(ui, ec2, launch, &image, yes)?;
        let cidr = match &launch.ssh_cidr {
            Some(c) => c.clone(),
            None => access::public_cidr().await?,
        };
        let repo = self.layout.repo.display().to_string();
        let owner = super::owner();
        let key_name =
            access::ensure_key_pair(ec2, &super::key_path(&super::config_dir()), &repo, &owner)
                .await?;
        let group = access::ensure_security_group(ec2, &cidr, &repo, &owner).await?;
        let dir_name = self
            .layout
            .repo
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("repo");
        let name = format!("bridge-{dir_name}");
        let plan = instance::LaunchPlan {
            launch,
            image: &image,
            key_name: &key_name,
            security_group: &group,
            repo: &repo,
            owner: &owner,
            name: &name,
        };
        let id = match instance::run(ec2, &plan).await {
            Ok(id) => id,
            Err(e) => {
                // Nothing was launched; drop a group this launch may have created.
                let _ = access::delete_group_if_unused(ec2, &group).await;
                return Err(e.into());
            }
        };
        ui.note(&format!("bridge: launched {id} ({})", launch.instance_type));
        let saved = Instance {
            id: id.clone(),
            ssh: String::new(),
            security_group: group.clone(),
        };
        *self.instance_mut() = Some(saved.clone());
        let ready = async {
            self.save()?;
            let ip = wait_running(ui, ec2, &id).await?;
            let endpoint = ssh_endpoint_for(&image.user, &ip);
            *self.instance_mut() = Some(Instance {
                ssh: endpoint.clone(),
                ..saved
            });
            self.save()?;
            wait_ssh(ui, &endpoint).await
        };
        if let Err(e) = ready.await {
            ui.warn(&format!("bridge: terminating {id}: {e:#}"));
            terminate_and_clean(ui, ec2, &id, &group).await;
            *self.instance_mut() = None;
            return Err(e);
        }
        Ok(id)
    }

    async fn undo(&mut self, ui: &dyn Ui) {
        let Some((acct, id)) = self.launched.take() else {
            return;
        };
        let group = self
            .instance_mut()
            .as_ref()
            .map(|i| i.security_group.clone())
            .unwrap_or_default();
        match ec2::connect(&acct).await {
            Ok(ec2) => {
                ui.warn(&format!(
                    "bridge: terminating {id}, launched by this bridge up"
                ));
                terminate_and_clean(ui, &ec2, &id, &group).await;
            }
            Err(e) => ui.warn(&format!(
                "bridge: could not terminate {id}: {e}; terminate it in the EC2 console"
            )),
        }
        *self.instance_mut() = None;
    }

    async fn down(&mut self, ui: &dyn Ui) -> anyhow::Result<()> {
        let (region, profile, _, instance) = self.parts();
        let Some(inst) = instance.clone() else {
            ui.out(&format!(
                "no instance is up for {}",
                self.layout.repo.display()
            ));
            return Ok(());
        };
        let ec2 = ec2::connect(&account(region, profile)).await?;
        {
            let mut step = ui.step();
            instance::terminate(&ec2, &inst.id, TERMINATE_LIMIT, |s| {
                step.say(format!("terminating {}: {s}", inst.id))
            })
            .await?;
        }
        let group_gone = access::delete_group_if_unused(&ec2, &inst.security_group).await?;
        let _ = std::fs::remove_file(super::known_hosts_path(&super::config_dir(), &inst.id));
        *self.instance_mut() = None;
        self.save()?;
        ui.out(&format!(
            "terminated {}{}",
            inst.id,
            if group_gone {
                "; removed the bridge security group"
            } else {
                ""
            }
        ));
        Ok(())
    }

    async fn status(&self) -> anyhow::Result<serde_json::Value> {
        let ProviderSpec::Aws {
            region,
            profile,
            launch,
            instance,
        } = &self.spec
        else {
            unreachable!("an AwsMachine holds an AWS spec")
        };
        let Some(inst) = instance else {
            return Ok(serde_json::json!({ "region": region, "instance": null }));
        };
        let ec2 = ec2::connect(&account(region, profile)).await?;
        let d = instance::describe_one(&ec2, &inst.id).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let uptime_s = d
            .as_ref()
            .filter(|d| d.state == "running")
            .and_then(|d| d.launched_at)
            .map(|t| (now - t).max(0) as u64);
        let price = catalog::lookup(&launch.instance_type).map(|r| r.usd_per_hour);
        let cost = match (uptime_s, price) {
            (Some(s), Some(p)) => Some(p * s as f64 / 3600.0),
            _ => None,
        };
        Ok(serde_json::json!({
            "region": region,
            "instance": inst.id,
            "instance_type": launch.instance_type,
            "state": d.as_ref().map(|d| d.state.clone()).unwrap_or_else(|| "gone".into()),
            "spot": launch.spot,
            "uptime_s": uptime_s,
            "usd_per_hour": price,
            "cost_so_far_usd": cost,
            "on_idle": launch.on_idle.as_str(),
            "idle_timeout_s": launch.idle_timeout_s,
        }))
    }
}

impl Machine for AwsMachine {
    fn noun(&self) -> &'static str {
        "instance"
    }

    fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    fn prepare<'a>(&'a mut self, ui: &'a dyn Ui, yes: bool) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.prepare(ui, yes))
    }

    fn undo<'a>(&'a mut self, ui: &'a dyn Ui) -> BoxFuture<'a, ()> {
        Box::pin(self.undo(ui))
    }

    /// The instance's disk goes with it: `purge` adds nothing.
    fn down<'a>(&'a mut self, ui: &'a dyn Ui, _purge: bool) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.down(ui))
    }

    fn status(&self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(self.status())
    }

    fn status_line(&self, v: &serde_json::Value) -> String {
        status_line(v)
    }
}

fn account(region: &str, profile: &Option<String>) -> Account {
    Account {
        profile: profile.clone(),
        region: (!region.is_empty()).then(|| region.to_string()),
    }
}

/// Shows the type, GPUs, price and image, and asks unless `yes`.
fn confirm(
    ui: &dyn Ui,
    ec2: &Ec2,
    launch: &Launch,
    image: &instance::Image,
    yes: bool,
) -> anyhow::Result<()> {
    let t = &launch.instance_type;
    let what = match catalog::lookup(t) {
        Some(row) => format!(
            "{t}: {}, ${:.3}/h {} (estimate)",
            catalog::describe(row),
            row.usd_per_hour,
            if launch.spot {
                "on-demand; spot is cheaper"
            } else {
                "on-demand"
            }
        ),
        None => format!("{t} (not in bridge's table: see the EC2 pricing page for its price)"),
    };
    let lines = vec![
        format!("bridge: launching in {}: {what}", ec2.region),
        format!(
            "        image {} ({}), {} GB disk{}",
            image.id,
            image.name,
            launch.disk_gb,
            if launch.spot { ", spot" } else { "" }
        ),
        format!(
            "        {}s itself after {} with no job and no daemon connected; `bridge down` terminates it",
            launch.on_idle.as_str(),
            super::human_duration(Duration::from_secs(launch.idle_timeout_s))
        ),
    ];
    let refusal =
        "this launches a billed instance: pass --yes to confirm (stdin is not a terminal)";
    if !ui.confirm(&lines, "Launch it?", yes, refusal)? {
        return Err(anyhow!("not launched"));
    }
    Ok(())
}

async fn wait_running(ui: &dyn Ui, ec2: &Ec2, id: &str) -> anyhow::Result<String> {
    let mut step = ui.step();
    let d = instance::wait_running(ec2, id, RUNNING_LIMIT, |s| {
        step.say(format!("waiting for {id}: {s}"))
    })
    .await?;
    Ok(d.public_ip.expect("running with an address"))
}

async fn wait_stopped(ui: &dyn Ui, ec2: &Ec2, id: &str) -> anyhow::Result<()> {
    let mut step = ui.step();
    instance::wait_for(
        ec2,
        id,
        RUNNING_LIMIT,
        "stop",
        |d| Ok(d.is_none_or(|d| d.state == "stopped")),
        |s| step.say(format!("waiting for {id} to stop: {s}")),
    )
    .await?;
    Ok(())
}

async fn wait_ssh(ui: &dyn Ui, endpoint: &str) -> anyhow::Result<()> {
    let addr = endpoint
        .rsplit_once('@')
        .map_or(endpoint, |(_, a)| a)
        .to_string();
    let mut step = ui.step();
    step.say(format!("waiting for SSH on {addr}"));
    Ok(instance::wait_ssh(&addr, SSH_LIMIT).await?)
}

/// `user@ip:22`, or the test override.
fn ssh_endpoint_for(user: &str, ip: &str) -> String {
    match std::env::var(super::SSH_ENDPOINT_ENV) {
        Ok(e) if e.contains('@') => e,
        Ok(e) if !e.is_empty() => format!("{user}@{e}"),
        _ => format!("{user}@{ip}:22"),
    }
}

/// The saved user with the instance's current address (it changes when a
/// stopped instance starts again).
fn ssh_endpoint(inst: &Instance, ip: &str) -> String {
    let user = inst.ssh.split_once('@').map_or("ubuntu", |(u, _)| u);
    ssh_endpoint_for(user, ip)
}

async fn terminate_and_clean(ui: &dyn Ui, ec2: &Ec2, id: &str, group: &str) {
    let res = {
        let mut step = ui.step();
        instance::terminate(ec2, id, TERMINATE_LIMIT, |s| {
            step.say(format!("terminating {id}: {s}"))
        })
        .await
    };
    match res {
        Ok(()) => {
            let _ = access::delete_group_if_unused(ec2, group).await;
        }
        Err(e) => ui.warn(&format!(
            "bridge: could not terminate {id}: {e}; terminate it in the EC2 console"
        )),
    }
}

/// `bridge down --all`: every bridge instance of this user in the region,
/// orphans included, terminated after confirmation. Returns their ids.
pub async fn down_all(ui: &dyn Ui, acct: Account, yes: bool) -> anyhow::Result<Vec<String>> {
    let ec2 = ec2::connect(&acct).await?;
    let owner = super::owner();
    let found = instance::list_owned(&ec2, &owner).await?;
    if found.is_empty() {
        ui.out(&format!("no bridge instances of {owner} in {}", ec2.region));
        return Ok(Vec::new());
    }
    ui.out(&format!("bridge instances of {owner} in {}:", ec2.region));
    for d in &found {
        ui.out(&format!(
            "  {}  {}  {}  {}",
            d.id,
            d.instance_type,
            d.state,
            if d.repo.is_empty() { "?" } else { &d.repo }
        ));
    }
    let question = format!("Terminate all {}?", found.len());
    let refusal = "pass --yes to terminate them (stdin is not a terminal)";
    if !ui.confirm(&[], &question, yes, refusal)? {
        return Err(anyhow!("nothing terminated"));
    }
    let ids: Vec<String> = found.iter().map(|d| d.id.clone()).collect();
    let mut groups: Vec<String> = found
        .iter()
        .flat_map(|d| d.security_groups.clone())
        .collect();
    groups.sort();
    groups.dedup();
    ec2.client
        .terminate_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .map_err(|e| ec2::describe("terminate the instances", &e))?;
    for id in &ids {
        {
            let mut step = ui.step();
            instance::wait_terminated(&ec2, id, TERMINATE_LIMIT, |s| {
                step.say(format!("terminating {id}: {s}"))
            })
            .await?;
        }
        ui.out(&format!("terminated {id}"));
    }
    for g in groups {
        if let Ok(Some(true)) = is_bridge_group(&ec2, &g).await {
            let _ = access::delete_group_if_unused(&ec2, &g).await;
        }
    }
    Ok(ids)
}

async fn is_bridge_group(ec2: &Ec2, id: &str) -> anyhow::Result<Option<bool>> {
    let res = ec2
        .client
        .describe_security_groups()
        .group_ids(id)
        .send()
        .await
        .map_err(|e| ec2::describe("describe a security group", &e))?;
    Ok(res
        .security_groups()
        .first()
        .map(|g| g.group_name() == Some(access::SECURITY_GROUP)))
}

/// The region and profile `down --all` uses: the flags, else the saved spec's.
pub fn account_for(
    region: Option<String>,
    profile: Option<String>,
    saved: Option<&ProviderSpec>,
) -> Account {
    let (r, p) = match saved {
        Some(ProviderSpec::Aws {
            region, profile, ..
        }) => (Some(region.clone()), profile.clone()),
        _ => (None, None),
    };
    Account {
        region: region.or(r).filter(|r| !r.is_empty()),
        profile: profile.or(p),
    }
}

/// `i-… g5.xlarge in us-east-1 running, up 1h 02m, ~$1.05 so far ($1.006/h on-demand)`
pub fn status_line(v: &serde_json::Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("unknown: {e}");
    }
    let Some(id) = v["instance"].as_str() else {
        return format!(
            "no instance (region {}); `bridge up` launches one",
            v["region"].as_str().unwrap_or("?")
        );
    };
    let mut line = format!(
        "{id} {} in {} {}",
        v["instance_type"].as_str().unwrap_or("?"),
        v["region"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    if let Some(s) = v["uptime_s"].as_u64() {
        line += &format!(", up {}", super::human_duration(Duration::from_secs(s)));
    }
    match (v["cost_so_far_usd"].as_f64(), v["usd_per_hour"].as_f64()) {
        (Some(c), Some(p)) => {
            let market = if v["spot"].as_bool() == Some(true) {
                "on-demand price; spot costs less"
            } else {
                "on-demand"
            };
            line += &format!(", ~${c:.2} so far (${p:.3}/h {market})");
        }
        _ => line += ", cost unknown (type not in bridge's table)",
    }
    line
}
