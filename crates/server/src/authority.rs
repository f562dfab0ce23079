//! Serving clients that send `:authority` as a URL.
//!
//! etcdctl 3.4 sends `:authority: http://127.0.0.1:2379` for some commands
//! (`endpoint status`, `snapshot save`, `defrag`, ...). etcd's Go server
//! accepts it; h2 resets the stream (PROTOCOL_ERROR) and will not be made
//! lenient (hyperium/h2#525). [`AuthorityFix`] sits between the accepted
//! byte stream and hyper: it looks at the connection's first header block
//! and, when its `:authority` is one h2 would refuse, rewrites every header
//! block of the connection (the URL's `host[:port]` as the authority) before
//! h2 sees it. Otherwise it gets out of the way: reads go straight to the
//! socket (one branch, no copy).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE's default: the largest frame the server takes
/// unless it says otherwise (it does not).
const MAX_FRAME: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE's default, on both sides of the rewrite.
const TABLE_SIZE: usize = 4096;
/// A header block larger than this is passed on untouched (h2 refuses it).
const MAX_BLOCK: usize = 1 << 20;
/// How much is read from the socket at a time while inspecting.
const READ_CHUNK: usize = 16 * 1024;

/// An accepted connection's byte stream, with header blocks whose
/// `:authority` h2 would refuse rewritten (see the module docs). Writes
/// pass straight through.
pub(crate) struct AuthorityFix<S> {
    inner: S,
    /// `None` once the connection is known to need nothing: a pure
    /// passthrough.
    fix: Option<Box<Fixer>>,
}

impl<S> AuthorityFix<S> {
    pub(crate) fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            fix: Some(Box::new(Fixer::new())),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Waiting for the first header block.
    Detect,
    /// Every header block is rewritten.
    Rewrite,
    /// Bytes pass untouched: once the output is drained, the wrapper
    /// becomes a passthrough.
    Raw,
}

/// A header block being collected (HEADERS + CONTINUATION frames).
struct Block {
    /// Its frames as received.
    raw: BytesMut,
    /// The HPACK fragments, concatenated (padding and priority removed).
    fragment: Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
}

struct Fixer {
    mode: Mode,
    /// Read from the socket, not yet parsed.
    input: BytesMut,
    /// Parsed (and maybe rewritten), for the caller.
    out: BytesMut,
    eof: bool,
    preface_seen: bool,
    /// Payload bytes of the current non-header frame still to pass on.
    skip: usize,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
}

impl Fixer {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        let mut encoder = Encoder::new();
        encoder.set_max_table_size(TABLE_SIZE);
        Fixer {
            mode: Mode::Detect,
            input: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
            preface_seen: false,
            skip: 0,
            block: None,
            decoder,
            encoder,
        }
    }

    /// Nothing more to do: the wrapper can become a passthrough.
    fn done(&self) -> bool {
        self.mode == Mode::Raw && self.out.is_empty() && self.input.is_empty()
    }

    /// Stops inspecting: what was read goes on as it came, h2 answers.
    fn give_up(&mut self) {
        if let Some(block) = self.block.take() {
            self.out.extend_from_slice(&block.raw);
        }
        let rest = self.input.split();
        self.out.extend_from_slice(&rest);
        self.mode = Mode::Raw;
    }

    /// Parses what `input` holds into `out`; false when it needs more bytes.
    fn process(&mut self) -> bool {
        let before = (self.input.len(), self.out.len());
        self.parse();
        self.mode == Mode::Raw || before != (self.input.len(), self.out.len())
    }

    fn parse(&mut self) {
        if self.mode == Mode::Raw {
            self.give_up();
            return;
        }
        if !self.preface_seen {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                self.give_up();
                return;
            }
            if n < PREFACE.len() {
                return;
            }
            let preface = self.input.split_to(n);
            self.out.extend_from_slice(&preface);
            self.preface_seen = true;
        }
        while self.mode != Mode::Raw {
            if self.skip > 0 {
                let n = self.skip.min(self.input.len());
                if n == 0 {
                    return;
                }
                let payload = self.input.split_to(n);
                self.out.extend_from_slice(&payload);
                self.skip -= n;
                continue;
            }
            if self.input.len() < FRAME_HEADER {
                return;
            }
            let len = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            let kind = self.input[3];
            let stream = stream_id(&self.input);
            match &self.block {
                Some(block) if kind != CONTINUATION || stream != block.stream => {
                    // h2: a connection error.
                    self.give_up();
                    return;
                }
                None if kind == CONTINUATION => {
                    self.give_up();
                    return;
                }
                _ => {}
            }
            if kind == HEADERS || kind == CONTINUATION {
                let collected = self.block.as_ref().map_or(0, |b| b.raw.len());
                if collected + FRAME_HEADER + len > MAX_BLOCK {
                    self.give_up();
                    return;
                }
                if self.input.len() < FRAME_HEADER + len {
                    return;
                }
                let frame = self.input.split_to(FRAME_HEADER + len);
                if !self.header_frame(frame) {
                    self.give_up();
                    return;
                }
            } else {
                let header = self.input.split_to(FRAME_HEADER);
                self.out.extend_from_slice(&header);
                self.skip = len;
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION frame to the block; false when it is
    /// malformed or the block cannot be decoded (the frame is then put back
    /// into the block's raw bytes for [`Fixer::give_up`]).
    fn header_frame(&mut self, frame: BytesMut) -> bool {
        let kind = frame[3];
        let flags = frame[4];
        let stream = stream_id(&frame);
        if kind == HEADERS {
            let parsed = headers_payload(flags, &frame[FRAME_HEADER..]);
            let ok = stream != 0 && parsed.is_some();
            let (priority, fragment) = parsed.unwrap_or((None, &[]));
            let fragment = fragment.to_vec();
            self.block = Some(Block {
                raw: frame,
                fragment,
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
            });
            if !ok {
                return false;
            }
        } else if let Some(block) = self.block.as_mut() {
            block.fragment.extend_from_slice(&frame[FRAME_HEADER..]);
            block.raw.extend_from_slice(&frame);
        } else {
            return false;
        }
        if flags & END_HEADERS != 0 {
            return self.finish_block();
        }
        true
    }

    /// The block is complete: passes it on, as it is or rewritten.
    fn finish_block(&mut self) -> bool {
        let Some(block) = self.block.take() else {
            return false;
        };
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            fields.push((name.into_owned(), value.into_owned()));
        });
        if decoded.is_err() {
            self.block = Some(block);
            return false;
        }
        if self.mode == Mode::Detect {
            let refused = fields
                .iter()
                .any(|(name, value)| name == b":authority" && !valid_authority(value));
            if !refused {
                self.out.extend_from_slice(&block.raw);
                self.mode = Mode::Raw;
                return true;
            }
            tracing::debug!("rewriting a connection's :authority (a URL) for h2");
            self.mode = Mode::Rewrite;
        }
        let mut fixed = Vec::with_capacity(fields.len());
        for (name, value) in fields {
            if name == b":authority" {
                if let Some(value) = fix_authority(&value) {
                    fixed.push((name, value));
                }
            } else {
                fixed.push((name, value));
            }
        }
        let encoded = self
            .encoder
            .encode(fixed.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        write_block(
            &mut self.out,
            block.stream,
            block.end_stream,
            block.priority,
            &encoded,
        );
        true
    }
}

fn stream_id(frame: &[u8]) -> u32 {
    u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff
}

/// A HEADERS payload's priority fields and header block fragment; `None`
/// when the padding or priority does not fit.
fn headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, tail) = rest.split_first()?;
        pad = usize::from(n);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, tail) = rest.split_at_checked(5)?;
        priority = Some(<[u8; 5]>::try_from(fields).ok()?);
        rest = tail;
    }
    let end = rest.len().checked_sub(pad)?;
    Some((priority, &rest[..end]))
}

/// What h2 accepts as `:authority`.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::from_maybe_shared(Bytes::copy_from_slice(value)).is_ok()
}

/// The authority to send on: the URL's `host[:port]`, `None` (no
/// authority) when there is none h2 accepts.
fn fix_authority(value: &[u8]) -> Option<Vec<u8>> {
    if valid_authority(value) {
        return Some(value.to_vec());
    }
    let uri = http::Uri::try_from(value).ok()?;
    let host = uri.host()?;
    let fixed = match uri.port_u16() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    valid_authority(fixed.as_bytes()).then(|| fixed.into_bytes())
}

fn frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len` <= MAX_FRAME: three bytes.
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// Frames an encoded header block: HEADERS, then CONTINUATION frames when
/// it exceeds the default maximum frame size. No padding.
fn write_block(
    out: &mut BytesMut,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let priority_len = if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(MAX_FRAME - priority_len));
    let mut flags = 0;
    if end_stream {
        flags |= END_STREAM;
    }
    if priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(out, priority_len + first.len(), HEADERS, flags, stream);
    if let Some(priority) = priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let Some(fix) = this.fix.as_mut() else {
                // The common case: straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            };
            if !fix.out.is_empty() {
                let n = fix.out.len().min(buf.remaining());
                buf.put_slice(&fix.out[..n]);
                fix.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if fix.done() {
                this.fix = None;
                continue;
            }
            if fix.process() {
                continue;
            }
            if fix.eof {
                // A truncated frame: on as it is (h2 sees the same EOF).
                fix.give_up();
                if fix.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let len = fix.input.len();
            fix.input.resize(len + READ_CHUNK, 0);
            let mut read = ReadBuf::new(&mut fix.input[len..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let n = read.filled().len();
            fix.input.truncate(len + n);
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if n == 0 {
                        fix.eof = true;
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Services still see the peer's address and certificates.
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Serves `data` at most `chunk` bytes per read.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let n = this
                .chunk
                .min(this.data.len() - this.at)
                .min(buf.remaining());
            buf.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// What the server reads through the wrapper, in reads of `out_chunk`
    /// bytes from a client writing `in_chunk` bytes at a time.
    async fn through(data: &[u8], in_chunk: usize, out_chunk: usize) -> Vec<u8> {
        let mut fix = AuthorityFix::new(Trickle {
            data: data.to_vec(),
            at: 0,
            chunk: in_chunk,
        });
        let mut got = Vec::new();
        let mut buf = vec![0; out_chunk];
        loop {
            let n = fix.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame_header(&mut out, payload.len(), kind, flags, stream);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    const SETTINGS: u8 = 0x4;
    const DATA: u8 = 0x0;

    fn request(encoder: &mut Encoder<'_>, authority: Option<&[u8]>, path: &[u8]) -> Vec<u8> {
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
        ];
        if let Some(authority) = authority {
            fields.push((b":authority", authority));
        }
        fields.push((b"content-type", b"application/grpc"));
        fields.push((b"te", b"trailers"));
        encoder.encode(fields)
    }

    /// A client's opening: preface, SETTINGS, then `rest`.
    fn connection(rest: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        for part in rest {
            out.extend_from_slice(part);
        }
        out
    }

    /// The header blocks of a connection's bytes, decoded, per stream; the
    /// other frames as (type, payload).
    type Fields = Vec<(Vec<u8>, Vec<u8>)>;
    /// Header blocks per stream, and the other frames as (type, payload).
    type Decoded = (Vec<(u32, Fields)>, Vec<(u8, Vec<u8>)>);

    fn decode(bytes: &[u8]) -> Decoded {
        assert_eq!(&bytes[..24], PREFACE);
        let mut rest = &bytes[24..];
        let mut decoder = Decoder::new();
        let mut blocks = Vec::new();
        let mut others = Vec::new();
        let mut fragment = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            assert!(len <= MAX_FRAME, "{len}");
            let (kind, flags, stream) = (rest[3], rest[4], stream_id(rest));
            let payload = &rest[9..9 + len];
            rest = &rest[9 + len..];
            match kind {
                HEADERS => {
                    let (_, f) = headers_payload(flags, payload).unwrap();
                    fragment = f.to_vec();
                }
                CONTINUATION => fragment.extend_from_slice(payload),
                _ => {
                    others.push((kind, payload.to_vec()));
                    continue;
                }
            }
            if flags & END_HEADERS != 0 {
                blocks.push((stream, decoder.decode(&fragment).unwrap()));
            }
        }
        (blocks, others)
    }

    fn authority(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        fields
            .iter()
            .find(|(n, _)| n == b":authority")
            .map(|(_, v)| v.as_slice())
    }

    #[tokio::test]
    async fn authority_url_is_rewritten_on_every_block() {
        let mut enc = Encoder::new();
        let first = request(&mut enc, Some(b"http://127.0.0.1:2379"), b"/a");
        let second = request(&mut enc, Some(b"http://127.0.0.1:2379"), b"/b");
        let third = request(&mut enc, Some(b"unix:///tmp/sock"), b"/c");
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &first),
            frame(DATA, END_STREAM, 1, b"hello"),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
            frame(HEADERS, END_HEADERS | END_STREAM, 5, &third),
        ]);
        let got = through(&input, 4096, 4096).await;
        let (blocks, others) = decode(&got);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0].0, 1);
        assert_eq!(authority(&blocks[0].1), Some(&b"127.0.0.1:2379"[..]));
        assert_eq!(authority(&blocks[1].1), Some(&b"127.0.0.1:2379"[..]));
        // No host: no authority.
        assert_eq!(authority(&blocks[2].1), None);
        assert_eq!(blocks[1].1[2], (b":path".to_vec(), b"/b".to_vec()));
        assert_eq!(blocks[2].1.len(), 5);
        assert_eq!(others[1], (DATA, b"hello".to_vec()));
        // Flags kept: END_STREAM on stream 3's HEADERS.
        let stream3 = got
            .windows(9)
            .position(|w| w[3] == HEADERS && stream_id(w) == 3)
            .unwrap();
        assert_eq!(got[stream3 + 4] & END_STREAM, END_STREAM);
        // One byte at a time, either way: the same bytes.
        assert_eq!(through(&input, 1, 1).await, got);
        assert_eq!(through(&input, 1, 4096).await, got);
        assert_eq!(through(&input, 4096, 1).await, got);
    }

    #[tokio::test]
    async fn valid_or_absent_authority_passes_byte_identical() {
        let mut enc = Encoder::new();
        let valid = request(&mut enc, Some(b"127.0.0.1:2379"), b"/a");
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &valid),
            frame(DATA, END_STREAM, 1, b"x"),
            // Later blocks are not looked at.
            frame(
                HEADERS,
                END_HEADERS,
                3,
                &request(&mut enc, Some(b"http://x:1"), b"/b"),
            ),
        ]);
        assert_eq!(through(&input, 4096, 4096).await, input);
        assert_eq!(through(&input, 1, 1).await, input);

        let mut enc = Encoder::new();
        let absent = request(&mut enc, None, b"/a");
        let input = connection(&[frame(HEADERS, END_HEADERS | END_STREAM, 1, &absent)]);
        assert_eq!(through(&input, 4096, 4096).await, input);
        assert_eq!(through(&input, 1, 3).await, input);
    }

    /// RFC 7541 Appendix B codes for the few symbols the tests use.
    fn huffman(s: &[u8]) -> Vec<u8> {
        let code = |c: u8| -> (u32, u32) {
            match c {
                b'0' => (0x0, 5),
                b'1' => (0x1, 5),
                b'2' => (0x2, 5),
                b't' => (0x9, 5),
                b'.' => (0x17, 6),
                b'/' => (0x18, 6),
                b'3' => (0x19, 6),
                b'7' => (0x1d, 6),
                b'9' => (0x1f, 6),
                b'h' => (0x27, 6),
                b'p' => (0x2b, 6),
                b':' => (0x5c, 7),
                other => panic!("no code for {other}"),
            }
        };
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &c in s {
            let (value, len) = code(c);
            acc = acc << len | u64::from(value);
            bits += len;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            // Padded with the EOS prefix (ones).
            out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
        }
        out
    }

    #[tokio::test]
    async fn huffman_coded_authority_is_decoded() {
        let url = b"http://127.0.0.1:2379";
        let coded = huffman(url);
        // `:authority` (static index 1) as a literal without indexing,
        // Huffman-coded value.
        let mut block = vec![0x83, 0x86, 0x44, 0x02, b'/', b'a', 0x01];
        assert!(coded.len() < 127);
        block.push(0x80 | coded.len() as u8);
        block.extend_from_slice(&coded);
        assert_eq!(
            authority(&Decoder::new().decode(&block).unwrap()),
            Some(&url[..]),
            "the test's Huffman coding"
        );
        let input = connection(&[frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)]);
        let (blocks, _) = decode(&through(&input, 7, 5).await);
        assert_eq!(authority(&blocks[0].1), Some(&b"127.0.0.1:2379"[..]));
    }

    #[tokio::test]
    async fn continuation_padding_and_priority() {
        let mut enc = Encoder::new();
        let big = "v".repeat(20_000);
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/p"),
            (b":authority", b"http://localhost:2379/"),
            (b"x-big", big.as_bytes()),
        ];
        let block = enc.encode(fields.drain(..));
        // HEADERS (padded, with priority) + two CONTINUATIONs.
        let mut payload = vec![3];
        payload.extend_from_slice(&[0x80, 0, 0, 1, 15]);
        payload.extend_from_slice(&block[..100]);
        payload.extend_from_slice(&[0, 0, 0]);
        let input = connection(&[
            frame(HEADERS, PADDED | PRIORITY, 1, &payload),
            frame(CONTINUATION, 0, 1, &block[100..10_000]),
            frame(CONTINUATION, END_HEADERS, 1, &block[10_000..]),
            frame(DATA, END_STREAM, 1, b"body"),
        ]);
        let got = through(&input, 4096, 4096).await;
        let (blocks, others) = decode(&got);
        assert_eq!(blocks.len(), 1);
        assert_eq!(authority(&blocks[0].1), Some(&b"localhost:2379"[..]));
        assert_eq!(blocks[0].1[4].1, big.as_bytes());
        assert_eq!(others[1], (DATA, b"body".to_vec()));
        // Priority kept, padding dropped, split at 16384.
        let headers = &got[24 + 15..];
        assert_eq!(headers[3], HEADERS);
        assert_eq!(headers[4], PRIORITY);
        assert_eq!(&headers[9..14], &[0x80, 0, 0, 1, 15]);
        assert_eq!(&headers[..3], &[0x00, 0x40, 0x00], "16384 bytes");
        let continuation = &headers[9 + MAX_FRAME..];
        assert_eq!(
            (continuation[3], continuation[4]),
            (CONTINUATION, END_HEADERS)
        );
        assert_eq!(through(&input, 1, 1).await, got);
    }

    #[tokio::test]
    async fn malformed_frames_pass_through_untouched() {
        let mut enc = Encoder::new();
        let url = request(&mut enc, Some(b"http://127.0.0.1:2379"), b"/a");
        let cases = [
            // A CONTINUATION with no HEADERS before it.
            connection(&[frame(CONTINUATION, END_HEADERS, 1, &url)]),
            // HEADERS on stream 0.
            connection(&[frame(HEADERS, END_HEADERS, 0, &url)]),
            // Padding longer than the payload.
            connection(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82])]),
            // Another frame inside a header block.
            connection(&[
                frame(HEADERS, 0, 1, &url),
                frame(DATA, 0, 1, b"x"),
                frame(CONTINUATION, END_HEADERS, 1, &[]),
            ]),
            // An undecodable block (index 70, the dynamic table is empty).
            connection(&[frame(HEADERS, END_HEADERS, 1, &[0x80 | 70])]),
            // Truncated in the middle of a frame.
            connection(&[frame(HEADERS, END_HEADERS, 1, &url)[..12].to_vec()]),
            // Not HTTP/2.
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Vec::new(),
        ];
        for input in cases {
            assert_eq!(through(&input, 4096, 4096).await, input);
            assert_eq!(through(&input, 1, 1).await, input);
        }
    }

    /// Against hyper's own HTTP/2 server (h2): requests with a URL as
    /// authority, many on one connection (the dynamic tables fill and
    /// evict), all answered, each seeing `host:port`.
    #[tokio::test]
    async fn h2_serves_rewritten_requests() {
        use tokio::io::AsyncWriteExt;
        const N: u32 = 150;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serve = tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                    let seen = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    async move {
                        let mut response = http::Response::new(String::new());
                        response
                            .headers_mut()
                            .insert("x-authority", http::HeaderValue::try_from(seen).unwrap());
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(
                    hyper_util::rt::TokioIo::new(AuthorityFix::new(server)),
                    service,
                )
                .await
        });
        let mut enc = Encoder::new();
        let mut requests = Vec::new();
        for i in 0..N {
            let path = format!("/{i}");
            let name = format!("x-name-{}", i % 40);
            let value = format!("value-{i}-{}", "v".repeat(i as usize % 97));
            let fields: Vec<(&[u8], &[u8])> = vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", path.as_bytes()),
                (b":authority", b"http://127.0.0.1:2379"),
                (name.as_bytes(), value.as_bytes()),
            ];
            let block = enc.encode(fields);
            requests.push(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
        }
        client.write_all(&connection(&requests)).await.unwrap();

        let answers = async {
            let mut dec = Decoder::new();
            let mut got = Vec::new();
            let mut header = [0; FRAME_HEADER];
            while got.len() < N as usize {
                client.read_exact(&mut header).await.unwrap();
                let len = usize::from(header[0]) << 16
                    | usize::from(header[1]) << 8
                    | usize::from(header[2]);
                let mut payload = vec![0; len];
                client.read_exact(&mut payload).await.unwrap();
                let (kind, flags) = (header[3], header[4]);
                assert!(
                    kind != 0x3 && kind != 0x7,
                    "RST_STREAM or GOAWAY: {payload:?}"
                );
                if kind == HEADERS {
                    assert_ne!(flags & END_HEADERS, 0);
                    let (_, fragment) = headers_payload(flags, &payload).unwrap();
                    got.push((stream_id(&header), dec.decode(fragment).unwrap()));
                }
            }
            got
        };
        let got = tokio::time::timeout(std::time::Duration::from_secs(60), answers)
            .await
            .expect("every request answered");
        for (stream, fields) in &got {
            let status = fields.iter().find(|(n, _)| n == b":status").unwrap();
            assert_eq!(status.1, b"200", "stream {stream}");
            let seen = fields.iter().find(|(n, _)| n == b"x-authority").unwrap();
            assert_eq!(seen.1, b"127.0.0.1:2379", "stream {stream}");
        }
        drop(client);
        let _ = serve.await;
    }

    proptest::proptest! {
        /// Any header block bytes, any framing flags: no panic, no hang,
        /// and the same output however the bytes arrive.
        #[test]
        fn arbitrary_blocks_never_panic(
            prefix in proptest::collection::vec(proptest::num::u8::ANY, 0..8),
            fragment in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            flags in proptest::num::u8::ANY,
            split in 0usize..64,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            // A URL authority first (the connection is rewritten), then
            // the arbitrary block, maybe split over a CONTINUATION.
            let mut enc = Encoder::new();
            let url = request(&mut enc, Some(b"http://127.0.0.1:2379"), b"/a");
            let mut block = prefix;
            block.extend_from_slice(&fragment);
            let split = split.min(block.len());
            let input = connection(&[
                frame(HEADERS, END_HEADERS, 1, &url),
                frame(HEADERS, flags & !END_HEADERS, 3, &block[..split]),
                frame(CONTINUATION, END_HEADERS, 3, &block[split..]),
                frame(HEADERS, flags, 5, &block),
            ]);
            let whole = runtime.block_on(through(&input, 4096, 4096));
            let trickled = runtime.block_on(through(&input, 1, 1));
            proptest::prop_assert_eq!(whole, trickled);
        }
    }

    #[test]
    fn authorities() {
        assert!(valid_authority(b"127.0.0.1:2379"));
        assert!(valid_authority(b"[::1]:2379"));
        assert!(!valid_authority(b"http://127.0.0.1:2379"));
        let fixed = |v: &[u8]| fix_authority(v).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            fixed(b"http://127.0.0.1:2379").as_deref(),
            Some("127.0.0.1:2379")
        );
        assert_eq!(
            fixed(b"https://[::1]:2379/x").as_deref(),
            Some("[::1]:2379")
        );
        assert_eq!(fixed(b"http://host").as_deref(), Some("host"));
        assert_eq!(fixed(b"unix:///tmp/s"), None);
    }
}
