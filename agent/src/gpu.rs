//! GPU discovery: which accelerators this machine has and how busy they are.
//!
//! [`GpuInventory`] is the seam: the agent asks it for the GPUs when it
//! schedules a job; [`NvidiaSmi`] asks the driver's `nvidia-smi`, [`Fixed`]
//! answers with a fixed list in unit tests. Integration tests put the fake
//! `tests/fixtures/nvidia-smi` first on the agent's PATH instead.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::Command;

/// One GPU as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// The index `CUDA_VISIBLE_DEVICES` refers to.
    pub index: u32,
    pub name: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    /// Utilisation over the driver's last sample period; 0 when not reported.
    pub utilization_pct: u32,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({} / {} MiB used, {}% busy)",
            self.index,
            self.name,
            self.memory_used_mib,
            self.memory_total_mib,
            self.utilization_pct
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No `nvidia-smi` on PATH: for the caller, "this machine has no GPUs".
    #[error("nvidia-smi is not on PATH")]
    NotFound,
    #[error("cannot run {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },
    #[error("nvidia-smi failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("cannot parse nvidia-smi line {line:?}: {why}")]
    Parse { line: String, why: String },
}

/// Where the agent learns about GPUs.
pub trait GpuInventory: Send + Sync {
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuError>;
}

/// The arguments the agent passes; the test fixture answers exactly these.
pub const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-gpu=index,name,memory.total,memory.used,utilization.gpu",
    "--format=csv,noheader,nounits",
];

/// Asks the NVIDIA driver through `nvidia-smi`, found on `PATH`.
#[derive(Debug, Clone, Default)]
pub struct NvidiaSmi {
    /// PATH to search; the process's own PATH when `None`.
    pub path: Option<OsString>,
}

impl NvidiaSmi {
    fn program(&self) -> Option<PathBuf> {
        let path = self.path.clone().or_else(|| std::env::var_os("PATH"))?;
        std::env::split_paths(&path)
            .map(|d| d.join("nvidia-smi"))
            .find(|p| is_executable(p))
    }
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl GpuInventory for NvidiaSmi {
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let program = self.program().ok_or(GpuError::NotFound)?;
        let out = Command::new(&program)
            .args(NVIDIA_SMI_ARGS)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| GpuError::Spawn {
                program: program.clone(),
                source,
            })?;
        if !out.status.success() {
            // nvidia-smi reports driver trouble ("couldn't communicate with the
            // NVIDIA driver") on stdout, so fall back to it.
            let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if msg.is_empty() {
                msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            return Err(GpuError::Failed {
                status: out.status.to_string(),
                stderr: msg,
            });
        }
        parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// A fixed answer, for unit tests.
#[derive(Debug, Clone, Default)]
pub struct Fixed(pub Vec<GpuInfo>);

impl GpuInventory for Fixed {
    fn discover(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.0.clone())
    }
}

/// Parses `nvidia-smi --query-gpu=index,name,memory.total,memory.used,
/// utilization.gpu --format=csv,noheader,nounits` output. Fields the driver
/// cannot report (`[N/A]`, `[Not Supported]`) read as 0, except the index.
pub fn parse(out: &str) -> Result<Vec<GpuInfo>, GpuError> {
    let mut gpus = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = |why: String| GpuError::Parse {
            line: line.to_string(),
            why,
        };
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 5 {
            return Err(bad(format!("expected 5 fields, found {}", f.len())));
        }
        // A GPU name could hold a comma; the numbers are the last three fields.
        let n = f.len();
        let index = f[0]
            .parse()
            .map_err(|e| bad(format!("index {:?}: {e}", f[0])))?;
        let name = f[1..n - 3].join(", ");
        let num = |s: &str| -> Result<u64, GpuError> {
            if s.starts_with('[') || s.eq_ignore_ascii_case("N/A") {
                return Ok(0);
            }
            // Some drivers print decimals for utilisation.
            s.parse::<u64>()
                .or_else(|_| s.parse::<f64>().map(|v| v.max(0.0).round() as u64))
                .map_err(|e| bad(format!("number {s:?}: {e}")))
        };
        gpus.push(GpuInfo {
            index,
            name,
            memory_total_mib: num(f[n - 3])?,
            memory_used_mib: num(f[n - 2])?,
            utilization_pct: num(f[n - 1])?.min(100) as u32,
        });
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_output() {
        let out = "0, NVIDIA H100 80GB HBM3, 81559, 0, 0\n\
                   1, NVIDIA H100 80GB HBM3, 81559, 40213, 97\n";
        let g = parse(out).unwrap();
        assert_eq!(
            g[0],
            GpuInfo {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_mib: 81559,
                memory_used_mib: 0,
                utilization_pct: 0,
            }
        );
        assert_eq!(g[1].memory_used_mib, 40213);
        assert_eq!(g[1].utilization_pct, 97);
    }

    #[test]
    fn parses_odd_fields() {
        let out =
            "  0 ,  Tesla T4 ,15360 , 3 , [N/A]  \n\n2, Weird, Name, 100, [Not Supported], 5.6\n";
        let g = parse(out).unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "Tesla T4");
        assert_eq!(g[0].utilization_pct, 0);
        assert_eq!(g[1].index, 2);
        assert_eq!(g[1].name, "Weird, Name");
        assert_eq!(g[1].memory_used_mib, 0);
        assert_eq!(g[1].utilization_pct, 6);
        assert!(parse("0, only, two").is_err());
        assert!(parse("x, a, 1, 2, 3").is_err());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn fixture_and_missing_binary() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let smi = NvidiaSmi {
            path: Some(fixtures.into_os_string()),
        };
        let g = smi.discover().unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[1].index, 1);
        assert_eq!(g[1].name, "Fake GPU");
        assert_eq!(g[1].memory_total_mib, 16384);
        let none = NvidiaSmi {
            path: Some("/nonexistent".into()),
        };
        assert!(matches!(none.discover(), Err(GpuError::NotFound)));
        assert_eq!(Fixed(g.clone()).discover().unwrap(), g);
    }
}
