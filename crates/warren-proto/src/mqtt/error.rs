//! Errors of the MQTT codec.
//!
//! [`DecodeError`] says why bytes from a peer are not a valid MQTT 3.1.1 packet; the gate closes
//! the connection on any of them and counts them by [`DecodeError::kind`]. [`EncodeError`] says
//! why a packet built by the application cannot be represented on the wire at all.

use thiserror::Error;

/// Why a byte stream is not a valid MQTT packet.
///
/// After an error the read buffer is in an unspecified state: the connection must be closed.
#[derive(Error, Debug)]
#[non_exhaustive]
pub enum DecodeError {
    /// The fixed header announces a packet larger than the configured limit; detected before
    /// the body is awaited or allocated.
    #[error("packet of {size} bytes exceeds the limit of {max}")]
    PacketTooLarge {
        /// Whole packet size: fixed header, remaining-length bytes and body.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The remaining length uses more than four bytes.
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// Packet type 0 or 15, which MQTT 3.1.1 reserves.
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    /// The low nibble of the first byte does not match what the packet type requires.
    #[error("invalid flags {flags:#06b} for packet type {packet_type}")]
    InvalidFlags {
        /// The packet type (high nibble).
        packet_type: u8,
        /// The flags (low nibble).
        flags: u8,
    },
    /// A QoS field holds a value other than 0, 1 or 2.
    #[error("invalid qos {0}")]
    InvalidQoS(u8),
    /// A string field is not valid UTF-8.
    #[error("invalid utf-8 in string field")]
    InvalidUtf8,
    /// A string field contains U+0000, which MQTT forbids.
    #[error("null character in string field")]
    NullCharacter,
    /// A topic name (PUBLISH or will topic) contains `+` or `#`.
    #[error("wildcard in topic name")]
    WildcardInTopicName,
    /// A topic name is empty.
    #[error("empty topic name")]
    EmptyTopic,
    /// A topic filter in SUBSCRIBE or UNSUBSCRIBE breaks the wildcard rules or is empty.
    #[error("invalid topic filter")]
    InvalidFilter,
    /// A packet identifier is 0 where a non-zero one is required.
    #[error("packet identifier is zero")]
    ZeroPacketId,
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter.
    #[error("no topic filters")]
    NoFilters,
    /// The CONNECT flags byte is inconsistent (reserved bit set, or will QoS/retain without a
    /// will).
    #[error("invalid connect flags {0:#010b}")]
    InvalidConnectFlags(u8),
    /// The CONNACK acknowledge flags byte has reserved bits set.
    #[error("invalid connack flags {0:#010b}")]
    InvalidConnAckFlags(u8),
    /// A CONNACK or SUBACK return code that MQTT 3.1.1 does not define.
    #[error("invalid return code {0:#04x}")]
    InvalidReturnCode(u8),
    /// A CONNECT for a protocol other than MQTT 3.1 (`MQIsdp`/3) or 3.1.1 (`MQTT`/4); the rest
    /// of its body is not parsed, since its layout differs (MQTT 5 adds properties). The gate
    /// answers it with CONNACK 1.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// Protocol name the client sent.
        name: String,
        /// Protocol level the client sent.
        level: u8,
    },
    /// The body holds bytes after the packet's last field.
    #[error("trailing bytes after packet")]
    TrailingBytes,
    /// The body is shorter than its own fields say.
    #[error("packet body truncated")]
    Truncated,
    /// An encode through [`super::MqttCodec`] failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// An IO error from the underlying stream (required by `tokio_util::codec::Decoder`).
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// A short stable label for metrics and logs (for example `"too_large"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PacketTooLarge { .. } => "too_large",
            Self::MalformedRemainingLength => "malformed_length",
            Self::InvalidPacketType(_) => "packet_type",
            Self::InvalidFlags { .. } => "flags",
            Self::InvalidQoS(_) => "qos",
            Self::InvalidUtf8 => "utf8",
            Self::NullCharacter => "null_char",
            Self::WildcardInTopicName => "wildcard_topic",
            Self::EmptyTopic => "empty_topic",
            Self::InvalidFilter => "invalid_filter",
            Self::ZeroPacketId => "zero_pkid",
            Self::NoFilters => "no_filters",
            Self::InvalidConnectFlags(_) => "connect_flags",
            Self::InvalidConnAckFlags(_) => "connack_flags",
            Self::InvalidReturnCode(_) => "return_code",
            Self::UnsupportedProtocol { .. } => "unsupported_protocol",
            Self::TrailingBytes => "trailing_bytes",
            Self::Truncated => "truncated",
            Self::Encode(_) => "encode",
            Self::Io(_) => "io",
        }
    }
}

/// Why a packet cannot be written in MQTT's wire format.
#[derive(Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string or binary field is longer than its two-byte length prefix can express.
    #[error("field of {len} bytes exceeds the limit of 65535")]
    FieldTooLong {
        /// The field's length in bytes.
        len: usize,
    },
    /// The body is longer than the four-byte remaining length can express.
    #[error("packet body of {size} bytes exceeds the limit of 268435455")]
    PacketTooLarge {
        /// The body length in bytes.
        size: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lowercase_without_period() {
        let e = DecodeError::PacketTooLarge {
            size: 70000,
            max: 4096,
        };
        assert_eq!(
            e.to_string(),
            "packet of 70000 bytes exceeds the limit of 4096"
        );
        assert_eq!(e.kind(), "too_large");
        let e = DecodeError::InvalidFlags {
            packet_type: 8,
            flags: 0,
        };
        assert_eq!(e.to_string(), "invalid flags 0b0000 for packet type 8");
        assert_eq!(
            DecodeError::from(EncodeError::FieldTooLong { len: 70000 }).to_string(),
            "field of 70000 bytes exceeds the limit of 65535"
        );
    }
}
