//! The HTTP/1.1 request that opens a WebSocket (RFC 6455 §4.2), read and answered by the gate
//! itself: one request head of at most [`MAX_REQUEST`] bytes, parsed with `httparse`, then either
//! `101 Switching Protocols` or a status that says why not, and the connection closed. No HTTP
//! server runs on a WebSocket listener: there is nothing else to serve there, and an upgrade
//! costs no more than the bytes of its request.
//!
//! What a client gets (docs/protocols/mqtt.md, "WebSocket"): any path; `GET` only (another
//! method: 405); the `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and
//! `Sec-WebSocket-Key` headers required (400 without them); a request head over 32 KiB or with
//! more than [`MAX_HEADERS`] headers: 431; the subprotocol chosen in the server's order of
//! preference among those the client offers.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request head (request line and headers) read; a larger one gets 431.
pub const MAX_REQUEST: usize = 32 * 1024;

/// Most headers one request may have; more get 431.
pub const MAX_HEADERS: usize = 64;

/// A valid WebSocket opening request: what the answer needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `Sec-WebSocket-Accept` for the client's key.
    pub accept: String,
    /// The subprotocols the client offered, in its order.
    pub protocols: Vec<String>,
}

/// Why a request does not open a WebSocket: the status to answer with, and the reason for the
/// log line.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status code.
    pub status: u16,
    /// What was wrong, in words.
    pub why: String,
}

impl Refused {
    fn new(status: u16, why: impl Into<String>) -> Refused {
        Refused {
            status,
            why: why.into(),
        }
    }

    /// The complete HTTP response: the status line, a short text body, and `connection: close`.
    pub fn response(&self) -> Vec<u8> {
        let body = format!("{}\n", self.why);
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.status,
            reason(self.status),
            body.len()
        )
        .into_bytes()
    }
}

/// The reason phrase of the statuses the gate answers with.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Read one request head from `io`. `Ok(None)` when the client closed first; otherwise the
/// parsed request (or why it is refused) and the bytes that came after the head (the client's
/// first frames, if it did not wait for the answer).
pub async fn read<IO: AsyncRead + Unpin>(
    io: &mut IO,
) -> std::io::Result<Option<(Result<Request, Refused>, BytesMut)>> {
    // room grows with what arrives, up to the cap: a slow client holds only what it sent
    let mut buf = BytesMut::with_capacity(1024);
    // where the search for the head's end resumes: a client that trickles its request costs a
    // scan of each new byte, not a parse of the whole head per read
    let mut scanned: usize = 0;
    loop {
        if buf.len() >= MAX_REQUEST {
            let r = Refused::new(
                431,
                format!("request head over {MAX_REQUEST} bytes without an end"),
            );
            return Ok(Some((Err(r), BytesMut::new())));
        }
        if buf.capacity() == buf.len() {
            buf.reserve((buf.len()).min(MAX_REQUEST - buf.len()).max(1024));
        }
        let room = (MAX_REQUEST - buf.len()).min(buf.capacity() - buf.len());
        let n = (&mut *io).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        let from = scanned.saturating_sub(2);
        scanned = buf.len();
        let ended = buf[from..].windows(2).any(|w| w == b"\n\n" || w == b"\n\r");
        if !ended {
            continue;
        }
        match parse(&buf) {
            Ok(None) => continue,
            Ok(Some((req, used))) => {
                let rest = buf.split_off(used);
                return Ok(Some((Ok(req), rest)));
            }
            Err(r) => return Ok(Some((Err(r), BytesMut::new()))),
        }
    }
}

/// Parse a request head: `Ok(None)` while it is incomplete, else the request and the bytes the
/// head took, or why it is refused.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, Refused> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused::new(
                431,
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(e) => return Err(Refused::new(400, format!("not an HTTP request: {e}"))),
    };
    let method = req.method.unwrap_or("");
    if method != "GET" {
        return Err(Refused::new(
            405,
            format!("{method} on a WebSocket listener (GET only)"),
        ));
    }
    if req.version != Some(1) {
        return Err(Refused::new(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    let mut connection_upgrade = false;
    let mut upgrade_websocket = false;
    let mut version_13 = false;
    let mut key: Option<&[u8]> = None;
    let mut protocols = Vec::new();
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            version_13 = value == "13";
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocols.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .take(MAX_HEADERS)
                    .map(str::to_owned),
            );
        }
    }
    if !connection_upgrade {
        return Err(Refused::new(
            400,
            "the Connection header does not include `upgrade`",
        ));
    }
    if !upgrade_websocket {
        return Err(Refused::new(400, "the Upgrade header is not `websocket`"));
    }
    if !version_13 {
        return Err(Refused::new(400, "Sec-WebSocket-Version is not 13"));
    }
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(Refused::new(400, "no Sec-WebSocket-Key header"));
    };
    Ok(Some((
        Request {
            accept: tungstenite::handshake::derive_accept_key(key),
            protocols,
        },
        used,
    )))
}

impl Request {
    /// The subprotocol to answer with: the first of `ours` (in the server's order of
    /// preference) that the client offered.
    pub fn choose(&self, ours: &[&'static str]) -> Option<&'static str> {
        ours.iter()
            .copied()
            .find(|p| self.protocols.iter().any(|c| c == p))
    }

    /// The `101 Switching Protocols` answer, with `protocol` if one was chosen.
    pub fn accepted(&self, protocol: Option<&str>) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: {}\r\n",
            self.accept
        );
        if let Some(p) = protocol {
            r.push_str("sec-websocket-protocol: ");
            r.push_str(p);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENING: &str = "GET /mqtt HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n\r\n";

    #[test]
    fn an_opening_request_is_accepted_with_the_rfc_key_and_our_preferred_protocol() {
        let (req, used) = parse(OPENING.as_bytes()).unwrap().unwrap();
        assert_eq!(used, OPENING.len());
        // RFC 6455 §1.3's example
        assert_eq!(req.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(req.choose(&["mqtt", "mqttv3.1"]), Some("mqtt"));
        assert_eq!(req.choose(&[]), None);
        let answer = String::from_utf8(req.accepted(Some("mqtt"))).unwrap();
        assert!(answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(answer.contains("sec-websocket-protocol: mqtt\r\n"));
        assert!(answer.ends_with("\r\n\r\n"));
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        assert_eq!(parse(&OPENING.as_bytes()[..40]).unwrap(), None);
    }

    #[test]
    fn what_is_not_an_upgrade_gets_its_status() {
        let status = |text: &str| parse(text.as_bytes()).unwrap_err().status;
        assert_eq!(status(&OPENING.replace("GET", "POST")), 405);
        assert_eq!(
            status(&OPENING.replace("keep-alive, Upgrade", "close")),
            400
        );
        assert_eq!(
            status(&OPENING.replace("Upgrade: websocket", "Upgrade: h2c")),
            400
        );
        assert_eq!(status(&OPENING.replace("Version: 13", "Version: 8")), 400);
        assert_eq!(
            status(&OPENING.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")),
            400
        );
        assert_eq!(status("\x16\x03\x01 garbage\r\n\r\n"), 400);
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
    }

    #[tokio::test]
    async fn a_head_over_the_cap_is_431_and_bytes_after_the_head_are_kept() {
        let mut big = Vec::new();
        big.extend_from_slice(b"GET / HTTP/1.1\r\n");
        while big.len() <= MAX_REQUEST {
            big.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let (r, _) = read(&mut &big[..]).await.unwrap().unwrap();
        assert_eq!(r.unwrap_err().status, 431);

        let mut with_frame = OPENING.as_bytes().to_vec();
        with_frame.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        let (r, rest) = read(&mut &with_frame[..]).await.unwrap().unwrap();
        assert!(r.is_ok());
        assert_eq!(&rest[..], &[0x82, 0x80, 1, 2, 3, 4]);

        assert!(read(&mut &b""[..]).await.unwrap().is_none());
    }
}
