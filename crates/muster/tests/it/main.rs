//! The library's integration tests: client, registrar, discovery, catalog,
//! watch and gRPC balancing, against real etcd and the embedded registry;
//! interop with Go programs using etcd's naming package (`go_naming`).
//!
//! One test binary per crate (one `mod` per area) rather than one per file:
//! every binary links the whole dependency tree, so fewer binaries mean a
//! faster, smaller build. Run one area with `cargo test -p <crate> --test it <area>::`.

mod auth;
mod auth_refresh;
mod catalog;
mod client;
mod common;
mod examples;
mod go_naming;
mod grpc;
mod layouts;
mod metrics;
mod registry;
mod tls;
mod watch;
