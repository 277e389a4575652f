//! The memory packed matrices live in: one anonymous mapping that a whole model's matrices
//! are packed into one after another, advised for transparent huge pages where it spans
//! them, so that packing takes a page fault per 2 MiB rather than per 4 KiB and the
//! products miss the TLB less.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use memmap2::MmapRaw;

use crate::QuantError;

/// The huge page size the mapping is aligned to and advised in (x86-64 and aarch64 with
/// 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Matrices start at multiples of this, on a cache line.
const MATRIX_ALIGN: usize = 64;

/// The room a matrix of `len` packed bytes takes in a region.
pub(crate) const fn room(len: usize) -> usize {
    len.next_multiple_of(MATRIX_ALIGN)
}

/// Room for packed matrices, filled front to back; each range is handed out once, to the
/// matrix packed into it.
#[derive(Debug)]
pub struct PackedRegion {
    map: Arc<RegionMap>,
    /// Bytes handed out so far, from `map.start`.
    claimed: AtomicUsize,
}

#[derive(Debug)]
struct RegionMap {
    map: MmapRaw,
    /// The offset of the region's first byte in `map` (the first huge page boundary).
    start: usize,
    capacity: usize,
}

/// A matrix's packed bytes: a range of a region, written once before this was made.
#[derive(Debug, Clone)]
pub(crate) struct PackedBytes {
    map: Arc<RegionMap>,
    at: usize,
    len: usize,
}

impl PackedRegion {
    /// Room for `capacity` bytes of packed matrices (the sum of their
    /// [`crate::QuantMatrix::room`]). Only the pages written become resident.
    pub fn new(capacity: usize) -> Result<Self, QuantError> {
        let huge = capacity >= HUGE_PAGE;
        // A huge page boundary lies within the first HUGE_PAGE bytes of the mapping; the
        // bytes before it are never touched, so never resident.
        let slack = if huge { HUGE_PAGE } else { 0 };
        let map = memmap2::MmapMut::map_anon((capacity + slack).max(1))
            .map(MmapRaw::from)
            .map_err(|error| QuantError::Map {
                bytes: capacity,
                reason: error.to_string(),
            })?;
        let start = if huge {
            (map.as_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize
        } else {
            0
        };
        #[cfg(target_os = "linux")]
        if huge {
            // Advice only: without transparent huge pages the region keeps base pages.
            let _ = map.advise_range(
                memmap2::Advice::HugePage,
                start,
                capacity / HUGE_PAGE * HUGE_PAGE,
            );
        }
        Ok(Self {
            map: Arc::new(RegionMap {
                map,
                start,
                capacity,
            }),
            claimed: AtomicUsize::new(0),
        })
    }

    /// The next `len` bytes (zero: never written before), to be written through the claim
    /// and then read through the [`PackedBytes`] it becomes.
    pub(crate) fn claim(&self, len: usize) -> Result<Claim, QuantError> {
        let capacity = self.map.capacity;
        let claim = |at: usize| Some(at + room(len)).filter(|&end| end <= capacity);
        let at = self
            .claimed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, claim)
            .map_err(|at| QuantError::RegionFull {
                needed: len,
                left: capacity - at,
            })?;
        Ok(Claim(PackedBytes {
            map: self.map.clone(),
            at,
            len,
        }))
    }
}

/// A range of a region, handed out once by [`PackedRegion::claim`]: the only way to
/// write it.
#[derive(Debug)]
pub(crate) struct Claim(PackedBytes);

impl Claim {
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let PackedBytes { map, at, len } = &self.0;
        // SAFETY: `at..at + len` lies within the mapping (`claim` checked it against the
        // capacity, which the mapping covers from `start`), and the atomic claim handed it
        // out once, to this claim, whose `&mut` makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(map.map.as_mut_ptr().add(map.start + at), *len) }
    }

    /// The written bytes, from now on only read.
    pub(crate) fn into_packed(self) -> PackedBytes {
        self.0
    }
}

impl std::ops::Deref for PackedBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the range lies within the mapping and was written through its `Claim`
        // before that became this handle; nothing writes it again, and the map lives as
        // long as any handle into it.
        unsafe {
            std::slice::from_raw_parts(
                self.map.map.as_ptr().add(self.map.start + self.at),
                self.len,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(region: &PackedRegion, len: usize, value: u8) -> Result<PackedBytes, QuantError> {
        let mut claim = region.claim(len)?;
        claim.bytes_mut().fill(value);
        Ok(claim.into_packed())
    }

    #[test]
    fn ranges_are_disjoint_and_bounded() {
        let region = PackedRegion::new(200).unwrap();
        let a = filled(&region, 100, 1).unwrap();
        // The first range takes 128 bytes with its padding, so 72 are left.
        assert_eq!(
            region.claim(100).unwrap_err(),
            QuantError::RegionFull {
                needed: 100,
                left: 72
            }
        );
        let b = filled(&region, 64, 2).unwrap();
        assert!(a.iter().all(|&x| x == 1) && a.len() == 100);
        assert!(b.iter().all(|&x| x == 2) && b.len() == 64);
        assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 128);
    }

    #[test]
    fn a_large_region_starts_on_a_huge_page() {
        let region = PackedRegion::new(3 * HUGE_PAGE).unwrap();
        let bytes = filled(&region, HUGE_PAGE, 7).unwrap();
        assert_eq!(bytes.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(bytes[HUGE_PAGE - 1], 7);
    }
}
