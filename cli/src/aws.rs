//! `bridge up|down|status` for the AWS provider: everything that talks to
//! EC2 (launch, waits, terminate, `down --all`, cost so far). The daemon
//! then reaches the instance like any SSH host.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bridge_daemon::provider::ProviderSpec;
use bridge_daemon::provider::aws::{
    self, DEFAULT_IDLE_COMMAND, DEFAULT_IDLE_TIMEOUT, Instance, Launch, OnIdle, SSH_ENDPOINT_ENV,
    access, catalog,
    ec2::{self, Account, Ec2},
    instance,
};
use bridge_daemon::repo::Layout;
use indicatif::{ProgressBar, ProgressStyle};

/// Bounds on the waits of `bridge up` and `bridge down`.
const RUNNING_LIMIT: Duration = Duration::from_secs(300);
const SSH_LIMIT: Duration = Duration::from_secs(300);
const TERMINATE_LIMIT: Duration = Duration::from_secs(600);

/// `--disk`'s default, in GB.
pub const DEFAULT_DISK_GB: u32 = 200;

/// Test hook: the idle command the agent runs instead of a shutdown.
const IDLE_COMMAND_ENV: &str = "BRIDGE_AWS_IDLE_COMMAND";

/// The AWS flags of `bridge up`.
#[derive(clap::Args, Clone, Default)]
pub struct UpArgs {
    /// AWS: the profile of ~/.aws/config to use (else AWS_PROFILE, else default).
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// AWS: the region (else AWS_REGION, else the profile's).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// AWS: the GPU model (T4, A10G, L4, A100, H100); the cheapest type with --gpu of them is chosen.
    #[arg(long, value_name = "MODEL")]
    pub gpu_type: Option<String>,
    /// AWS: launch exactly this instance type (overrides --gpu-type).
    #[arg(long, value_name = "TYPE")]
    pub instance_type: Option<String>,
    /// AWS: boot this image (default: the region's newest Deep Learning AMI with NVIDIA drivers).
    #[arg(long, value_name = "AMI_ID")]
    pub ami: Option<String>,
    /// AWS: a spot instance (cheaper, may be reclaimed).
    #[arg(long)]
    pub spot: bool,
    /// AWS: root disk size in GB.
    #[arg(long, value_name = "GB", default_value_t = DEFAULT_DISK_GB)]
    pub disk: u32,
    /// AWS: what the idle instance does to itself: terminate (default) or stop (keeps its disk, billed for storage).
    #[arg(long, value_name = "ACTION", value_parser = ["terminate", "stop"])]
    pub on_idle: Option<String>,
    /// AWS: shut down after this long with no job and no daemon connected (e.g. 30m, 2h).
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// AWS: allow SSH from this CIDR (default: this machine's public address /32).
    #[arg(long, value_name = "CIDR")]
    pub ssh_cidr: Option<String>,
    /// Launch without asking (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
}

impl UpArgs {
    /// Whether any AWS-only flag was given.
    pub fn any(&self) -> bool {
        self.profile.is_some()
            || self.region.is_some()
            || self.gpu_type.is_some()
            || self.instance_type.is_some()
            || self.ami.is_some()
            || self.spot
            || self.on_idle.is_some()
            || self.idle_timeout.is_some()
            || self.ssh_cidr.is_some()
    }

    /// The provider spec for `--provider aws`: a saved instance is kept
    /// (reused if it still runs), the launch options come from the flags.
    pub fn spec(
        &self,
        gpus: Option<u32>,
        remote_dir: Option<String>,
        saved: Option<ProviderSpec>,
    ) -> anyhow::Result<ProviderSpec> {
        let instance_type = match &self.instance_type {
            Some(t) => t.clone(),
            None => catalog::choose(gpus.unwrap_or(1), self.gpu_type.as_deref(), None)?
                .name
                .to_string(),
        };
        if let Some(c) = &self.ssh_cidr {
            access::check_cidr(c).map_err(|e| anyhow!(e))?;
        }
        if self.disk < 8 {
            bail!(
                "--disk {} is too small: the image needs at least 8 GB (deep learning images want 100+)",
                self.disk
            );
        }
        let on_idle = match self.on_idle.as_deref() {
            Some("stop") => OnIdle::Stop,
            _ => OnIdle::Terminate,
        };
        if self.spot && on_idle == OnIdle::Stop {
            bail!("--spot instances cannot stop, only terminate: drop --on-idle stop or --spot");
        }
        let idle_timeout = match &self.idle_timeout {
            Some(t) => aws::parse_duration(t).map_err(|e| anyhow!("--idle-timeout: {e}"))?,
            None => DEFAULT_IDLE_TIMEOUT,
        };
        if idle_timeout < Duration::from_secs(1) {
            bail!("--idle-timeout must be at least 1s");
        }
        let launch = Launch {
            instance_type,
            ami: self.ami.clone(),
            spot: self.spot,
            disk_gb: self.disk,
            on_idle,
            idle_timeout_s: idle_timeout.as_secs(),
            idle_command: std::env::var(IDLE_COMMAND_ENV)
                .ok()
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| DEFAULT_IDLE_COMMAND.to_string()),
            ssh_cidr: self.ssh_cidr.clone(),
            remote_dir,
        };
        let (region, profile, instance) = match saved {
            Some(ProviderSpec::Aws {
                region,
                profile,
                instance,
                ..
            }) => (Some(region), profile, instance),
            _ => (None, None, None),
        };
        Ok(ProviderSpec::Aws {
            // Resolved by `prepare` when neither the flag nor a saved one says.
            region: self.region.clone().or(region).unwrap_or_default(),
            profile: self.profile.clone().or(profile),
            launch,
            instance,
        })
    }
}

fn account(region: &str, profile: &Option<String>) -> Account {
    Account {
        profile: profile.clone(),
        region: (!region.is_empty()).then(|| region.to_string()),
    }
}

/// A spinner on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last: String,
}

impl Progress {
    fn new() -> Progress {
        let bar = crate::out::progress().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("template"),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b
        });
        Progress {
            bar,
            last: String::new(),
        }
    }

    fn say(&mut self, msg: String) {
        if msg == self.last {
            return;
        }
        match &self.bar {
            Some(b) => b.set_message(msg.clone()),
            None => crate::note!("bridge: {msg}"),
        }
        self.last = msg;
    }

    fn done(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// What `prepare` did.
pub struct Prepared {
    /// The instance launched by this `bridge up` (terminated again if the
    /// rest of `up` fails).
    pub launched: Option<(Account, String)>,
}

/// Makes sure the spec's instance runs and answers SSH: reuses a running
/// one, starts a stopped one, launches a new one (after showing what it
/// costs and asking, unless `yes`). Saves the spec as soon as an instance
/// exists, so `bridge down` finds it whatever happens next.
pub async fn prepare(
    layout: &Layout,
    spec: &mut ProviderSpec,
    yes: bool,
) -> anyhow::Result<Prepared> {
    let ProviderSpec::Aws {
        region,
        profile,
        launch,
        instance,
    } = spec
    else {
        return Ok(Prepared { launched: None });
    };
    let ec2 = ec2::connect(&account(region, profile)).await?;
    *region = ec2.region.clone();
    if let Some(inst) = instance.clone() {
        match instance::describe_one(&ec2, &inst.id).await? {
            Some(d)
                if matches!(
                    d.state.as_str(),
                    "running" | "pending" | "stopped" | "stopping"
                ) =>
            {
                if matches!(d.state.as_str(), "stopped" | "stopping") {
                    crate::note!(
                        "bridge: starting {} ({}), stopped when it was idle",
                        d.id,
                        d.instance_type
                    );
                    wait_stopped(&ec2, &inst.id).await?;
                    instance::start(&ec2, &inst.id).await?;
                } else {
                    crate::note!(
                        "bridge: reusing {} ({}, {})",
                        d.id,
                        d.instance_type,
                        d.state
                    );
                }
                // A restarted instance has a new address.
                let ip = wait_running(&ec2, &inst.id).await?;
                let endpoint = ssh_endpoint(&inst, &ip);
                *instance = Some(Instance {
                    ssh: endpoint.clone(),
                    ..inst
                });
                spec.save(&layout.provider)?;
                wait_ssh(&endpoint).await?;
                return Ok(Prepared { launched: None });
            }
            other => {
                let state = other.map(|d| d.state).unwrap_or_else(|| "gone".into());
                crate::note!(
                    "bridge: the previous instance {} is {state}; launching a new one",
                    inst.id
                );
                *instance = None;
            }
        }
    }
    let launch = launch.clone();
    let acct = account(region, profile);
    let id = launch_new(layout, &ec2, &launch, yes, spec).await?;
    Ok(Prepared {
        launched: Some((acct, id)),
    })
}

/// Checks, shows, asks, launches; then waits for SSH. On a failure after
/// the launch, terminates what it launched.
async fn launch_new(
    layout: &Layout,
    ec2: &Ec2,
    launch: &Launch,
    yes: bool,
    spec: &mut ProviderSpec,
) -> anyhow::Result<String> {
    instance::check_offered(ec2, &launch.instance_type).await?;
    let image = instance::find_image(ec2, launch.ami.as_deref()).await?;
    confirm(ec2, launch, &image, yes)?;
    let cidr = match &launch.ssh_cidr {
        Some(c) => c.clone(),
        None => access::public_cidr().await?,
    };
    let repo = layout.repo.display().to_string();
    let owner = aws::owner();
    let key_name =
        access::ensure_key_pair(ec2, &aws::key_path(&aws::config_dir()), &repo, &owner).await?;
    let group = access::ensure_security_group(ec2, &cidr, &repo, &owner).await?;
    let dir_name = layout
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
    crate::note!("bridge: launched {id} ({})", launch.instance_type);
    let saved = Instance {
        id: id.clone(),
        ssh: String::new(),
        security_group: group.clone(),
    };
    if let ProviderSpec::Aws { instance, .. } = spec {
        *instance = Some(saved.clone());
    }
    let ready = async {
        spec.save(&layout.provider)?;
        let ip = wait_running(ec2, &id).await?;
        let endpoint = ssh_endpoint_for(&image.user, &ip);
        if let ProviderSpec::Aws { instance, .. } = spec {
            *instance = Some(Instance {
                ssh: endpoint.clone(),
                ..saved
            });
        }
        spec.save(&layout.provider)?;
        wait_ssh(&endpoint).await?;
        Ok::<_, anyhow::Error>(())
    };
    if let Err(e) = ready.await {
        eprintln!("bridge: terminating {id}: {e:#}");
        terminate_and_clean(ec2, &id, &group).await;
        if let ProviderSpec::Aws { instance, .. } = spec {
            *instance = None;
        }
        return Err(e);
    }
    Ok(id)
}

/// Shows the type, GPUs, price and image, and asks unless `yes`.
fn confirm(ec2: &Ec2, launch: &Launch, image: &instance::Image, yes: bool) -> anyhow::Result<()> {
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
    let mut lines = vec![
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
            aws::human_duration(Duration::from_secs(launch.idle_timeout_s))
        ),
    ];
    if yes {
        lines.iter().for_each(|l| eprintln!("{l}"));
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        lines.iter().for_each(|l| eprintln!("{l}"));
        bail!("this launches a billed instance: pass --yes to confirm (stdin is not a terminal)");
    }
    lines.push("Launch it? [y/N] ".into());
    let prompt = lines.join("\n");
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not launched");
    }
    Ok(())
}

async fn wait_running(ec2: &Ec2, id: &str) -> anyhow::Result<String> {
    let mut p = Progress::new();
    let res = instance::wait_running(ec2, id, RUNNING_LIMIT, |s| {
        p.say(format!("waiting for {id}: {s}"))
    })
    .await;
    p.done();
    let d = res?;
    Ok(d.public_ip.expect("running with an address"))
}

async fn wait_stopped(ec2: &Ec2, id: &str) -> anyhow::Result<()> {
    let mut p = Progress::new();
    let res = instance::wait_for(
        ec2,
        id,
        RUNNING_LIMIT,
        "stop",
        |d| Ok(d.is_none_or(|d| d.state == "stopped")),
        |s| p.say(format!("waiting for {id} to stop: {s}")),
    )
    .await;
    p.done();
    res?;
    Ok(())
}

async fn wait_ssh(endpoint: &str) -> anyhow::Result<()> {
    let addr = endpoint
        .rsplit_once('@')
        .map_or(endpoint, |(_, a)| a)
        .to_string();
    let mut p = Progress::new();
    p.say(format!("waiting for SSH on {addr}"));
    let res = instance::wait_ssh(&addr, SSH_LIMIT).await;
    p.done();
    Ok(res?)
}

/// `user@ip:22`, or the test override.
fn ssh_endpoint_for(user: &str, ip: &str) -> String {
    match std::env::var(SSH_ENDPOINT_ENV) {
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

async fn terminate_and_clean(ec2: &Ec2, id: &str, group: &str) {
    let mut p = Progress::new();
    let res = instance::terminate(ec2, id, TERMINATE_LIMIT, |s| {
        p.say(format!("terminating {id}: {s}"))
    })
    .await;
    p.done();
    match res {
        Ok(()) => {
            let _ = access::delete_group_if_unused(ec2, group).await;
        }
        Err(e) => {
            eprintln!("bridge: could not terminate {id}: {e}; terminate it in the EC2 console")
        }
    }
}

/// Undoes a launch of this `bridge up` after a later failure.
pub async fn undo_launch(spec: &mut ProviderSpec, launched: &(Account, String)) {
    let (acct, id) = launched;
    let group = match spec {
        ProviderSpec::Aws {
            instance: Some(i), ..
        } => i.security_group.clone(),
        _ => String::new(),
    };
    match ec2::connect(acct).await {
        Ok(ec2) => {
            eprintln!("bridge: terminating {id}, launched by this bridge up");
            terminate_and_clean(&ec2, id, &group).await;
        }
        Err(e) => {
            eprintln!("bridge: could not terminate {id}: {e}; terminate it in the EC2 console")
        }
    }
    if let ProviderSpec::Aws { instance, .. } = spec {
        *instance = None;
    }
}

/// `bridge down` for AWS (after the daemon stopped): terminates the
/// instance, waits, removes the security group when unused, and forgets the
/// instance (keeping the launch options). Idempotent.
pub async fn down(layout: &Layout, spec: &mut ProviderSpec) -> anyhow::Result<()> {
    let ProviderSpec::Aws {
        region,
        profile,
        instance,
        ..
    } = spec
    else {
        return Ok(());
    };
    let Some(inst) = instance.clone() else {
        println!("no instance is up for {}", layout.repo.display());
        return Ok(());
    };
    let ec2 = ec2::connect(&account(region, profile)).await?;
    let mut p = Progress::new();
    let res = instance::terminate(&ec2, &inst.id, TERMINATE_LIMIT, |s| {
        p.say(format!("terminating {}: {s}", inst.id))
    })
    .await;
    p.done();
    res?;
    let group_gone = access::delete_group_if_unused(&ec2, &inst.security_group).await?;
    let _ = std::fs::remove_file(aws::known_hosts_path(&aws::config_dir(), &inst.id));
    *instance = None;
    spec.save(&layout.provider)
        .with_context(|| format!("cannot write {}", layout.provider.display()))?;
    println!(
        "terminated {}{}",
        inst.id,
        if group_gone {
            "; removed the bridge security group"
        } else {
            ""
        }
    );
    Ok(())
}

/// `bridge down --all`: every bridge instance of this user in the region,
/// orphans included, terminated after confirmation.
pub async fn down_all(acct: Account, yes: bool) -> anyhow::Result<Vec<String>> {
    let ec2 = ec2::connect(&acct).await?;
    let owner = aws::owner();
    let found = instance::list_owned(&ec2, &owner).await?;
    if found.is_empty() {
        println!("no bridge instances of {owner} in {}", ec2.region);
        return Ok(Vec::new());
    }
    println!("bridge instances of {owner} in {}:", ec2.region);
    for d in &found {
        println!(
            "  {}  {}  {}  {}",
            d.id,
            d.instance_type,
            d.state,
            if d.repo.is_empty() { "?" } else { &d.repo }
        );
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            bail!("pass --yes to terminate them (stdin is not a terminal)");
        }
        eprint!("Terminate all {}? [y/N] ", found.len());
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("nothing terminated");
        }
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
        let mut p = Progress::new();
        let res = instance::wait_terminated(&ec2, id, TERMINATE_LIMIT, |s| {
            p.say(format!("terminating {id}: {s}"))
        })
        .await;
        p.done();
        res?;
        println!("terminated {id}");
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

/// The instance's lines of `bridge status` (and its JSON): id, type,
/// state, uptime, cost so far.
pub async fn status(spec: &ProviderSpec) -> anyhow::Result<Option<serde_json::Value>> {
    let ProviderSpec::Aws {
        region,
        profile,
        launch,
        instance,
    } = spec
    else {
        return Ok(None);
    };
    let Some(inst) = instance else {
        return Ok(Some(
            serde_json::json!({ "region": region, "instance": null }),
        ));
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
    Ok(Some(serde_json::json!({
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
    })))
}

/// `instance     i-… g5.xlarge running, up 1h 02m, ~$1.05 so far ($1.006/h on-demand)`
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
        line += &format!(", up {}", aws::human_duration(Duration::from_secs(s)));
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
