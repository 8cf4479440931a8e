//! The message layer (docs/protocols/pomelo.md, "Packages and messages"), carried in the body of a
//! data package: `flag · [id] · [route] · body`.
//!
//! The flag byte holds the route-compressed bit (0), the message type (bits 1–3) and the gzip
//! bit (4); bits 5–7 must be 0. Requests carry an id and a route, notifies and pushes only a
//! route, responses only an id. A route is either a two-byte code from the handshake dictionary
//! or a one-byte length followed by UTF-8. Everything after that is the body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::PomeloError;
use super::id::{decode_id, encode_id, id_len};
use super::package::{PackageType, write_header};

/// Longest route name: its length prefix is one byte.
pub const MAX_ROUTE_LEN: usize = 255;

/// Flag bit 0: the route is a two-byte dictionary code.
const FLAG_ROUTE_CODE: u8 = 0x01;
/// Flag bit 4: the body is gzip-compressed.
const FLAG_GZIP: u8 = 0x10;
/// Flag bits 5–7, which must be 0.
const FLAG_RESERVED: u8 = 0xe0;

/// What a message is for; bits 1–3 of the flag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// Client → server call that expects a response: id and route.
    Request = 0,
    /// Client → server call without a response: route only.
    Notify = 1,
    /// Server → client answer to a request: id only.
    Response = 2,
    /// Server → client event: route only.
    Push = 3,
}

impl MessageType {
    /// Parses the wire value; `None` for anything but 0 to 3.
    pub fn from_u8(v: u8) -> Option<MessageType> {
        match v {
            0 => Some(MessageType::Request),
            1 => Some(MessageType::Notify),
            2 => Some(MessageType::Response),
            3 => Some(MessageType::Push),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Whether messages of this type carry an id (requests and responses).
    pub fn has_id(self) -> bool {
        matches!(self, MessageType::Request | MessageType::Response)
    }

    /// Whether messages of this type carry a route (everything but responses).
    pub fn has_route(self) -> bool {
        !matches!(self, MessageType::Response)
    }

    /// A short stable name for logs and metrics (for example `"request"`).
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Request => "request",
            MessageType::Notify => "notify",
            MessageType::Response => "response",
            MessageType::Push => "push",
        }
    }
}

/// Where a message goes, as it appears on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MessageRoute {
    /// No route: responses.
    None,
    /// A compressed route: its code in the handshake dictionary (flag bit 0 set).
    Code(u16),
    /// A route spelled out, for example `connector.entryHandler.entry` (at most 255 bytes).
    Name(String),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Request, notify, response or push.
    pub kind: MessageType,
    /// The request id for requests and responses; 0 for notifies and pushes.
    pub id: u32,
    /// The route; [`MessageRoute::None`] for responses.
    pub route: MessageRoute,
    /// The body as sent (still compressed when `gzip` is set; see [`super::inflate`]).
    pub body: Bytes,
    /// Flag bit 4: the body is gzip-compressed.
    pub gzip: bool,
}

impl Message {
    /// Appends this message's bytes to `buf`, gzip flag included, with the same rules as
    /// [`try_encode_message`]. The body is written as given: it is not compressed here.
    pub fn try_encode(&self, buf: &mut BytesMut) -> Result<(), PomeloError> {
        let len = message_len(self.kind, self.id, &self.route, &self.body)?;
        write_message(
            self.kind,
            self.id,
            &self.route,
            &self.body,
            self.gzip,
            len,
            buf,
        );
        Ok(())
    }
}

/// Decodes the body of a data package as one message.
///
/// The body of the message is a zero-copy slice of `body`. A gzip body is returned as sent with
/// [`Message::gzip`] set; inflate it with [`super::inflate`]. A compressed-route bit on a
/// response, which has no route, is ignored as upstream does.
pub fn decode_message(body: Bytes) -> Result<Message, PomeloError> {
    let mut rest = body;
    if rest.is_empty() {
        return Err(PomeloError::Truncated);
    }
    let flag = rest.get_u8();
    if flag & FLAG_RESERVED != 0 {
        return Err(PomeloError::InvalidFlag(flag));
    }
    let type_bits = (flag >> 1) & 0x07;
    let kind = MessageType::from_u8(type_bits).ok_or(PomeloError::InvalidMessageType(type_bits))?;
    let id = if kind.has_id() {
        let (id, used) = decode_id(&rest)?;
        rest.advance(used);
        id
    } else {
        0
    };
    let route = if kind.has_route() {
        read_route(&mut rest, flag & FLAG_ROUTE_CODE != 0)?
    } else {
        MessageRoute::None
    };
    Ok(Message {
        kind,
        id,
        route,
        body: rest,
        gzip: flag & FLAG_GZIP != 0,
    })
}

/// Reads a route code or a length-prefixed route name from the front of `rest`.
fn read_route(rest: &mut Bytes, compressed: bool) -> Result<MessageRoute, PomeloError> {
    if rest.is_empty() {
        return Err(PomeloError::MissingRoute);
    }
    if compressed {
        if rest.len() < 2 {
            return Err(PomeloError::Truncated);
        }
        return Ok(MessageRoute::Code(rest.get_u16()));
    }
    let len = usize::from(rest.get_u8());
    if rest.len() < len {
        return Err(PomeloError::Truncated);
    }
    let raw = rest.split_to(len);
    let name = std::str::from_utf8(&raw).map_err(|_| PomeloError::RouteNotUtf8)?;
    Ok(MessageRoute::Name(name.to_owned()))
}

/// Size of the message [`try_encode_message`] would write, or why it cannot be written.
fn message_len(
    kind: MessageType,
    id: u32,
    route: &MessageRoute,
    body: &[u8],
) -> Result<usize, PomeloError> {
    let id_bytes = if kind.has_id() { id_len(id) } else { 0 };
    let route_bytes = if kind.has_route() {
        match route {
            MessageRoute::None => return Err(PomeloError::MissingRoute),
            MessageRoute::Code(_) => 2,
            MessageRoute::Name(name) if name.len() > MAX_ROUTE_LEN => {
                return Err(PomeloError::RouteTooLong { len: name.len() });
            }
            MessageRoute::Name(name) => 1 + name.len(),
        }
    } else {
        0
    };
    Ok(1 + id_bytes + route_bytes + body.len())
}

/// Writes a message that [`message_len`] accepted (`len` is what it returned).
fn write_message(
    kind: MessageType,
    id: u32,
    route: &MessageRoute,
    body: &[u8],
    gzip: bool,
    len: usize,
    buf: &mut BytesMut,
) {
    buf.reserve(len);
    let mut flag = kind.as_u8() << 1;
    if gzip {
        flag |= FLAG_GZIP;
    }
    if kind.has_route() && matches!(route, MessageRoute::Code(_)) {
        flag |= FLAG_ROUTE_CODE;
    }
    buf.put_u8(flag);
    if kind.has_id() {
        encode_id(id, buf);
    }
    if kind.has_route() {
        match route {
            MessageRoute::None => {}
            MessageRoute::Code(code) => buf.put_u16(*code),
            MessageRoute::Name(name) => {
                // `message_len` checked the length; the fallback only keeps the prefix honest.
                let name = name
                    .as_bytes()
                    .get(..MAX_ROUTE_LEN)
                    .unwrap_or(name.as_bytes());
                buf.put_u8(u8::try_from(name.len()).unwrap_or(u8::MAX));
                buf.put_slice(name);
            }
        }
    }
    buf.put_slice(body);
}

/// Appends one message (its bytes only, no package header) to `buf`.
///
/// `id` is written for requests and responses and ignored otherwise; `route` is written for
/// requests, notifies and pushes and ignored for responses. Fails, writing nothing, when a
/// routed message has [`MessageRoute::None`] ([`PomeloError::MissingRoute`]) or a route name
/// longer than [`MAX_ROUTE_LEN`] bytes ([`PomeloError::RouteTooLong`]). warren never sends
/// gzip bodies, so the gzip bit is never set here.
pub fn try_encode_message(
    kind: MessageType,
    id: u32,
    route: &MessageRoute,
    body: &[u8],
    buf: &mut BytesMut,
) -> Result<(), PomeloError> {
    let len = message_len(kind, id, route, body)?;
    write_message(kind, id, route, body, false, len, buf);
    Ok(())
}

/// Appends one message (its bytes only, no package header) to `buf`.
///
/// A message that cannot be encoded (see [`try_encode_message`]) is a bug in the caller: debug
/// builds panic, release builds write nothing.
pub fn encode_message(
    kind: MessageType,
    id: u32,
    route: &MessageRoute,
    body: &[u8],
    buf: &mut BytesMut,
) {
    let result = try_encode_message(kind, id, route, body, buf);
    debug_assert!(result.is_ok(), "unencodable pomelo message: {result:?}");
}

/// Appends a whole data package holding one message to `buf`: what the gate writes for
/// responses and pushes.
///
/// Fails, writing nothing, for the reasons of [`try_encode_message`] and when the message does
/// not fit in a package ([`PomeloError::PackageTooLarge`]).
pub fn try_encode_data(
    kind: MessageType,
    id: u32,
    route: &MessageRoute,
    body: &[u8],
    buf: &mut BytesMut,
) -> Result<(), PomeloError> {
    let len = message_len(kind, id, route, body)?;
    write_header(PackageType::Data, len, buf)?;
    write_message(kind, id, route, body, false, len, buf);
    Ok(())
}

/// Appends a whole data package holding one message to `buf`.
///
/// A message that cannot be encoded (see [`try_encode_data`]) is a bug in the caller: debug
/// builds panic, release builds write nothing.
pub fn encode_data(
    kind: MessageType,
    id: u32,
    route: &MessageRoute,
    body: &[u8],
    buf: &mut BytesMut,
) {
    let result = try_encode_data(kind, id, route, body, buf);
    debug_assert!(
        result.is_ok(),
        "unencodable pomelo data package: {result:?}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kind: MessageType, id: u32, route: &MessageRoute, body: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_message(kind, id, route, body, &mut buf);
        buf.to_vec()
    }

    fn decoded(bytes: &[u8]) -> Result<Message, PomeloError> {
        decode_message(Bytes::copy_from_slice(bytes))
    }

    fn name(route: &str) -> MessageRoute {
        MessageRoute::Name(route.to_owned())
    }

    #[test]
    fn request_with_route_name() {
        let mut bytes = vec![0x00, 0x01, 0x1c];
        bytes.extend_from_slice(b"connector.entryHandler.entry{}");
        let route = name("connector.entryHandler.entry");
        assert_eq!(encoded(MessageType::Request, 1, &route, b"{}"), bytes);
        let m = decoded(&bytes).unwrap();
        assert_eq!(
            m,
            Message {
                kind: MessageType::Request,
                id: 1,
                route,
                body: Bytes::from_static(b"{}"),
                gzip: false,
            }
        );
    }

    #[test]
    fn response_has_no_route() {
        let bytes = b"\x04\xac\x02{\"code\":200}";
        assert_eq!(
            encoded(
                MessageType::Response,
                300,
                &MessageRoute::None,
                br#"{"code":200}"#
            ),
            bytes
        );
        // A route given for a response is not written.
        assert_eq!(
            encoded(MessageType::Response, 300, &name("x.y"), br#"{"code":200}"#),
            bytes
        );
        let m = decoded(bytes).unwrap();
        assert_eq!(
            (m.kind, m.id, m.route),
            (MessageType::Response, 300, MessageRoute::None)
        );
        assert_eq!(&m.body[..], br#"{"code":200}"#);
        // The route-code bit on a response is ignored.
        let m = decoded(b"\x05\x01{}").unwrap();
        assert_eq!(
            (m.kind, m.id, m.route),
            (MessageType::Response, 1, MessageRoute::None)
        );
    }

    #[test]
    fn notify_and_push_have_no_id() {
        let bytes = b"\x02\x15chat.chatHandler.send{}";
        assert_eq!(
            encoded(
                MessageType::Notify,
                99,
                &name("chat.chatHandler.send"),
                b"{}"
            ),
            bytes
        );
        let m = decoded(bytes).unwrap();
        assert_eq!((m.kind, m.id), (MessageType::Notify, 0));
        let bytes = b"\x06\x06onChat{}";
        assert_eq!(encoded(MessageType::Push, 0, &name("onChat"), b"{}"), bytes);
        assert_eq!(decoded(bytes).unwrap().route, name("onChat"));
    }

    #[test]
    fn compressed_route() {
        let bytes = [0x01, 0x01, 0x00, 0x01, 0x7b, 0x7d];
        assert_eq!(
            encoded(MessageType::Request, 1, &MessageRoute::Code(1), b"{}"),
            bytes
        );
        let m = decoded(&bytes).unwrap();
        assert_eq!((m.id, m.route), (1, MessageRoute::Code(1)));
        assert!(matches!(
            decoded(&[0x01, 0x01, 0x00]),
            Err(PomeloError::Truncated)
        ));
    }

    #[test]
    fn empty_route_name_and_empty_body() {
        let bytes = [0x06, 0x00];
        assert_eq!(encoded(MessageType::Push, 0, &name(""), b""), bytes);
        let m = decoded(&bytes).unwrap();
        assert_eq!(m.route, name(""));
        assert!(m.body.is_empty());
    }

    #[test]
    fn flag_bits() {
        for flag in [0x20u8, 0x40, 0x80, 0xe0, 0x30] {
            assert!(
                matches!(decoded(&[flag, 0x01, 0x00]), Err(PomeloError::InvalidFlag(f)) if f == flag),
                "{flag:#x}"
            );
        }
        for type_bits in 4u8..8 {
            assert!(matches!(
                decoded(&[type_bits << 1, 0x01]),
                Err(PomeloError::InvalidMessageType(t)) if t == type_bits
            ));
        }
        let m = decoded(b"\x12\x03abc\x1f\x8b").unwrap();
        assert!(m.gzip);
        assert_eq!(m.kind, MessageType::Notify);
        assert_eq!(&m.body[..], b"\x1f\x8b");
        let mut again = BytesMut::new();
        m.try_encode(&mut again).unwrap();
        assert_eq!(&again[..], b"\x12\x03abc\x1f\x8b");
    }

    #[test]
    fn malformed_messages() {
        assert!(matches!(decoded(&[]), Err(PomeloError::Truncated)));
        // Request that ends inside its id, or before its route.
        assert!(matches!(
            decoded(&[0x00, 0x80]),
            Err(PomeloError::Truncated)
        ));
        assert!(matches!(
            decoded(&[0x00, 0x01]),
            Err(PomeloError::MissingRoute)
        ));
        assert!(matches!(decoded(&[0x02]), Err(PomeloError::MissingRoute)));
        // Six-byte id.
        assert!(matches!(
            decoded(&[0x00, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00]),
            Err(PomeloError::IdTooLong)
        ));
        // Route length beyond the body.
        assert!(matches!(
            decoded(b"\x00\x01\x10short"),
            Err(PomeloError::Truncated)
        ));
        assert!(matches!(
            decoded(b"\x06\x02\xff\xfe{}"),
            Err(PomeloError::RouteNotUtf8)
        ));
    }

    #[test]
    fn unencodable_messages_write_nothing() {
        let mut buf = BytesMut::new();
        let long = name(&"r".repeat(MAX_ROUTE_LEN + 1));
        assert!(matches!(
            try_encode_message(MessageType::Push, 0, &long, b"{}", &mut buf),
            Err(PomeloError::RouteTooLong { len: 256 })
        ));
        assert!(matches!(
            try_encode_data(
                MessageType::Request,
                1,
                &MessageRoute::None,
                b"{}",
                &mut buf
            ),
            Err(PomeloError::MissingRoute)
        ));
        let huge = vec![0u8; super::super::MAX_PACKAGE_BODY];
        assert!(matches!(
            try_encode_data(
                MessageType::Response,
                1,
                &MessageRoute::None,
                &huge,
                &mut buf
            ),
            Err(PomeloError::PackageTooLarge { .. })
        ));
        assert!(buf.is_empty());
        // 255 bytes is the longest route that fits.
        let longest = name(&"r".repeat(MAX_ROUTE_LEN));
        try_encode_message(MessageType::Push, 0, &longest, b"", &mut buf).unwrap();
        assert_eq!(buf.len(), 2 + MAX_ROUTE_LEN);
        assert_eq!(buf[1], 0xff);
    }

    #[test]
    fn data_package_wraps_one_message() {
        let mut buf = BytesMut::new();
        encode_data(MessageType::Push, 0, &name("onChat"), b"{}", &mut buf);
        assert_eq!(&buf[..], b"\x04\x00\x00\x0a\x06\x06onChat{}");
    }

    #[test]
    fn type_helpers() {
        assert_eq!(MessageType::from_u8(3), Some(MessageType::Push));
        assert_eq!(MessageType::from_u8(4), None);
        assert_eq!(MessageType::Response.as_u8(), 2);
        assert!(MessageType::Request.has_id() && MessageType::Request.has_route());
        assert!(!MessageType::Notify.has_id() && MessageType::Notify.has_route());
        assert!(MessageType::Response.has_id() && !MessageType::Response.has_route());
        assert_eq!(MessageType::Notify.name(), "notify");
    }
}
