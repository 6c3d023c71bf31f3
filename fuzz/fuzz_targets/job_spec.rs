//! A job spec as the `Jobs` service decodes it, into the agent's checks
//! (`Jobs::check_spec`: command, GPUs, placement, image name, relative
//! paths): never a panic, and an accepted spec names only paths inside the
//! tree.
#![no_main]

use std::sync::OnceLock;

use bridge_agent::gpu::{Fixed, GpuInfo};
use bridge_agent::jobs::Jobs;
use bridge_proto::path::RelPath;
use bridge_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn jobs() -> &'static Jobs {
    static JOBS: OnceLock<Jobs> = OnceLock::new();
    JOBS.get_or_init(|| {
        let root = bridge_fuzz::fresh("job_spec");
        let gpus = (0..4)
            .map(|index| GpuInfo {
                index,
                name: "fuzz".into(),
                memory_total_mib: 81_559,
                memory_used_mib: 0,
                utilization_pct: 0,
            })
            .collect();
        Jobs::open(&root, Box::new(Fixed(gpus))).expect("jobs")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = v1::JobSpec::decode(data) else {
        return;
    };
    if jobs().check_spec(&spec).is_ok() {
        for p in &spec.outputs {
            assert!(RelPath::check(p.trim_matches('/')).is_ok(), "output {p:?}");
        }
        for p in spec.setup_inputs.iter().chain([&spec.workdir]) {
            let p = p.trim_matches('/');
            assert!(
                p.is_empty() || p == "." || RelPath::check(p).is_ok(),
                "{p:?}"
            );
        }
    }
});
