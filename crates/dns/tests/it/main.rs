//! The DNS server's integration tests, against real etcd and the embedded
//! registry (`on_both!`), with raw queries, hickory's resolver and `dig`
//! as clients.
//!
//! One test binary (one `mod` per area), as the other crates: fewer
//! binaries link faster. Run one area with
//! `cargo test -p muster-dns --test it <area>::`.

mod answers;
mod common;
mod dig;
mod outage;
mod robustness;
