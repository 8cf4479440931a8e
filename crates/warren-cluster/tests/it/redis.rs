//! Tests of `warren_cluster::redis` against a real server.
