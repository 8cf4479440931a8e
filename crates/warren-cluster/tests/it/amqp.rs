//! Tests of `warren_cluster::amqp` against a real server.
