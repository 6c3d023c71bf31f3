//! The AWS provider against a real EC2 API emulator (moto on 127.0.0.1)
//! and, for the SSH stage, a private sshd standing in for the instance
//! (`BRIDGE_AWS_SSH_ENDPOINT`): the made-up addresses moto hands out are
//! never contacted.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use bridge_tests::moto::Moto;
use bridge_tests::proxy::Proxy;
use bridge_tests::sshd::Sshd;
use bridge_tests::{Repo, eventually, fixtures_dir};

const REGION: &str = "us-east-1";

/// A repository set up for the AWS provider: its own config home (bridge's
/// key, per-instance known hosts), an empty `~/.ssh`, and the emulator.
struct AwsRepo {
    repo: Repo,
    config_home: PathBuf,
    ssh_dir: PathBuf,
    remote_str: String,
    extra_env: Vec<(String, String)>,
}

impl AwsRepo {
    fn new() -> AwsRepo {
        let repo = Repo::new();
        let config_home = repo.scratch("config");
        let ssh_dir = repo.scratch("dot-ssh");
        fs::create_dir_all(&ssh_dir).unwrap();
        let remote_str = repo.scratch("remote").display().to_string();
        AwsRepo {
            repo,
            config_home,
            ssh_dir,
            remote_str,
            extra_env: Vec::new(),
        }
    }

    /// Points the SSH stage at `sshd` and authorizes bridge's key there (as
    /// if the instance had booted with the imported key pair).
    fn with_sshd(mut self, sshd: &Sshd) -> AwsRepo {
        let dir = self.config_home.join("bridge/aws");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let key = dir.join("id_ed25519");
        fs::copy(sshd.client_key(), &key).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        self.extra_env.push((
            "BRIDGE_AWS_SSH_ENDPOINT".into(),
            format!("root@127.0.0.1:{}", sshd.port()),
        ));
        self
    }

    /// Where the agent lives on the "instance": in the test's scratch space.
    fn remote(&self) -> PathBuf {
        self.repo.scratch("remote")
    }

    /// `bridge up --provider aws` with the test's region, CIDR and remote
    /// directory, confirmed.
    fn up_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let remote = self.remote_str.as_str();
        let mut a = vec![
            "up",
            "--provider",
            "aws",
            "--region",
            REGION,
            "--ssh-cidr",
            "127.0.0.1/32",
            "--remote-dir",
            remote,
            "--yes",
        ];
        a.extend_from_slice(extra);
        a
    }

    fn env(&self, moto: &Moto) -> Vec<(String, String)> {
        let mut env = moto.env(&self.config_home);
        env.push(("BRIDGE_SSH_DIR".into(), self.ssh_dir.display().to_string()));
        env.push(("SSH_AUTH_SOCK".into(), String::new()));
        env.extend(self.extra_env.iter().cloned());
        env
    }

    fn bridge(&self, moto: &Moto, args: &[&str]) -> Output {
        let env = self.env(moto);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.repo.bridge_env(args, &env)
    }

    fn ok(&self, moto: &Moto, args: &[&str]) -> (String, String) {
        let o = self.bridge(moto, args);
        let (out, err) = texts(&o);
        assert!(
            o.status.success(),
            "bridge {args:?} failed:\nstdout: {out}\nstderr: {err}\ndaemon log:\n{}",
            self.repo.daemon_log()
        );
        (out, err)
    }

    fn fails(&self, moto: &Moto, args: &[&str]) -> String {
        let o = self.bridge(moto, args);
        let (out, err) = texts(&o);
        assert!(
            !o.status.success(),
            "bridge {args:?} should fail:\n{out}\n{err}"
        );
        assert!(
            !self.repo.path(".bridge/daemon.sock").exists(),
            "a failed bridge {args:?} left a daemon"
        );
        err
    }

    fn provider_toml(&self) -> String {
        fs::read_to_string(self.repo.path(".bridge/provider.toml")).unwrap_or_default()
    }
}

impl Drop for AwsRepo {
    /// Stops an agent left on the "instance" (moto's terminations do not
    /// reach the sshd standing in for it).
    fn drop(&mut self) {
        let pid = fs::read_to_string(self.remote().join("run/agent.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn texts(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// An sshd whose sessions see the fake `nvidia-smi` with one GPU, so the
/// agent on the "instance" has the GPU `--gpu 1` asks for.
fn gpu_sshd() -> Sshd {
    Sshd::start_with(&format!(
        "SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin BRIDGE_FAKE_GPUS=1",
        fixtures_dir().display()
    ))
}

#[test]
fn up_run_autostop_reuse_down() {
    let moto = Moto::start();
    let sshd = gpu_sshd();
    let mut a = AwsRepo::new().with_sshd(&sshd);
    let marker = a.repo.scratch("idle-shutdown");
    a.extra_env.push((
        "BRIDGE_AWS_IDLE_COMMAND".into(),
        format!("touch {}", marker.display()),
    ));
    a.repo
        .write("train.py", "print('hello from the instance')\n");

    let (out, err) = a.ok(
        &moto,
        &a.up_args(&["--gpu", "1", "--gpu-type", "A10G", "--idle-timeout", "3s"]),
    );
    eprintln!("--- bridge up --provider aws printed:\n{err}{out}---");
    assert!(
        err.contains("launching in us-east-1: g5.xlarge: 1× NVIDIA A10G (24 GiB), 4 vCPUs, 16 GiB RAM, $1.006/h on-demand"),
        "{err}"
    );
    assert!(err.contains("Deep Learning AMI"), "{err}");
    assert!(out.contains("bridge is up"), "{out}");

    // What the emulator holds: one g5.xlarge, tagged, terminating on
    // shutdown, in the bridge group that lets SSH in from the given CIDR
    // only, with bridge's imported ed25519 key.
    let live = moto.live_instances(REGION);
    assert_eq!(live.len(), 1, "{live:?}");
    let id = live[0].clone();
    let facts = moto.boto(
        REGION,
        &format!(
            "i = ec2.describe_instances(InstanceIds=['{id}'])['Reservations'][0]['Instances'][0]\n\
             tags = {{t['Key']: t['Value'] for t in i.get('Tags', [])}}\n\
             img = ec2.describe_images(ImageIds=[i['ImageId']])['Images'][0]['Name']\n\
             sd = ec2.describe_instance_attribute(InstanceId='{id}', Attribute='instanceInitiatedShutdownBehavior')\n\
             sg = ec2.describe_security_groups(GroupIds=[i['SecurityGroups'][0]['GroupId']])['SecurityGroups'][0]\n\
             kp = ec2.describe_key_pairs(KeyNames=[i['KeyName']])['KeyPairs'][0]\n\
             print(json.dumps({{'type': i['InstanceType'], 'tags': tags, 'image': img,\n\
               'shutdown': sd['InstanceInitiatedShutdownBehavior']['Value'], 'group': sg['GroupName'],\n\
               'rules': [(p.get('FromPort'), r['CidrIp']) for p in sg['IpPermissions'] for r in p['IpRanges']],\n\
               'key_type': kp.get('KeyType'), 'key_name': kp['KeyName'], 'spot': i.get('InstanceLifecycle')}}))\n"
        ),
    );
    let f: serde_json::Value = serde_json::from_str(facts.trim()).unwrap();
    assert_eq!(f["type"], "g5.xlarge", "{f}");
    assert_eq!(f["tags"]["bridge:managed"], "true", "{f}");
    assert_eq!(
        f["tags"]["bridge:repo"],
        a.repo.root.display().to_string(),
        "{f}"
    );
    assert!(
        f["tags"]["bridge:owner"].as_str().unwrap().contains('@'),
        "{f}"
    );
    assert!(
        f["image"].as_str().unwrap().contains("Deep Learning"),
        "{f}"
    );
    assert_eq!(f["shutdown"], "terminate", "{f}");
    assert_eq!(f["group"], "bridge-ssh", "{f}");
    assert_eq!(f["rules"], serde_json::json!([[22, "127.0.0.1/32"]]), "{f}");
    assert_eq!(f["key_type"], "ed25519", "{f}");
    assert!(
        f["key_name"].as_str().unwrap().starts_with("bridge-"),
        "{f}"
    );
    assert!(f["spot"].is_null(), "{f}");
    assert!(a.provider_toml().contains(&id), "{}", a.provider_toml());

    // Exactly as with the local provider: an exact mirror, a job, logs.
    a.repo.wait_exact();
    let (out, _) = a.ok(&moto, &["exec", "--", "python3", "train.py"]);
    assert!(out.contains("hello from the instance"), "{out}");

    let (status, _) = a.ok(&moto, &["status"]);
    assert!(
        status.contains(&id) && status.contains("g5.xlarge"),
        "{status}"
    );
    assert!(
        status.contains("running") && status.contains("so far"),
        "{status}"
    );
    assert!(status.contains("autostop"), "{status}");

    // The connected daemon holds the instance past its idle timeout…
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !marker.exists(),
        "the agent shut down while a daemon was connected"
    );
    // …and once the laptop is gone (the daemon killed, not stopped), the
    // agent runs its idle command by itself.
    let pid = a.repo.status()["daemon_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || marker.exists()),
        "the idle command did not run after the daemon went away"
    );
    let _ = fs::remove_file(a.repo.path(".bridge/daemon.sock"));

    // A plain `bridge up` reuses the running instance.
    let (_, err) = a.ok(&moto, &["up"]);
    assert!(err.contains(&format!("reusing {id}")), "{err}");
    assert_eq!(moto.live_instances(REGION), vec![id.clone()]);

    // Down terminates it, removes the group, keeps the key pair, and is
    // idempotent.
    let (out, _) = a.ok(&moto, &["down"]);
    assert!(out.contains(&format!("terminated {id}")), "{out}");
    assert!(moto.live_instances(REGION).is_empty());
    let groups = moto.boto(
        REGION,
        "print([g['GroupName'] for g in ec2.describe_security_groups()['SecurityGroups']])",
    );
    assert!(!groups.contains("bridge-ssh"), "{groups}");
    assert!(!a.provider_toml().contains(&id), "{}", a.provider_toml());
    let (out, _) = a.ok(&moto, &["down"]);
    assert!(out.contains("no instance is up"), "{out}");
}

#[test]
fn spot_and_down_all_with_orphans() {
    let moto = Moto::start();
    let sshd = gpu_sshd();
    let a = AwsRepo::new().with_sshd(&sshd);
    a.ok(&moto, &a.up_args(&["--spot", "--gpu-type", "T4"]));
    let live = moto.live_instances(REGION);
    assert_eq!(live.len(), 1, "{live:?}");
    let mine = live[0].clone();
    let facts = moto.boto(
        REGION,
        &format!(
            "i = ec2.describe_instances(InstanceIds=['{mine}'])['Reservations'][0]['Instances'][0]\n\
             tags = {{t['Key']: t['Value'] for t in i['Tags']}}\n\
             print(i.get('InstanceLifecycle'), i['InstanceType'], tags['bridge:owner'])"
        ),
    );
    let mut w = facts.split_whitespace();
    assert_eq!(w.next(), Some("spot"), "{facts}");
    assert_eq!(w.next(), Some("g4dn.xlarge"), "{facts}");
    let owner = w.next().unwrap().to_string();

    // An orphan of the same owner (its repository long gone), a terminated
    // one (moto keeps listing those) and someone else's.
    let made = moto.boto(
        REGION,
        &format!(
            "def run(owner):\n\
             \x20 tags = [{{'Key': 'bridge:managed', 'Value': 'true'}}, {{'Key': 'bridge:owner', 'Value': owner}}]\n\
             \x20 return ec2.run_instances(ImageId='ami-dca37ea5', InstanceType='g5.xlarge', MinCount=1, MaxCount=1,\n\
             \x20   TagSpecifications=[{{'ResourceType': 'instance', 'Tags': tags}}])['Instances'][0]['InstanceId']\n\
             orphan, dead, other = run('{owner}'), run('{owner}'), run('someone@else')\n\
             ec2.terminate_instances(InstanceIds=[dead])\n\
             print(orphan, dead, other)"
        ),
    );
    let ids: Vec<&str> = made.split_whitespace().collect();
    let (orphan, dead, other) = (ids[0], ids[1], ids[2]);

    // Without --yes and no terminal: listed, nothing terminated.
    let o = a.bridge(&moto, &["down", "--all"]);
    let (out, err) = texts(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(out.contains(orphan) && out.contains(&mine), "{out}");
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(moto.live_instances(REGION).len(), 3);

    let (out, _) = a.ok(&moto, &["down", "--all", "--yes"]);
    eprintln!("--- bridge down --all --yes printed:\n{out}---");
    assert!(out.contains(&format!("terminated {mine}")), "{out}");
    assert!(out.contains(&format!("terminated {orphan}")), "{out}");
    assert!(!out.contains(dead) && !out.contains(other), "{out}");
    assert_eq!(moto.live_instances(REGION), vec![other.to_string()]);
    // This repository's daemon went with its instance.
    assert!(!a.repo.path(".bridge/daemon.sock").exists());
    assert!(!a.provider_toml().contains(&mine));
}

#[test]
fn bad_input_leaves_nothing_running() {
    let mut moto = Moto::start();
    let a = AwsRepo::new();
    let none_left = |moto: &Moto| {
        assert!(moto.live_instances(REGION).is_empty());
        assert!(moto.live_instances("eu-west-3").is_empty());
    };

    // Flags checked before any AWS call.
    for (extra, want) in [
        (&["--idle-timeout", "5x"][..], "invalid duration"),
        (&["--ssh-cidr", "10.1.2.3"][..], "not an IPv4 CIDR"),
        (&["--spot", "--on-idle", "stop"][..], "cannot stop"),
        (&["--gpu-type", "V100"][..], "unknown GPU type"),
        (&["--gpu", "16"][..], "at most 8"),
    ] {
        let mut args = vec!["up", "--provider", "aws", "--region", REGION, "--yes"];
        args.extend_from_slice(extra);
        let e = a.fails(&moto, &args);
        assert!(e.contains(want), "{extra:?}: {e}");
    }

    // No credentials anywhere in the chain (and no network to find any).
    let mut env = a.env(&moto);
    env.retain(|(k, _)| k != "AWS_ACCESS_KEY_ID" && k != "AWS_SECRET_ACCESS_KEY");
    let o = std::process::Command::new("unshare")
        .arg("-n")
        .arg(bridge_tests::bridge_bin())
        .arg("-C")
        .arg(&a.repo.root)
        .args(a.up_args(&[]))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .envs(env)
        .output()
        .expect("unshare");
    let (_, e) = texts(&o);
    assert!(!o.status.success());
    assert!(e.contains("no AWS credentials found"), "{e}");
    none_left(&moto);

    // The region does not offer the type.
    let e = a.fails(
        &moto,
        &[
            "up",
            "--provider",
            "aws",
            "--region",
            "eu-west-3",
            "--gpu-type",
            "A10G",
            "--ssh-cidr",
            "127.0.0.1/32",
            "--yes",
        ],
    );
    assert!(e.contains("g5.xlarge is not offered in eu-west-3"), "{e}");
    assert!(e.contains("g4dn.xlarge"), "{e}");

    // An image that does not exist.
    let e = a.fails(&moto, &a.up_args(&["--ami", "ami-12345678"]));
    assert!(e.contains("unknown image \"ami-12345678\""), "{e}");

    // A launch needs a yes.
    let e = a.fails(
        &moto,
        &[
            "up",
            "--provider",
            "aws",
            "--region",
            REGION,
            "--ssh-cidr",
            "127.0.0.1/32",
        ],
    );
    assert!(e.contains("pass --yes"), "{e}");
    none_left(&moto);

    // What AWS refuses at launch time, injected in front of the emulator.
    for (rule, extra, want) in [
        (
            "RunInstances=InsufficientInstanceCapacity:500",
            &["--gpu-type", "A10G"][..],
            "no spare g5.xlarge capacity",
        ),
        (
            "RunInstances=InsufficientInstanceCapacity:500",
            &["--spot"][..],
            "no spot capacity for g4dn.xlarge",
        ),
        (
            "RunInstances=VcpuLimitExceeded:400",
            &["--gpu-type", "H100", "--gpu", "8"][..],
            "Running On-Demand P instances",
        ),
    ] {
        moto.inject(&[rule]);
        let e = a.fails(&moto, &a.up_args(extra));
        assert!(e.contains(want), "{rule}: {e}");
        none_left(&moto);
    }
    moto.clear_faults();
    let groups = moto.boto(
        REGION,
        "print([g['GroupName'] for g in ec2.describe_security_groups()['SecurityGroups']])",
    );
    assert!(!groups.contains("bridge-ssh"), "{groups}");

    // A failure after the launch (the instance does not accept bridge's
    // key) terminates what was launched.
    let sshd = Sshd::start();
    let mut b = AwsRepo::new();
    b.extra_env.push((
        "BRIDGE_AWS_SSH_ENDPOINT".into(),
        format!("root@127.0.0.1:{}", sshd.port()),
    ));
    let e = b.fails(&moto, &b.up_args(&[]));
    assert!(e.contains("terminating i-"), "{e}");
    let all = moto.instances(REGION);
    assert!(
        !all.is_empty() && all.iter().all(|(_, s, _)| s == "terminated"),
        "{all:?}"
    );
    assert!(!b.provider_toml().contains("i-"), "{}", b.provider_toml());
    // bridge made a key of its own, private.
    let key = b.config_home.join("bridge/aws/id_ed25519");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn stopped_instance_starts_again() {
    let moto = Moto::start();
    let sshd = gpu_sshd();
    let a = AwsRepo::new().with_sshd(&sshd);
    a.ok(
        &moto,
        &a.up_args(&["--on-idle", "stop", "--instance-type", "g6.xlarge"]),
    );
    let id = moto.live_instances(REGION).pop().unwrap();
    let behaviour = moto.boto(
        REGION,
        &format!(
            "print(ec2.describe_instance_attribute(InstanceId='{id}', \
             Attribute='instanceInitiatedShutdownBehavior')['InstanceInitiatedShutdownBehavior']['Value'])"
        ),
    );
    assert_eq!(behaviour.trim(), "stop");
    // The instance stopped itself while idle (the daemon went with the laptop).
    let pid = a.repo.status()["daemon_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = fs::remove_file(a.repo.path(".bridge/daemon.sock"));
    moto.boto(REGION, &format!("ec2.stop_instances(InstanceIds=['{id}'])"));

    // The next `bridge up` starts it again instead of launching another.
    let (_, err) = a.ok(&moto, &["up"]);
    assert!(err.contains(&format!("starting {id}")), "{err}");
    assert_eq!(moto.live_instances(REGION), vec![id.clone()]);
    let state = moto.boto(
        REGION,
        &format!("print(ec2.describe_instances(InstanceIds=['{id}'])['Reservations'][0]['Instances'][0]['State']['Name'])"),
    );
    assert_eq!(state.trim(), "running");
    a.ok(&moto, &["down"]);
    assert!(moto.live_instances(REGION).is_empty());
}

/// Answers as checkip.amazonaws.com does, with an address the test sets.
struct CheckIp {
    port: u16,
    ip: std::sync::Arc<std::sync::Mutex<String>>,
}

impl CheckIp {
    fn start(ip: &str) -> CheckIp {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(ip.to_string()));
        let answer = shared.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let ip = answer.lock().unwrap().clone();
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{ip}\n"
                );
            }
        });
        CheckIp { port, ip: shared }
    }

    fn set(&self, ip: &str) {
        *self.ip.lock().unwrap() = ip.to_string();
    }
}

/// Fault suite: the laptop's public address changes while the instance is
/// up (`bridge up` looked it up itself: no `--ssh-cidr`). The security
/// group, played by a proxy in front of the instance's sshd, lets in only
/// the address its SSH rule names: the daemon notices the instance no
/// longer answers, moves the rule it owns to the new address (the old one
/// revoked), and reconnects by itself.
#[test]
fn a_new_laptop_address_is_let_in_and_the_daemon_reconnects() {
    let moto = Moto::start();
    let sshd = Sshd::start();
    let proxy = Proxy::start(sshd.port());
    let checkip = CheckIp::start("198.51.100.7");
    let mut a = AwsRepo::new().with_sshd(&sshd);
    a.extra_env.retain(|(k, _)| k != "BRIDGE_AWS_SSH_ENDPOINT");
    a.extra_env.push((
        "BRIDGE_AWS_SSH_ENDPOINT".into(),
        format!("root@127.0.0.1:{}", proxy.port()),
    ));
    a.extra_env.push((
        "BRIDGE_AWS_CHECKIP".into(),
        format!("127.0.0.1:{}", checkip.port),
    ));
    a.repo.write("before.txt", "here\n");
    let remote = a.remote_str.clone();
    a.ok(
        &moto,
        &[
            "up",
            "--provider",
            "aws",
            "--region",
            REGION,
            "--remote-dir",
            &remote,
            "--yes",
        ],
    );
    let rules = || {
        moto.boto(
            REGION,
            "print(sorted(r['CidrIp'] for g in ec2.describe_security_groups(\
             Filters=[{'Name': 'group-name', 'Values': ['bridge-ssh']}])['SecurityGroups'] \
             for p in g['IpPermissions'] if p.get('FromPort') == 22 for r in p['IpRanges']))",
        )
        .trim()
        .to_string()
    };
    assert_eq!(rules(), "['198.51.100.7/32']");

    // The laptop moves to another network: the group drops its packets.
    checkip.set("198.51.100.8");
    proxy.set_down(true);
    proxy.cut();
    let moved = eventually(Duration::from_secs(90), || {
        rules().contains("198.51.100.8/32")
    });
    assert!(
        moved,
        "the rule was not moved: {}\ndaemon log:\n{}",
        rules(),
        a.repo.daemon_log()
    );
    assert_eq!(
        rules(),
        "['198.51.100.8/32']",
        "the old address is still allowed"
    );
    // The group now lets the laptop in: the daemon reconnects by itself.
    proxy.set_down(false);
    a.repo.write("after.txt", "moved\n");
    let mirror = a.repo.mirror();
    assert!(
        eventually(Duration::from_secs(60), || {
            fs::read_to_string(mirror.join("after.txt")).is_ok_and(|s| s == "moved\n")
        }),
        "the daemon did not reconnect:\n{}",
        a.repo.daemon_log()
    );
    assert!(
        a.repo
            .daemon_log()
            .contains("the bridge security group now allows SSH from it"),
        "{}",
        a.repo.daemon_log()
    );
    a.ok(&moto, &["down", "--force"]);
}
