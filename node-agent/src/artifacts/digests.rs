//! The two SHA-256 digests a download needs over the same bytes: the chunk being
//! written and the whole file so far, fed once so that the file is never read back.

use nanofleet_artifact::ids::Sha256Digest;
use sha2::{Digest, Sha256};

/// Digests of the current chunk and of the whole file, fed the same bytes.
#[derive(Clone, Default)]
pub struct Digests {
    chunk: Sha256,
    whole: Sha256,
}

impl Digests {
    pub fn update(&mut self, data: &[u8]) {
        self.chunk.update(data);
        self.whole.update(data);
    }

    /// Ends the current chunk: returns its digest; the next byte starts the next chunk.
    pub fn finish_chunk(&mut self) -> Sha256Digest {
        Sha256Digest::from_bytes(std::mem::take(&mut self.chunk).finalize().into())
    }

    /// The digest of every byte fed.
    pub fn finish_whole(self) -> Sha256Digest {
        Sha256Digest::from_bytes(self.whole.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_and_whole_digests_equal_separate_hashes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut digests = Digests::default();
        for chunk in data.chunks(3000) {
            for piece in chunk.chunks(777) {
                digests.update(piece);
            }
            assert_eq!(digests.finish_chunk(), Sha256Digest::of(chunk));
        }
        assert_eq!(digests.finish_whole(), Sha256Digest::of(&data));
    }
}
