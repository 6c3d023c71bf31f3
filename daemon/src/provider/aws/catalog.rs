//! The GPU instance types bridge picks from: `--gpu N` and `--gpu-type`
//! choose a row, `--instance-type` names one directly.
//!
//! Prices are us-east-1 on-demand list prices in USD per hour (Linux), as
//! published by AWS in 2025; other regions differ by a few percent. They are
//! shown before launching and used for `bridge status`'s cost so far, both
//! marked as estimates.

/// One instance type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceType {
    pub name: &'static str,
    /// `T4`, `A10G`, `L4`, `A100`, `H100`.
    pub gpu: &'static str,
    pub gpus: u32,
    /// Memory of one GPU.
    pub gpu_mem_gib: u32,
    pub vcpus: u32,
    pub mem_gib: u32,
    pub usd_per_hour: f64,
}

const fn row(
    name: &'static str,
    gpu: &'static str,
    gpus: u32,
    gpu_mem_gib: u32,
    vcpus: u32,
    mem_gib: u32,
    usd_per_hour: f64,
) -> InstanceType {
    InstanceType {
        name,
        gpu,
        gpus,
        gpu_mem_gib,
        vcpus,
        mem_gib,
        usd_per_hour,
    }
}

/// The table, cheapest first within a family.
pub const TYPES: &[InstanceType] = &[
    row("g4dn.xlarge", "T4", 1, 16, 4, 16, 0.526),
    row("g4dn.2xlarge", "T4", 1, 16, 8, 32, 0.752),
    row("g4dn.12xlarge", "T4", 4, 16, 48, 192, 3.912),
    row("g4dn.metal", "T4", 8, 16, 96, 384, 7.824),
    row("g5.xlarge", "A10G", 1, 24, 4, 16, 1.006),
    row("g5.2xlarge", "A10G", 1, 24, 8, 32, 1.212),
    row("g5.12xlarge", "A10G", 4, 24, 48, 192, 5.672),
    row("g5.48xlarge", "A10G", 8, 24, 192, 768, 16.288),
    row("g6.xlarge", "L4", 1, 24, 4, 16, 0.805),
    row("g6.2xlarge", "L4", 1, 24, 8, 32, 0.978),
    row("g6.12xlarge", "L4", 4, 24, 48, 192, 4.602),
    row("g6.48xlarge", "L4", 8, 24, 192, 768, 13.350),
    row("p4d.24xlarge", "A100", 8, 40, 96, 1152, 21.958),
    row("p5.48xlarge", "H100", 8, 80, 192, 2048, 55.040),
];

/// The GPU names `--gpu-type` accepts.
pub const GPU_TYPES: &[&str] = &["T4", "A10G", "L4", "A100", "H100"];

/// The row of a type name, if bridge knows it.
pub fn lookup(name: &str) -> Option<&'static InstanceType> {
    TYPES.iter().find(|t| t.name == name)
}

/// Why no row fits a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("unknown GPU type {0:?}; choose one of {list}", list = GPU_TYPES.join(", "))]
    UnknownGpu(String),
    #[error(
        "no instance type in bridge's table has {want}{gpu} GPUs (at most {max}); pass --instance-type to choose one yourself"
    )]
    TooMany { want: u32, gpu: String, max: u32 },
    #[error("--gpu 0 needs --instance-type (bridge's table lists GPU instances only)")]
    NoGpu,
}

/// The cheapest type with at least `gpus` GPUs, of `gpu` when given (in
/// any case), among `offered` (all rows when `None`).
pub fn choose(
    gpus: u32,
    gpu: Option<&str>,
    offered: Option<&[String]>,
) -> Result<&'static InstanceType, ChooseError> {
    if gpus == 0 {
        return Err(ChooseError::NoGpu);
    }
    let gpu = match gpu {
        Some(g) => Some(
            *GPU_TYPES
                .iter()
                .find(|k| k.eq_ignore_ascii_case(g))
                .ok_or_else(|| ChooseError::UnknownGpu(g.to_string()))?,
        ),
        None => None,
    };
    let kind = |t: &&InstanceType| gpu.is_none_or(|g| t.gpu == g);
    let available = |t: &&InstanceType| offered.is_none_or(|o| o.iter().any(|n| n == t.name));
    TYPES
        .iter()
        .filter(kind)
        .filter(available)
        .filter(|t| t.gpus >= gpus)
        .min_by(|a, b| {
            (a.gpus, a.usd_per_hour)
                .partial_cmp(&(b.gpus, b.usd_per_hour))
                .expect("prices are finite")
        })
        .ok_or_else(|| ChooseError::TooMany {
            want: gpus,
            gpu: gpu.map(|g| format!(" {g}")).unwrap_or_default(),
            max: TYPES.iter().filter(kind).map(|t| t.gpus).max().unwrap_or(0),
        })
}

/// `1× NVIDIA A10G (24 GiB), 4 vCPUs, 16 GiB RAM`
pub fn describe(t: &InstanceType) -> String {
    format!(
        "{}× NVIDIA {} ({} GiB), {} vCPUs, {} GiB RAM",
        t.gpus, t.gpu, t.gpu_mem_gib, t.vcpus, t.mem_gib
    )
}

/// The EC2 vCPU quota an instance type counts against, for messages:
/// (name, quota code).
pub fn vcpu_quota(instance_type: &str, spot: bool) -> (&'static str, &'static str) {
    let p_family = instance_type.starts_with('p');
    match (p_family, spot) {
        (false, false) => ("Running On-Demand G and VT instances", "L-DB2E81BA"),
        (false, true) => ("All G and VT Spot Instance Requests", "L-3819A6DF"),
        (true, false) => ("Running On-Demand P instances", "L-417A185B"),
        (true, true) => ("All P Spot Instance Requests", "L-7212CCBC"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_cheapest_fit() {
        assert_eq!(choose(1, None, None).unwrap().name, "g4dn.xlarge");
        assert_eq!(choose(1, Some("a10g"), None).unwrap().name, "g5.xlarge");
        assert_eq!(choose(2, Some("L4"), None).unwrap().name, "g6.12xlarge");
        assert_eq!(choose(8, Some("H100"), None).unwrap().name, "p5.48xlarge");
        assert_eq!(choose(1, Some("A100"), None).unwrap().name, "p4d.24xlarge");
    }

    #[test]
    fn respects_what_the_region_offers() {
        let offered = vec!["g6.xlarge".to_string(), "g5.xlarge".to_string()];
        assert_eq!(choose(1, None, Some(&offered)).unwrap().name, "g6.xlarge");
        assert!(matches!(
            choose(1, Some("T4"), Some(&offered)),
            Err(ChooseError::TooMany { .. })
        ));
    }

    #[test]
    fn refuses_what_it_cannot_satisfy() {
        assert_eq!(
            choose(1, Some("V100"), None).unwrap_err().to_string(),
            "unknown GPU type \"V100\"; choose one of T4, A10G, L4, A100, H100"
        );
        assert!(
            choose(16, None, None)
                .unwrap_err()
                .to_string()
                .contains("at most 8")
        );
        assert_eq!(choose(0, None, None).unwrap_err(), ChooseError::NoGpu);
    }

    #[test]
    fn every_row_is_consistent() {
        for t in TYPES {
            assert!(GPU_TYPES.contains(&t.gpu), "{}", t.name);
            assert!(t.gpus >= 1 && t.usd_per_hour > 0.0, "{}", t.name);
        }
        assert_eq!(vcpu_quota("p5.48xlarge", true).1, "L-7212CCBC");
        assert_eq!(vcpu_quota("g5.xlarge", false).1, "L-DB2E81BA");
    }
}
