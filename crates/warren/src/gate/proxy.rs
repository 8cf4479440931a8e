//! PROXY protocol v1 and v2 (HAProxy's spec): behind a load balancer, the first bytes of a
//! connection name the client's address, which then stands for the peer in IP lists, per-IP
//! limits, logs and the session's remote address.
//!
//! The header is read exactly, never past its end (what follows belongs to TLS or the protocol):
//! 12 bytes first, which tell the version; then, for v2, the 4 bytes of command, family and
//! length and the length announced (bounded by [`V2_MAX`]); for v1, byte by byte up to the CRLF,
//! at most [`V1_MAX`] bytes in all. `ppp` parses what was read. The caller bounds the whole read
//! with the handshake deadline.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included (the spec's 107 bytes).
pub(crate) const V1_MAX: usize = 107;
/// Longest v2 address-and-TLV block accepted. The spec allows 65535; real balancers send a few
/// hundred bytes at most (addresses plus a few TLVs).
pub(crate) const V2_MAX: usize = 4096;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A header that could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
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

/// Read one PROXY header and return the client's address: `Some` for a proxied TCP connection,
/// `None` for `LOCAL` / `UNKNOWN` (the balancer's own health check: keep the socket's peer).
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut buf = [0u8; 16 + V2_MAX];
    r.read_exact(&mut buf[..12]).await?;
    if buf[..12] == V2_SIGNATURE {
        r.read_exact(&mut buf[12..16]).await?;
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > V2_MAX {
            return Err(ProxyError::Invalid(format!(
                "v2 header of {len} bytes (at most {V2_MAX} accepted)"
            )));
        }
        r.read_exact(&mut buf[16..16 + len]).await?;
        return parse_v2(&buf[..16 + len]);
    }
    if &buf[..6] != b"PROXY " {
        return Err(ProxyError::Missing);
    }
    let mut n = 12;
    while !(n >= 2 && buf[n - 2] == b'\r' && buf[n - 1] == b'\n') {
        if n == V1_MAX {
            return Err(ProxyError::Invalid(format!(
                "v1 header without CRLF in {V1_MAX} bytes"
            )));
        }
        r.read_exact(&mut buf[n..n + 1]).await?;
        n += 1;
    }
    parse_v1(&buf[..n])
}

/// Parse a complete v1 header (`PROXY TCP4 src dst sport dport\r\n`).
pub(crate) fn parse_v1(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
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
pub(crate) fn parse_v2(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
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
