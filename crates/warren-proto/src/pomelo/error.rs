//! Errors of the pomelo codec.
//!
//! [`PomeloError`] says why bytes from a client are not a valid pomelo package or message, why a
//! gzip body could not be inflated within its limit, or why something the application built
//! cannot be written in pomelo's wire format. The gate closes the connection on decode errors
//! and counts them by [`PomeloError::kind`].

use thiserror::Error;

/// Why bytes are not a valid pomelo package or message, or why one cannot be encoded.
///
/// After a package-layer error the read buffer is in an unspecified state: the connection must
/// be closed.
#[derive(Error, Debug)]
#[non_exhaustive]
pub enum PomeloError {
    /// A package body is longer than allowed: on decode, the header announces more than the
    /// configured `max_package` (detected before the body is awaited or allocated); on encode,
    /// the body does not fit the three-byte length field.
    #[error("package body of {size} bytes exceeds the limit of {max}")]
    PackageTooLarge {
        /// Body length in bytes (the four header bytes are not counted).
        size: usize,
        /// The limit that was exceeded.
        max: usize,
    },
    /// The first byte of a package is not one of the five package types.
    #[error("invalid package type {0}")]
    InvalidPackageType(u8),
    /// A message flag byte has one of the reserved bits 5–7 set.
    #[error("invalid message flag {0:#04x}")]
    InvalidFlag(u8),
    /// Bits 1–3 of a message flag hold a type other than request, notify, response or push.
    #[error("invalid message type {0}")]
    InvalidMessageType(u8),
    /// A message id varint runs past five bytes or does not fit in 32 bits.
    #[error("message id too long")]
    IdTooLong,
    /// A message is shorter than its own fields say.
    #[error("message truncated")]
    Truncated,
    /// An uncompressed route is not valid UTF-8.
    #[error("route is not utf-8")]
    RouteNotUtf8,
    /// A request, notify or push has no route: on decode, the message ends where the route
    /// should start; on encode, the route given is [`super::MessageRoute::None`].
    #[error("message has no route")]
    MissingRoute,
    /// A route name is longer than its one-byte length prefix can express.
    #[error("route of {len} bytes exceeds the limit of 255")]
    RouteTooLong {
        /// The route's length in bytes.
        len: usize,
    },
    /// A gzip body is not a valid gzip (or zlib) stream.
    #[error("inflate failed: {0}")]
    InflateFailed(String),
    /// A gzip body inflates to more than the allowed size; inflating stopped at the limit.
    #[error("inflated body exceeds the limit of {limit}")]
    InflateTooLarge {
        /// The limit on the inflated size.
        limit: usize,
    },
    /// An IO error from the underlying stream (required by `tokio_util::codec::Decoder`).
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl PomeloError {
    /// A short stable label for metrics and logs (for example `"too_large"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PackageTooLarge { .. } => "too_large",
            Self::InvalidPackageType(_) => "package_type",
            Self::InvalidFlag(_) => "flag",
            Self::InvalidMessageType(_) => "message_type",
            Self::IdTooLong => "id_too_long",
            Self::Truncated => "truncated",
            Self::RouteNotUtf8 => "route_utf8",
            Self::MissingRoute => "missing_route",
            Self::RouteTooLong { .. } => "route_too_long",
            Self::InflateFailed(_) => "inflate_failed",
            Self::InflateTooLarge { .. } => "inflate_too_large",
            Self::Io(_) => "io",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lowercase_without_period() {
        let e = PomeloError::PackageTooLarge {
            size: 70000,
            max: 65536,
        };
        assert_eq!(
            e.to_string(),
            "package body of 70000 bytes exceeds the limit of 65536"
        );
        assert_eq!(e.kind(), "too_large");
        assert_eq!(
            PomeloError::InvalidFlag(0x20).to_string(),
            "invalid message flag 0x20"
        );
        assert_eq!(
            PomeloError::InflateTooLarge { limit: 65536 }.to_string(),
            "inflated body exceeds the limit of 65536"
        );
        let all = [
            PomeloError::InvalidPackageType(9),
            PomeloError::InvalidMessageType(5),
            PomeloError::IdTooLong,
            PomeloError::Truncated,
            PomeloError::RouteNotUtf8,
            PomeloError::MissingRoute,
            PomeloError::RouteTooLong { len: 256 },
            PomeloError::InflateFailed("bad header".into()),
            PomeloError::Io(std::io::Error::other("x")),
        ];
        for e in all {
            let text = e.to_string();
            assert!(!text.ends_with('.'), "{text}");
            assert_eq!(text, text.to_lowercase(), "{text}");
            assert!(!e.kind().is_empty());
        }
    }
}
