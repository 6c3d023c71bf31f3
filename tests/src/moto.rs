//! A private EC2 API emulator (moto's `moto_server`) on 127.0.0.1 for the
//! AWS provider's tests, plus an optional fault-injecting proxy in front of
//! it (`fixtures/ec2_faults.py`) for the errors moto cannot produce.
//!
//! `tests/run` installs `moto[server]` into a virtual environment
//! (`$BRIDGE_MOTO_VENV`, default `~/.cache/bridge/moto-venv`); [`Moto::start`]
//! fails a test (never skips it) when it is missing. The instances moto
//! returns have made-up public addresses: tests never connect to them, they
//! set `BRIDGE_AWS_SSH_ENDPOINT` to a private sshd instead.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The virtual environment holding moto and boto3.
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("BRIDGE_MOTO_VENV") {
        return v.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/bridge/moto-venv")
}

fn venv_bin(name: &str) -> PathBuf {
    let p = venv().join("bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: install moto with `python3 -m venv {v} && {v}/bin/pip install 'moto[server]'` (tests/run does it)",
        p.display(),
        v = venv().display()
    );
    p
}

/// A running `moto_server` and, when asked for, a fault proxy in front.
pub struct Moto {
    server: Child,
    port: u16,
    faults: Option<(Child, u16)>,
}

impl Moto {
    pub fn start() -> Moto {
        let port = crate::sshd::free_port();
        let server = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let mut moto = Moto {
            server,
            port,
            faults: None,
        };
        moto.wait_listening(port);
        moto
    }

    fn wait_listening(&mut self, port: u16) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let t = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.server.try_wait().expect("wait moto") {
                panic!("moto_server exited ({status}) on port {port}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "moto_server did not listen on {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Answers `rules` (`Action=Code:HttpStatus`, e.g.
    /// `RunInstances=InsufficientInstanceCapacity:500`) with EC2 errors
    /// from now on; [`Moto::endpoint`] then points at the proxy.
    pub fn inject(&mut self, rules: &[&str]) {
        self.clear_faults();
        let script = crate::fixtures_dir().join("ec2_faults.py");
        let mut child = Command::new(venv_bin("python3"))
            .arg(script)
            .arg(self.port.to_string())
            .args(rules)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the fault proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the proxy's port");
        let port = line.trim().parse().expect("the proxy prints its port");
        self.faults = Some((child, port));
    }

    pub fn clear_faults(&mut self) {
        if let Some((mut c, _)) = self.faults.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `http://127.0.0.1:PORT`: moto, or the fault proxy while one runs.
    pub fn endpoint(&self) -> String {
        let port = self.faults.as_ref().map_or(self.port, |(_, p)| *p);
        format!("http://127.0.0.1:{port}")
    }

    /// The environment that points bridge (and the SDK's whole credential
    /// chain) at the emulator only: static test credentials, no profile
    /// files, no instance metadata service.
    pub fn env(&self, config_home: &std::path::Path) -> Vec<(String, String)> {
        let none = config_home.join("no-such-aws-file");
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_SESSION_TOKEN".into(), String::new()),
            ("AWS_PROFILE".into(), String::new()),
            ("AWS_REGION".into(), String::new()),
            ("AWS_DEFAULT_REGION".into(), String::new()),
            ("AWS_CONFIG_FILE".into(), none.display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                none.display().to_string(),
            ),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("XDG_CONFIG_HOME".into(), config_home.display().to_string()),
        ]
    }

    /// Runs `code` with `ec2` bound to a boto3 client of `region` on moto
    /// itself (never the fault proxy); returns stdout.
    pub fn boto(&self, region: &str, code: &str) -> String {
        let prelude = format!(
            "import boto3, json\n\
             ec2 = boto3.client('ec2', region_name='{region}', endpoint_url='http://127.0.0.1:{}', \
             aws_access_key_id='testing', aws_secret_access_key='testing')\n",
            self.port
        );
        let out = Command::new(venv_bin("python3"))
            .arg("-c")
            .arg(prelude + code)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "boto3 script failed: {}\n{code}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `(id, state, type)` of every instance moto knows in `region`.
    pub fn instances(&self, region: &str) -> Vec<(String, String, String)> {
        let out = self.boto(
            region,
            "r = ec2.describe_instances()\n\
             for res in r['Reservations']:\n\
             \x20 for i in res['Instances']:\n\
             \x20   print(i['InstanceId'], i['State']['Name'], i['InstanceType'])\n",
        );
        out.lines()
            .map(|l| {
                let mut w = l.split_whitespace().map(str::to_string);
                (
                    w.next().unwrap_or_default(),
                    w.next().unwrap_or_default(),
                    w.next().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The instances that are not terminated.
    pub fn live_instances(&self, region: &str) -> Vec<String> {
        self.instances(region)
            .into_iter()
            .filter(|(_, s, _)| s != "terminated")
            .map(|(id, _, _)| id)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.clear_faults();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
