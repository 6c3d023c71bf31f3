use std::io::{Seek, SeekFrom, Write};

use bridge_tests::*;

#[test]
fn one_mib_changed_in_a_200_mb_file_sends_under_5_mb() {
    let r = Repo::new();
    r.write("weights.bin", random_bytes(200 * 1000 * 1000, 11));
    r.up();
    r.assert_mirror_exact();
    let before = r.status()["bytes_sent"].as_u64().unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(r.path("weights.bin"))
            .unwrap();
        f.seek(SeekFrom::Start(100 * 1000 * 1000)).unwrap();
        f.write_all(&random_bytes(1024 * 1024, 12)).unwrap();
    }
    r.sync_wait();
    let sent = r.status()["bytes_sent"].as_u64().unwrap() - before;
    assert!(
        sent < 5_000_000,
        "1 MiB changed in 200 MB sent {sent} bytes"
    );
    assert!(
        sent > 1_000_000,
        "the changed MiB must have been sent ({sent} bytes)"
    );
    r.assert_mirror_exact();
}
