//! warren: the library behind the `warren` binary.
//!
//! A [`Node`](node::Node) owns everything one process runs: the gate listeners that keep client
//! connections open, the [`SessionTable`](session::SessionTable) of those connections, the
//! [`Router`](router::Router) that turns a client message into a handler call, and the
//! [`Module`](module::Module) instances whose handlers answer it. Modules reach one another and the
//! gate through a [`Bus`](bus::Bus) and find one another through a [`Registry`](registry::Registry);
//! this crate ships the in-memory implementations, so one process needs no other server.
//!
//! The request path, with the file that owns each step, all on the connection's one task when the
//! module runs in this process: bytes → `gate/mqtt.rs` (decode, session) → `gate/conn.rs` (the
//! connection's route cache, else `router.rs`: route → instance) → `module/runtime.rs` (run the
//! handler; one that waits moves to a task of its own; another node's instance goes over
//! `bus.rs`) → the reply framed by `gate/mqtt.rs` and written by `gate/conn.rs`. The layers are
//! drawn in docs/architecture.md.

#![forbid(unsafe_code)]

pub mod acl;
pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod fanout;
pub mod gate;
pub(crate) mod message_path;
pub mod module;
pub mod mqant_conf;
pub mod mqtt_session;
/// The durable MQTT store (`[mqtt] store`): retained messages and persistent sessions in a redb
/// file (feature `mqtt-store`).
#[cfg(feature = "mqtt-store")]
pub mod mqtt_store;
pub mod node;
pub(crate) mod refusal;
pub mod registry;
pub mod remote;
pub mod retained;
pub mod ring;
pub mod route;
pub mod router;
pub mod session;
pub mod trace;

pub use error::{CallError, CallErrorKind};
pub use module::{Context, Execution, Json, Module, ModuleBuilder, Services};
pub use node::{Node, NodeBuilder};
pub use route::Route;
pub use session::{Session, SessionId};

/// The module guide (docs/modules.md), compiled and run as a doctest so its examples stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/modules.md")]
pub struct ModulesGuide;
