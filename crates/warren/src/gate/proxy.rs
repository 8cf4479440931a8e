//! PROXY protocol v1 and v2 (HAProxy's spec): behind a load balancer, the first bytes of a
//! connection name the client's address, which then stands for the peer in IP lists, per-IP
//! limits, logs and the session's remote address.
//!
//! The header is read exactly, never past its end (what follows belongs to TLS or the protocol).
//! [`parse_header`] decides, from the bytes read so far, how many bytes in all are needed next
//! or where the header ends: 12 bytes first, which tell the version; then, for v2, the 4 bytes
//! of command, family and length and the length announced (bounded by [`V2_MAX`]); for v1, one
//! byte more until the CRLF, at most [`V1_MAX`] bytes in all. `ppp` parses the complete header.
//! The reader only reads what [`parse_header`] asks for; the caller bounds the whole read with
//! the handshake deadline. The module is public so the fuzz target can drive [`parse_header`].

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included (the spec's 107 bytes).
pub const V1_MAX: usize = 107;
/// Longest v2 address-and-TLV block accepted. The spec allows 65535; real balancers send a few
/// hundred bytes at most (addresses plus a few TLVs).
pub const V2_MAX: usize = 4096;
/// The most bytes a header may take (a v2 header of [`V2_MAX`] bytes after its fixed 16).
pub const HEADER_MAX: usize = 16 + V2_MAX;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A header that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The socket failed or closed before the header was complete.
    #[error("connection ended inside the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// Neither a v1 nor a v2 header.
    #[error("no PROXY protocol header (the listener has proxy_protocol = true)")]
    Missing,
    /// A header that breaks the spec.
    #[error("invalid PROXY header: {0}")]
    Invalid(String),
}

/// What the bytes read so far say about the PROXY header at their start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The header is not complete: read until `total` bytes are buffered (always more than
    /// were given, at most [`HEADER_MAX`]), then ask again.
    NeedMore {
        /// Bytes needed in all, counted from the start of the header.
        total: usize,
    },
    /// A complete header of `len` bytes (never more than were given); what follows it is not
    /// part of it.
    Header {
        /// The header's length, its CRLF or TLVs included.
        len: usize,
        /// The client's address: `Some` for a proxied TCP connection, `None` for `LOCAL` /
        /// `UNKNOWN` (the balancer's own health check: keep the socket's peer).
        source: Option<SocketAddr>,
    },
}

/// Decide on the PROXY header at the start of `buf`, the bytes read from the connection so
/// far: more bytes needed (and how many in all), a complete header (its length and the client's
/// address), or an error. Never reads past the header: a v1 header ends at the first CRLF, a v2
/// header after the length it announces. Pure, so it can be fuzzed.
pub fn parse_header(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let Some(head) = buf.get(..12) else {
        return Ok(Parsed::NeedMore { total: 12 });
    };
    if head == V2_SIGNATURE {
        let Some(fixed) = buf.get(12..16) else {
            return Ok(Parsed::NeedMore { total: 16 });
        };
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if len > V2_MAX {
            return Err(ProxyError::Invalid(format!(
                "v2 header of {len} bytes (at most {V2_MAX} accepted)"
            )));
        }
        let total = 16 + len;
        let Some(header) = buf.get(..total) else {
            return Ok(Parsed::NeedMore { total });
        };
        return Ok(Parsed::Header {
            len: total,
            source: parse_v2(header)?,
        });
    }
    if &head[..6] != b"PROXY " {
        return Err(ProxyError::Missing);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    match window.windows(2).position(|w| w == b"\r\n") {
        // no valid v1 header is shorter than the 12 bytes read to tell the version
        Some(at) if at + 2 < 12 => Err(ProxyError::Invalid(format!(
            "v1 header of {} bytes",
            at + 2
        ))),
        Some(at) => {
            let len = at + 2;
            Ok(Parsed::Header {
                len,
                source: parse_v1(&buf[..len])?,
            })
        }
        None if buf.len() >= V1_MAX => Err(ProxyError::Invalid(format!(
            "v1 header without CRLF in {V1_MAX} bytes"
        ))),
        None => Ok(Parsed::NeedMore {
            total: buf.len() + 1,
        }),
    }
}

/// Read one PROXY header and return the client's address: `Some` for a proxied TCP connection,
/// `None` for `LOCAL` / `UNKNOWN` (the balancer's own health check: keep the socket's peer).
/// Reads exactly the header's bytes, as [`parse_header`] asks for them.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = [0u8; HEADER_MAX];
    let mut have = 0;
    loop {
        match parse_header(&buf[..have])? {
            Parsed::Header { source, .. } => return Ok(source),
            Parsed::NeedMore { total } => {
                let Some(more) = buf.get_mut(have..total) else {
                    // parse_header never asks for more than HEADER_MAX
                    return Err(ProxyError::Invalid("header longer than accepted".into()));
                };
                r.read_exact(more).await?;
                have = total;
            }
        }
    }
}

/// Parse a complete v1 header (`PROXY TCP4 src dst sport dport\r\n`).
fn parse_v1(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v1::{Addresses, Header};
    let h = Header::try_from(bytes).map_err(|e| ProxyError::Invalid(format!("v1: {e}")))?;
    if h.header.len() != bytes.len() {
        return Err(ProxyError::Invalid("v1: bytes after the CRLF".into()));
    }
    Ok(match h.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => None,
    })
}

/// Parse a complete v2 header (signature, command, family, length, addresses, TLVs).
fn parse_v2(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v2::{Addresses, Command, Header};
    let h = Header::try_from(bytes).map_err(|e| ProxyError::Invalid(format!("v2: {e}")))?;
    if h.command == Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut r = bytes;
        let got = read_header(&mut r).await;
        (got, r.to_vec())
    }

    fn v2(cmd: u8, fam: u8, addrs: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        b.extend_from_slice(addrs);
        b
    }

    #[tokio::test]
    async fn v1_tcp4_and_tcp6_give_the_source_and_leave_the_rest_unread() {
        let (a, rest) = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 1883\r\n\x10\x0c").await;
        assert_eq!(
            a.ok().flatten(),
            Some("192.0.2.7:5555".parse().expect("addr"))
        );
        assert_eq!(rest, b"\x10\x0c");
        let (a, _) = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n").await;
        assert_eq!(
            a.ok().flatten(),
            Some("[2001:db8::1]:4000".parse().expect("addr"))
        );
        let (a, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert!(matches!(a, Ok(None)));
    }

    #[tokio::test]
    async fn v1_without_crlf_in_107_bytes_is_refused() {
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(400, b'1');
        let (a, rest) = read(&long).await;
        assert!(matches!(a, Err(ProxyError::Invalid(_))), "{a:?}");
        assert_eq!(rest.len(), 400 - V1_MAX, "read no further than 107 bytes");
        let (a, _) = read(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n").await;
        assert!(matches!(a, Err(ProxyError::Invalid(_))), "{a:?}");
    }

    #[tokio::test]
    async fn v2_ipv4_ipv6_and_local() {
        let mut addrs = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addrs.extend_from_slice(&5555u16.to_be_bytes());
        addrs.extend_from_slice(&1883u16.to_be_bytes());
        let mut bytes = v2(1, 0x11, &addrs);
        bytes.extend_from_slice(b"next");
        let (a, rest) = read(&bytes).await;
        assert_eq!(
            a.ok().flatten(),
            Some("192.0.2.7:5555".parse().expect("addr"))
        );
        assert_eq!(rest, b"next");

        let mut addrs = vec![0u8; 36];
        addrs[0] = 0x20;
        addrs[1] = 0x01;
        addrs[15] = 1;
        addrs[32..34].copy_from_slice(&4000u16.to_be_bytes());
        let (a, _) = read(&v2(1, 0x21, &addrs)).await;
        assert_eq!(
            a.ok().flatten(),
            Some("[2001::1]:4000".parse().expect("addr"))
        );

        let (a, _) = read(&v2(0, 0x00, &[])).await;
        assert!(matches!(a, Ok(None)), "{a:?}");
    }

    #[test]
    fn parse_header_asks_for_exactly_the_header() {
        let need = |b: &[u8]| match parse_header(b) {
            Ok(Parsed::NeedMore { total }) => total,
            other => panic!("{other:?}"),
        };
        assert_eq!(need(b""), 12);
        assert_eq!(need(b"PROXY TC"), 12);
        assert_eq!(need(b"PROXY TCP4 1"), 13);
        assert_eq!(need(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"), 32);
        let line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nmore";
        assert_eq!(
            parse_header(line).ok(),
            Some(Parsed::Header {
                len: 32,
                source: Some("1.2.3.4:1".parse().expect("addr"))
            })
        );
        // a CRLF within the first 12 bytes: no v1 header is that short
        assert!(matches!(
            parse_header(b"PROXY \r\nxxxxxxx"),
            Err(ProxyError::Invalid(_))
        ));
        let local = v2(0, 0x00, &[]);
        assert_eq!(need(&local[..12]), 16);
        assert_eq!(
            parse_header(&local).ok(),
            Some(Parsed::Header {
                len: 16,
                source: None
            })
        );
        let mut addrs = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addrs.extend_from_slice(&5555u16.to_be_bytes());
        addrs.extend_from_slice(&1883u16.to_be_bytes());
        let tcp = v2(1, 0x11, &addrs);
        assert_eq!(need(&tcp[..16]), 28);
        assert_eq!(need(&tcp[..27]), 28);
    }

    #[tokio::test]
    async fn v2_bad_lengths_and_missing_headers_are_refused() {
        // announces 12 address bytes for IPv4 but carries 4
        let (a, _) = read(&v2(1, 0x11, &[1, 2, 3, 4])).await;
        assert!(matches!(a, Err(ProxyError::Invalid(_))), "{a:?}");
        // announces more than V2_MAX
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (a, _) = read(&b).await;
        assert!(matches!(a, Err(ProxyError::Invalid(_))), "{a:?}");
        // truncated
        let (a, _) = read(&V2_SIGNATURE[..8]).await;
        assert!(matches!(a, Err(ProxyError::Io(_))), "{a:?}");
        // a client that speaks MQTT straight away
        let (a, _) = read(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c").await;
        assert!(matches!(a, Err(ProxyError::Missing)), "{a:?}");
    }
}
