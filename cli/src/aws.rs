//! The AWS flags of `bridge up`, turned into a provider spec. The instance's
//! lifecycle (launch, waits, terminate, cost so far) is the daemon crate's
//! (`provider::aws::lifecycle`), driven through `provider::machine`.

use std::time::Duration;

use anyhow::{anyhow, bail};
use bridge_daemon::provider::ProviderSpec;
use bridge_daemon::provider::aws::{
    self, DEFAULT_IDLE_COMMAND, DEFAULT_IDLE_TIMEOUT, Launch, OnIdle, access, catalog,
};

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
            || self.ssh_cidr.is_some()
    }

    /// The provider spec for `--provider aws`: a saved instance is kept
    /// (reused if it still runs), the launch options come from the flags.
    pub fn spec(
        &self,
        gpus: Option<u32>,
        remote_dir: Option<String>,
        idle_timeout: Option<&str>,
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
        let idle_timeout = match idle_timeout {
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
