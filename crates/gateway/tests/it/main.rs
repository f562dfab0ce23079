//! The gateway's integration tests: proxying, balancing, health, streaming,
//! upgrades and TLS, against real etcd and the embedded registry.
//!
//! One test binary per crate (one `mod` per area) rather than one per file:
//! every binary links the whole dependency tree, so fewer binaries mean a
//! faster, smaller build. Run one area with `cargo test -p <crate> --test it <area>::`.

mod common;
mod h1;
mod proxy;
mod stream;
mod tls;
