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

/// A one-byte change in a 200 MB file (~3,000 chunks) sends one chunk and a
/// splice of the agent's chunk list, not the whole list (~120 KB).
#[test]
fn a_small_change_in_a_big_file_sends_a_splice_not_its_chunk_list() {
    let r = Repo::new();
    r.write("weights.bin", random_bytes(200 * 1000 * 1000, 21));
    r.up();
    for round in 0..2u8 {
        let at = 50 * 1000 * 1000 + u64::from(round);
        let before = r.status()["bytes_sent"].as_u64().unwrap();
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(r.path("weights.bin"))
                .unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[round.wrapping_add(0x5a)]).unwrap();
        }
        r.sync_wait();
        let sent = r.status()["bytes_sent"].as_u64().unwrap() - before;
        // The bodies of the chunks that changed (the one holding the byte,
        // and the next when the cut moved) plus a few hundred bytes of plan.
        let content = std::fs::read(r.path("weights.bin")).unwrap();
        let chunks = bridge_proto::chunking::chunk_bytes(&content).chunks;
        let mut start = 0u64;
        let i = chunks
            .iter()
            .position(|c| {
                start += u64::from(c.len);
                start > at
            })
            .unwrap();
        let bodies: u64 = chunks[i..(i + 2).min(chunks.len())]
            .iter()
            .map(|c| u64::from(c.len))
            .sum();
        assert!(
            sent < bodies + 8_000,
            "change {round}: one byte changed in 200 MB sent {sent} bytes (changed chunks: {bodies})"
        );
        r.assert_mirror_exact();
    }
}
