//! Tests of `warren_cluster::etcd` against a real server.
