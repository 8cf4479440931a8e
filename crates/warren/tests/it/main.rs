//! Library-level tests of the warren crate: modules, calls and the node, without sockets.
//! The gate in process (`gate`), driven by rumqttc; end to end, against the real binary, by
//! tests/e2e.

#![allow(clippy::unwrap_used)]

mod cluster;
mod gate;
mod layering;
mod modules;
