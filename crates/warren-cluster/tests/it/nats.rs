//! Tests of `warren_cluster::nats` against a real server.
