//! etcd's v3 gRPC API, the subset muster speaks, generated from our own
//! `.proto` files by protox and tonic-prost-build (no `protoc` needed).
//!
//! The packages mirror etcd's: [`etcdserverpb`] (KV, Watch, Lease,
//! Maintenance, Cluster, Auth), [`mvccpb`] (keys and events) and [`authpb`].
//! Message names and field numbers are etcd's, so the client stubs talk to a
//! real etcd 3.4+ cluster and the server stubs serve etcd's own clients.
#![forbid(unsafe_code)]

/// Keys, values and watch events (`mvccpb`).
#[allow(missing_docs, clippy::all)]
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}

/// Users, roles and permissions (`authpb`).
#[allow(missing_docs, clippy::all)]
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
}

/// The etcd v3 services and their messages (`etcdserverpb`).
#[allow(missing_docs, clippy::all)]
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

pub use etcdserverpb::*;

/// The exclusive end of the range of every key starting with `prefix`, as
/// etcd's `clientv3.GetPrefixRangeEnd` computes it; `[0]` (every key) when
/// no such end exists (empty prefix, or only `0xff` bytes).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
pub use mvccpb::{Event, KeyValue, event::EventType};
