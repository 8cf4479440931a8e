//! Integration tests of the cluster parts against real servers (see `kit.rs`).

mod amqp;
mod backend;
mod backend_more;
#[cfg(feature = "etcd")]
mod etcd;
mod kit;
mod nats;
mod redis;

#[test]
fn kit_starts_and_restarts_every_server() {
    for kind in [kit::Kind::Nats, kit::Kind::Redis, kit::Kind::Etcd] {
        kit::Server::require(kind);
        let mut s = kit::Server::start(kind);
        assert!(
            kit::wait_port(s.port, std::time::Duration::from_secs(1)),
            "{kind:?}"
        );
        s.restart();
        assert!(
            kit::wait_port(s.port, std::time::Duration::from_secs(1)),
            "{kind:?}"
        );
    }
}
