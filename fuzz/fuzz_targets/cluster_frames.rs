//! The cluster protocol's frames (`bridge-agent worker` ↔ the head), on any
//! bytes: frames or a clean error, never a panic or a frame over the cap;
//! each JSON payload decodes or is refused.
#![no_main]

use bridge_agent::cluster::wire::{self, Entry, Exit, Hello, Job, Kind, MAX_FRAME, Welcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = data;
        while let Ok(Some(f)) = wire::read(&mut r).await {
            assert!(f.payload.len() <= MAX_FRAME);
            let _ = match f.kind {
                Kind::Hello => f.json::<Hello>().map(drop),
                Kind::Welcome => f.json::<Welcome>().map(drop),
                Kind::Entry | Kind::Output => f.json::<Entry>().map(drop),
                Kind::Job => f.json::<Job>().map(drop),
                Kind::Exit => f.json::<Exit>().map(drop),
                Kind::Data | Kind::Log | Kind::Done => Ok(()),
            };
        }
    });
});
