//! The fixed four-byte packets a server answers with (CONNACK and the acknowledgements that
//! carry only a packet id), as arrays: a gate queues them inline, without a buffer or an
//! allocation, and they are the same bytes [`super::encode`] writes for the packet.

/// An acknowledgement that carries only a packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// PUBACK: a QoS 1 PUBLISH was received.
    PubAck,
    /// PUBREC: a QoS 2 PUBLISH was received (first step).
    PubRec,
    /// PUBREL: the sender of a QoS 2 PUBLISH releases it (second step).
    PubRel,
    /// PUBCOMP: a QoS 2 exchange is complete (third step).
    PubComp,
    /// UNSUBACK: an UNSUBSCRIBE was done.
    UnsubAck,
}

/// The bytes of `ack` for packet id `pkid` (MQTT 3.1.1 §3.4–3.7, §3.11: PUBREL has the
/// reserved flags 0b0010).
pub fn ack_bytes(ack: Ack, pkid: u16) -> [u8; 4] {
    let first = match ack {
        Ack::PubAck => 0x40,
        Ack::PubRec => 0x50,
        Ack::PubRel => 0x62,
        Ack::PubComp => 0x70,
        Ack::UnsubAck => 0xb0,
    };
    let [h, l] = pkid.to_be_bytes();
    [first, 0x02, h, l]
}

/// The bytes of a CONNACK with return `code` (0 accepted; 1–5 refused, §3.2.2.3) and the
/// session-present flag.
pub const fn connack_bytes(session_present: bool, code: u8) -> [u8; 4] {
    let flags = if session_present && code == 0 { 1 } else { 0 };
    [0x20, 0x02, flags, code]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{ConnAck, Packet, encode};
    use bytes::BytesMut;

    fn encoded(p: &Packet) -> Vec<u8> {
        let mut b = BytesMut::new();
        encode(p, &mut b);
        b.to_vec()
    }

    #[test]
    fn the_arrays_are_what_the_encoder_writes() {
        for pkid in [1u16, 0x1234, u16::MAX] {
            assert_eq!(
                ack_bytes(Ack::PubAck, pkid).to_vec(),
                encoded(&Packet::PubAck(pkid))
            );
            assert_eq!(
                ack_bytes(Ack::PubRec, pkid).to_vec(),
                encoded(&Packet::PubRec(pkid))
            );
            assert_eq!(
                ack_bytes(Ack::PubRel, pkid).to_vec(),
                encoded(&Packet::PubRel(pkid))
            );
            assert_eq!(
                ack_bytes(Ack::PubComp, pkid).to_vec(),
                encoded(&Packet::PubComp(pkid))
            );
            assert_eq!(
                ack_bytes(Ack::UnsubAck, pkid).to_vec(),
                encoded(&Packet::UnsubAck(pkid))
            );
        }
        for code in 0..=5u8 {
            let c = ConnAck {
                session_present: false,
                code,
            };
            assert_eq!(
                connack_bytes(false, code).to_vec(),
                encoded(&Packet::ConnAck(c))
            );
        }
    }
}
