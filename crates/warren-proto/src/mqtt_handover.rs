//! A persistent MQTT session moving from one gate to another (docs/protocols/mqtt.md, "Across
//! gates"): the answer of the gate module's `MqttTakeSession` call. When a `clean_session = 0`
//! client reconnects to another gate of the cluster, that gate asks the others for the session;
//! the gate holding it detaches it and answers with its transferable part in this binary form,
//! and the new gate rebuilds it.
//!
//! It arrives over the cluster's broker, where anyone who can publish can put bytes: the decoder
//! is pure and bounded. Every count and length is checked against the receiving gate's caps
//! ([`Limits`], from its `[limits]`) and against the bytes left before anything is allocated
//! (fuzzed: `fuzz/fuzz_targets/mqtt_handover_decode.rs`).
//!
//! Layout, integers big-endian:
//!
//! ```text
//! [version = 1][answer: 0 none | 1 refused | 2 session]
//! session:
//!   [flags: bit 0 = owner present]
//!   [client id length u16][client id][owner length u16][owner]   (owner only with bit 0)
//!   [expiry seconds u32, 0 = never][last packet id u16]
//!   [filter count u16] then per filter [length u16][filter][granted QoS]
//!   [awaiting count u16] then per id [packet id u16]               (inbound QoS 2, no PUBREL yet)
//!   [message count u32] then per message
//!     [flags: bit 0 retain, bit 1 in flight, bit 2 PUBREC'd][QoS 1 | 2][packet id u16]
//!     [topic length u16][topic][payload length u32][payload]
//! ```
//!
//! Messages come in their delivery order: those in flight (sent with a packet id, awaiting
//! PUBACK, PUBREC or PUBCOMP) first, then the queued ones.

use bytes::{BufMut, Bytes, BytesMut};

/// First byte: the version of the format.
pub const VERSION: u8 = 1;

/// Bytes of one message besides its topic and payload: flags, QoS, packet id, the two lengths.
pub const MESSAGE_OVERHEAD: usize = 10;

/// Bytes of one filter besides its text: its length and QoS.
pub const FILTER_OVERHEAD: usize = 3;

/// What one gate answers another that asks for a client id's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// This gate holds no session of the client id (any connection of it here was closed).
    None,
    /// A session or connection of the client id here belongs to another user: the connecting
    /// client is refused, as a takeover by another user is on one gate.
    Refused,
    /// The session, detached and removed from this gate.
    Session(Handover),
}

/// The transferable part of a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// The client id (not empty).
    pub client_id: String,
    /// The verified user that owns it (`None`: anonymous).
    pub owner: Option<String>,
    /// How long the session was to be kept without a connection, in seconds (0: for ever).
    pub expiry_s: u32,
    /// The last packet id the session used, so new ones continue after it.
    pub last_pkid: u16,
    /// Subscriptions: filter and granted QoS.
    pub filters: Vec<(String, u8)>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub awaiting: Vec<u16>,
    /// Outbound messages in delivery order: in flight first, then queued.
    pub messages: Vec<HandedMessage>,
}

/// An outbound QoS 1 / 2 message of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedMessage {
    /// The topic name.
    pub topic: Bytes,
    /// The payload, any bytes.
    pub payload: Bytes,
    /// 1 or 2.
    pub qos: u8,
    /// Sent as a retained copy (the retain flag set when framed).
    pub retain: bool,
    /// Where it is in its delivery.
    pub state: Delivery,
}

/// Where an outbound message is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Waiting for the inflight window.
    Queued,
    /// Sent with this packet id, not acknowledged: resent with DUP on reconnect.
    Sent {
        /// Its packet id (not 0).
        packet_id: u16,
    },
    /// QoS 2, PUBREC received: its PUBREL is resent on reconnect.
    Released {
        /// Its packet id (not 0).
        packet_id: u16,
    },
}

impl HandedMessage {
    /// Bytes it takes in the encoding.
    pub fn encoded_len(&self) -> usize {
        MESSAGE_OVERHEAD + self.topic.len() + self.payload.len()
    }
}

/// The receiving gate's caps on what it accepts (from its `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most subscriptions (`max_filters_per_session`).
    pub max_filters: usize,
    /// Longest filter or topic name (`max_topic_len`).
    pub max_topic_len: usize,
    /// Most outbound messages (`max_inflight_messages` + `max_queued_messages`).
    pub max_messages: usize,
    /// Most inbound QoS 2 ids awaiting PUBREL.
    pub max_awaiting: usize,
    /// Most bytes of the whole answer.
    pub max_bytes: usize,
}

/// Why an answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    /// The body ends before a field it announces.
    #[error("a session handover cut short: {0}")]
    Short(&'static str),
    /// A format this gate does not know.
    #[error("a session handover in format version {0} (this gate reads version 1)")]
    Version(u8),
    /// An answer kind other than none, refused or session.
    #[error("a session handover answer of unknown kind {0}")]
    Kind(u8),
    /// Bits set that the format does not define.
    #[error("a session handover with unknown flags {0:#04x}")]
    Flags(u8),
    /// Longer than the receiving gate accepts.
    #[error("a session handover of {size} bytes, more than the {max} accepted")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The cap.
        max: usize,
    },
    /// More entries of some kind than the receiving gate accepts.
    #[error("a session handover with {count} {what}, more than the {max} accepted")]
    TooMany {
        /// Which entries.
        what: &'static str,
        /// Announced.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// A client id, owner, filter or topic that is not valid.
    #[error("a session handover with an invalid {0}")]
    Invalid(&'static str),
    /// Bytes after the last message.
    #[error("a session handover with {0} bytes after its end")]
    Trailing(usize),
}

impl HandoverError {
    /// The refusal kind for logs and metrics.
    pub fn kind(&self) -> &'static str {
        "mqtt_handover_malformed"
    }
}

impl Answer {
    /// The body sent back to the asking gate. Lists longer than the format holds are cut (a
    /// gate never holds that many: its own caps are far lower).
    pub fn encode(&self) -> Bytes {
        let h = match self {
            Answer::None => return Bytes::from_static(&[VERSION, 0]),
            Answer::Refused => return Bytes::from_static(&[VERSION, 1]),
            Answer::Session(h) => h,
        };
        let size = 2
            + 1
            + 4
            + h.client_id.len()
            + h.owner.as_ref().map_or(0, String::len)
            + 6
            + 2
            + h.filters
                .iter()
                .map(|(f, _)| f.len() + FILTER_OVERHEAD)
                .sum::<usize>()
            + 2
            + h.awaiting.len() * 2
            + 4
            + h.messages
                .iter()
                .map(HandedMessage::encoded_len)
                .sum::<usize>();
        let mut b = BytesMut::with_capacity(size);
        b.put_slice(&[VERSION, 2, u8::from(h.owner.is_some())]);
        put_str16(&mut b, h.client_id.as_bytes());
        if let Some(o) = &h.owner {
            put_str16(&mut b, o.as_bytes());
        }
        b.put_u32(h.expiry_s);
        b.put_u16(h.last_pkid);
        let filters = &h.filters[..h.filters.len().min(usize::from(u16::MAX))];
        b.put_u16(filters.len() as u16);
        for (f, q) in filters {
            put_str16(&mut b, f.as_bytes());
            b.put_u8(*q);
        }
        let awaiting = &h.awaiting[..h.awaiting.len().min(usize::from(u16::MAX))];
        b.put_u16(awaiting.len() as u16);
        for id in awaiting {
            b.put_u16(*id);
        }
        let messages = &h.messages[..h.messages.len().min(u32::MAX as usize)];
        b.put_u32(messages.len() as u32);
        for m in messages {
            let (flag, pkid) = match m.state {
                Delivery::Queued => (0, 0),
                Delivery::Sent { packet_id } => (2, packet_id),
                Delivery::Released { packet_id } => (6, packet_id),
            };
            b.put_u8(flag | u8::from(m.retain));
            b.put_u8(m.qos);
            b.put_u16(pkid);
            put_str16(&mut b, &m.topic);
            let len = m.payload.len().min(u32::MAX as usize);
            b.put_u32(len as u32);
            b.put_slice(&m.payload[..len]);
        }
        b.freeze()
    }

    /// Read an answer another gate sent, under `limits`; every field is checked before it is
    /// used and every count before anything is allocated for it.
    pub fn decode(body: Bytes, limits: &Limits) -> Result<Answer, HandoverError> {
        if body.len() > limits.max_bytes {
            return Err(HandoverError::TooLarge {
                size: body.len(),
                max: limits.max_bytes,
            });
        }
        let mut r = Reader { body, at: 0 };
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(HandoverError::Version(version));
        }
        let answer = match r.u8("answer")? {
            0 => Answer::None,
            1 => Answer::Refused,
            2 => Answer::Session(session(&mut r, limits)?),
            k => return Err(HandoverError::Kind(k)),
        };
        let left = r.left();
        if left > 0 {
            return Err(HandoverError::Trailing(left));
        }
        Ok(answer)
    }
}

fn put_str16(b: &mut BytesMut, s: &[u8]) {
    let len = s.len().min(usize::from(u16::MAX));
    b.put_u16(len as u16);
    b.put_slice(&s[..len]);
}

fn session(r: &mut Reader, limits: &Limits) -> Result<Handover, HandoverError> {
    let flags = r.u8("flags")?;
    if flags & !1 != 0 {
        return Err(HandoverError::Flags(flags));
    }
    let client_id = r.string("client id", usize::from(u16::MAX))?;
    if client_id.is_empty() {
        return Err(HandoverError::Invalid("client id"));
    }
    let owner = if flags & 1 == 1 {
        Some(r.string("owner", usize::from(u16::MAX))?)
    } else {
        None
    };
    let expiry_s = r.u32("expiry")?;
    let last_pkid = r.u16("last packet id")?;

    let n = r.count16("filters", limits.max_filters, FILTER_OVERHEAD)?;
    let mut filters = Vec::with_capacity(n);
    for _ in 0..n {
        let f = r.string("filter", limits.max_topic_len)?;
        if !crate::mqtt::topic::valid_filter(&f) {
            return Err(HandoverError::Invalid("filter"));
        }
        let q = r.u8("granted QoS")?;
        if q > 2 {
            return Err(HandoverError::Invalid("granted QoS"));
        }
        filters.push((f, q));
    }

    let n = r.count16("awaiting ids", limits.max_awaiting, 2)?;
    let mut awaiting = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.u16("awaiting id")?;
        if id == 0 {
            return Err(HandoverError::Invalid("packet id"));
        }
        awaiting.push(id);
    }

    let count = r.u32("message count")? as usize;
    r.check_count("messages", count, limits.max_messages, MESSAGE_OVERHEAD)?;
    let mut messages = Vec::with_capacity(count);
    let mut queued_seen = false;
    for _ in 0..count {
        let flags = r.u8("message flags")?;
        if flags & !7 != 0 {
            return Err(HandoverError::Flags(flags));
        }
        let qos = r.u8("message QoS")?;
        if !(1..=2).contains(&qos) {
            return Err(HandoverError::Invalid("message QoS"));
        }
        let pkid = r.u16("packet id")?;
        let (retain, in_flight, released) = (flags & 1 == 1, flags & 2 == 2, flags & 4 == 4);
        let state = match (in_flight, released) {
            (false, false) if pkid == 0 => Delivery::Queued,
            (true, false) if pkid != 0 && !queued_seen => Delivery::Sent { packet_id: pkid },
            (true, true) if pkid != 0 && qos == 2 && !queued_seen => {
                Delivery::Released { packet_id: pkid }
            }
            _ => return Err(HandoverError::Invalid("message state")),
        };
        queued_seen |= state == Delivery::Queued;
        let tlen = usize::from(r.u16("topic length")?);
        if tlen > limits.max_topic_len {
            return Err(HandoverError::Invalid("topic"));
        }
        let topic = r.take(tlen, "topic")?;
        match std::str::from_utf8(&topic) {
            Ok(t) if crate::mqtt::topic::valid_topic_name(t) => {}
            _ => return Err(HandoverError::Invalid("topic")),
        }
        let plen = r.u32("payload length")? as usize;
        let payload = r.take(plen, "payload")?;
        messages.push(HandedMessage {
            topic,
            payload,
            qos,
            retain,
            state,
        });
    }
    Ok(Handover {
        client_id,
        owner,
        expiry_s,
        last_pkid,
        filters,
        awaiting,
        messages,
    })
}

/// A cursor over the body: every read checks what is left first.
struct Reader {
    body: Bytes,
    at: usize,
}

impl Reader {
    fn left(&self) -> usize {
        self.body.len() - self.at
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, HandoverError> {
        if n > self.left() {
            return Err(HandoverError::Short(what));
        }
        let b = self.body.slice(self.at..self.at + n);
        self.at += n;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], HandoverError> {
        if N > self.left() {
            return Err(HandoverError::Short(what));
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&self.body[self.at..self.at + N]);
        self.at += N;
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HandoverError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HandoverError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, HandoverError> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, HandoverError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(HandoverError::Invalid(what));
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| HandoverError::Invalid(what))
    }

    /// A u16 count, checked against `max` and against the bytes left (`min_size` each).
    fn count16(
        &mut self,
        what: &'static str,
        max: usize,
        min_size: usize,
    ) -> Result<usize, HandoverError> {
        let n = usize::from(self.u16(what)?);
        self.check_count(what, n, max, min_size)?;
        Ok(n)
    }

    fn check_count(
        &self,
        what: &'static str,
        count: usize,
        max: usize,
        min_size: usize,
    ) -> Result<(), HandoverError> {
        if count > max {
            return Err(HandoverError::TooMany { what, count, max });
        }
        if count.saturating_mul(min_size) > self.left() {
            return Err(HandoverError::Short(what));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_filters: 8,
            max_topic_len: 64,
            max_messages: 8,
            max_awaiting: 8,
            max_bytes: 1 << 20,
        }
    }

    fn msg(topic: &'static str, payload: &'static [u8], qos: u8, state: Delivery) -> HandedMessage {
        HandedMessage {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(payload),
            qos,
            retain: topic.ends_with("kept"),
            state,
        }
    }

    fn sample() -> Handover {
        Handover {
            client_id: "sensor-7".into(),
            owner: Some("ann".into()),
            expiry_s: 7200,
            last_pkid: 41,
            filters: vec![("t/#".into(), 1), ("a/+/b".into(), 2)],
            awaiting: vec![9, 12],
            messages: vec![
                msg("t/1", b"one", 2, Delivery::Released { packet_id: 40 }),
                msg("t/2", b"\x00\xff", 1, Delivery::Sent { packet_id: 41 }),
                msg("t/kept", b"", 1, Delivery::Queued),
                msg("t/3", b"three", 2, Delivery::Queued),
            ],
        }
    }

    #[test]
    fn answers_round_trip() {
        for a in [
            Answer::None,
            Answer::Refused,
            Answer::Session(sample()),
            Answer::Session(Handover {
                owner: None,
                filters: vec![],
                awaiting: vec![],
                messages: vec![],
                ..sample()
            }),
        ] {
            assert_eq!(Answer::decode(a.encode(), &limits()), Ok(a));
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let body = Answer::Session(sample()).encode();
        for n in 0..body.len() {
            assert!(
                Answer::decode(body.slice(..n), &limits()).is_err(),
                "{n} of {} bytes",
                body.len()
            );
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(
            Answer::decode(Bytes::from(long), &limits()),
            Err(HandoverError::Trailing(1))
        );
    }

    #[test]
    fn counts_over_the_limits_are_refused_before_allocating() {
        let body = Answer::Session(sample()).encode();
        let tight = |f: fn(&mut Limits)| {
            let mut l = limits();
            f(&mut l);
            Answer::decode(body.clone(), &l)
        };
        assert!(matches!(
            tight(|l| l.max_filters = 1),
            Err(HandoverError::TooMany {
                what: "filters",
                ..
            })
        ));
        assert!(matches!(
            tight(|l| l.max_awaiting = 1),
            Err(HandoverError::TooMany { .. })
        ));
        assert!(matches!(
            tight(|l| l.max_messages = 3),
            Err(HandoverError::TooMany {
                what: "messages",
                count: 4,
                ..
            })
        ));
        assert!(matches!(
            tight(|l| l.max_bytes = 10),
            Err(HandoverError::TooLarge { .. })
        ));
        assert_eq!(
            tight(|l| l.max_topic_len = 4),
            Err(HandoverError::Invalid("filter"))
        );
        // a huge count with few bytes behind it: refused without allocating for it
        let mut b = vec![VERSION, 2, 0, 0, 1, b'c', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        let big = Limits {
            max_messages: usize::MAX,
            ..limits()
        };
        assert_eq!(
            Answer::decode(Bytes::from(b), &big),
            Err(HandoverError::Short("messages"))
        );
    }

    #[test]
    fn bad_fields_are_refused() {
        let body = Answer::Session(sample()).encode();
        let with = |i: usize, v: u8| {
            let mut b = body.to_vec();
            b[i] = v;
            Answer::decode(Bytes::from(b), &limits())
        };
        assert_eq!(with(0, 2), Err(HandoverError::Version(2)));
        assert_eq!(with(1, 3), Err(HandoverError::Kind(3)));
        assert_eq!(with(2, 2), Err(HandoverError::Flags(2)));
        // the first filter's text: after the header, client id, owner, expiry, last packet id,
        // filter count and its own length
        let filter_at = 3 + (2 + 8) + (2 + 3) + 4 + 2 + 2 + 2;
        assert_eq!(&body[filter_at..filter_at + 3], b"t/#");
        assert_eq!(with(filter_at, b'#'), Err(HandoverError::Invalid("filter")));
        assert_eq!(
            with(filter_at + 3, 3),
            Err(HandoverError::Invalid("granted QoS"))
        );
        // an empty client id
        let empty = Answer::Session(Handover {
            client_id: String::new(),
            ..sample()
        });
        assert_eq!(
            Answer::decode(empty.encode(), &limits()),
            Err(HandoverError::Invalid("client id"))
        );
        // a message in flight after a queued one, a queued one with a packet id, QoS 0, a
        // QoS 1 message PUBREC'd, a wildcard topic
        for bad in [
            vec![
                msg("t", b"", 1, Delivery::Queued),
                msg("t", b"", 1, Delivery::Sent { packet_id: 1 }),
            ],
            vec![msg("t", b"", 1, Delivery::Released { packet_id: 1 })],
            vec![msg("t", b"", 0, Delivery::Queued)],
            vec![msg("t/+", b"", 1, Delivery::Queued)],
            vec![msg("t", b"", 1, Delivery::Sent { packet_id: 0 })],
        ] {
            let a = Answer::Session(Handover {
                messages: bad,
                ..sample()
            });
            assert!(Answer::decode(a.encode(), &limits()).is_err(), "{a:?}");
        }
    }
}
