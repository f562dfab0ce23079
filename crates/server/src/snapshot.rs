//! Snapshots: a point-in-time copy of the whole server state, as
//! `Maintenance.Snapshot` streams it and `muster snapshot restore` reads it.
//!
//! # Format (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! magic      8 bytes   "MUSTSNAP"
//! version    u32       1
//! records    ...       tag u8, length u32, payload (length bytes)
//! trailer    32 bytes  SHA-256 of everything before it
//! ```
//!
//! Records, in this order:
//!
//! - `1` meta, first and once: revision i64, compact revision i64, auth
//!   enabled u8 (0 or 1), auth revision u64 (25 bytes);
//! - `2` event, in `(revision, sub revision)` order: revision i64, sub
//!   revision i64, then the prost-encoded [`Event`] as storage keeps it
//!   (`prev_kv` unset; a delete's `kv` holds the key and `mod_revision`).
//!   The keys are the storage's own `(main, sub)` keys, so that later
//!   compactions of a restored store remove the right records;
//! - `3` lease: id i64, granted TTL i64 (seconds);
//! - `4` user: a prost-encoded [`authpb::User`] (with its bcrypt hash);
//! - `5` role: a prost-encoded [`authpb::Role`];
//! - `7` padding, once, just before the end record: zero bytes, as many
//!   as make the length before the trailer a multiple of 512;
//! - `6` end, last and once: the numbers of event, lease, user and role
//!   records, u64 each (32 bytes).
//!
//! As etcd's snapshot stream (a bbolt file followed by its SHA-256), the
//! stream ends with the SHA-256 of what precedes it, so `etcdctl snapshot
//! save` accepts ours: it checks only the trailer, and that the length
//! before it is a multiple of 512 (a bbolt file is whole pages), hence the
//! padding.
//!
//! # Leases
//!
//! A snapshot keeps each lease's granted TTL, not the time left: a
//! restored server grants every lease its full TTL again when it starts,
//! as etcd does after a restore (and as [`crate::core::Core::new`] does
//! after any restart).

use std::collections::HashMap;

use muster_proto::authpb;
use muster_proto::{Event, EventType};
use prost::Message;

use crate::storage::{LeaseRecord, Recovered};

/// First bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"MUSTSNAP";

/// Version of the format written (and the only one read).
pub const FORMAT_VERSION: u32 = 1;

/// Size of the SHA-256 trailer.
pub const HASH_BYTES: usize = 32;

/// Bytes per `SnapshotResponse` blob (etcd's 32 KiB).
pub const CHUNK_BYTES: usize = 32 * 1024;

const HEADER_BYTES: usize = MAGIC.len() + 4;

const TAG_META: u8 = 1;
const TAG_EVENT: u8 = 2;
const TAG_LEASE: u8 = 3;
const TAG_USER: u8 = 4;
const TAG_ROLE: u8 = 5;
const TAG_END: u8 = 6;
const TAG_PAD: u8 = 7;

/// The length before the trailer is a multiple of this (see the padding
/// record).
pub const ALIGN: usize = 512;

/// Length of the end record, its header included.
const END_RECORD_BYTES: usize = 5 + 32;

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Shorter than a header and a trailer.
    #[error("snapshot too short: {len} bytes, a snapshot has at least {min}")]
    TooShort {
        /// Its length.
        len: usize,
        /// The least length of a snapshot.
        min: usize,
    },
    /// The SHA-256 trailer does not match the content: truncated or damaged.
    #[error(
        "snapshot hash mismatch (truncated or corrupted): trailer says {expected}, content hashes to {found}"
    )]
    HashMismatch {
        /// The trailer, in hex.
        expected: String,
        /// The content's hash, in hex.
        found: String,
    },
    /// Not a muster snapshot (for example an etcd one, a bbolt file).
    #[error(
        "not a muster snapshot (bad magic {found:02x?}); an etcd snapshot must be restored with etcdutl"
    )]
    BadMagic {
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// A format version this build does not read.
    #[error("unsupported snapshot format version {found} (this build reads {expected})")]
    UnsupportedVersion {
        /// Version found.
        found: u32,
        /// Version supported.
        expected: u32,
    },
    /// A record is malformed.
    #[error("corrupt snapshot record at offset {offset}: {reason}")]
    Corrupt {
        /// Byte offset of the record.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
}

fn corrupt(offset: usize, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        offset,
        reason: reason.into(),
    }
}

/// The SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; HASH_BYTES] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0; HASH_BYTES];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the SHA-256 trailer of a snapshot stream (ours or etcd's): the
/// content without the trailer.
pub fn verify_trailer(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    if bytes.len() < HASH_BYTES {
        return Err(SnapshotError::TooShort {
            len: bytes.len(),
            min: HASH_BYTES,
        });
    }
    let (content, trailer) = bytes.split_at(bytes.len() - HASH_BYTES);
    let found = sha256(content);
    if found != trailer {
        return Err(SnapshotError::HashMismatch {
            expected: hex(trailer),
            found: hex(&found),
        });
    }
    Ok(content)
}

/// Checks a snapshot stream's SHA-256 trailer as the stream arrives, in
/// constant memory: every byte but the last [`HASH_BYTES`] is hashed.
pub struct TrailerCheck {
    context: ring::digest::Context,
    tail: Vec<u8>,
    len: u64,
}

impl std::fmt::Debug for TrailerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrailerCheck")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Default for TrailerCheck {
    fn default() -> Self {
        TrailerCheck {
            context: ring::digest::Context::new(&ring::digest::SHA256),
            tail: Vec::with_capacity(2 * HASH_BYTES),
            len: 0,
        }
    }
}

impl TrailerCheck {
    /// Adds the next bytes of the stream.
    pub fn update(&mut self, mut chunk: &[u8]) {
        self.len += chunk.len() as u64;
        if chunk.len() >= HASH_BYTES {
            self.context.update(&self.tail);
            self.tail.clear();
            let (body, tail) = chunk.split_at(chunk.len() - HASH_BYTES);
            self.context.update(body);
            chunk = tail;
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > HASH_BYTES {
            let extra = self.tail.len() - HASH_BYTES;
            self.context.update(&self.tail[..extra]);
            self.tail.drain(..extra);
        }
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the last [`HASH_BYTES`] bytes are the SHA-256 of the rest.
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.tail.len() < HASH_BYTES {
            return Err(SnapshotError::TooShort {
                len: self.tail.len(),
                min: HASH_BYTES,
            });
        }
        let found = self.context.finish();
        if found.as_ref() != self.tail.as_slice() {
            return Err(SnapshotError::HashMismatch {
                expected: hex(&self.tail),
                found: hex(found.as_ref()),
            });
        }
        Ok(())
    }
}

/// Whether `bytes` start as a muster snapshot (an etcd snapshot does not).
pub fn is_muster_snapshot(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

fn record(out: &mut Vec<u8>, tag: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    payload(out);
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Encodes a state as a snapshot, trailer included. Events are written in
/// `(revision, sub revision)` order whatever their order in `state`.
pub fn encode(state: &Recovered) -> Vec<u8> {
    let approx: usize = state.events.iter().map(|(_, e)| 21 + e.encoded_len()).sum();
    let mut out = Vec::with_capacity(approx + 1024);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    record(&mut out, TAG_META, |p| {
        p.extend_from_slice(&state.revision.to_le_bytes());
        p.extend_from_slice(&state.compact_revision.to_le_bytes());
        p.push(u8::from(state.auth.enabled));
        p.extend_from_slice(&state.auth.revision.to_le_bytes());
    });
    let mut order: Vec<usize> = (0..state.events.len()).collect();
    order.sort_by_key(|&i| state.events[i].0);
    for i in order {
        let ((rev, sub), event) = &state.events[i];
        record(&mut out, TAG_EVENT, |p| {
            p.extend_from_slice(&rev.to_le_bytes());
            p.extend_from_slice(&sub.to_le_bytes());
            // Encoding into a Vec cannot fail.
            let _ = event.encode(p);
        });
    }
    for lease in &state.leases {
        record(&mut out, TAG_LEASE, |p| {
            p.extend_from_slice(&lease.id.to_le_bytes());
            p.extend_from_slice(&lease.ttl.to_le_bytes());
        });
    }
    for user in &state.auth.users {
        record(&mut out, TAG_USER, |p| {
            let _ = user.encode(p);
        });
    }
    for role in &state.auth.roles {
        record(&mut out, TAG_ROLE, |p| {
            let _ = role.encode(p);
        });
    }
    let used = out.len() + 5 + END_RECORD_BYTES;
    let pad = (ALIGN - used % ALIGN) % ALIGN;
    record(&mut out, TAG_PAD, |p| p.resize(p.len() + pad, 0));
    record(&mut out, TAG_END, |p| {
        for n in [
            state.events.len(),
            state.leases.len(),
            state.auth.users.len(),
            state.auth.roles.len(),
        ] {
            p.extend_from_slice(&(n as u64).to_le_bytes());
        }
    });
    let hash = sha256(&out);
    out.extend_from_slice(&hash);
    out
}

fn i64_at(p: &[u8], at: usize) -> i64 {
    let mut b = [0; 8];
    b.copy_from_slice(&p[at..at + 8]);
    i64::from_le_bytes(b)
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes a snapshot: checks its trailer, then its header and every
/// record. Nothing is returned unless all of it is valid.
pub fn decode(bytes: &[u8]) -> Result<Recovered, SnapshotError> {
    let min = HEADER_BYTES + HASH_BYTES;
    if bytes.len() < min {
        return Err(SnapshotError::TooShort {
            len: bytes.len(),
            min,
        });
    }
    let content = verify_trailer(bytes)?;
    if !is_muster_snapshot(content) {
        return Err(SnapshotError::BadMagic {
            found: content[..MAGIC.len()].to_vec(),
        });
    }
    let mut v = [0; 4];
    v.copy_from_slice(&content[MAGIC.len()..HEADER_BYTES]);
    let version = u32::from_le_bytes(v);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            expected: FORMAT_VERSION,
        });
    }

    let mut state = Recovered::default();
    let mut meta = false;
    let mut end = false;
    let mut last_event: Option<(i64, i64)> = None;
    let mut at = HEADER_BYTES;
    while at < content.len() {
        let offset = at;
        if end {
            return Err(corrupt(offset, "data after the end record"));
        }
        if content.len() - at < 5 {
            return Err(corrupt(offset, "record header cut short"));
        }
        let tag = content[at];
        let mut l = [0; 4];
        l.copy_from_slice(&content[at + 1..at + 5]);
        let len = u32::from_le_bytes(l) as usize;
        at += 5;
        if content.len() - at < len {
            return Err(corrupt(
                offset,
                format!("record of {len} bytes, only {} left", content.len() - at),
            ));
        }
        let p = &content[at..at + len];
        at += len;
        if !meta && tag != TAG_META {
            return Err(corrupt(offset, "the first record is not the meta record"));
        }
        let fixed = |want: usize| -> Result<(), SnapshotError> {
            if len == want {
                Ok(())
            } else {
                Err(corrupt(
                    offset,
                    format!("record of type {tag} has {len} bytes, not {want}"),
                ))
            }
        };
        match tag {
            TAG_META => {
                if meta {
                    return Err(corrupt(offset, "a second meta record"));
                }
                fixed(25)?;
                meta = true;
                state.revision = i64_at(p, 0);
                state.compact_revision = i64_at(p, 8);
                state.auth.enabled = match p[16] {
                    0 => false,
                    1 => true,
                    other => return Err(corrupt(offset, format!("auth enabled flag {other}"))),
                };
                state.auth.revision = u64_at(p, 17);
            }
            TAG_EVENT => {
                if len < 16 {
                    return Err(corrupt(offset, "event record shorter than its key"));
                }
                let key = (i64_at(p, 0), i64_at(p, 8));
                if last_event.is_some_and(|last| last >= key) {
                    return Err(corrupt(
                        offset,
                        format!("event {key:?} out of order (after {last_event:?})"),
                    ));
                }
                last_event = Some(key);
                let event = Event::decode(&p[16..])
                    .map_err(|e| corrupt(offset, format!("event {key:?}: {e}")))?;
                if event.kv.is_none() {
                    return Err(corrupt(offset, format!("event {key:?} has no key")));
                }
                state.events.push((key, event));
            }
            TAG_LEASE => {
                fixed(16)?;
                state.leases.push(LeaseRecord {
                    id: i64_at(p, 0),
                    ttl: i64_at(p, 8),
                });
            }
            TAG_USER => {
                let user =
                    authpb::User::decode(p).map_err(|e| corrupt(offset, format!("user: {e}")))?;
                state.auth.users.push(user);
            }
            TAG_ROLE => {
                let role =
                    authpb::Role::decode(p).map_err(|e| corrupt(offset, format!("role: {e}")))?;
                state.auth.roles.push(role);
            }
            TAG_END => {
                fixed(32)?;
                end = true;
                let counts = [
                    state.events.len(),
                    state.leases.len(),
                    state.auth.users.len(),
                    state.auth.roles.len(),
                ];
                for (i, (name, n)) in ["events", "leases", "users", "roles"]
                    .iter()
                    .zip(counts)
                    .enumerate()
                {
                    let want = u64_at(p, 8 * i);
                    if want != n as u64 {
                        return Err(corrupt(
                            offset,
                            format!("the end record counts {want} {name}, the snapshot has {n}"),
                        ));
                    }
                }
            }
            TAG_PAD => {
                if p.iter().any(|b| *b != 0) {
                    return Err(corrupt(offset, "padding that is not zeros"));
                }
            }
            other => return Err(corrupt(offset, format!("unknown record type {other}"))),
        }
    }
    if !meta {
        return Err(corrupt(at, "no meta record"));
    }
    if !end {
        return Err(corrupt(at, "no end record"));
    }
    Ok(state)
}

/// What `muster snapshot status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// CRC-32 (IEEE) of the snapshot without its trailer.
    pub hash: u32,
    /// The snapshot's revision.
    pub revision: i64,
    /// Live keys at that revision.
    pub total_keys: usize,
    /// Size of the file, trailer included.
    pub total_size: usize,
    /// Event records (key history kept since the last compaction).
    pub events: usize,
    /// Leases.
    pub leases: usize,
    /// Users and roles.
    pub users: usize,
    /// Roles.
    pub roles: usize,
    /// Whether authentication is on.
    pub auth_enabled: bool,
}

/// Decodes `bytes` and summarizes them.
pub fn status(bytes: &[u8]) -> Result<Status, SnapshotError> {
    let state = decode(bytes)?;
    let mut live: HashMap<&[u8], bool> = HashMap::new();
    for (_, event) in &state.events {
        if let Some(kv) = &event.kv {
            live.insert(&kv.key, event.r#type == EventType::Put as i32);
        }
    }
    Ok(Status {
        hash: crc32fast::hash(&bytes[..bytes.len() - HASH_BYTES]),
        revision: state.revision,
        total_keys: live.values().filter(|l| **l).count(),
        total_size: bytes.len(),
        events: state.events.len(),
        leases: state.leases.len(),
        users: state.auth.users.len(),
        roles: state.auth.roles.len(),
        auth_enabled: state.auth.enabled,
    })
}

#[cfg(test)]
mod tests {
    use muster_proto::KeyValue;

    use super::*;
    use crate::storage::RecoveredAuth;

    fn sample() -> Recovered {
        let put = |key: &str, rev: i64, create: i64, version: i64, lease: i64| Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.as_bytes().to_vec(),
                value: format!("v{rev}").into_bytes(),
                create_revision: create,
                mod_revision: rev,
                version,
                lease,
            }),
            prev_kv: None,
        };
        let del = Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: b"b".to_vec(),
                mod_revision: 5,
                ..KeyValue::default()
            }),
            prev_kv: None,
        };
        Recovered {
            events: vec![
                ((2, 0), put("a", 2, 2, 1, 0)),
                ((3, 0), put("b", 3, 3, 1, 7)),
                ((3, 1), put("c", 3, 3, 1, 0)),
                ((4, 0), put("a", 4, 2, 2, 0)),
                ((5, 0), del),
            ],
            compact_revision: 2,
            leases: vec![LeaseRecord { id: 7, ttl: 30 }],
            revision: 6,
            auth: RecoveredAuth {
                enabled: true,
                revision: 9,
                users: vec![authpb::User {
                    name: b"root".to_vec(),
                    password: b"$2b$hash".to_vec(),
                    roles: vec!["root".into()],
                    options: None,
                }],
                roles: vec![authpb::Role {
                    name: b"root".to_vec(),
                    key_permission: Vec::new(),
                }],
            },
        }
    }

    #[test]
    fn round_trip() {
        let state = sample();
        let bytes = encode(&state);
        assert!(is_muster_snapshot(&bytes));
        assert_eq!((bytes.len() - HASH_BYTES) % ALIGN, 0);
        assert_eq!(decode(&bytes).unwrap(), state);
        let st = status(&bytes).unwrap();
        assert_eq!(st.revision, 6);
        assert_eq!(st.total_keys, 2);
        assert_eq!(st.events, 5);
        assert_eq!(st.total_size, bytes.len());
    }

    #[test]
    fn empty_round_trip() {
        let state = Recovered::default();
        assert_eq!(decode(&encode(&state)).unwrap(), state);
    }

    #[test]
    fn events_sorted_on_encode() {
        let mut state = sample();
        state.events.reverse();
        let decoded = decode(&encode(&state)).unwrap();
        assert_eq!(decoded.events, sample().events);
    }

    #[test]
    fn truncated_by_one_byte_is_refused() {
        let bytes = encode(&sample());
        let err = decode(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, SnapshotError::HashMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("truncated or corrupted"));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flipped byte {i} accepted");
        }
    }

    #[test]
    fn bad_records_with_valid_trailer_are_refused() {
        let bytes = encode(&sample());
        let content = &bytes[..bytes.len() - HASH_BYTES];
        let rehash = |c: &[u8]| {
            let mut v = c.to_vec();
            v.extend_from_slice(&sha256(c));
            v
        };
        // Cut inside the records, with a valid trailer: no end record or
        // a record cut short.
        for cut in [HEADER_BYTES + 3, content.len() - 10, content.len() - 37] {
            let err = decode(&rehash(&content[..cut])).unwrap_err();
            assert!(matches!(err, SnapshotError::Corrupt { .. }), "{cut}: {err}");
        }
        let mut other = content.to_vec();
        other[0] = b'X';
        assert!(matches!(
            decode(&rehash(&other)).unwrap_err(),
            SnapshotError::BadMagic { .. }
        ));
        let mut other = content.to_vec();
        other[8] = 2;
        assert!(matches!(
            decode(&rehash(&other)).unwrap_err(),
            SnapshotError::UnsupportedVersion { found: 2, .. }
        ));
    }

    #[test]
    fn etcd_stream_trailer_verifies() {
        let mut stream = b"bbolt file bytes".to_vec();
        let hash = sha256(&stream);
        stream.extend_from_slice(&hash);
        assert_eq!(verify_trailer(&stream).unwrap(), b"bbolt file bytes");
        assert!(!is_muster_snapshot(&stream));
    }
    #[test]
    fn restored_directory_opens_with_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("restored");
        let state = decode(&encode(&sample())).unwrap();
        crate::storage::create_from_state(&target, &state).unwrap();
        let (storage, recovered) = crate::storage::Storage::open(&target).unwrap();
        assert_eq!(recovered, state);
        drop(storage);
        // A second restore into the same directory is refused.
        assert!(crate::storage::create_from_state(&target, &state).is_err());
    }
    #[test]
    fn trailer_check_in_any_chunking() {
        let bytes = encode(&sample());
        for step in [1, 7, 31, 32, 33, 100, bytes.len()] {
            let mut check = TrailerCheck::default();
            for chunk in bytes.chunks(step) {
                check.update(chunk);
            }
            assert_eq!(check.len(), bytes.len() as u64);
            check.finish().unwrap();
            let mut check = TrailerCheck::default();
            for chunk in bytes[..bytes.len() - 1].chunks(step) {
                check.update(chunk);
            }
            assert!(check.finish().is_err(), "step {step}");
        }
    }
}
