//! Line protocol (docs/protocols/line.md, "Echo handler (default)"): every echo vector through the
//! decoder and encoder acting as the broker, plus chunking properties.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};
use warren_proto::line::{ERROR_BODY, LineCodec, LineDecoder, LineError, LineEvent, encode};

/// Plays the broker with the echo plugin: feeds each read to one decoder, echoes messages and
/// answers bad heads with ERROR, and returns everything sent.
fn echo(reads: &[&[u8]]) -> Vec<u8> {
    let mut decoder = LineDecoder::new(64, 64 * 1024);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    for read in reads {
        buf.extend_from_slice(read);
        while let Some(event) = decoder.decode(&mut buf).unwrap() {
            match event {
                LineEvent::Message(body) => encode(&body, true, &mut out),
                LineEvent::BadHead => encode(ERROR_BODY, true, &mut out),
            }
        }
    }
    out.to_vec()
}

#[test]
fn echo_vectors() {
    let vectors: &[(&[&[u8]], &[u8])] = &[
        (&[b"5\r\nhello"], b"5 \r\nhello"),
        (&[b"5\nhello"], b"5 \r\nhello"),
        (&[b"11\r\nhello world"], b"11 \r\nhello world"),
        (&[b"3 cmd key\r\nabc"], b"3 \r\nabc"),
        (&[b"\r\n5\r\nhello"], b"5 \r\nhello"),
        (&[b"2\r\nhi3\r\nabc"], b"2 \r\nhi3 \r\nabc"),
        (&[b"5\r\n", b"hello\r\n"], b"5 \r\nhello"),
        (&[b"0\r\n"], b"0 \r\n"),
        (&[b"a b c d\r\n"], b"7 \r\nERROR\r\n"),
        (&[b"abc\r\n"], b"7 \r\nERROR\r\n"),
        (&[b"5abc\r\n"], b"7 \r\nERROR\r\n"),
    ];
    for (reads, expected) in vectors {
        assert_eq!(
            echo(reads),
            *expected,
            "{:?}",
            reads
                .iter()
                .map(|r| String::from_utf8_lossy(r))
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn wire_bytes_of_the_table() {
    assert_eq!(
        echo(&[b"5\r\nhello"]),
        [0x35, 0x20, 0x0d, 0x0a, 0x68, 0x65, 0x6c, 0x6c, 0x6f]
    );
    assert_eq!(
        echo(&[b"abc\r\n"]),
        [
            0x37, 0x20, 0x0d, 0x0a, 0x45, 0x52, 0x52, 0x4f, 0x52, 0x0d, 0x0a
        ]
    );
}

#[test]
fn bad_heads_do_not_lose_the_stream() {
    assert_eq!(
        echo(&[b"abc\r\n1 2 3 4\r\n70000\r\n2\r\nok"]),
        b"7 \r\nERROR\r\n7 \r\nERROR\r\n7 \r\nERROR\r\n2 \r\nok"
    );
}

#[test]
fn head_too_long_is_fatal() {
    let mut decoder = LineDecoder::new(64, 64 * 1024);
    let mut buf = BytesMut::from(&[b'1'; 65][..]);
    assert!(matches!(
        decoder.decode(&mut buf),
        Err(LineError::HeadTooLong { max: 64 })
    ));
    let mut decoder = LineDecoder::new(64, 64 * 1024);
    let mut head = vec![b' '; 63];
    head.extend_from_slice(b"0\r\n");
    let mut buf = BytesMut::from(&head[..]);
    assert_eq!(
        decoder.decode(&mut buf).unwrap(),
        Some(LineEvent::Message(Bytes::new()))
    );
}

#[test]
fn codec_without_space() {
    let mut codec = LineCodec::new(64, 1024, false);
    let mut out = BytesMut::new();
    codec
        .encode(Bytes::from_static(b"hello"), &mut out)
        .unwrap();
    codec.encode(&b""[..], &mut out).unwrap();
    assert_eq!(&out[..], b"5\r\nhello0\r\n");
    let mut buf = BytesMut::from(&b"5\r\nhello"[..]);
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(LineEvent::Message(Bytes::from_static(b"hello")))
    );
}

proptest! {
    /// Framed messages decode back to themselves however the stream is cut into reads.
    #[test]
    fn framed_messages_survive_chunking(
        bodies in vec(vec(any::<u8>(), 0..40), 0..6),
        chunk in 1usize..16,
        space in any::<bool>(),
    ) {
        let mut wire = BytesMut::new();
        for body in &bodies {
            encode(body, space, &mut wire);
        }
        let mut decoder = LineDecoder::new(64, 64);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(event) = decoder.decode(&mut buf).unwrap() {
                match event {
                    LineEvent::Message(body) => got.push(body.to_vec()),
                    LineEvent::BadHead => prop_assert!(false, "bad head in framed stream"),
                }
            }
        }
        prop_assert_eq!(got, bodies);
        prop_assert!(buf.is_empty());
    }

    /// Arbitrary bytes never panic the decoder, and chunked reads agree with one read.
    #[test]
    fn arbitrary_bytes(data in vec(any::<u8>(), 0..200), chunk in 1usize..16) {
        let run = |pieces: Vec<&[u8]>| {
            let mut decoder = LineDecoder::new(8, 16);
            let mut buf = BytesMut::new();
            let mut events = Vec::new();
            for piece in pieces {
                buf.extend_from_slice(piece);
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(Some(event)) => events.push(event),
                        Ok(None) => break,
                        Err(_) => return (events, true),
                    }
                }
            }
            (events, false)
        };
        prop_assert_eq!(run(vec![&data[..]]), run(data.chunks(chunk).collect()));
    }
}
