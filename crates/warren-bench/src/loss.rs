//! Loss and order accounting for one (subscriber, publisher) pair, from sequence numbers alone.
//!
//! MQTT keeps one publisher's messages in order on one topic, so a sequence number below the
//! highest seen is a duplicate (a QoS 1 redelivery). What was sent and never arrived is lost;
//! the count is only final once publishing stopped and in-flight messages had time to land.

/// What one subscriber saw of one publisher's messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeqTracker {
    /// Highest sequence number seen + 1.
    next: u64,
    /// Messages received, duplicates included.
    received: u64,
    /// Messages whose sequence number was below `next` on arrival.
    late: u64,
}

impl SeqTracker {
    /// Account for the message with sequence number `seq`.
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if seq >= self.next {
            self.next = seq + 1;
        } else {
            self.late += 1;
        }
    }

    /// How far this subscriber has got (the closed loop's measure): highest sequence + 1.
    pub fn progress(&self) -> u64 {
        self.next
    }

    /// Messages received, duplicates included.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Messages that arrived behind a later one: duplicates, or reordering by the server.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Of the `sent` messages, how many never arrived.
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.received - self.late)
    }

    /// Fold another tracker's counts into this one (for totals over subscribers).
    pub fn merge_counts(&mut self, other: &SeqTracker) {
        self.received += other.received;
        self.late += other.late;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_delivery_loses_nothing() {
        let mut t = SeqTracker::default();
        for s in 0..100 {
            t.record(s);
        }
        assert_eq!(t.progress(), 100);
        assert_eq!(t.lost(100), 0);
        assert_eq!(t.late(), 0);
        // Messages still in flight count as lost until they arrive.
        assert_eq!(t.lost(105), 5);
    }

    #[test]
    fn gaps_are_lost_and_duplicates_do_not_hide_them() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 4, 5, 5] {
            t.record(s);
        }
        assert_eq!(t.progress(), 6);
        assert_eq!(t.received(), 5);
        assert_eq!(t.late(), 1);
        // 0, 1, 4 and 5 arrived (5 twice): of 6 sent, 2 and 3 are lost.
        assert_eq!(t.lost(6), 2);
    }

    #[test]
    fn nothing_received_means_everything_lost() {
        let t = SeqTracker::default();
        assert_eq!(t.lost(42), 42);
        let mut total = SeqTracker::default();
        total.merge_counts(&t);
        assert_eq!(total, t);
    }
}
