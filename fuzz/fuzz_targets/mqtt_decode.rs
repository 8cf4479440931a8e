//! Fuzz target for the MQTT decoder: arbitrary bytes must never make `decode` panic, whatever
//! decodes must survive a re-encode, and feeding the same bytes in chunks through
//! `MqttCodec` must give the same packets as decoding them from one buffer.

#![no_main]
#![forbid(unsafe_code)]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use warren_proto::mqtt::{MqttCodec, Packet, decode, encode};

/// Decodes packets from the front of `data` until the decoder needs more bytes or fails.
/// Returns the packets and whether it stopped on an error.
fn decode_all(data: &[u8], max_packet: usize) -> (Vec<Packet>, bool) {
    let mut buf = BytesMut::from(data);
    let mut packets = Vec::new();
    loop {
        let before = buf.len();
        match decode(&mut buf, max_packet) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before, "a packet must consume bytes");
                packets.push(packet);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more must consume nothing");
                return (packets, false);
            }
            Err(e) => {
                assert!(!e.kind().is_empty());
                return (packets, true);
            }
        }
    }
}

/// Feeds `data` to a codec in chunks of `chunk` bytes, with the same stopping rule.
fn decode_chunked(data: &[u8], max_packet: usize, chunk: usize) -> (Vec<Packet>, bool) {
    let mut codec = MqttCodec::new(max_packet);
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => packets.push(packet),
                Ok(None) => break,
                Err(_) => return (packets, true),
            }
        }
    }
    (packets, false)
}

fuzz_target!(|data: &[u8]| {
    let chunk = usize::from(data.first().copied().unwrap_or(0) % 17) + 1;
    for max_packet in [64, 1 << 20] {
        let (packets, failed) = decode_all(data, max_packet);
        for packet in &packets {
            let mut again = BytesMut::new();
            encode(packet, &mut again);
            let redecoded = decode(&mut again, usize::MAX).expect("re-encoded packet decodes");
            assert_eq!(redecoded.as_ref(), Some(packet));
            assert!(again.is_empty());
        }
        assert_eq!(decode_chunked(data, max_packet, chunk), (packets, failed));
    }
});
