//! What user code learns of, and decides for, a backend group: every method has a default, so
//! a user implements only what it needs (docs/backends.md, "Hooks").

use std::future::Future;
use std::io;

use super::codec::Codec;
use super::tcp::Service;
use super::{RpcId, ServiceConf};

/// What to do after a dial failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Redial {
    /// Dial again in a second (the default).
    #[default]
    Retry,
    /// Stop dialling: the service leaves its group (`on_remove`). A later discovery update that
    /// lists it creates it again.
    Stop,
}

/// The hooks of a [`Backends`](super::Backends).
///
/// The synchronous hooks run on the task that noticed the event (the update call, or the
/// service's connection task) and should return quickly. [`on_msg`](Hooks::on_msg) and
/// [`on_tick`](Hooks::on_tick) are async and run on the service's delivery task, one after the
/// other in arrival order (`msg_seq = true`), or on a bounded pool of tasks (`msg_seq = false`).
pub trait Hooks<C: Codec>: Send + Sync + 'static {
    /// Choose which of the services a discovery update lists are kept (all, by default). Names,
    /// ids and tags are already lowercased and trimmed.
    fn filter(&self, group: &str, services: Vec<ServiceConf>) -> Vec<ServiceConf> {
        let _ = group;
        services
    }

    /// A service joined a group (it dials in the background).
    fn on_add(&self, service: &Service<C>) {
        let _ = service;
    }

    /// A service left its group for good: its connection task has ended.
    fn on_remove(&self, service: &Service<C>) {
        let _ = service;
    }

    /// A service's connection is up; it is now on its group's rings.
    fn on_connected(&self, service: &Service<C>) {
        let _ = service;
    }

    /// A service's connection is down; it left the rings and its waiting calls ended with
    /// `close`.
    fn on_disconnect(&self, service: &Service<C>) {
        let _ = service;
    }

    /// A dial failed (or timed out). Dial again in a second, or stop.
    fn on_dial_fail(&self, service: &Service<C>, error: &io::Error) -> Redial {
        let _ = (service, error);
        Redial::Retry
    }

    /// `len` bytes were written to a service's socket.
    fn on_send(&self, service: &Service<C>, len: usize) {
        let _ = (service, len);
    }

    /// `len` bytes were read from a service's socket.
    fn on_recv(&self, service: &Service<C>, len: usize) {
        let _ = (service, len);
    }

    /// Whether a decoded message answers a call, and which: the rpc id of the waiting
    /// [`Service::call`]. Messages that answer no waiting call go to [`on_msg`](Hooks::on_msg).
    fn check_rpc_resp(&self, msg: &C::Msg) -> Option<RpcId> {
        let _ = msg;
        None
    }

    /// A message from a service that answers no call.
    fn on_msg(&self, service: &Service<C>, msg: C::Msg) -> impl Future<Output = ()> + Send {
        let _ = (service, msg);
        async {}
    }

    /// Once a second for each service of every group, connected or not.
    fn on_tick(&self, service: &Service<C>) -> impl Future<Output = ()> + Send {
        let _ = service;
        async {}
    }
}

/// Hooks that do nothing: a group that is only sent to, or only called.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl<C: Codec> Hooks<C> for NoHooks {}
