//! The decoded layer as a stream: a second thread decompresses into a few queued chunks while
//! the entries are applied, and every decoded byte counts against the image's cap.

use std::io::{self, Read};
use std::sync::mpsc;

use super::{Compression, UnpackError, COPY_BUF};

/// Decoded chunks queued between the decompressing and the applying thread.
pub(super) const IN_FLIGHT_CHUNKS: usize = 4;

/// The decompressor for a layer.
pub(super) fn decode<'a>(
    layer: impl Read + 'a,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match compression {
        Compression::None => Box::new(layer),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            io::BufReader::with_capacity(COPY_BUF / 4, layer),
        )),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(layer).map_err(UnpackError::Read)?)
        }
    })
}

/// Reads until `buf` is full or the stream ends.
pub(super) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The decoded layer as a stream, from the decompressing thread's chunks.
pub(super) struct ChunkReader {
    pub(super) rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    pub(super) chunk: Vec<u8>,
    pub(super) pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // decoding finished
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts decoded bytes read through it and fails once they pass `limit`.
pub(super) struct Capped<R> {
    pub(super) inner: R,
    pub(super) count: u64,
    pub(super) limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other("uncompressed size limit exceeded"));
        }
        Ok(n)
    }
}
