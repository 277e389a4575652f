//! The layout the products read: weight rows in panels of eight, each of a panel's blocks
//! holding the eight rows' scales side by side and their weights interleaved four at a
//! time, so that one 32-byte vector carries four weights of every row of the panel and one
//! broadcast of four activation bytes multiplies all of them. A panel block takes exactly
//! the bytes of the eight GGUF blocks it is made from.
//!
//! A panel block of `format`:
//! - the eight rows' scales `d` as f16; for Q4_1 then the eight minimums `m` as f16;
//! - eight groups `j` of four weights per row: weights `4j..4j+4` of row `r` are bytes
//!   `4r..4r+4` of the group. Q4_0 and Q4_1 hold two groups per 32 bytes, group `2v` in
//!   the low nibbles and group `2v + 1` in the high nibbles of vector `v`; Q8_0 holds one
//!   group per 32 bytes, each signed weight plus 128 (as the unsigned operand of the
//!   SIMD byte products).
//!
//! A matrix whose rows are not a multiple of eight gets a last panel padded with zero
//! rows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::{Format, MatrixSource, Pool, BLOCK};

/// Weight rows per panel.
pub const PANEL_ROWS: usize = 8;

/// Bytes of one panel block of `format`.
pub(crate) const fn panel_block_bytes(format: Format) -> usize {
    PANEL_ROWS * format.block_bytes()
}

/// Bytes of a panel block before its weights: the scales (and Q4_1's minimums).
pub(crate) const fn scale_bytes(format: Format) -> usize {
    match format {
        Format::Q4_1 => 4 * PANEL_ROWS,
        _ => 2 * PANEL_ROWS,
    }
}

/// What Q8_0's stored bytes add to each weight.
pub(crate) const Q8_0_BIAS: u8 = 128;

/// Where weight `i` of row `row` lies among a panel block's weight bytes, and whether it
/// is the high nibble of its byte (the 4-bit formats).
pub(crate) const fn weight_at(format: Format, row: usize, i: usize) -> (usize, bool) {
    match format {
        Format::Q8_0 => ((i / 4) * 32 + row * 4 + i % 4, false),
        Format::Q4_0 | Format::Q4_1 => ((i / 8) * 32 + row * 4 + i % 4, i % 8 >= 4),
    }
}

/// Row `row` of GGUF block `block` in the panel layout, as its GGUF bytes (the inverse of
/// [`pack`]'s placement).
fn gguf_block(format: Format, panel_block: &[u8], row: usize, out: &mut [u8]) {
    out[..2].copy_from_slice(&panel_block[2 * row..2 * row + 2]);
    let weights = &panel_block[scale_bytes(format)..];
    match format {
        Format::Q8_0 => {
            for (i, byte) in out[2..2 + BLOCK].iter_mut().enumerate() {
                *byte = weights[weight_at(format, row, i).0] ^ Q8_0_BIAS;
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
            let header = format.block_bytes() - BLOCK / 2;
            if format == Format::Q4_1 {
                out[2..4].copy_from_slice(&panel_block[16 + 2 * row..16 + 2 * row + 2]);
            }
            let nibble = |i: usize| {
                let (at, high) = weight_at(format, row, i);
                if high {
                    weights[at] >> 4
                } else {
                    weights[at] & 0x0F
                }
            };
            for j in 0..BLOCK / 2 {
                out[header + j] = nibble(j) | nibble(j + BLOCK / 2) << 4;
            }
        }
    }
}

/// Panels per task of a parallel [`pack`].
const PANELS_PER_TASK: usize = 64;

/// Bytes of a matrix of `rows` by `cols / 32` blocks of `format` in the panel layout.
pub(crate) fn packed_len(format: Format, rows: usize, cols: usize) -> usize {
    rows.div_ceil(PANEL_ROWS) * (cols / BLOCK) * panel_block_bytes(format)
}

/// A matrix to pack, into `out` ([`packed_len`] bytes).
pub(crate) struct PackJob<'a> {
    pub source: MatrixSource<'a>,
    pub out: &'a mut [u8],
}

/// Every matrix of `jobs` in the panel layout, as one run of tasks on `pool`, so that its
/// threads stay busy from the first matrix to the last; `packed(i)` runs once matrix `i`
/// is done (on whichever thread finished it).
pub(crate) fn pack(jobs: Vec<PackJob>, pool: &Pool, packed: &(dyn Fn(usize) + Sync)) {
    // Each matrix with the count of its tasks not yet done.
    let mut matrices: Vec<(MatrixSource, AtomicUsize)> = Vec::with_capacity(jobs.len());
    let mut tasks: Vec<Mutex<(usize, usize, &mut [u8])>> = Vec::new();
    for (index, PackJob { source, out }) in jobs.into_iter().enumerate() {
        assert_eq!(
            out.len(),
            packed_len(source.format, source.rows, source.cols)
        );
        let panel_bytes = source.cols / BLOCK * panel_block_bytes(source.format);
        let first_task = tasks.len();
        tasks.extend(
            out.chunks_mut(PANELS_PER_TASK * panel_bytes.max(1))
                .enumerate()
                .map(|(task, chunk)| Mutex::new((index, task * PANELS_PER_TASK, chunk))),
        );
        let left = AtomicUsize::new(tasks.len() - first_task);
        if tasks.len() == first_task {
            packed(index);
        }
        matrices.push((source, left));
    }
    pool.run(tasks.len(), &|task| {
        let mut task = tasks[task].lock().unwrap_or_else(|e| e.into_inner());
        let (index, first_panel, ref mut chunk) = *task;
        let (source, left) = &matrices[index];
        pack_panels(source, first_panel, chunk);
        if left.fetch_sub(1, Ordering::AcqRel) == 1 {
            packed(index);
        }
    });
}

/// Panels `first_panel..` of `source` into `out` (whole panels).
fn pack_panels(source: &MatrixSource, first_panel: usize, out: &mut [u8]) {
    match source.format {
        Format::Q4_0 => pack_panels_of::<18, 144>(source, first_panel, out),
        Format::Q4_1 => pack_panels_of::<20, 160>(source, first_panel, out),
        Format::Q8_0 => pack_panels_of::<34, 272>(source, first_panel, out),
    }
}

/// [`pack_panels`] for blocks of `SIZE` bytes and panel blocks of `PANEL` bytes: with the
/// sizes known, each block's moves compile to fixed offsets without bounds checks.
fn pack_panels_of<const SIZE: usize, const PANEL: usize>(
    source: &MatrixSource,
    first_panel: usize,
    out: &mut [u8],
) {
    let MatrixSource {
        format,
        rows,
        cols,
        data,
    } = *source;
    debug_assert_eq!(
        (SIZE, PANEL),
        (format.block_bytes(), panel_block_bytes(format))
    );
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2");
    let blocks = cols / BLOCK;
    let row_bytes = blocks * SIZE;
    for (index, panel_out) in out.chunks_exact_mut(blocks * PANEL).enumerate() {
        let first_row = (first_panel + index) * PANEL_ROWS;
        let valid = PANEL_ROWS.min(rows - first_row);
        let source = &data[first_row * row_bytes..(first_row + valid) * row_bytes];
        for (b, panel_block) in panel_out.chunks_exact_mut(PANEL).enumerate() {
            let panel_block: &mut [u8; PANEL] = panel_block.try_into().expect("PANEL bytes");
            let block = |r: usize| -> &[u8; SIZE] {
                let at = r * row_bytes + b * SIZE;
                source[at..at + SIZE].try_into().expect("SIZE bytes")
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 && valid == PANEL_ROWS {
                // SAFETY: the CPU has AVX2.
                unsafe {
                    crate::x86::pack_panel_block(format, std::array::from_fn(block), panel_block)
                };
                continue;
            }
            // Built on the stack and stored whole, so that the fresh destination is written
            // in full lines; rows past the matrix's last (a last panel's padding) stay zero.
            let mut built = [0u8; PANEL];
            for r in 0..valid {
                pack_block(format, block(r), r, &mut built);
            }
            *panel_block = built;
        }
    }
}

/// GGUF block `block` as row `r` of `panel_block`.
#[inline(always)]
fn pack_block<const SIZE: usize, const PANEL: usize>(
    format: Format,
    block: &[u8; SIZE],
    r: usize,
    panel_block: &mut [u8; PANEL],
) {
    let (scales, weights) = panel_block.split_at_mut(scale_bytes(format));
    scales[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
    // Whole words at a time: four weights of one row per 32-bit word of the panel.
    let word = |at: usize| u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"));
    let mut put = |v: usize, value: u32| {
        weights[v * 32 + r * 4..v * 32 + r * 4 + 4].copy_from_slice(&value.to_le_bytes());
    };
    match format {
        Format::Q8_0 => {
            let bias = u32::from_le_bytes([Q8_0_BIAS; 4]);
            for v in 0..BLOCK / 4 {
                put(v, word(2 + 4 * v) ^ bias);
            }
        }
        Format::Q4_0 | Format::Q4_1 => {
            if format == Format::Q4_1 {
                scales[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&block[2..4]);
            }
            // Byte j holds weights j (low nibble) and j + 16 (high); vector v of the panel
            // takes weights 8v..8v+4 in its low nibbles and 8v+4..8v+8 in its high ones.
            let nibbles = SIZE - BLOCK / 2;
            let (a, b, c, e) = (
                word(nibbles),
                word(nibbles + 4),
                word(nibbles + 8),
                word(nibbles + 12),
            );
            const LOW: u32 = 0x0F0F_0F0F;
            put(0, (a & LOW) | (b & LOW) << 4);
            put(1, (c & LOW) | (e & LOW) << 4);
            put(2, (a >> 4 & LOW) | (b & !LOW));
            put(3, (c >> 4 & LOW) | (e & !LOW));
        }
    }
}

/// The GGUF bytes of weight row `row` of a packed matrix with `blocks` blocks per row.
pub(crate) fn unpack_row(format: Format, packed: &[u8], blocks: usize, row: usize) -> Vec<u8> {
    let size = format.block_bytes();
    let panel = row / PANEL_ROWS;
    let mut out = vec![0u8; blocks * size];
    for (b, block) in out.chunks_exact_mut(size).enumerate() {
        let at = (panel * blocks + b) * panel_block_bytes(format);
        gguf_block(
            format,
            &packed[at..at + panel_block_bytes(format)],
            row % PANEL_ROWS,
            block,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every row comes back from the panels as the GGUF bytes it went in as, whatever
        /// the rows and columns (padding included).
        #[test]
        fn packing_keeps_every_row(
            format in prop::sample::select(Format::ALL.to_vec()),
            rows in 1usize..20,
            blocks in 1usize..5,
            seed in any::<u64>(),
        ) {
            let row_bytes = blocks * format.block_bytes();
            let len = rows * row_bytes;
            let mut state = seed;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (state >> 56) as u8
                })
                .collect();
            // Filled with a byte that no padding holds, to see the padding written.
            let mut packed = vec![0xA5; packed_len(format, rows, blocks * BLOCK)];
            let job = PackJob {
                source: MatrixSource {
                    format,
                    rows,
                    cols: blocks * BLOCK,
                    data: &data,
                },
                out: &mut packed,
            };
            pack(vec![job], &Pool::new(3), &|_| {});
            let zeros = vec![0; packed.len()];
            for padding_row in rows..rows.div_ceil(PANEL_ROWS) * PANEL_ROWS {
                prop_assert_eq!(
                    unpack_row(format, &packed, blocks, padding_row),
                    unpack_row(format, &zeros, blocks, padding_row)
                );
            }
            for row in 0..rows {
                prop_assert_eq!(
                    unpack_row(format, &packed, blocks, row),
                    data[row * row_bytes..(row + 1) * row_bytes].to_vec()
                );
            }
        }

        /// The AVX2 packing of a full panel block equals the scalar one, for every format.
        #[cfg(target_arch = "x86_64")]
        #[test]
        fn simd_packing_equals_scalar(seed in any::<u64>()) {
            if !is_x86_feature_detected!("avx2") {
                return Ok(());
            }
            let mut state = seed;
            let mut byte = || {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (state >> 56) as u8
            };
            fn both<const SIZE: usize, const PANEL: usize>(
                format: Format,
                byte: &mut impl FnMut() -> u8,
            ) -> ([u8; PANEL], [u8; PANEL]) {
                let blocks: [[u8; SIZE]; PANEL_ROWS] =
                    std::array::from_fn(|_| std::array::from_fn(|_| byte()));
                let mut scalar = [0u8; PANEL];
                for (r, block) in blocks.iter().enumerate() {
                    pack_block(format, block, r, &mut scalar);
                }
                let mut simd = [0u8; PANEL];
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe {
                    crate::x86::pack_panel_block(format, std::array::from_fn(|r| &blocks[r]), &mut simd)
                };
                (scalar, simd)
            }
            let (a, b) = both::<18, 144>(Format::Q4_0, &mut byte);
            prop_assert_eq!(a, b);
            let (a, b) = both::<20, 160>(Format::Q4_1, &mut byte);
            prop_assert_eq!(a, b);
            let (a, b) = both::<34, 272>(Format::Q8_0, &mut byte);
            prop_assert_eq!(a, b);
        }
    }
}
