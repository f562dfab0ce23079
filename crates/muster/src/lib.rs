//! # muster
//!
//! Service registration and discovery for Rust microservices, on etcd.
#![forbid(unsafe_code)]

pub mod auth;
pub mod balance;
pub mod catalog;
pub mod client;
pub mod discovery;
pub mod duration;
pub mod error;
mod follow;
pub mod grpc;
pub mod instance;
pub mod layout;
pub mod metrics;
pub mod registrar;

pub use catalog::{Catalog, CatalogSnapshot};
pub use client::{Config, Etcd};
pub use discovery::{Discovery, DiscoveryConfig, Service};
pub use duration::parse_duration;
pub use error::{Error, Result};
pub use instance::{Instance, Status};
pub use layout::{LayoutKind, Source};
pub use muster_tls::{ClientTls, Pem};
pub use registrar::{Registrar, RegistrarConfig, RegistrarState};
