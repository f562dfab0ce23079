//! The dashboard's integration tests: its JSON/SSE API and a headless
//! browser, against real etcd and the embedded registry.
//!
//! One test binary per crate (one `mod` per area) rather than one per file:
//! every binary links the whole dependency tree, so fewer binaries mean a
//! faster, smaller build. Run one area with `cargo test -p <crate> --test it <area>::`.

mod api;
mod auth;
mod browser;
mod common;
