//! Client protocol codecs for warren.
//!
//! Every codec here is pure: it turns bytes into typed packets and back, and never touches a
//! socket, a clock or a runtime. The gate's connection tasks drive these codecs through
//! `tokio_util::codec` framing, and the same functions are fed arbitrary bytes by the fuzz
//! targets under `fuzz/`, so decoders must return `Ok(None)` for "need more bytes", check every
//! size limit before allocating, and never panic.
//!
//! Protocols live in sibling modules: MQTT 3.1.1 (which also reads 3.1 `MQIsdp` CONNECTs) in
//! [`mqtt`], the pomelo client protocol in [`pomelo`], the telnet-friendly line framing in
//! [`line`](mod@line), JSON-over-WebSocket frames in [`json_ws`], and the pomelo-rpc messages and their
//! stream-pkg TCP framing in [`pomelo_rpc`] and [`stream_pkg`]. The frames warren nodes send each
//! other over a broker are in [`node_frame`]; the gobase test codec a node speaks to its TCP
//! backend services is in [`backend_frame`]; the W3C trace context a call carries across nodes
//! is in [`trace_context`].

#![forbid(unsafe_code)]

pub mod backend_frame;
pub mod json_ws;
pub mod line;
pub mod mqtt;
pub mod mqtt_forward;
pub mod mqtt_handover;
pub mod node_frame;
pub mod pomelo;
pub mod pomelo_rpc;
pub mod proxy_envelope;
pub mod stream_pkg;
pub mod trace_context;
