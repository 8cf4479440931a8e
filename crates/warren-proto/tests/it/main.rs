//! Integration tests of `warren-proto`: golden wire vectors from the protocol contracts and
//! property tests over the public API. One binary, one module per concern.

// Test helpers outside `#[test]` functions unwrap too; a panic is a test failure here.
#![allow(clippy::unwrap_used)]

mod golden;
mod json_ws_golden;
mod line_golden;
mod node_frame;
mod pomelo;
mod pomelo_rpc_golden;
mod roundtrip;
