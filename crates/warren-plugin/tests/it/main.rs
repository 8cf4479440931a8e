//! warren-plugin's tests: plugins of every kind loaded into a real node on port 0 and driven by
//! real clients (a TCP line client, rumqttc). The C and Rust example plugins are compiled here,
//! into temporary directories, with the machine's `cc` and `rustc`.

#![allow(clippy::unwrap_used)]

mod channels;
mod kit;
mod modules;
mod patch;
mod reload;
mod watch;
