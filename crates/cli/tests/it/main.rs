//! The `muster` binary's integration tests, run as child processes against
//! real etcd and the embedded registry.
//!
//! One test binary per crate (one `mod` per area) rather than one per file:
//! every binary links the whole dependency tree, so fewer binaries mean a
//! faster, smaller build. Run one area with `cargo test -p <crate> --test it <area>::`.

mod auth;
mod bench;
mod browser;
mod client_tls;
#[macro_use]
mod common;
mod dashboard;
mod demo;
mod dns;
mod ops;
mod quota;
mod register;
mod seed;
mod serve;
mod serve_tls;
mod snapshot;
