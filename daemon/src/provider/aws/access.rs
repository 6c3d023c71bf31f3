//! How bridge gets into its instances: one ed25519 key pair per user (the
//! private key stays here, 0600; AWS only ever sees the public half, through
//! `ImportKeyPair`) and one security group per VPC that lets SSH in from one
//! address only. Both are created once and reused.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, IpPermission, IpRange, ResourceType, Tag, TagSpecification};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{LineEnding, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ec2::{AwsError, Ec2, code, describe};
use super::{TAG_MANAGED, TAG_OWNER};

/// The security group's name (one per owner and VPC).
pub const SECURITY_GROUP: &str = "bridge-ssh";

/// The tags on everything bridge creates.
pub fn tags(kind: ResourceType, repo: &str, owner: &str, name: &str) -> TagSpecification {
    let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
    TagSpecification::builder()
        .resource_type(kind)
        .tags(tag(TAG_MANAGED, "true"))
        .tags(tag(super::TAG_REPO, repo))
        .tags(tag(TAG_OWNER, owner))
        .tags(tag("Name", name))
        .build()
}

pub fn filter(name: &str, values: &[&str]) -> Filter {
    let mut f = Filter::builder().name(name);
    for v in values {
        f = f.values(*v);
    }
    f.build()
}

/// The local key (created when missing) and the name of its key pair in
/// the region (imported when missing). The name carries the key's
/// fingerprint, so a new local key never collides with an old pair.
pub async fn ensure_key_pair(
    ec2: &Ec2,
    key_file: &Path,
    repo: &str,
    owner: &str,
) -> Result<String, AwsError> {
    let key = load_or_create_key(key_file)?;
    let public = key.public_key();
    let fingerprint = public.fingerprint(russh::keys::HashAlg::Sha256);
    let short: String = blake3::hash(fingerprint.as_bytes()).to_hex()[..12].to_string();
    let name = format!("bridge-{short}");
    let found = ec2
        .client
        .describe_key_pairs()
        .filters(filter("key-name", &[&name]))
        .send()
        .await
        .map_err(|e| describe("list key pairs", &e))?;
    if !found.key_pairs().is_empty() {
        return Ok(name);
    }
    let openssh = public
        .to_openssh()
        .map_err(|e| AwsError(format!("cannot encode the public key: {e}")))?;
    let res = ec2
        .client
        .import_key_pair()
        .key_name(&name)
        .public_key_material(aws_sdk_ec2::primitives::Blob::new(openssh.into_bytes()))
        .tag_specifications(tags(ResourceType::KeyPair, repo, owner, &name))
        .send()
        .await;
    match res {
        Ok(_) => Ok(name),
        // Another `bridge up` imported it just now.
        Err(e) if code(&e) == Some("InvalidKeyPair.Duplicate") => Ok(name),
        Err(e) => Err(describe("import the bridge key pair", &e)),
    }
}

/// Reads the private key, or creates one (0600, in a 0700 directory).
fn load_or_create_key(path: &Path) -> Result<PrivateKey, AwsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(AwsError(format!(
                    "{} is readable by other users; run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )));
            }
            PrivateKey::from_openssh(text.trim_end().to_string() + "\n").map_err(|e| {
                AwsError(format!(
                    "cannot read the bridge key {}: {e}",
                    path.display()
                ))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(path),
        Err(e) => Err(AwsError(format!("cannot read {}: {e}", path.display()))),
    }
}

fn create_key(path: &Path) -> Result<PrivateKey, AwsError> {
    let io = |e: std::io::Error| AwsError(format!("cannot write {}: {e}", path.display()));
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| AwsError(format!("no randomness: {e}")))?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(format!("bridge {}", super::owner()));
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| AwsError(format!("cannot encode the key: {e}")))?;
    let dir = path.parent().expect("key path has a parent");
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    // Written under a temporary name, so a crash never leaves half a key.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(private.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    let public = key.public_key().to_openssh().unwrap_or_default();
    let _ = std::fs::write(path.with_extension("pub"), format!("{public}\n"));
    Ok(key)
}

/// The bridge security group of the default VPC, created when missing,
/// allowing TCP 22 from `cidr` only (other SSH rules in it are revoked: it
/// follows the caller's address).
pub async fn ensure_security_group(
    ec2: &Ec2,
    cidr: &str,
    repo: &str,
    owner: &str,
) -> Result<String, AwsError> {
    let (id, rules) = match find_group(ec2, owner).await? {
        Some(g) => g,
        None => (create_group(ec2, repo, owner).await?, Vec::new()),
    };
    point_ssh_rule(ec2, &id, &rules, cidr).await?;
    Ok(id)
}

/// The caller's bridge security group: its id and its ingress rules.
async fn find_group(
    ec2: &Ec2,
    owner: &str,
) -> Result<Option<(String, Vec<IpPermission>)>, AwsError> {
    let found = ec2
        .client
        .describe_security_groups()
        .filters(filter("group-name", &[SECURITY_GROUP]))
        .filters(filter(&format!("tag:{TAG_OWNER}"), &[owner]))
        .send()
        .await
        .map_err(|e| describe("list security groups", &e))?;
    Ok(found.security_groups().first().map(|g| {
        (
            g.group_id().unwrap_or_default().to_string(),
            g.ip_permissions().to_vec(),
        )
    }))
}

/// Makes group `id` (now holding `rules`) allow TCP 22 from `cidr` only:
/// every other range is revoked, `cidr` added when missing. Returns whether
/// anything changed.
async fn point_ssh_rule(
    ec2: &Ec2,
    id: &str,
    rules: &[IpPermission],
    cidr: &str,
) -> Result<bool, AwsError> {
    let mut changed = false;
    let mut have = false;
    for rule in rules {
        for range in rule.ip_ranges() {
            let other = range.cidr_ip() != Some(cidr) || rule.from_port() != Some(22);
            if !other {
                have = true;
                continue;
            }
            let stale = IpPermission::builder()
                .ip_protocol(rule.ip_protocol().unwrap_or("tcp"))
                .set_from_port(rule.from_port())
                .set_to_port(rule.to_port())
                .ip_ranges(range.clone())
                .build();
            ec2.client
                .revoke_security_group_ingress()
                .group_id(id)
                .ip_permissions(stale)
                .send()
                .await
                .map_err(|e| describe("update the bridge security group", &e))?;
            changed = true;
        }
    }
    if !have {
        let rule = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(22)
            .to_port(22)
            .ip_ranges(
                IpRange::builder()
                    .cidr_ip(cidr)
                    .description("bridge: SSH from the machine that ran bridge up")
                    .build(),
            )
            .build();
        let res = ec2
            .client
            .authorize_security_group_ingress()
            .group_id(id)
            .ip_permissions(rule)
            .send()
            .await;
        match res {
            Ok(_) => changed = true,
            Err(e) if code(&e) == Some("InvalidPermission.Duplicate") => {}
            Err(e) => return Err(describe("allow SSH in the bridge security group", &e)),
        }
    }
    Ok(changed)
}

async fn create_group(ec2: &Ec2, repo: &str, owner: &str) -> Result<String, AwsError> {
    let res = ec2
        .client
        .create_security_group()
        .group_name(SECURITY_GROUP)
        .description("bridge: SSH to bridge instances from one address")
        .tag_specifications(tags(ResourceType::SecurityGroup, repo, owner, SECURITY_GROUP))
        .send()
        .await
        .map_err(|e| match code(&e) {
            Some("VPCIdNotSpecified") => AwsError::new(
                "the region has no default VPC, which bridge launches into; create one with `aws ec2 create-default-vpc`",
            ),
            _ => describe("create the bridge security group", &e),
        })?;
    Ok(res.group_id().unwrap_or_default().to_string())
}

/// Deletes the security group unless an instance that is not terminated
/// still uses it. Returns whether it was deleted.
pub async fn delete_group_if_unused(ec2: &Ec2, group: &str) -> Result<bool, AwsError> {
    let users = ec2
        .client
        .describe_instances()
        .filters(filter("instance.group-id", &[group]))
        .filters(filter(
            "instance-state-name",
            &["pending", "running", "shutting-down", "stopping", "stopped"],
        ))
        .send()
        .await
        .map_err(|e| describe("list instances", &e))?;
    if users
        .reservations()
        .iter()
        .any(|r| !r.instances().is_empty())
    {
        return Ok(false);
    }
    match ec2
        .client
        .delete_security_group()
        .group_id(group)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) => match code(&e) {
            Some("InvalidGroup.NotFound") => Ok(false),
            // Still attached to a network interface being torn down.
            Some("DependencyViolation") => Ok(false),
            _ => Err(describe("delete the bridge security group", &e)),
        },
    }
}

/// Points the SSH rule of the caller's bridge security group at `cidr`,
/// revoking the other SSH rules bridge put there; returns whether it
/// changed. No group (the instance is gone): nothing to do.
pub async fn follow_address(ec2: &Ec2, cidr: &str, owner: &str) -> Result<bool, AwsError> {
    match find_group(ec2, owner).await? {
        Some((id, rules)) => point_ssh_rule(ec2, &id, &rules, cidr).await,
        None => Ok(false),
    }
}

/// Test hook: `host:port` answering as checkip.amazonaws.com does (the
/// address in the body), instead of it.
pub const CHECKIP_ENV: &str = "BRIDGE_AWS_CHECKIP";

/// This machine's public IPv4 address as `a.b.c.d/32`, from
/// checkip.amazonaws.com (plain HTTP: a forged answer only opens the group
/// to a wrong address, and `--ssh-cidr` avoids the lookup).
pub async fn public_cidr() -> Result<String, AwsError> {
    let fail = |why: String| {
        AwsError(format!(
            "cannot find this machine's public address (checkip.amazonaws.com: {why}); pass --ssh-cidr ADDRESS/32"
        ))
    };
    let ask = async {
        let mut s = match std::env::var(CHECKIP_ENV) {
            Ok(at) => tokio::net::TcpStream::connect(at).await?,
            Err(_) => tokio::net::TcpStream::connect(("checkip.amazonaws.com", 80)).await?,
        };
        s.write_all(b"GET / HTTP/1.0\r\nHost: checkip.amazonaws.com\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.take(4096).read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let ip = body.lines().last().unwrap_or("").trim();
    ip.parse::<std::net::Ipv4Addr>()
        .map(|a| format!("{a}/32"))
        .map_err(|_| fail(format!("unexpected answer {ip:?}")))
}

/// Checks `--ssh-cidr`: an IPv4 network in CIDR notation.
pub fn check_cidr(cidr: &str) -> Result<(), String> {
    let bad = || format!("--ssh-cidr {cidr:?} is not an IPv4 CIDR like 203.0.113.7/32");
    let (addr, len) = cidr.split_once('/').ok_or_else(bad)?;
    addr.parse::<std::net::Ipv4Addr>().map_err(|_| bad())?;
    match len.parse::<u8>() {
        Ok(0..=32) => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("aws").join("id_ed25519");
        let a = load_or_create_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_key(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn cidrs() {
        assert!(check_cidr("203.0.113.7/32").is_ok());
        assert!(check_cidr("10.0.0.0/8").is_ok());
        for bad in ["203.0.113.7", "1.2.3/32", "1.2.3.4/33", "::1/128"] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
    }
}
