//! The embedded registry's integration tests: etcd conformance, differential
//! runs against real etcd, the etcd features the Go registries use
//! (`go_clients`), watch, restart, TLS and fault injection (`faults`).
//!
//! One test binary per crate (one `mod` per area) rather than one per file:
//! every binary links the whole dependency tree, so fewer binaries mean a
//! faster, smaller build. Run one area with `cargo test -p <crate> --test it <area>::`.

mod auth;
mod common;
mod conformance;
mod differential;
mod faults;
mod go_clients;
mod maintenance;
mod quota;
mod restart;
mod tls;
mod watch;
