//! Whether a round compresses chunk bodies, decided by measuring.
//!
//! zstd level 1 compresses text at ~285 MiB/s per core. On a slow link that
//! multiplies what the link carries; on a fast one the compressor is the
//! bottleneck, and where the link's cost is CPU on the same machines (an SSH
//! tunnel's encryption, the agent's decompression) it also takes that CPU
//! away. Neither a rule on the link's rate nor one on the sender's waiting
//! tells the two apart on shared cores, so the sender measures the outcome.
//!
//! The bodies go in epochs of [`EPOCH_BYTES`] raw bytes. While compressing,
//! each epoch notes the share of the sender's time spent in zstd; while that
//! share stays under [`SUSPECT_SHARE`] compression cannot be what limits the
//! round (a slow link, or incompressible data that stopped trying) and
//! nothing is probed. Otherwise the next four epochs are a probe, on, off,
//! off, on (a drift in the data cancels out), and the mode that moved raw
//! bytes faster by [`MARGIN`] is kept for a while: longer each time the same
//! mode wins again, since the same link usually gives the same answer.

use std::time::{Duration, Instant};

/// Raw bytes per epoch.
const EPOCH_BYTES: u64 = 24 << 20;
/// The first bytes of an epoch are not timed: until then the queues towards
/// the agent still drain data sent in the previous epoch's mode.
const SETTLE_IN_BYTES: u64 = 8 << 20;
/// While compressing, a share of the sender's time in zstd below this means
/// compression is not the bottleneck: no probe.
const SUSPECT_SHARE: f64 = 0.2;
/// A mode wins a probe only by this factor (else the current one stays).
const MARGIN: f64 = 1.05;
/// Epochs a probe's winner runs before the next probe (first, and at most).
const SETTLE_EPOCHS: (u32, u32) = (4, 64);
/// The probe's modes, in order.
const PROBE: [bool; 4] = [true, false, false, true];

/// The compression decision, kept across rounds (the link stays the same).
pub(super) struct Adaptive {
    on: bool,
    /// `Some(step)` while probing.
    probe: Option<usize>,
    /// Raw bytes and timed seconds per mode during the probe (off, on).
    probed: [(u64, f64); 2],
    /// Epochs until the next probe may start, and the length of the last wait.
    settle_left: u32,
    settle: u32,
    epoch: Epoch,
    /// One compression context for every chunk.
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

#[derive(Default)]
struct Epoch {
    bytes: u64,
    timed_from: Option<Instant>,
    timed_bytes: u64,
    in_zstd: Duration,
}

impl Adaptive {
    /// Starts compressing (a link that is not local).
    pub(super) fn new() -> Adaptive {
        Adaptive {
            on: true,
            probe: None,
            probed: [(0, 0.0); 2],
            settle_left: 0,
            settle: SETTLE_EPOCHS.0,
            epoch: Epoch::default(),
            zstd: None,
        }
    }

    /// Whether the next chunk should be compressed (if its file compresses).
    pub(super) fn on(&self) -> bool {
        match self.probe {
            Some(step) => PROBE[step],
            None => self.on,
        }
    }

    /// A round starts: the time since the last one is not link time.
    pub(super) fn new_round(&mut self) {
        self.epoch = Epoch::default();
    }

    /// Compresses `raw` at level 1, timing it; `None` when zstd fails.
    pub(super) fn compress(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let t0 = Instant::now();
        if self.zstd.is_none() {
            self.zstd = zstd::bulk::Compressor::new(1).ok();
        }
        let z = self.zstd.as_mut()?.compress(raw).ok();
        if self.epoch.timed_from.is_some() {
            self.epoch.in_zstd += t0.elapsed();
        }
        z
    }

    /// A chunk of `raw` bytes has been handed to the link at `now`.
    pub(super) fn sent(&mut self, raw: u64, now: Instant) {
        let e = &mut self.epoch;
        e.bytes += raw;
        match e.timed_from {
            Some(_) => e.timed_bytes += raw,
            None if e.bytes >= SETTLE_IN_BYTES => e.timed_from = Some(now),
            None => {}
        }
        if e.bytes >= EPOCH_BYTES {
            let secs = e.timed_from.map_or(0.0, |t| (now - t).as_secs_f64());
            let (bytes, in_zstd) = (e.timed_bytes, e.in_zstd.as_secs_f64());
            self.epoch = Epoch::default();
            if bytes > 0 && secs > 0.0 {
                self.end_epoch(bytes, secs, in_zstd);
            }
        }
    }

    fn end_epoch(&mut self, bytes: u64, secs: f64, in_zstd: f64) {
        tracing::trace!(
            mode = self.on(),
            mib_s = bytes as f64 / secs / (1 << 20) as f64,
            zstd_share = in_zstd / secs,
            "compression epoch"
        );
        let Some(step) = self.probe else {
            self.settle_left = self.settle_left.saturating_sub(1);
            let suspect = !self.on || in_zstd / secs >= SUSPECT_SHARE;
            if suspect && self.settle_left == 0 {
                self.probe = Some(0);
                self.probed = [(0, 0.0); 2];
            }
            return;
        };
        let m = &mut self.probed[PROBE[step] as usize];
        m.0 += bytes;
        m.1 += secs;
        if step + 1 < PROBE.len() {
            self.probe = Some(step + 1);
            return;
        }
        self.probe = None;
        let rate = |(b, s): (u64, f64)| b as f64 / s;
        let (off, on) = (rate(self.probed[0]), rate(self.probed[1]));
        let was = self.on;
        if on > off * MARGIN {
            self.on = true;
        } else if off > on * MARGIN {
            self.on = false;
        }
        self.settle = if self.on == was {
            (self.settle * 2).min(SETTLE_EPOCHS.1)
        } else {
            SETTLE_EPOCHS.0
        };
        self.settle_left = self.settle;
        tracing::debug!(
            on_mib_s = on / (1 << 20) as f64,
            off_mib_s = off / (1 << 20) as f64,
            compress = self.on,
            "compression probe"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds epochs at the given raw rates (MiB/s) and zstd share; returns
    /// the mode after each epoch.
    fn run(a: &mut Adaptive, epochs: usize, rate: impl Fn(bool) -> (f64, f64)) -> Vec<bool> {
        let mut now = Instant::now();
        let chunk = 1u64 << 20;
        let mut modes = Vec::new();
        for _ in 0..epochs {
            for _ in 0..EPOCH_BYTES / chunk {
                let on = a.on();
                let (mib_s, share) = rate(on);
                let dt = Duration::from_secs_f64(1.0 / mib_s);
                if on && a.epoch.timed_from.is_some() {
                    a.epoch.in_zstd += dt.mul_f64(share);
                }
                now += dt;
                a.sent(chunk, now);
            }
            modes.push(a.on());
        }
        modes
    }

    #[test]
    fn compression_that_slows_the_round_is_turned_off_and_probed_again_later() {
        let mut a = Adaptive::new();
        // Compressing costs half the sender's time and the round goes slower.
        let modes = run(&mut a, 6, |on| if on { (100.0, 0.5) } else { (140.0, 0.0) });
        assert!(!a.on, "{modes:?}");
        // It stays off for the settling epochs, then probes again, and
        // settles longer after the same answer.
        let modes = run(&mut a, SETTLE_EPOCHS.0 as usize + 4, |on| {
            if on { (100.0, 0.5) } else { (140.0, 0.0) }
        });
        assert!(modes.contains(&true), "probed again: {modes:?}");
        assert!(!a.on);
        assert_eq!(a.settle, SETTLE_EPOCHS.0 * 2);
    }

    #[test]
    fn compression_on_a_slow_link_stays_on_without_probing() {
        let mut a = Adaptive::new();
        // A slow link: zstd takes a tenth of the time; nothing is probed.
        let modes = run(&mut a, 20, |on| if on { (30.0, 0.1) } else { (10.0, 0.0) });
        assert!(modes.iter().all(|m| *m), "{modes:?}");
        assert!(a.probe.is_none());
    }

    #[test]
    fn compression_that_pays_wins_its_probe() {
        let mut a = Adaptive::new();
        // A fast link where the compressor is busy but still the better way.
        let modes = run(&mut a, 8, |on| if on { (250.0, 0.8) } else { (110.0, 0.0) });
        assert!(a.on, "{modes:?}");
        assert!(modes.contains(&false), "it was probed: {modes:?}");
    }

    #[test]
    fn a_tie_keeps_the_current_mode_and_a_new_round_drops_the_partial_epoch() {
        let mut a = Adaptive::new();
        run(&mut a, 6, |_| (100.0, 0.5));
        assert!(a.on);
        a.sent(SETTLE_IN_BYTES + 1, Instant::now());
        assert!(a.epoch.timed_from.is_some());
        a.new_round();
        assert_eq!(a.epoch.bytes, 0);
        assert!(a.epoch.timed_from.is_none());
    }

    #[test]
    fn compressed_bodies_inflate_back() {
        let mut a = Adaptive::new();
        let text = b"the same line again and again\n".repeat(4000);
        let z = a.compress(&text).unwrap();
        assert!(z.len() < text.len() / 10);
        assert_eq!(zstd::bulk::decompress(&z, text.len()).unwrap(), text);
    }
}
