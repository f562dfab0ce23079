//! The write-ahead log: preallocated segment files of CRC-checked records,
//! one record per group commit.
//!
//! # Record format
//!
//! Every record starts at an offset that is a multiple of [`ALIGN`] bytes,
//! with a 16-byte header, all little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | [`MAGIC`] |
//! | 4..8 | payload length in bytes |
//! | 8..12 | CRC-32 (IEEE) of the payload |
//! | 12..16 | CRC-32 of bytes 0..12 followed by the segment's sequence number (u64) |
//!
//! then the payload (the group's [`Change`]s, see [`encode_change`]) and zero
//! padding up to the next multiple of [`ALIGN`]. (The sequence number in the
//! header's CRC makes a record read from anywhere but its own segment
//! invalid: should a crash leave a new segment with blocks of an old,
//! deleted one instead of zeros, its records do not count.) A segment is a file
//! preallocated with zeros (so that an fdatasync after an append does not
//! have to journal a change of size or block allocation), and records are
//! appended to it until the next one does not fit; then the next segment
//! takes it. A segment is never rewritten.
//!
//! # Reading
//!
//! The log ends at the first place that does not hold a valid record: zeros
//! (the preallocated rest of the segment), a record cut short, a header or
//! payload whose CRC does not match. That is the normal end after a crash
//! (the last append may be partly on disk). But if a valid record follows
//! such an end, in the same segment or a later one, something in the
//! middle of the log was lost or damaged: that is corruption, reported as
//! [`StorageError::CorruptWal`]. (Zeros at the end of a segment followed by
//! records in the next one are a rotation, not an end.)

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use muster_proto::{Event, authpb};
use prost::Message;
use tracing::{debug, warn};

use super::{Change, LeaseRecord, StorageError};

/// First four bytes of every record header (`MWA1`).
pub(super) const MAGIC: u32 = u32::from_le_bytes(*b"MWA1");

/// Size of a record header.
pub(super) const HEADER: usize = 16;

/// Records start at multiples of this.
pub(super) const ALIGN: usize = 8;

/// Name of the zero-filled file prepared for the next segment.
pub(super) const SPARE_NAME: &str = "spare.tmp";

/// Name of [`SPARE_NAME`] while it is being written.
const PARTIAL_SPARE_NAME: &str = "spare.tmp.part";

/// A place in the log: byte `offset` of segment number `segment`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Position {
    /// Sequence number of the segment (its file name).
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// File name of segment `seq`: 16 hex digits, so that names sort in order.
pub(super) fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Sequence numbers of the segments in `dir`, in order (none if `dir` does
/// not exist).
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push(seq);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Deletes segment `seq` (gone already is fine).
pub(super) fn remove_segment(dir: &Path, seq: u64) -> io::Result<()> {
    match std::fs::remove_file(dir.join(segment_name(seq))) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Makes the directory's entries (new, renamed or removed files) durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn padded(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

// --- Encoding -------------------------------------------------------------

const TAG_EVENT: u8 = 1;
const TAG_REVISION: u8 = 2;
const TAG_LEASE_GRANT: u8 = 3;
const TAG_LEASE_REVOKE: u8 = 4;
const TAG_COMPACT: u8 = 5;
const TAG_AUTH_USER: u8 = 6;
const TAG_AUTH_ROLE: u8 = 7;
const TAG_AUTH_STATE: u8 = 8;

/// Writes one record holding `changes` into `buf` (cleared first): header,
/// payload and padding, ready to append (which seals its header for the
/// segment it goes to).
pub(super) fn encode_record<'a>(changes: impl Iterator<Item = &'a Change>, buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(HEADER, 0);
    for change in changes {
        encode_change(change, buf);
    }
    let len = buf.len() - HEADER;
    let payload_crc = crc(&buf[HEADER..]);
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    buf[8..12].copy_from_slice(&payload_crc.to_le_bytes());
    buf.resize(padded(buf.len()), 0);
}

/// CRC of a record header's first 12 bytes and the segment's number.
fn header_crc(header: &[u8], seq: u64) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..12]);
    hasher.update(&seq.to_le_bytes());
    hasher.finalize()
}

/// Seals a record from [`encode_record`] for segment `seq`: its header CRC.
fn seal_record(record: &mut [u8], seq: u64) {
    let crc = header_crc(record, seq);
    record[12..16].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(bytes);
}

fn put_message(buf: &mut Vec<u8>, message: &impl Message) {
    let len = message.encoded_len();
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    // Writing into a Vec cannot run out of room.
    let _ = message.encode(buf);
}

/// Appends one change: a tag byte, then its fields (integers little-endian,
/// strings and protobuf messages behind a u32 length).
pub(super) fn encode_change(change: &Change, buf: &mut Vec<u8>) {
    match change {
        Change::Event { rev, sub, event } => {
            buf.push(TAG_EVENT);
            buf.extend_from_slice(&rev.to_le_bytes());
            buf.extend_from_slice(&sub.to_le_bytes());
            put_message(buf, event);
        }
        Change::Revision(rev) => {
            buf.push(TAG_REVISION);
            buf.extend_from_slice(&rev.to_le_bytes());
        }
        Change::LeaseGrant(lease) => {
            buf.push(TAG_LEASE_GRANT);
            buf.extend_from_slice(&lease.id.to_le_bytes());
            buf.extend_from_slice(&lease.ttl.to_le_bytes());
        }
        Change::LeaseRevoke(id) => {
            buf.push(TAG_LEASE_REVOKE);
            buf.extend_from_slice(&id.to_le_bytes());
        }
        Change::Compact { revision, removed } => {
            buf.push(TAG_COMPACT);
            buf.extend_from_slice(&revision.to_le_bytes());
            let count = u32::try_from(removed.len()).unwrap_or(u32::MAX);
            buf.extend_from_slice(&count.to_le_bytes());
            for (rev, sub) in removed {
                buf.extend_from_slice(&rev.to_le_bytes());
                buf.extend_from_slice(&sub.to_le_bytes());
            }
        }
        Change::AuthUser { name, user } => {
            buf.push(TAG_AUTH_USER);
            put_bytes(buf, name.as_bytes());
            match user {
                Some(user) => {
                    buf.push(1);
                    put_message(buf, user);
                }
                None => buf.push(0),
            }
        }
        Change::AuthRole { name, role } => {
            buf.push(TAG_AUTH_ROLE);
            put_bytes(buf, name.as_bytes());
            match role {
                Some(role) => {
                    buf.push(1);
                    put_message(buf, role);
                }
                None => buf.push(0),
            }
        }
        Change::AuthState { enabled, revision } => {
            buf.push(TAG_AUTH_STATE);
            buf.push(u8::from(*enabled));
            buf.extend_from_slice(&revision.to_le_bytes());
        }
    }
}

/// Reads the fields [`encode_change`] wrote.
struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!(
                "record ends early ({n} bytes wanted, {} left)",
                self.rest.len()
            ));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().map_err(|_| "u32")?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| "u64")?))
    }

    fn i64(&mut self) -> Result<i64, String> {
        let bytes = self.take(8)?;
        Ok(i64::from_le_bytes(bytes.try_into().map_err(|_| "i64")?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|error| format!("name: {error}"))
    }

    fn message<M: Message + Default>(&mut self, what: &str) -> Result<M, String> {
        M::decode(self.bytes()?).map_err(|error| format!("{what}: {error}"))
    }

    fn flag(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("flag byte {other}")),
        }
    }
}

/// Decodes a record's payload back into its changes.
pub(super) fn decode_changes(payload: &[u8]) -> Result<Vec<Change>, String> {
    let mut decoder = Decoder { rest: payload };
    let mut changes = Vec::new();
    while !decoder.rest.is_empty() {
        let change = match decoder.u8()? {
            TAG_EVENT => Change::Event {
                rev: decoder.i64()?,
                sub: decoder.i64()?,
                event: decoder.message::<Event>("event")?,
            },
            TAG_REVISION => Change::Revision(decoder.i64()?),
            TAG_LEASE_GRANT => Change::LeaseGrant(LeaseRecord {
                id: decoder.i64()?,
                ttl: decoder.i64()?,
            }),
            TAG_LEASE_REVOKE => Change::LeaseRevoke(decoder.i64()?),
            TAG_COMPACT => {
                let revision = decoder.i64()?;
                let count = decoder.u32()? as usize;
                // Each pair is 16 bytes: a count beyond that is damage, not
                // a reason to allocate.
                if count > decoder.rest.len() / 16 {
                    return Err(format!("compaction of {count} records in a short record"));
                }
                let mut removed = Vec::with_capacity(count);
                for _ in 0..count {
                    removed.push((decoder.i64()?, decoder.i64()?));
                }
                Change::Compact { revision, removed }
            }
            TAG_AUTH_USER => {
                let name = decoder.string()?;
                let user = if decoder.flag()? {
                    Some(decoder.message::<authpb::User>("user")?)
                } else {
                    None
                };
                Change::AuthUser { name, user }
            }
            TAG_AUTH_ROLE => {
                let name = decoder.string()?;
                let role = if decoder.flag()? {
                    Some(decoder.message::<authpb::Role>("role")?)
                } else {
                    None
                };
                Change::AuthRole { name, role }
            }
            TAG_AUTH_STATE => Change::AuthState {
                enabled: decoder.flag()?,
                revision: decoder.u64()?,
            },
            tag => return Err(format!("unknown change tag {tag}")),
        };
        changes.push(change);
    }
    Ok(changes)
}

// --- Reading --------------------------------------------------------------

/// What lies at an offset of a segment.
enum Slot<'a> {
    /// A valid record: its payload and its length with header and padding.
    Record(&'a [u8], usize),
    /// Zeros, or the end of the file: nothing was ever written here.
    Empty,
    /// Something that is not a valid record.
    Invalid(&'static str),
}

fn read_slot(data: &[u8], at: usize, seq: u64) -> Slot<'_> {
    let Some(header) = data.get(at..at + HEADER) else {
        return if data[at.min(data.len())..].iter().all(|&b| b == 0) {
            Slot::Empty
        } else {
            Slot::Invalid("a record header cut short")
        };
    };
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != MAGIC {
        return if header.iter().all(|&b| b == 0) {
            Slot::Empty
        } else {
            Slot::Invalid("no record header")
        };
    }
    if header_crc(header, seq) != word(12) {
        return Slot::Invalid("header CRC mismatch");
    }
    let len = word(4) as usize;
    let Some(payload) = data.get(at + HEADER..at + HEADER + len) else {
        return Slot::Invalid("a record cut short");
    };
    if crc(payload) != word(8) {
        return Slot::Invalid("payload CRC mismatch");
    }
    Slot::Record(payload, padded(HEADER + len))
}

/// Whether a valid record starts anywhere at or after `from` in `data`.
fn valid_record_after(data: &[u8], from: usize, seq: u64) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut at = from.div_ceil(ALIGN) * ALIGN;
    while at + HEADER <= data.len() {
        if data[at..at + 4] == magic && matches!(read_slot(data, at, seq), Slot::Record(..)) {
            return Some(at);
        }
        at += ALIGN;
    }
    None
}

fn read_segment(dir: &Path, seq: u64, from: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(dir.join(segment_name(seq)))?;
    file.seek(SeekFrom::Start(from))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(data)
}

/// Reads the log from `from` on, calling `apply` with each valid record's
/// changes and the position just past it, in order. Returns the position
/// past the last valid record (`None` if there was none).
pub(super) fn replay(
    dir: &Path,
    from: Position,
    mut apply: impl FnMut(Vec<Change>, Position) -> Result<(), StorageError>,
) -> Result<Option<Position>, StorageError> {
    let mut last = None;
    // Where the log ended with something invalid (rather than zeros): any
    // valid record after it is corruption.
    let mut broken: Option<(Position, &'static str)> = None;
    for seq in list_segments(dir)? {
        if seq < from.segment {
            continue;
        }
        let start = if seq == from.segment { from.offset } else { 0 };
        let data = read_segment(dir, seq, start)?;
        let corrupt = |at: usize, reason: String| StorageError::CorruptWal {
            segment: seq,
            offset: start + at as u64,
            reason,
        };
        if let Some((end, why)) = broken {
            if let Some(at) = valid_record_after(&data, 0, seq) {
                return Err(StorageError::CorruptWal {
                    segment: end.segment,
                    offset: end.offset,
                    reason: format!(
                        "{why}, yet segment {seq:016x} holds a valid record at offset {}",
                        start + at as u64
                    ),
                });
            }
            continue;
        }
        let mut at = 0;
        loop {
            match read_slot(&data, at, seq) {
                Slot::Record(payload, len) => {
                    let changes = decode_changes(payload).map_err(|reason| corrupt(at, reason))?;
                    at += len;
                    let end = Position {
                        segment: seq,
                        offset: start + at as u64,
                    };
                    apply(changes, end)?;
                    last = Some(end);
                }
                Slot::Empty => break,
                Slot::Invalid(why) => {
                    broken = Some((
                        Position {
                            segment: seq,
                            offset: start + at as u64,
                        },
                        why,
                    ));
                    break;
                }
            }
        }
        if let Some(found) = valid_record_after(&data, at + 1, seq) {
            let why = broken.map_or("zeros", |(_, why)| why);
            return Err(corrupt(
                at,
                format!(
                    "{why}, yet a valid record follows at offset {}",
                    start + found as u64
                ),
            ));
        }
        if let Some((end, why)) = broken {
            warn!(
                segment = end.segment,
                offset = end.offset,
                why,
                "storage: the write-ahead log ends with a torn record (an append cut by a crash); ignoring it"
            );
        }
    }
    Ok(last)
}

// --- Writing --------------------------------------------------------------

/// Creates `path` (replacing it) as `len` bytes of zeros, written and
/// synced.
fn create_zeroed(path: &Path, len: u64) -> io::Result<File> {
    const CHUNK: usize = 1 << 20;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; CHUNK];
    let mut written = 0;
    while written < len {
        let n = (len - written).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], written)?;
        written += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

/// Appends records to the current segment, syncing each; rotates to a new
/// segment when one does not fit. The next segment's file is zero-filled
/// ahead of time on a helper thread (as [`SPARE_NAME`]).
pub(super) struct WalWriter {
    dir: PathBuf,
    segment_bytes: u64,
    /// The current segment, or the first one to create.
    seq: u64,
    /// `None` until the first append.
    file: Option<File>,
    offset: u64,
    len: u64,
    /// The helper thread preparing the spare, until it is joined. At most
    /// one at a time: two would zero-fill and rename the same files, and
    /// one left running could write zeros over a segment already in use.
    spare: Option<JoinHandle<io::Result<()>>>,
    /// Tests: how many spare preparations this writer started.
    #[cfg(test)]
    spares_started: u64,
    /// Tests: fail every append while set.
    fail: Option<Arc<AtomicBool>>,
}

impl WalWriter {
    /// A writer that starts segment `first` (created on the first append).
    pub(super) fn new(
        dir: PathBuf,
        first: u64,
        segment_bytes: u64,
        fail: Option<Arc<AtomicBool>>,
    ) -> Self {
        WalWriter {
            dir,
            segment_bytes,
            seq: first,
            file: None,
            offset: 0,
            len: 0,
            spare: None,
            #[cfg(test)]
            spares_started: 0,
            fail,
        }
    }

    /// Appends `record` (from [`encode_record`]) and syncs it; returns the
    /// position just past it.
    pub(super) fn append(&mut self, record: &mut [u8]) -> io::Result<Position> {
        if self
            .fail
            .as_ref()
            .is_some_and(|fail| fail.load(Ordering::SeqCst))
        {
            return Err(io::Error::other("injected write-ahead log failure"));
        }
        let need = record.len() as u64;
        if self.file.is_none() || self.offset + need > self.len {
            self.rotate(need)?;
        }
        let Some(file) = &self.file else {
            return Err(io::Error::other("no write-ahead log segment"));
        };
        seal_record(record, self.seq);
        file.write_all_at(record, self.offset)?;
        file.sync_data()?;
        self.offset += need;
        Ok(Position {
            segment: self.seq,
            offset: self.offset,
        })
    }

    /// Moves to the next segment (the first one, on the first append),
    /// big enough for `need` bytes.
    fn rotate(&mut self, need: u64) -> io::Result<()> {
        let seq = if self.file.is_some() {
            self.seq + 1
        } else {
            self.seq
        };
        let path = self.dir.join(segment_name(seq));
        let file = if need <= self.segment_bytes && self.take_spare() {
            std::fs::rename(self.dir.join(SPARE_NAME), &path)?;
            OpenOptions::new().read(true).write(true).open(&path)?
        } else {
            create_zeroed(&path, need.max(self.segment_bytes))?
        };
        sync_dir(&self.dir)?;
        self.len = file.metadata()?.len();
        self.file = Some(file);
        self.seq = seq;
        self.offset = 0;
        debug!(
            segment = seq,
            bytes = self.len,
            "storage: new write-ahead log segment"
        );
        self.prepare_spare();
        Ok(())
    }

    /// Whether a complete spare segment is ready: the one the helper thread
    /// prepared, or one left by an earlier run.
    fn take_spare(&mut self) -> bool {
        let path = self.dir.join(SPARE_NAME);
        if let Some(handle) = self.spare.take() {
            match handle.join() {
                Ok(Ok(())) => return true,
                Ok(Err(error)) => {
                    warn!(%error, "storage: preparing a write-ahead log segment failed");
                }
                Err(_) => warn!("storage: the segment preparing thread panicked"),
            }
            return false;
        }
        // Left by an earlier run: only ever named so once its zeros are on
        // disk (see prepare_spare).
        std::fs::metadata(&path).is_ok_and(|metadata| metadata.len() == self.segment_bytes)
    }

    /// Starts zero-filling the next spare, unless one is being prepared
    /// already (a segment made to measure for an oversized record leaves the
    /// pending spare for the next rotation).
    fn prepare_spare(&mut self) {
        if self.spare.is_some() {
            return;
        }
        let dir = self.dir.clone();
        let len = self.segment_bytes;
        // Zero-filled and synced under a temporary name, then renamed: a
        // spare that exists is complete.
        let spawned = std::thread::Builder::new()
            .name("muster-wal-prep".into())
            .spawn(move || {
                let partial = dir.join(PARTIAL_SPARE_NAME);
                create_zeroed(&partial, len)?;
                std::fs::rename(&partial, dir.join(SPARE_NAME))?;
                sync_dir(&dir)
            });
        match spawned {
            Ok(handle) => {
                self.spare = Some(handle);
                #[cfg(test)]
                {
                    self.spares_started += 1;
                }
            }
            Err(error) => warn!(%error, "storage: cannot start the segment preparing thread"),
        }
    }

    /// How many spare preparations this writer started.
    #[cfg(test)]
    pub(super) fn spares_started(&self) -> u64 {
        self.spares_started
    }
}

impl Drop for WalWriter {
    fn drop(&mut self) {
        if let Some(handle) = self.spare.take() {
            let _ = handle.join();
        }
    }
}
