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

use std::sync::Mutex;

use crate::{Format, Pool, BLOCK};

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

/// Rows of GGUF blocks (`rows` by `cols / 32` blocks of `format`) in the panel layout.
/// Panels per task of a parallel [`pack`].
const PANELS_PER_TASK: usize = 64;

/// Rows of GGUF blocks (`rows` by `cols / 32` blocks of `format`) in the panel layout,
/// packed on `pool`.
pub(crate) fn pack(format: Format, rows: usize, cols: usize, data: &[u8], pool: &Pool) -> Vec<u8> {
    let panel_bytes = cols / BLOCK * panel_block_bytes(format);
    let mut out = vec![0u8; rows.div_ceil(PANEL_ROWS) * panel_bytes];
    let tasks: Vec<Mutex<(usize, &mut [u8])>> = out
        .chunks_mut(PANELS_PER_TASK * panel_bytes.max(1))
        .enumerate()
        .map(|(task, chunk)| Mutex::new((task * PANELS_PER_TASK, chunk)))
        .collect();
    pool.run(tasks.len(), &|task| {
        let mut task = tasks[task].lock().unwrap_or_else(|e| e.into_inner());
        let (first_panel, ref mut chunk) = *task;
        pack_panels(format, rows, cols, data, first_panel, chunk);
    });
    drop(tasks);
    out
}

/// Panels `first_panel..` into `out` (whole panels).
fn pack_panels(
    format: Format,
    rows: usize,
    cols: usize,
    data: &[u8],
    first_panel: usize,
    out: &mut [u8],
) {
    let blocks = cols / BLOCK;
    let size = format.block_bytes();
    for (index, panel_block) in out.chunks_exact_mut(panel_block_bytes(format)).enumerate() {
        let (panel, b) = (first_panel + index / blocks, index % blocks);
        let (scales, weights) = panel_block.split_at_mut(scale_bytes(format));
        for r in 0..PANEL_ROWS.min(rows - panel * PANEL_ROWS) {
            let at = ((panel * PANEL_ROWS + r) * blocks + b) * size;
            let block = &data[at..at + size];
            scales[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
            // Whole words at a time: four weights of one row per 32-bit word of the panel.
            let word = |bytes: &[u8]| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let mut put = |v: usize, value: u32| {
                weights[v * 32 + r * 4..v * 32 + r * 4 + 4].copy_from_slice(&value.to_le_bytes());
            };
            match format {
                Format::Q8_0 => {
                    let bias = u32::from_le_bytes([Q8_0_BIAS; 4]);
                    for (v, four) in block[2..].chunks_exact(4).enumerate() {
                        put(v, word(four) ^ bias);
                    }
                }
                Format::Q4_0 | Format::Q4_1 => {
                    if format == Format::Q4_1 {
                        scales[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&block[2..4]);
                    }
                    // Byte j holds weights j (low nibble) and j + 16 (high); vector v of
                    // the panel takes weights 8v..8v+4 in its low nibbles and 8v+4..8v+8
                    // in its high ones.
                    let nibbles = &block[size - BLOCK / 2..];
                    let [a, b, c, e] = [0, 4, 8, 12].map(|at| word(&nibbles[at..]));
                    const LOW: u32 = 0x0F0F_0F0F;
                    put(0, (a & LOW) | (b & LOW) << 4);
                    put(1, (c & LOW) | (e & LOW) << 4);
                    put(2, (a >> 4 & LOW) | (b & !LOW));
                    put(3, (c >> 4 & LOW) | (e & !LOW));
                }
            }
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
            let len = rows * blocks * format.block_bytes();
            let mut state = seed;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (state >> 56) as u8
                })
                .collect();
            let packed = pack(format, rows, blocks * BLOCK, &data, &Pool::new(3));
            prop_assert_eq!(
                packed.len(),
                rows.div_ceil(PANEL_ROWS) * blocks * panel_block_bytes(format)
            );
            let row_bytes = blocks * format.block_bytes();
            for row in 0..rows {
                prop_assert_eq!(
                    unpack_row(format, &packed, blocks, row),
                    data[row * row_bytes..(row + 1) * row_bytes].to_vec()
                );
            }
        }
    }
}
