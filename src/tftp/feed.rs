//! Where a transfer's blocks come from, cut to exactly `blksize` bytes (the final block shorter,
//! and empty when the size is a multiple of blksize, RFC 1350 §6).
//!
//! A small file on disk (a cache hit, an override) is sent from memory shared by every
//! transfer of the same version ([`SharedFiles`]); a larger one is read with `pread` at the
//! transfer's offset, [`READ_AHEAD`] bytes at a time, ahead of the blocks sent, by the event
//! loop itself: the bytes come from the page cache, so a transfer holds a few KiB and needs no
//! task, and a lock-step transfer costs one `pread` per 8 KiB rather than one per block. A miss streaming through from
//! an upstream is read by a task on the runtime into a channel of two chunks; the loop is woken
//! per chunk. Either way a source that ends early is an error, never a short final block: a
//! truncated file must never look complete.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::netascii;
use super::packet::Mode;
use super::shared::SharedFiles;

/// Bytes read from a file per `pread` (whole blocks, at least one).
pub const READ_AHEAD: usize = 8 << 10;

/// What the reader task hands the transfer: chunks, then an explicit end (a closed channel
/// without `End` means the reader died, which must never look like a complete file).
pub(crate) enum Chunk {
    Data(Bytes),
    End,
    Failed(io::Error),
}

enum Raw {
    File {
        file: File,
        offset: u64,
        size: u64,
        _keep: Box<dyn Send>,
    },
    Stream(mpsc::Receiver<Chunk>),
    /// A small file read whole, shared with every transfer of the same version.
    Memory {
        data: Bytes,
        offset: usize,
    },
}

/// The blocks of one transfer.
pub(crate) struct Feed {
    raw: Raw,
    mode: Mode,
    blksize: usize,
    pending: BytesMut,
    ended: bool,
    final_given: bool,
}

impl Feed {
    /// A file of `size` bytes; bytes past `size` are never sent. A small one comes from
    /// `shared` (and its descriptor and `keep` are let go at once), a larger one is read with
    /// `pread` block by block.
    pub fn file(
        file: File,
        size: u64,
        keep: Box<dyn Send>,
        mode: Mode,
        blksize: u16,
        shared: &SharedFiles,
    ) -> Feed {
        // A failed read here is retried block by block, where it fails the transfer properly.
        if let Ok(Some(data)) = shared.get(&file, size) {
            return Feed::memory(Bytes::from_owner(data), mode, blksize);
        }
        Feed::new(
            Raw::File {
                file,
                offset: 0,
                size,
                _keep: keep,
            },
            mode,
            blksize,
        )
    }

    /// A file already in memory (a small override's shared copy).
    pub fn memory(data: Bytes, mode: Mode, blksize: u16) -> Feed {
        Feed::new(Raw::Memory { data, offset: 0 }, mode, blksize)
    }

    /// A stream read by a task into a channel; `rx` is that channel's end.
    pub fn stream(rx: mpsc::Receiver<Chunk>, mode: Mode, blksize: u16) -> Feed {
        Feed::new(Raw::Stream(rx), mode, blksize)
    }

    fn new(raw: Raw, mode: Mode, blksize: u16) -> Feed {
        Feed {
            raw,
            mode,
            blksize: blksize as usize,
            pending: BytesMut::new(),
            ended: false,
            final_given: false,
        }
    }

    /// The next block, or `Ok(None)` when a stream has nothing yet (the loop is woken when it
    /// has).
    pub fn try_next(&mut self) -> io::Result<Option<Bytes>> {
        if let (Raw::Memory { data, offset }, Mode::Octet) = (&mut self.raw, self.mode) {
            // Blocks of a shared file are slices of its bytes: no copy, no allocation.
            if self.final_given {
                return Err(io::Error::other("read past the end"));
            }
            let end = (*offset + self.blksize).min(data.len());
            let block = data.slice(*offset..end);
            *offset = end;
            self.final_given = block.len() < self.blksize;
            return Ok(Some(block));
        }
        loop {
            if self.pending.len() >= self.blksize {
                return Ok(Some(self.pending.split_to(self.blksize).freeze()));
            }
            if self.ended {
                if self.final_given {
                    return Err(io::Error::other("read past the end"));
                }
                self.final_given = true;
                return Ok(Some(self.pending.split().freeze()));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    /// Reads the next block of a file ahead, so the ACK that asks for it is answered without a
    /// read. Streams are not touched (their chunks arrive by themselves).
    pub fn prefetch(&mut self) -> io::Result<()> {
        if matches!(self.raw, Raw::File { .. }) && !self.ended && self.pending.len() < self.blksize
        {
            self.fill()?;
        }
        Ok(())
    }

    /// Adds bytes to `pending` or marks the end; `false` when a stream must be waited for.
    fn fill(&mut self) -> io::Result<bool> {
        match &mut self.raw {
            Raw::File {
                file, offset, size, ..
            } => {
                let chunk = self.blksize * (READ_AHEAD / self.blksize).max(1);
                let want = (*size - *offset).min(chunk as u64) as usize;
                if want == 0 {
                    self.ended = true;
                    return Ok(true);
                }
                let n = match self.mode {
                    // Straight into the pending bytes: no buffer of its own per block.
                    Mode::Octet => {
                        let start = self.pending.len();
                        self.pending.resize(start + want, 0);
                        let n = file.read_at(&mut self.pending[start..], *offset);
                        self.pending.truncate(start + *n.as_ref().unwrap_or(&0));
                        n?
                    }
                    Mode::Netascii => {
                        let mut buf = vec![0u8; want];
                        let n = file.read_at(&mut buf, *offset)?;
                        push(&mut self.pending, self.mode, &buf[..n]);
                        n
                    }
                };
                if n == 0 {
                    return Err(io::Error::other("file shorter than its size"));
                }
                *offset += n as u64;
                Ok(true)
            }
            Raw::Memory { data, offset } => {
                let end = (*offset + self.blksize).min(data.len());
                if *offset == end {
                    self.ended = true;
                } else {
                    push(&mut self.pending, self.mode, &data[*offset..end]);
                    *offset = end;
                }
                Ok(true)
            }
            Raw::Stream(rx) => match rx.try_recv() {
                Ok(Chunk::Data(d)) => {
                    push(&mut self.pending, self.mode, &d);
                    Ok(true)
                }
                Ok(Chunk::End) => {
                    self.ended = true;
                    Ok(true)
                }
                Ok(Chunk::Failed(e)) => Err(e),
                Err(mpsc::error::TryRecvError::Empty) => Ok(false),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    Err(io::Error::other("content source ended unexpectedly"))
                }
            },
        }
    }
}

fn push(pending: &mut BytesMut, mode: Mode, raw: &[u8]) {
    match mode {
        Mode::Octet => pending.extend_from_slice(raw),
        Mode::Netascii => {
            let mut ascii = Vec::with_capacity(raw.len() + raw.len() / 16);
            netascii::encode(raw, &mut ascii);
            pending.extend_from_slice(&ascii);
        }
    }
}

/// Reads a stream ahead of its transfer in chunks of `chunk_size`, calling `wake` after each
/// so the event loop picks it up. Ends with [`Chunk::End`] or [`Chunk::Failed`].
pub(crate) async fn read_ahead(
    mut reader: Pin<Box<dyn AsyncRead + Send>>,
    chunk_size: usize,
    tx: mpsc::Sender<Chunk>,
    wake: impl Fn(),
) {
    loop {
        let mut buf = BytesMut::with_capacity(chunk_size);
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Chunk::Failed(e)).await;
                wake();
                return;
            }
        }
        if tx.send(Chunk::Data(buf.freeze())).await.is_err() {
            return;
        }
        wake();
    }
    if tx.send(Chunk::End).await.is_ok() {
        wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> SharedFiles {
        SharedFiles::default()
    }

    fn blocks(feed: &mut Feed) -> Vec<Bytes> {
        let mut out = Vec::new();
        loop {
            let b = feed.try_next().unwrap().unwrap();
            let last = b.len() < feed.blksize;
            out.push(b);
            if last {
                return out;
            }
        }
    }

    #[test]
    fn a_file_is_cut_into_blocks_with_an_empty_final_one_on_a_boundary() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 1024]).unwrap();
        let mut feed = Feed::file(f, 1024, Box::new(()), Mode::Octet, 512, &shared());
        assert!(
            matches!(feed.raw, Raw::Memory { .. }),
            "a small file is shared"
        );
        let b = blocks(&mut feed);
        assert_eq!(b.iter().map(|b| b.len()).collect::<Vec<_>>(), [512, 512, 0]);
    }

    #[test]
    fn a_large_file_is_read_block_by_block_into_the_same_cuts() {
        let size = super::super::shared::SHARED_MAX as usize + 512;
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &vec![7u8; size]).unwrap();
        let mut feed = Feed::file(f, size as u64, Box::new(()), Mode::Octet, 512, &shared());
        assert!(matches!(feed.raw, Raw::File { .. }));
        let b = blocks(&mut feed);
        assert_eq!(b.len(), size / 512 + 1);
        assert!(b[..b.len() - 1].iter().all(|b| b.len() == 512));
        assert!(b.last().unwrap().is_empty());
    }

    #[test]
    fn a_large_file_is_read_ahead_in_whole_blocks_of_about_8_kib() {
        let size = super::super::shared::SHARED_MAX as usize + 512;
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &vec![7u8; size]).unwrap();
        for (blksize, per_read) in [(512, 16), (1428, 5), (9000, 1)] {
            let f = f.try_clone().unwrap();
            let mut feed = Feed::file(
                f,
                size as u64,
                Box::new(()),
                Mode::Octet,
                blksize,
                &shared(),
            );
            assert_eq!(feed.try_next().unwrap().unwrap().len(), blksize as usize);
            // One read brought `per_read` blocks: the rest wait for the next ACKs, unread.
            assert_eq!(
                feed.pending.len(),
                (per_read - 1) * blksize as usize,
                "{blksize}"
            );
        }
    }

    #[test]
    fn a_file_shorter_than_its_size_is_an_error_not_a_final_block() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 600]).unwrap();
        let mut feed = Feed::file(f, 2000, Box::new(()), Mode::Octet, 512, &shared());
        assert_eq!(feed.try_next().unwrap().unwrap().len(), 512);
        assert!(feed.try_next().is_err());
    }

    #[test]
    fn netascii_blocks_are_cut_after_translation() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, b"a\nb\n").unwrap();
        let mut feed = Feed::file(f, 4, Box::new(()), Mode::Netascii, 8, &shared());
        let b = blocks(&mut feed);
        assert_eq!(&b[0][..], b"a\r\nb\r\n");
    }

    #[test]
    fn a_stream_that_dies_without_its_end_marker_is_an_error() {
        let (tx, rx) = mpsc::channel(2);
        let mut feed = Feed::stream(rx, Mode::Octet, 4);
        assert!(feed.try_next().unwrap().is_none(), "nothing yet: wait");
        tx.try_send(Chunk::Data(Bytes::from_static(b"abcdef")))
            .unwrap();
        assert_eq!(&feed.try_next().unwrap().unwrap()[..], b"abcd");
        drop(tx);
        assert!(feed.try_next().is_err());
    }
}
