//! The closed loop: a publisher may be at most `window` messages ahead of its slowest
//! subscriber, so saturation is measured without unbounded queues anywhere.
//!
//! [`Window`] is the publisher's own arithmetic (pure, no clock). [`Progress`] is what the
//! subscribers share with the publishers: for each (publisher, subscriber) pair, how far the
//! subscriber has got. A blocked publisher waits until *every* subscriber has reached a target
//! half a window back, then sends the next half window in one go; subscribers wake it only when
//! they cross that target, so the cost per message stays flat with a thousand subscribers.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Progress value of a subscriber that has gone away: it never holds a publisher back.
pub const GONE: u64 = u64::MAX;

/// A publisher's view of its window.
#[derive(Debug, Clone)]
pub struct Window {
    size: u64,
    sent: u64,
    /// Progress every subscriber is known to have reached.
    floor: u64,
}

impl Window {
    /// A window of `size` messages (at least 1).
    pub fn new(size: u64) -> Self {
        Self {
            size: size.max(1),
            sent: 0,
            floor: 0,
        }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// How many more messages may be sent now.
    pub fn allowance(&self) -> u64 {
        (self.floor + self.size).saturating_sub(self.sent)
    }

    /// Account for `n` messages sent (never more than [`Window::allowance`]).
    pub fn record_sent(&mut self, n: u64) {
        self.sent += n;
    }

    /// The progress every subscriber must reach before a blocked publisher resumes: half a
    /// window behind what was sent (hysteresis, so wake-ups come once per half window).
    pub fn resume_at(&self) -> u64 {
        let half = (self.size / 2).max(1);
        (self.sent + half).saturating_sub(self.size).max(self.floor)
    }

    /// Every subscriber has reached `progress` (capped at what was sent).
    pub fn advance(&mut self, progress: u64) {
        self.floor = self.floor.max(progress.min(self.sent));
    }
}

/// How far each subscriber has got with each publisher's messages, shared by all tasks.
#[derive(Debug)]
pub struct Progress {
    subscribers: usize,
    /// `[publisher * subscribers + subscriber]`: highest sequence number seen + 1, or [`GONE`].
    seen: Box<[AtomicU64]>,
    /// Per publisher: the progress it is waiting for (0 while it is not blocked).
    need: Box<[AtomicU64]>,
    /// Per publisher: woken when a subscriber crosses its `need`.
    wake: Box<[Notify]>,
}

impl Progress {
    /// Progress of `subscribers` subscribers over `publishers` publishers, all at zero.
    pub fn new(publishers: usize, subscribers: usize) -> Self {
        Self {
            subscribers,
            seen: (0..publishers * subscribers)
                .map(|_| AtomicU64::new(0))
                .collect(),
            need: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            wake: (0..publishers).map(|_| Notify::new()).collect(),
        }
    }

    fn slot(&self, publisher: usize, subscriber: usize) -> Option<&AtomicU64> {
        self.seen.get(publisher * self.subscribers + subscriber)
    }

    /// Subscriber side: its progress with `publisher` went from `old` to `new`. Wakes the
    /// publisher if this crosses the value it waits for.
    pub fn update(&self, publisher: usize, subscriber: usize, old: u64, new: u64) {
        let Some(slot) = self.slot(publisher, subscriber) else {
            return;
        };
        slot.store(new, Ordering::SeqCst);
        if let Some(need) = self.need.get(publisher) {
            let need = need.load(Ordering::SeqCst);
            if old < need
                && new >= need
                && let Some(w) = self.wake.get(publisher)
            {
                w.notify_one();
            }
        }
    }

    /// Subscriber side: this subscriber is gone and must hold no publisher back.
    pub fn gone(&self, subscriber: usize) {
        for p in 0..self.need.len() {
            if let Some(slot) = self.slot(p, subscriber) {
                slot.store(GONE, Ordering::SeqCst);
            }
            if let Some(w) = self.wake.get(p) {
                w.notify_one();
            }
        }
    }

    /// Publisher side: announce the progress this publisher now waits for.
    pub fn wait_for(&self, publisher: usize, target: u64) {
        if let Some(n) = self.need.get(publisher) {
            n.store(target, Ordering::SeqCst);
        }
    }

    /// Publisher side: the first subscriber at or after `from` whose progress is below
    /// `target`, with its progress; `None` when all of them have reached it.
    pub fn first_behind(&self, publisher: usize, from: usize, target: u64) -> Option<(usize, u64)> {
        (from..self.subscribers).find_map(|s| {
            let v = self.slot(publisher, s)?.load(Ordering::SeqCst);
            (v < target).then_some((s, v))
        })
    }

    /// The progress of the slowest subscriber still connected ([`GONE`] if none is).
    pub fn min(&self, publisher: usize) -> u64 {
        (0..self.subscribers)
            .filter_map(|s| self.slot(publisher, s))
            .map(|a| a.load(Ordering::SeqCst))
            .min()
            .unwrap_or(GONE)
    }

    /// Publisher side: a future that completes when a subscriber crosses the awaited value
    /// (or a wake-up was stored since the last wait).
    pub fn notified(&self, publisher: usize) -> Option<Notified<'_>> {
        self.wake.get(publisher).map(Notify::notified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_blocks_then_resumes_at_half() {
        let mut w = Window::new(10);
        assert_eq!(w.allowance(), 10);
        w.record_sent(10);
        assert_eq!(w.allowance(), 0);
        // Resume once everyone is at most half a window behind.
        assert_eq!(w.resume_at(), 5);
        w.advance(3);
        assert_eq!(w.allowance(), 3);
        w.advance(5);
        assert_eq!(w.allowance(), 5);
        // Progress never goes back, and never past what was sent.
        w.advance(2);
        assert_eq!(w.allowance(), 5);
        w.advance(1_000);
        assert_eq!(w.allowance(), 10);
    }

    #[test]
    fn window_of_one_is_lockstep() {
        let mut w = Window::new(0);
        assert_eq!(w.allowance(), 1);
        w.record_sent(1);
        assert_eq!(w.allowance(), 0);
        assert_eq!(w.resume_at(), 1);
        w.advance(1);
        assert_eq!(w.allowance(), 1);
    }

    #[test]
    fn progress_finds_the_slowest_and_ignores_the_gone() {
        let p = Progress::new(2, 3);
        p.update(0, 0, 0, 10);
        p.update(0, 1, 0, 4);
        p.update(0, 2, 0, 7);
        assert_eq!(p.first_behind(0, 0, 5), Some((1, 4)));
        assert_eq!(p.first_behind(0, 2, 5), None);
        assert_eq!(p.min(0), 4);
        assert_eq!(p.min(1), 0);
        p.gone(1);
        assert_eq!(p.first_behind(0, 0, 5), None);
        assert_eq!(p.min(0), 7);
    }

    #[tokio::test]
    async fn crossing_the_target_wakes_the_publisher() {
        let p = Progress::new(1, 2);
        p.wait_for(0, 5);
        // Below the target: no wake-up stored.
        p.update(0, 0, 0, 4);
        let woke =
            tokio::time::timeout(std::time::Duration::from_millis(20), p.notified(0).unwrap())
                .await;
        assert!(woke.is_err());
        // Crossing stores one, even before anyone waits.
        p.update(0, 0, 4, 6);
        tokio::time::timeout(std::time::Duration::from_secs(1), p.notified(0).unwrap())
            .await
            .unwrap();
    }
}
