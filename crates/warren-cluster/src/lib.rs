//! warren's cluster parts: the brokers that carry calls between nodes and the registries where
//! nodes find each other, each behind the traits of the `warren` crate
//! ([`Transport`](warren::remote::Transport), [`Registry`](warren::registry::Registry)), plus the
//! bridges that let peers of the original systems call warren modules and be called by them.
//!
//! | URL | bus | registry |
//! |---|---|---|
//! | `nats://host:4222` | [`nats::NatsTransport`] | [`nats::KvRegistry`] (JetStream KV) |
//! | `redis://host:6379/0` | [`redis::RedisTransport`] | [`redis::GobaseRegistry`] (docs/cluster.md) |
//! | `amqp://user:pass@host:5672/%2f` | [`amqp::AmqpTransport`] | – |
//! | `etcd://host:2379` (feature `etcd`) | – | `etcd::EtcdRegistry` |
//!
//! The NATS and Redis buses also keep the cluster's shared copy of the retained MQTT messages
//! ([`nats::NatsRetained`], [`redis::RedisRetained`], [`connect::shared_retained`]).

#![forbid(unsafe_code)]

pub mod amqp;
pub mod backend;
pub mod connect;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod nats;
pub mod proxy;
pub mod redis;
mod retained_value;
pub mod rpc_route;
