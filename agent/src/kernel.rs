//! Jupyter kernels (`bridge kernel`): a job whose command is
//! `python -m ipykernel_launcher`, run in the live mirror.
//!
//! The agent writes the kernel's connection file itself, in the job's
//! directory (`kernel/`, mode 0700; the file 0600): the front end's HMAC key
//! and signature scheme, transport tcp on 127.0.0.1 and every port 0, so
//! ipykernel binds free loopback ports and writes them back into the file,
//! where `Jobs.Hold` reads them for the daemon. Nothing but loopback is ever
//! bound, and the key never leaves that file (the stored spec drops it).
//!
//! ipykernel comes from the job's environment when it has it, otherwise it
//! is installed once per interpreter into the agent's cache, like debugpy
//! ([`crate::debugger::ensure_tool`]).
//!
//! Bytecode: live jobs write their `.pyc` files under one prefix per mirror
//! ([`pycache_dir`]), and applying a changed `.py` removes its cached
//! bytecode ([`invalidate_bytecode`]). Python trusts a `.pyc` whose recorded
//! source mtime (whole seconds) and size match, so two saves of the same
//! size within a second would otherwise reload the old code under
//! `%autoreload`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bridge_proto::path::RelPath;

use crate::debugger::Tool;

pub const IPYKERNEL: Tool = Tool {
    module: "ipykernel",
    requirement: "ipykernel",
    purpose: "the Jupyter kernel",
};

/// The connection file's name in the job directory.
pub const CONNECTION_FILE: &str = "kernel/connection.json";

/// Port keys of a connection file, in the order of `KernelEvent.ports`.
const PORT_KEYS: [&str; 5] = [
    "shell_port",
    "iopub_port",
    "stdin_port",
    "control_port",
    "hb_port",
];

/// Signature schemes Jupyter defines (`hmac-` and a hashlib name).
pub fn valid_scheme(s: &str) -> bool {
    s.strip_prefix("hmac-").is_some_and(|h| {
        !h.is_empty() && h.len() <= 16 && h.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Writes the kernel's connection file into `job_dir` (see the module doc).
pub fn write_connection_file(job_dir: &Path, key: &str, scheme: &str) -> io::Result<PathBuf> {
    let path = job_dir.join(CONNECTION_FILE);
    let dir = path.parent().expect("has a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut info = serde_json::Map::new();
    for k in PORT_KEYS {
        info.insert(k.into(), 0.into());
    }
    info.insert("ip".into(), "127.0.0.1".into());
    info.insert("transport".into(), "tcp".into());
    info.insert("key".into(), key.into());
    info.insert("signature_scheme".into(), scheme.into());
    info.insert("kernel_name".into(), "bridge".into());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    io::Write::write_all(
        &mut f,
        &serde_json::to_vec_pretty(&info).map_err(io::Error::other)?,
    )?;
    Ok(path)
}

/// The ports ipykernel bound, once it has written them back.
pub fn bound_ports(job_dir: &Path) -> Option<Vec<u32>> {
    let bytes = fs::read(job_dir.join(CONNECTION_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let ports: Vec<u32> = PORT_KEYS
        .iter()
        .map(|k| v.get(k).and_then(|p| p.as_u64()).unwrap_or(0) as u32)
        .collect();
    ports.iter().all(|&p| p > 0 && p <= 65535).then_some(ports)
}

/// The kernel's command line, for `/bin/sh -c`.
pub fn command(python: &Path, connection_file: &Path) -> String {
    format!(
        "exec {} -m ipykernel_launcher -f {}",
        shell_quote(&python.to_string_lossy()),
        shell_quote(&connection_file.to_string_lossy())
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Where live jobs of the mirror at `mirror_root` (`<agent>/mirrors/<name>`)
/// keep their bytecode: `<agent>/pycache/<name>`.
pub fn pycache_dir(mirror_root: &Path) -> PathBuf {
    let agent = mirror_root
        .parent()
        .and_then(Path::parent)
        .unwrap_or(mirror_root);
    let name = mirror_root.file_name().unwrap_or_default();
    agent.join("pycache").join(name)
}

/// Removes the cached bytecode of the mirror's `path` (a `.py` file just
/// replaced), for every interpreter and optimisation level.
pub fn invalidate_bytecode(mirror_root: &Path, path: &RelPath) {
    let Some(stem) = path.name().strip_suffix(".py") else {
        return;
    };
    let src = path.to_fs(mirror_root);
    let Some(dir) = src.parent() else { return };
    let cache = pycache_dir(mirror_root).join(dir.strip_prefix("/").unwrap_or(dir));
    let Ok(entries) = fs::read_dir(&cache) else {
        return;
    };
    let prefix = format!("{stem}.");
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".pyc") {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_connection_file_is_private_and_ports_are_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = write_connection_file(d.path(), "secret", "hmac-sha256").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&p), 0o600);
        assert_eq!(mode(p.parent().unwrap()), 0o700);
        assert_eq!(bound_ports(d.path()), None, "ports 0 until ipykernel binds");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["key"], "secret");
        assert_eq!(v["ip"], "127.0.0.1");
        for (i, k) in PORT_KEYS.iter().enumerate() {
            v[k] = (5000 + i).into();
        }
        fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(
            bound_ports(d.path()),
            Some(vec![5000, 5001, 5002, 5003, 5004])
        );
        assert!(
            write_connection_file(d.path(), "k", "hmac-sha256").is_err(),
            "never overwritten"
        );
    }

    #[test]
    fn schemes_and_quoting() {
        assert!(valid_scheme("hmac-sha256"));
        assert!(!valid_scheme("hmac-"));
        assert!(!valid_scheme("sha256"));
        assert!(!valid_scheme("hmac-sha256; rm -rf /"));
        assert_eq!(
            command(Path::new("/e n/python"), Path::new("/j/it's.json")),
            r"exec '/e n/python' -m ipykernel_launcher -f '/j/it'\''s.json'"
        );
    }

    #[test]
    fn bytecode_of_a_replaced_module_is_removed_and_only_its() {
        let agent = tempfile::tempdir().unwrap();
        let mirror = agent.path().join("mirrors").join("m1");
        fs::create_dir_all(mirror.join("pkg")).unwrap();
        let cache = pycache_dir(&mirror).join(mirror.join("pkg").strip_prefix("/").unwrap());
        assert!(cache.starts_with(agent.path().join("pycache").join("m1")));
        fs::create_dir_all(&cache).unwrap();
        for f in [
            "mod.cpython-311.pyc",
            "mod.cpython-312.opt-1.pyc",
            "module.cpython-311.pyc",
            "other.cpython-311.pyc",
        ] {
            fs::write(cache.join(f), b"").unwrap();
        }
        invalidate_bytecode(&mirror, &RelPath::new("pkg/mod.py").unwrap());
        let mut left: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["module.cpython-311.pyc", "other.cpython-311.pyc"]);
        invalidate_bytecode(&mirror, &RelPath::new("pkg/data.txt").unwrap());
    }
}
