//! The fan-out relay (`warren bench relay-server`): the physical-limit reference for `pubsub`,
//! as `echo-server` is for `request`. It speaks just enough MQTT 3.1.1 for the generator — a
//! CONNACK for CONNECT, a SUBACK granting QoS 0 for SUBSCRIBE, UNSUBACK, PINGRESP — and treats
//! every connection that subscribed to anything as a subscriber of the one topic there is.
//!
//! Each read of a connection is cut at packet boundaries (walking the fixed headers: type and
//! length, the least any MQTT server must read); each run of PUBLISH packets in it becomes one
//! shared `Bytes` that every subscriber's queue gets a reference to, and each subscriber's task
//! writes what its queue holds in one vectored write. No topic is matched, no packet decoded or
//! re-encoded: no per-message work beyond the header walk. QoS 0 only (a QoS 1 PUBLISH is
//! relayed as it is and never acknowledged).
//!
//! One task per connection reads, answers, and writes what its queue holds (the mini-redis
//! shape). A subscriber whose queue is full holds the publisher back, so memory stays bounded
//! and the generator's closed loop measures the relay's throughput.

use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::BenchError;
use crate::args::EchoServerArgs;

/// Read room per connection.
const READ_CHUNK: usize = 64 * 1024;

/// Chunks a subscriber's queue holds before publishers wait for it.
const QUEUE: usize = 256;

/// Most queued chunks written in one vectored write.
const WRITE_BATCH: usize = 64;

/// Largest packet accepted (the generator's are far smaller).
const MAX_PACKET: usize = 1 << 20;

/// Every subscriber's id and queue.
type List = Arc<Vec<(u64, mpsc::Sender<Bytes>)>>;

/// The subscribers, replaced as a whole when one comes or goes so that a publisher takes a
/// snapshot for the price of a reference count.
#[derive(Default)]
struct Subscribers {
    list: Mutex<List>,
    next_id: AtomicU64,
}

impl Subscribers {
    fn add(&self, tx: mpsc::Sender<Bytes>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut list = self.list.lock();
        let mut v = Vec::clone(&list);
        v.push((id, tx));
        *list = Arc::new(v);
        id
    }

    fn remove(&self, id: u64) {
        let mut list = self.list.lock();
        if list.iter().any(|(i, _)| *i == id) {
            let v = list.iter().filter(|(i, _)| *i != id).cloned().collect();
            *list = Arc::new(v);
        }
    }

    fn snapshot(&self) -> List {
        self.list.lock().clone()
    }
}

/// Serves until `stop` is cancelled; prints `listening ADDR` on stdout once bound.
pub async fn run(a: &EchoServerArgs, stop: CancellationToken) -> Result<(), BenchError> {
    let subs = Arc::new(Subscribers::default());
    crate::echo::accept_loop(a, stop, move |sock, stop| {
        connection(sock, subs.clone(), stop)
    })
    .await
}

/// What a connection's read held, cut at packet boundaries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Cut {
    /// Runs of whole PUBLISH packets, in order, to relay.
    publishes: Vec<Bytes>,
    /// Answers for this connection (CONNACK, SUBACK, UNSUBACK, PINGRESP).
    answers: Vec<u8>,
    /// The connection subscribed.
    subscribed: bool,
    /// The connection sent DISCONNECT (or something that is not MQTT): close it.
    close: bool,
}

/// The fixed header at the start of `buf`: (header length, remaining length), `None` until it
/// is all there, `Err` when it is not MQTT.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, ()> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((2 + i, len)));
        }
    }
    Err(())
}

/// Takes every whole packet from the front of `buf`: PUBLISH runs to relay, answers for the
/// others. An incomplete packet stays in `buf`.
fn cut(buf: &mut BytesMut) -> Cut {
    let mut out = Cut::default();
    // bytes at the front of `buf` that are whole PUBLISH packets not yet split off
    let mut run = 0;
    loop {
        let rest = &buf[run..];
        let Some(&first) = rest.first() else { break };
        let (h, len) = match fixed_header(rest) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(()) => {
                out.close = true;
                break;
            }
        };
        if h + len > MAX_PACKET {
            out.close = true;
            break;
        }
        if rest.len() < h + len {
            break;
        }
        if first >> 4 == 3 {
            run += h + len;
            continue;
        }
        // another packet: what came before it goes out first, then it is answered
        if run > 0 {
            out.publishes.push(buf.split_to(run).freeze());
            run = 0;
        }
        let body = &buf[h..h + len];
        match first >> 4 {
            1 => out.answers.extend_from_slice(&[0x20, 0x02, 0x00, 0x00]),
            8 => {
                let (Some(&hi), Some(&lo)) = (body.first(), body.get(1)) else {
                    out.close = true;
                    break;
                };
                let n = count_filters(body.get(2..).unwrap_or_default());
                out.answers.push(0x90);
                push_remaining_length(&mut out.answers, 2 + n);
                out.answers.extend_from_slice(&[hi, lo]);
                out.answers.resize(out.answers.len() + n, 0x00);
                out.subscribed = true;
            }
            10 => {
                let (Some(&hi), Some(&lo)) = (body.first(), body.get(1)) else {
                    out.close = true;
                    break;
                };
                out.answers.extend_from_slice(&[0xB0, 0x02, hi, lo]);
            }
            12 => out.answers.extend_from_slice(&[0xD0, 0x00]),
            14 => out.close = true,
            // acknowledgements and the rest need nothing
            _ => {}
        }
        buf.advance(h + len);
        if out.close {
            break;
        }
    }
    if run > 0 {
        out.publishes.push(buf.split_to(run).freeze());
    }
    out
}

/// The number of (filter, QoS) pairs in a SUBSCRIBE payload.
fn count_filters(mut p: &[u8]) -> usize {
    let mut n = 0;
    while let (Some(&hi), Some(&lo)) = (p.first(), p.get(1)) {
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let Some(rest) = p.get(2 + len + 1..) else {
            break;
        };
        n += 1;
        p = rest;
    }
    n.max(1)
}

/// Appends an MQTT remaining length.
fn push_remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// One connection: reads and answers, relays its PUBLISH runs to every subscriber, and, once it
/// has subscribed, writes what its queue holds.
async fn connection(mut sock: TcpStream, subs: Arc<Subscribers>, stop: CancellationToken) {
    let _ = sock.set_nodelay(true);
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let mut tx = Some(tx);
    let mut my_id = None;
    let mut buf = BytesMut::new();
    let mut chunks: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH);
    'conn: loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            n = rx.recv_many(&mut chunks, WRITE_BATCH), if my_id.is_some() => {
                if n == 0 || write_all_vectored(&mut sock, &chunks).await.is_err() {
                    break;
                }
                chunks.clear();
            }
            r = sock.read_buf(&mut buf) => {
                match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let c = cut(&mut buf);
                if !c.publishes.is_empty() {
                    let list = subs.snapshot();
                    for run in c.publishes {
                        for (_, s) in list.iter() {
                            match s.try_send(run.clone()) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(b)) => {
                                    // a full queue holds this publisher back (our own queue
                                    // included: keep writing it meanwhile)
                                    if send_draining(s, b, &mut rx, &mut sock, my_id.is_some()).await.is_err() {
                                        break 'conn;
                                    }
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => {}
                            }
                        }
                    }
                }
                if c.subscribed
                    && my_id.is_none()
                    && let Some(tx) = tx.take()
                {
                    my_id = Some(subs.add(tx));
                }
                if !c.answers.is_empty() && sock.write_all(&c.answers).await.is_err() {
                    break;
                }
                if c.close {
                    break;
                }
            }
        }
    }
    if let Some(id) = my_id {
        subs.remove(id);
    }
}

/// Waits for room in `s`'s queue; when this connection is a subscriber too, keeps writing its
/// own queue meanwhile (else a connection that both publishes and subscribes would wait on
/// itself).
async fn send_draining(
    s: &mpsc::Sender<Bytes>,
    b: Bytes,
    rx: &mut mpsc::Receiver<Bytes>,
    sock: &mut TcpStream,
    subscribed: bool,
) -> std::io::Result<()> {
    let send = s.send(b);
    tokio::pin!(send);
    let mut chunks = Vec::with_capacity(WRITE_BATCH);
    loop {
        tokio::select! {
            biased;
            r = &mut send => return r.map_err(|_| std::io::ErrorKind::BrokenPipe.into()),
            n = rx.recv_many(&mut chunks, WRITE_BATCH), if subscribed => {
                if n == 0 {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                write_all_vectored(sock, &chunks).await?;
                chunks.clear();
            }
        }
    }
}

/// Writes every chunk, as few syscalls as the socket allows.
async fn write_all_vectored(sock: &mut TcpStream, chunks: &[Bytes]) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = chunks.iter().map(|c| IoSlice::new(c)).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = sock.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::mqtt::{self, Connect, Packet, QoS, Subscribe, SubscribeFilter};

    fn publish(out: &mut BytesMut, i: u8) {
        mqtt::encode_publish(out, b"bench/1", QoS::AtMostOnce, false, false, 0, &[i; 30]);
    }

    #[test]
    fn publishes_are_cut_into_runs_and_the_rest_answered() {
        let mut buf = BytesMut::new();
        mqtt::encode(&Packet::Connect(Connect::new("c", 60)), &mut buf);
        publish(&mut buf, 1);
        publish(&mut buf, 2);
        mqtt::encode(&Packet::PingReq, &mut buf);
        publish(&mut buf, 3);
        mqtt::encode(
            &Packet::Subscribe(Subscribe {
                pkid: 7,
                filters: vec![
                    SubscribeFilter {
                        filter: "bench/1".into(),
                        qos: QoS::AtMostOnce,
                    },
                    SubscribeFilter {
                        filter: "x/#".into(),
                        qos: QoS::AtLeastOnce,
                    },
                ],
            }),
            &mut buf,
        );
        // half of a last publish stays for the next read
        let mut tail = BytesMut::new();
        publish(&mut tail, 4);
        buf.extend_from_slice(&tail[..10]);
        let c = cut(&mut buf);
        assert_eq!(c.publishes.len(), 2);
        let mut run = BytesMut::from(&c.publishes[0][..]);
        for i in [1, 2] {
            let Some(Packet::Publish(p)) = mqtt::decode(&mut run, MAX_PACKET).unwrap() else {
                panic!("not a publish")
            };
            assert_eq!(p.payload[0], i);
        }
        assert!(run.is_empty());
        let mut answers = BytesMut::from(&c.answers[..]);
        assert!(matches!(
            mqtt::decode(&mut answers, MAX_PACKET).unwrap(),
            Some(Packet::ConnAck(a)) if a.code == 0
        ));
        assert!(matches!(
            mqtt::decode(&mut answers, MAX_PACKET).unwrap(),
            Some(Packet::PingResp)
        ));
        match mqtt::decode(&mut answers, MAX_PACKET).unwrap() {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.pkid, 7);
                assert_eq!(a.return_codes, vec![0, 0]);
            }
            other => panic!("{other:?}"),
        }
        assert!(answers.is_empty());
        assert!(c.subscribed && !c.close);
        assert_eq!(&buf[..], &tail[..10]);
        buf.extend_from_slice(&tail[10..]);
        let c = cut(&mut buf);
        assert_eq!(c.publishes, vec![tail.freeze()]);
        assert!(buf.is_empty());
    }

    #[test]
    fn disconnect_and_garbage_close() {
        let mut buf = BytesMut::new();
        publish(&mut buf, 1);
        mqtt::encode(&Packet::Disconnect, &mut buf);
        publish(&mut buf, 2);
        let c = cut(&mut buf);
        assert!(c.close);
        assert_eq!(c.publishes.len(), 1);
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(cut(&mut buf).close);
    }

    #[test]
    fn remaining_lengths() {
        for n in [0usize, 127, 128, 16_383, 16_384, 2_097_151] {
            let mut v = vec![0x90];
            push_remaining_length(&mut v, n);
            assert_eq!(fixed_header(&v), Ok(Some((v.len(), n))));
        }
        assert_eq!(fixed_header(&[0x30]), Ok(None));
        assert_eq!(fixed_header(&[0x30, 0x80]), Ok(None));
    }
}
