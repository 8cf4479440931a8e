//! A publish one MQTT gate forwards to the other gates of its cluster (docs/protocols/mqtt.md,
//! "Across gates"): the body of the gate module's `MqttPublish` call. Binary, so a payload is
//! any bytes. It arrives over the cluster's broker, where anyone who can publish can put bytes:
//! every field is checked before it is used (fuzzed: `fuzz/fuzz_targets/mqtt_forward_decode.rs`).

use bytes::{Bytes, BytesMut};

/// First byte: the version of the format.
pub const VERSION: u8 = 1;

/// Bytes before the topic: version, flags, QoS, topic length.
pub const HEADER: usize = 5;

/// A publish forwarded from the gate its client published on to every other gate of the
/// cluster. Its body is binary, so a payload is any bytes:
/// `[version = 1][flags: bit 0 = retain][QoS][topic length, u16 big-endian][topic][payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The topic published on (a valid MQTT topic name).
    pub topic: Bytes,
    /// The publish's QoS (0, 1 or 2).
    pub qos: u8,
    /// The publish's retain flag.
    pub retain: bool,
    /// The payload, any bytes.
    pub payload: Bytes,
}

/// Why a forwarded publish was refused (another gate sent what this one cannot read: a newer
/// version, or a bug).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Shorter than its header.
    #[error("a forwarded publish of {0} bytes, shorter than its header")]
    Short(usize),
    /// A format this gate does not know.
    #[error("a forwarded publish in format version {0} (this gate reads version 1)")]
    Version(u8),
    /// Flags other than the retain flag.
    #[error("a forwarded publish with unknown flags {0:#04x}")]
    Flags(u8),
    /// A QoS above 2.
    #[error("a forwarded publish at QoS {0}")]
    Qos(u8),
    /// The topic length runs past the body.
    #[error("a forwarded publish announcing a topic of {len} bytes with {left} left")]
    TopicLength {
        /// Announced.
        len: usize,
        /// Present.
        left: usize,
    },
    /// Not a valid MQTT topic name (not UTF-8, empty, or with a wildcard).
    #[error("a forwarded publish whose topic is not a valid MQTT topic name")]
    Topic,
}

impl ForwardError {
    /// The refusal kind for logs and metrics.
    pub fn kind(&self) -> &'static str {
        "mqtt_forward_malformed"
    }
}

impl Forwarded {
    /// The body sent to the other gates.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER + self.topic.len() + self.payload.len());
        b.extend_from_slice(&[VERSION, u8::from(self.retain), self.qos]);
        // a topic name is at most 65535 bytes (MQTT 3.1.1 section 1.5.3)
        let len = u16::try_from(self.topic.len()).unwrap_or(u16::MAX);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&self.topic[..usize::from(len)]);
        b.extend_from_slice(&self.payload);
        b.freeze()
    }

    /// Read a body another gate sent; every field is checked before it is used.
    pub fn decode(mut body: Bytes) -> Result<Forwarded, ForwardError> {
        if body.len() < HEADER {
            return Err(ForwardError::Short(body.len()));
        }
        let (version, flags, qos) = (body[0], body[1], body[2]);
        if version != VERSION {
            return Err(ForwardError::Version(version));
        }
        if flags & !1 != 0 {
            return Err(ForwardError::Flags(flags));
        }
        if qos > 2 {
            return Err(ForwardError::Qos(qos));
        }
        let len = usize::from(u16::from_be_bytes([body[3], body[4]]));
        let left = body.len() - HEADER;
        if len > left {
            return Err(ForwardError::TopicLength { len, left });
        }
        let mut rest = body.split_off(HEADER);
        let payload = rest.split_off(len);
        let topic = rest;
        match std::str::from_utf8(&topic) {
            Ok(t) if crate::mqtt::topic::valid_topic_name(t) => {}
            _ => return Err(ForwardError::Topic),
        }
        Ok(Forwarded {
            topic,
            qos,
            retain: flags & 1 == 1,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_publish_round_trips_and_bad_bodies_are_refused() {
        let f = Forwarded {
            topic: Bytes::from_static(b"sensors/1"),
            qos: 1,
            retain: true,
            payload: Bytes::from_static(b"\x00\xff binary"),
        };
        let body = f.encode();
        assert_eq!(Forwarded::decode(body.clone()), Ok(f));
        for n in 0..HEADER + 9 {
            assert!(Forwarded::decode(body.slice(..n)).is_err(), "{n} bytes");
        }
        let with = |i: usize, b: u8| {
            let mut v = body.to_vec();
            v[i] = b;
            Forwarded::decode(Bytes::from(v))
        };
        assert_eq!(with(0, 2), Err(ForwardError::Version(2)));
        assert_eq!(with(1, 3), Err(ForwardError::Flags(3)));
        assert_eq!(with(2, 3), Err(ForwardError::Qos(3)));
        assert_eq!(with(5, b'+'), Err(ForwardError::Topic));
        assert_eq!(with(5, 0xff), Err(ForwardError::Topic));
        // an empty payload (a retained delete) and an empty topic
        let empty = Forwarded::decode(Bytes::from_static(b"\x01\x01\x00\x00\x01a"));
        assert_eq!(empty.map(|f| f.payload.is_empty()), Ok(true));
        let no_topic = Forwarded::decode(Bytes::from_static(b"\x01\x00\x00\x00\x00x"));
        assert_eq!(no_topic, Err(ForwardError::Topic));
    }
}
