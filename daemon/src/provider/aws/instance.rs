//! Instances: the image, the launch, the waits, what `bridge status` shows,
//! and termination.

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, InstanceInterruptionBehavior, InstanceMarketOptionsRequest,
    InstanceStateName, LocationType, MarketType, ResourceType, ShutdownBehavior, SpotInstanceType,
    SpotMarketOptions, VolumeType,
};

use aws_sdk_ec2::error::ProvideErrorMetadata;

use super::access::{filter, tags};
use super::catalog;
use super::ec2::{AwsError, Ec2, code, describe};
use super::{Launch, OnIdle, TAG_MANAGED, TAG_OWNER};

/// Owner of the Deep Learning AMIs ("amazon").
pub const DLAMI_OWNER: &str = "amazon";

/// Name patterns of the Deep Learning AMIs with NVIDIA drivers, Ubuntu, for
/// x86-64: the base images and the PyTorch ones (the newest match wins).
pub const DLAMI_NAMES: &[&str] = &[
    "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu *",
    "Deep Learning OSS Nvidia Driver AMI GPU PyTorch * (Ubuntu *",
    "Deep Learning Base AMI (Ubuntu *",
    "Deep Learning AMI Ubuntu*",
];

/// The image an instance boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub root_device: String,
    /// The login user of its distribution.
    pub user: String,
}

/// `--ami`, checked, or the newest Deep Learning AMI in the region.
pub async fn find_image(ec2: &Ec2, ami: Option<&str>) -> Result<Image, AwsError> {
    let mut req = ec2.client.describe_images();
    req = match ami {
        Some(id) => req.image_ids(id),
        None => req
            .owners(DLAMI_OWNER)
            .filters(filter("name", DLAMI_NAMES))
            .filters(filter("architecture", &["x86_64"]))
            .filters(filter("state", &["available"])),
    };
    let found = req.send().await.map_err(|e| match (ami, code(&e)) {
        (
            Some(id),
            Some("InvalidAMIID.NotFound" | "InvalidAMIID.Malformed" | "InvalidAMIID.Unavailable"),
        ) => unknown_ami(id, &ec2.region),
        _ => describe("look up the machine image", &e),
    })?;
    let newest = found
        .images()
        .iter()
        .filter(|i| i.image_id().is_some())
        .max_by(|a, b| a.creation_date().cmp(&b.creation_date()));
    let Some(img) = newest else {
        return Err(match ami {
            Some(id) => unknown_ami(id, &ec2.region),
            None => AwsError(format!(
                "no Deep Learning AMI with NVIDIA drivers found in {}; pass --ami IMAGE_ID",
                ec2.region
            )),
        });
    };
    let name = img.name().unwrap_or_default().to_string();
    Ok(Image {
        id: img.image_id().unwrap_or_default().to_string(),
        user: login_user(&name).to_string(),
        root_device: img.root_device_name().unwrap_or("/dev/sda1").to_string(),
        name,
    })
}

fn unknown_ami(id: &str, region: &str) -> AwsError {
    AwsError(format!(
        "unknown image {id:?} in {region}: it does not exist there or is not shared with this account (AMI ids are per region)"
    ))
}

/// The default login of an image: `ubuntu` for Ubuntu, `ec2-user` otherwise
/// (Amazon Linux).
pub fn login_user(image_name: &str) -> &'static str {
    if image_name.to_ascii_lowercase().contains("ubuntu") {
        "ubuntu"
    } else {
        "ec2-user"
    }
}

/// Checks that the region offers `instance_type`; when it does not, names
/// the table's types it does offer.
pub async fn check_offered(ec2: &Ec2, instance_type: &str) -> Result<(), AwsError> {
    let names: Vec<&str> = catalog::TYPES
        .iter()
        .map(|t| t.name)
        .chain(std::iter::once(instance_type))
        .collect();
    let res = ec2
        .client
        .describe_instance_type_offerings()
        .location_type(LocationType::Region)
        .filters(filter("instance-type", &names))
        .send()
        .await
        .map_err(|e| describe("list the instance types of the region", &e))?;
    let offered: Vec<String> = res
        .instance_type_offerings()
        .iter()
        .filter_map(|o| o.instance_type().map(|t| t.as_str().to_string()))
        .collect();
    if offered.iter().any(|t| t == instance_type) {
        return Ok(());
    }
    let others: Vec<String> = catalog::TYPES
        .iter()
        .filter(|t| offered.iter().any(|o| o == t.name))
        .map(|t| format!("{} ({}× {})", t.name, t.gpus, t.gpu))
        .collect();
    Err(AwsError(format!(
        "{instance_type} is not offered in {}; {}",
        ec2.region,
        if others.is_empty() {
            "none of bridge's GPU types are: choose another --region".to_string()
        } else {
            format!(
                "GPU types offered there: {} (use --gpu-type or --instance-type), or choose another --region",
                others.join(", ")
            )
        }
    )))
}

/// Everything a launch needs besides the options.
pub struct LaunchPlan<'a> {
    pub launch: &'a Launch,
    pub image: &'a Image,
    pub key_name: &'a str,
    pub security_group: &'a str,
    pub repo: &'a str,
    pub owner: &'a str,
    /// Names the instance (`bridge-<repo dir>`).
    pub name: &'a str,
}

/// `RunInstances`; returns the instance id. Capacity and quota failures get
/// a message that says what to try instead.
pub async fn run(ec2: &Ec2, plan: &LaunchPlan<'_>) -> Result<String, AwsError> {
    let l = plan.launch;
    let mut token = [0u8; 16];
    getrandom::fill(&mut token).map_err(|e| AwsError(format!("no randomness: {e}")))?;
    let mut req = ec2
        .client
        .run_instances()
        .image_id(&plan.image.id)
        .instance_type(l.instance_type.as_str().into())
        .min_count(1)
        .max_count(1)
        .key_name(plan.key_name)
        .security_group_ids(plan.security_group)
        .client_token(hex::encode(token))
        .instance_initiated_shutdown_behavior(match l.on_idle {
            OnIdle::Terminate => ShutdownBehavior::Terminate,
            OnIdle::Stop => ShutdownBehavior::Stop,
        })
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(&plan.image.root_device)
                .ebs(
                    EbsBlockDevice::builder()
                        .volume_size(l.disk_gb as i32)
                        .volume_type(VolumeType::Gp3)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(tags(
            ResourceType::Instance,
            plan.repo,
            plan.owner,
            plan.name,
        ))
        .tag_specifications(tags(ResourceType::Volume, plan.repo, plan.owner, plan.name));
    if l.spot {
        req = req.instance_market_options(
            InstanceMarketOptionsRequest::builder()
                .market_type(MarketType::Spot)
                .spot_options(
                    SpotMarketOptions::builder()
                        .spot_instance_type(SpotInstanceType::OneTime)
                        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                        .build(),
                )
                .build(),
        );
    }
    let res = req.send().await.map_err(|e| launch_error(ec2, l, &e))?;
    res.instances()
        .first()
        .and_then(|i| i.instance_id())
        .map(str::to_string)
        .ok_or_else(|| AwsError::new("RunInstances returned no instance"))
}

fn launch_error<E>(ec2: &Ec2, l: &Launch, e: &aws_sdk_ec2::error::SdkError<E>) -> AwsError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let t = &l.instance_type;
    let region = &ec2.region;
    let alternatives = || {
        let gpu = catalog::lookup(t).map(|r| r.gpus).unwrap_or(1);
        let others: Vec<String> = catalog::TYPES
            .iter()
            .filter(|r| r.name != t && r.gpus >= gpu)
            .filter(|r| catalog::lookup(t).is_none_or(|c| c.gpu != r.gpu))
            .take(3)
            .map(|r| format!("{} ({}, ${:.2}/h)", r.name, r.gpu, r.usd_per_hour))
            .collect();
        others.join(", ")
    };
    match e.code() {
        Some("InsufficientInstanceCapacity")
        | Some("InsufficientCapacity")
        | Some("Unsupported")
            if l.spot =>
        {
            AwsError(format!(
                "no spot capacity for {t} in {region} right now; try without --spot (on-demand{}), another type ({}) or another --region",
                catalog::lookup(t)
                    .map(|r| format!(", ${:.2}/h", r.usd_per_hour))
                    .unwrap_or_default(),
                alternatives()
            ))
        }
        Some("SpotMaxPriceTooLow") => AwsError(format!(
            "the spot price of {t} in {region} is above what this request allows; try without --spot or another type ({})",
            alternatives()
        )),
        Some("InsufficientInstanceCapacity") | Some("InsufficientCapacity") => AwsError(format!(
            "AWS has no spare {t} capacity in {region} right now (InsufficientInstanceCapacity); try another type: {} — or another --region, or again in a few minutes",
            alternatives()
        )),
        Some("VcpuLimitExceeded")
        | Some("MaxSpotInstanceCountExceeded")
        | Some("InstanceLimitExceeded") => {
            let (quota, quota_code) = catalog::vcpu_quota(t, l.spot);
            let vcpus = catalog::lookup(t)
                .map(|r| format!(" ({} vCPUs)", r.vcpus))
                .unwrap_or_default();
            AwsError(format!(
                "your vCPU quota \"{quota}\" in {region} is too small for {t}{vcpus}: ask for more at \
                 https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas/{quota_code}, or choose a smaller type"
            ))
        }
        Some("InvalidAMIID.NotFound") | Some("InvalidAMIID.Malformed") => {
            unknown_ami(l.ami.as_deref().unwrap_or("?"), region)
        }
        Some("Unsupported") | Some("InvalidParameterCombination") => AwsError(format!(
            "{t} cannot be launched this way in {region}: {}",
            e.message().unwrap_or_default()
        )),
        _ => describe(&format!("launch {t}"), e),
    }
}

/// What `DescribeInstances` says about one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    pub id: String,
    pub instance_type: String,
    /// `pending`, `running`, `stopped`, `terminated`, …
    pub state: String,
    pub public_ip: Option<String>,
    /// Seconds since the Unix epoch.
    pub launched_at: Option<i64>,
    pub spot: bool,
    pub security_groups: Vec<String>,
    pub repo: String,
    pub name: String,
}

/// The instance, or `None` when AWS no longer knows it.
pub async fn describe_one(ec2: &Ec2, id: &str) -> Result<Option<Described>, AwsError> {
    let res = ec2
        .client
        .describe_instances()
        .instance_ids(id)
        .send()
        .await;
    match res {
        Ok(out) => Ok(described(&out).into_iter().next()),
        Err(e) if code(&e) == Some("InvalidInstanceID.NotFound") => Ok(None),
        Err(e) => Err(describe("describe the instance", &e)),
    }
}

/// Every bridge instance of `owner` that is not terminated (orphans too).
pub async fn list_owned(ec2: &Ec2, owner: &str) -> Result<Vec<Described>, AwsError> {
    let mut all = Vec::new();
    let mut pages = ec2
        .client
        .describe_instances()
        .filters(filter(&format!("tag:{TAG_MANAGED}"), &["true"]))
        .filters(filter(&format!("tag:{TAG_OWNER}"), &[owner]))
        .filters(filter(
            "instance-state-name",
            &["pending", "running", "stopping", "stopped", "shutting-down"],
        ))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| describe("list bridge instances", &e))?;
        all.extend(described(&page));
    }
    Ok(all)
}

fn described(
    out: &aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput,
) -> Vec<Described> {
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            let tag = |k: &str| {
                i.tags()
                    .iter()
                    .find(|t| t.key() == Some(k))
                    .and_then(|t| t.value())
                    .unwrap_or_default()
                    .to_string()
            };
            Described {
                id: i.instance_id().unwrap_or_default().to_string(),
                instance_type: i
                    .instance_type()
                    .map(|t| t.as_str().to_string())
                    .unwrap_or_default(),
                state: i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
                public_ip: i.public_ip_address().map(str::to_string),
                launched_at: i.launch_time().map(|t| t.secs()),
                spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
                security_groups: i
                    .security_groups()
                    .iter()
                    .filter_map(|g| g.group_id().map(str::to_string))
                    .collect(),
                repo: tag(super::TAG_REPO),
                name: tag("Name"),
            }
        })
        .collect()
}

/// Polls until `done` holds for the instance (or it is gone), calling
/// `tick` with its state every poll; fails after `limit`.
pub async fn wait_for(
    ec2: &Ec2,
    id: &str,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(Option<&Described>) -> Result<bool, AwsError>,
    mut tick: impl FnMut(&str),
) -> Result<Option<Described>, AwsError> {
    let start = Instant::now();
    loop {
        let d = describe_one(ec2, id).await?;
        tick(d.as_ref().map(|d| d.state.as_str()).unwrap_or("gone"));
        if done(d.as_ref())? {
            return Ok(d);
        }
        if start.elapsed() > limit {
            return Err(AwsError(format!(
                "{id} did not {what} within {} s",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Waits until the instance runs and has a public address.
pub async fn wait_running(
    ec2: &Ec2,
    id: &str,
    limit: Duration,
    tick: impl FnMut(&str),
) -> Result<Described, AwsError> {
    let d = wait_for(
        ec2,
        id,
        limit,
        "start running",
        |d| match d.map(|d| (d.state.as_str(), d.public_ip.is_some())) {
            Some(("running", true)) => Ok(true),
            Some(("running", false)) => Err(AwsError(format!(
                "{id} runs but has no public address: its subnet does not assign one (bridge needs the default VPC's public subnets)"
            ))),
            Some(("pending", _)) => Ok(false),
            Some((s, _)) => Err(AwsError(format!("{id} is {s} instead of running (spot reclaimed, or a launch failure: see the EC2 console)"))),
            None => Err(AwsError(format!("{id} disappeared while starting"))),
        },
        tick,
    )
    .await?;
    Ok(d.expect("running"))
}

/// Terminates the instance and waits until it is terminated (a missing one
/// counts as terminated).
pub async fn terminate(
    ec2: &Ec2,
    id: &str,
    limit: Duration,
    tick: impl FnMut(&str),
) -> Result<(), AwsError> {
    match ec2
        .client
        .terminate_instances()
        .instance_ids(id)
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) if code(&e) == Some("InvalidInstanceID.NotFound") => return Ok(()),
        Err(e) => return Err(describe(&format!("terminate {id}"), &e)),
    }
    wait_terminated(ec2, id, limit, tick).await
}

/// Waits until a terminating instance is terminated (or gone).
pub async fn wait_terminated(
    ec2: &Ec2,
    id: &str,
    limit: Duration,
    tick: impl FnMut(&str),
) -> Result<(), AwsError> {
    wait_for(
        ec2,
        id,
        limit,
        "terminate",
        |d| Ok(d.is_none_or(|d| d.state == InstanceStateName::Terminated.as_str())),
        tick,
    )
    .await
    .map(|_| ())
}

/// Starts a stopped instance (`--on-idle stop`).
pub async fn start(ec2: &Ec2, id: &str) -> Result<(), AwsError> {
    ec2.client
        .start_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(|e| match code(&e) {
            Some("InsufficientInstanceCapacity") => AwsError(format!(
                "AWS has no capacity to restart {id} right now; try again later, or `bridge down` and `bridge up` with another type"
            )),
            _ => describe(&format!("start {id}"), &e),
        })?;
    Ok(())
}

/// Waits until something answers SSH (`SSH-` banner) at `host:port`.
pub async fn wait_ssh(addr: &str, limit: Duration) -> Result<(), AwsError> {
    let start = Instant::now();
    let mut last = String::from("no answer");
    while start.elapsed() < limit {
        match banner(addr).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Err(AwsError(format!(
        "SSH on {addr} did not answer within {} s ({last})",
        limit.as_secs()
    )))
}

async fn banner(addr: &str) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf == b"SSH-" {
            Ok(())
        } else {
            Err("not an SSH server".to_string())
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_users() {
        assert_eq!(
            login_user("Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250101"),
            "ubuntu"
        );
        assert_eq!(
            login_user("Deep Learning AMI Amazon Linux - 3.3_Oct2017"),
            "ec2-user"
        );
    }
}
