//! Dropped frames, copied out for `xskgate run --capture-drops` and the
//! admin endpoint's `/capture` (pcapng files with the reason in each
//! packet's comment).
//!
//! Contract: a worker offers each dropped frame with [`DropCapture::offer`];
//! it is copied (up to [`SNAPLEN`] bytes) only while a capture is on, for a
//! reason it asks for, within its rate (packets per second over all
//! workers). The copy goes into a slot taken from a fixed pool of
//! [`SLOTS`] preallocated slots through two bounded lock-free queues: the
//! worker never blocks, never allocates and makes no system call; when the
//! pool is empty (the reader is behind) the frame is counted as
//! `overflow` and not copied. Off, a worker pays one relaxed load per batch
//! ([`DropCapture::reasons`]). One reader at a time drains the queue
//! ([`DropCapture::drain`]).

use crate::verdict::DropReason;
use crossbeam_queue::ArrayQueue;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

/// Bytes of a frame kept (a full 1500-byte MTU frame with its Ethernet
/// and VLAN headers).
pub const SNAPLEN: usize = 1518;
/// Preallocated copies waiting for the reader.
pub const SLOTS: usize = 1024;
/// `--capture-rate`'s default: packets per second over all workers.
pub const DEFAULT_RATE: u32 = 1000;

/// One dropped frame, as copied.
pub struct Captured {
    /// Wall-clock time of the copy (since the Unix epoch).
    pub time: Duration,
    pub ifindex: u32,
    pub reason: DropReason,
    /// The frame's length on the wire.
    pub original_len: u32,
    /// Bytes of `data` that hold the frame (at most [`SNAPLEN`]).
    pub len: u16,
    pub data: [u8; SNAPLEN],
}

impl Captured {
    pub fn bytes(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

/// What a capture has done since it was turned on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub captured: u64,
    /// Left out: over the rate.
    pub rate_limited: u64,
    /// Left out: no free slot (the reader was behind).
    pub overflow: u64,
}

/// See the module documentation. Shared by the workers and the reader.
pub struct DropCapture {
    /// Bit `r` set: frames dropped for reason `r` are captured; 0: off.
    reasons: AtomicU64,
    rate: AtomicU64,
    /// The current one-second window: `second << 32 | frames taken in it`.
    window: AtomicU64,
    free: ArrayQueue<Box<Captured>>,
    full: ArrayQueue<Box<Captured>>,
    captured: AtomicU64,
    rate_limited: AtomicU64,
    overflow: AtomicU64,
}

impl Default for DropCapture {
    fn default() -> DropCapture {
        DropCapture::new()
    }
}

/// The mask of `reasons` (every reason if empty).
pub fn reason_mask(reasons: &[DropReason]) -> u64 {
    if reasons.is_empty() {
        return DropReason::ALL.iter().fold(0, |m, r| m | 1 << *r as u32);
    }
    reasons.iter().fold(0, |m, r| m | 1 << *r as u32)
}

impl DropCapture {
    /// A capture, off, with its slots allocated.
    pub fn new() -> DropCapture {
        let free = ArrayQueue::new(SLOTS);
        for _ in 0..SLOTS {
            let slot = Box::new(Captured {
                time: Duration::ZERO,
                ifindex: 0,
                reason: DropReason::Malformed,
                original_len: 0,
                len: 0,
                data: [0; SNAPLEN],
            });
            let _ = free.push(slot);
        }
        DropCapture {
            reasons: AtomicU64::new(0),
            rate: AtomicU64::new(u64::from(DEFAULT_RATE)),
            window: AtomicU64::new(0),
            free,
            full: ArrayQueue::new(SLOTS),
            captured: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            overflow: AtomicU64::new(0),
        }
    }

    /// Turns the capture on for the reasons of `mask` ([`reason_mask`]) at
    /// `rate` packets per second, its counters from zero.
    pub fn start(&self, mask: u64, rate: u32) {
        self.captured.store(0, Relaxed);
        self.rate_limited.store(0, Relaxed);
        self.overflow.store(0, Relaxed);
        self.rate.store(u64::from(rate.max(1)), Relaxed);
        self.reasons.store(mask, Relaxed);
    }

    /// Turns it off (frames already copied stay for [`DropCapture::drain`]).
    pub fn stop(&self) {
        self.reasons.store(0, Relaxed);
    }

    /// The reasons captured now (0: off): a worker reads this once per batch.
    #[inline]
    pub fn reasons(&self) -> u64 {
        self.reasons.load(Relaxed)
    }

    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            captured: self.captured.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            overflow: self.overflow.load(Relaxed),
        }
    }

    /// Whether one more frame fits this second's rate.
    fn take_token(&self, second: u64) -> bool {
        let rate = self.rate.load(Relaxed);
        self.window
            .fetch_update(Relaxed, Relaxed, |w| {
                let (at, n) = (w >> 32, w & 0xffff_ffff);
                if at != second {
                    Some(second << 32 | 1)
                } else if n < rate {
                    Some(w + 1)
                } else {
                    None
                }
            })
            .is_ok()
    }

    /// A worker's dropped frame: copied if the capture wants it (see the
    /// module documentation). `mask` is this batch's [`DropCapture::reasons`].
    #[cold]
    pub fn offer(&self, mask: u64, reason: DropReason, ifindex: u32, frame: &[u8]) {
        if mask & (1 << reason as u32) == 0 {
            return;
        }
        let time = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        if !self.take_token(time.as_secs()) {
            self.rate_limited.fetch_add(1, Relaxed);
            return;
        }
        let Some(mut slot) = self.free.pop() else {
            self.overflow.fetch_add(1, Relaxed);
            return;
        };
        let len = frame.len().min(SNAPLEN);
        slot.data[..len].copy_from_slice(&frame[..len]);
        slot.len = len as u16;
        slot.original_len = frame.len() as u32;
        slot.time = time;
        slot.ifindex = ifindex;
        slot.reason = reason;
        match self.full.push(slot) {
            Ok(()) => {
                self.captured.fetch_add(1, Relaxed);
            }
            // Cannot happen (as many slots as places), but never lose one.
            Err(slot) => {
                let _ = self.free.push(slot);
                self.overflow.fetch_add(1, Relaxed);
            }
        }
    }

    /// Hands every frame copied so far to `f`, oldest first, and returns
    /// the slots to the pool. Returns how many.
    pub fn drain(&self, mut f: impl FnMut(&Captured)) -> usize {
        let mut n = 0;
        while let Some(slot) = self.full.pop() {
            f(&slot);
            let _ = self.free.push(slot);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_captures_nothing_and_on_only_the_reasons_asked_for() {
        let c = DropCapture::new();
        c.offer(c.reasons(), DropReason::NoLocalEndpoints, 3, &[1, 2, 3]);
        assert_eq!(c.drain(|_| {}), 0);
        c.start(reason_mask(&[DropReason::NoLocalEndpoints]), 100);
        c.offer(c.reasons(), DropReason::NoLocalEndpoints, 3, &[1, 2, 3]);
        c.offer(c.reasons(), DropReason::Malformed, 3, &[4]);
        let mut got = Vec::new();
        c.drain(|p| got.push((p.reason, p.ifindex, p.bytes().to_vec(), p.original_len)));
        assert_eq!(got, vec![(DropReason::NoLocalEndpoints, 3, vec![1, 2, 3], 3)]);
        assert_eq!(c.stats().captured, 1);
    }

    #[test]
    fn rate_and_pool_limits_are_counted_and_long_frames_cut() {
        let c = DropCapture::new();
        c.start(reason_mask(&[]), 10);
        let long = vec![7u8; 4000];
        for _ in 0..25 {
            c.offer(c.reasons(), DropReason::SourceRange, 1, &long);
        }
        let s = c.stats();
        // A second boundary may fall inside the loop: at most two windows.
        assert!((10..=20).contains(&s.captured), "{s:?}");
        assert_eq!(s.captured + s.rate_limited, 25);
        c.drain(|p| assert_eq!((p.len as usize, p.original_len), (SNAPLEN, 4000)));

        c.start(reason_mask(&[]), u32::MAX);
        for _ in 0..SLOTS + 5 {
            c.offer(c.reasons(), DropReason::SourceRange, 1, &[0]);
        }
        assert_eq!(c.stats().overflow, 5, "a full pool is counted, never waited for");
        assert_eq!(c.drain(|_| {}), SLOTS);
        c.offer(c.reasons(), DropReason::SourceRange, 1, &[0]);
        assert_eq!(c.drain(|_| {}), 1, "drained slots are reused");
    }
}
