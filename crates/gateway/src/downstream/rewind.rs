//! A connection handed over to hyper with the bytes already read from it
//! ([`Rewind`]), and the `Date` header's text, cached per thread.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose first bytes were read already: they are read again
/// before the rest.
#[derive(Debug)]
pub(crate) struct Rewind<I> {
    pre: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(io: I, pre: Bytes) -> Self {
        Rewind { pre, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.pre.is_empty() {
            let n = this.pre.len().min(buf.remaining());
            buf.put_slice(&this.pre[..n]);
            this.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
const DATE_LEN: usize = 29;

thread_local! {
    /// The second it was made for, and the text.
    static DATE: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
}

/// Appends `date: <now>\r\n` (as hyper does for answers without one); the
/// text is made once a second per thread.
pub(crate) fn write_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == DATE_LEN {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = secs;
            } else {
                // Not a four-digit year: not cached.
                out.extend_from_slice(b"date: ");
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
                return;
            }
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&cached.1);
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn rewound_bytes_come_first() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewind::new(a, Bytes::from_static(b"abc"));
        b.write_all(b"def").await.unwrap();
        drop(b);
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "abcdef");
    }

    #[test]
    fn dates_are_imf_fixdates() {
        let mut out = Vec::new();
        write_date(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("date: ") && text.ends_with(" GMT\r\n"),
            "{text}"
        );
        let parsed = httpdate::parse_http_date(&text[6..text.len() - 2]).unwrap();
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off.as_secs() < 5);
    }
}
