//! A quantized weight matrix (GGUF blocks packed into panels of eight rows) and its product
//! with quantized activations, split by panels over threads when the work is large
//! enough to pay for them.

use crate::panels::{self, panel_block_bytes, PANEL_ROWS};
use crate::{Format, KernelChoice, Pool, QuantizedActivations, BLOCK};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{cols} columns are not whole {BLOCK}-element blocks")]
    PartialBlock { cols: usize },
    #[error("{format:?} weights of {rows} x {cols} take {expected} bytes, got {got}")]
    WrongSize {
        format: Format,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
}

/// Blocks of work per band of a product; a product of fewer runs on the calling thread
/// alone, since handing it to the pool would cost about as much as doing it.
const BLOCKS_PER_BAND: usize = 1024;

/// Activation rows per panel product in prefill: each weight block is unpacked once for
/// all of them.
const ROWS_PER_TILE: usize = 4;

/// `rows` output features by `cols` input features, packed in panels (`panels`).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    packed: Vec<u8>,
}

impl QuantMatrix {
    /// The matrix of `rows` rows of GGUF blocks in `data` (as the file stores them),
    /// packed into panels on `pool`.
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        data: &[u8],
        pool: &Pool,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::PartialBlock { cols });
        }
        let expected = rows * cols / BLOCK * format.block_bytes();
        if data.len() != expected {
            return Err(QuantError::WrongSize {
                format,
                rows,
                cols,
                expected,
                got: data.len(),
            });
        }
        Ok(Self {
            format,
            rows,
            cols,
            packed: panels::pack(format, rows, cols, data, pool),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn panel_bytes(&self) -> usize {
        self.cols / BLOCK * panel_block_bytes(self.format)
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL_ROWS)
    }

    /// The f32 values of weight row `row` (an embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} of {}", self.rows);
        let gguf = panels::unpack_row(self.format, &self.packed, self.cols / BLOCK, row);
        crate::scalar::dequantize(self.format, &gguf, out);
    }

    /// `out[m * rows + n] = x[m] . w[n]` for every activation row `m` and weight row `n`,
    /// in bands of panels spread over `pool`.
    pub fn matmul(
        &self,
        kernel: KernelChoice,
        x: &QuantizedActivations,
        out: &mut [f32],
        pool: &Pool,
    ) {
        assert_eq!(
            x.cols, self.cols,
            "activations and weights differ in columns"
        );
        assert_eq!(
            out.len(),
            x.rows * self.rows,
            "output is activation rows x weight rows"
        );
        let panels = self.panels();
        let work = x.rows * self.rows * (self.cols / BLOCK);
        if work < BLOCKS_PER_BAND || pool.threads() == 1 {
            self.panels_into(kernel, x, 0..panels, out.as_mut_ptr());
            return;
        }
        // A few bands per thread, so that a thread that starts late still finds work.
        let bands = (work / BLOCKS_PER_BAND)
            .clamp(1, pool.threads() * 4)
            .min(panels);
        let per_band = panels.div_ceil(bands);
        let out = OutPtr(out.as_mut_ptr());
        pool.run(bands, &|band| {
            let start = (band * per_band).min(panels);
            let end = ((band + 1) * per_band).min(panels);
            let out = &out;
            self.panels_into(kernel, x, start..end, out.0);
        });
    }

    /// Panels `panels` against every activation row, into `out[m * self.rows + n]`.
    fn panels_into(
        &self,
        kernel: KernelChoice,
        x: &QuantizedActivations,
        panels: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        assert!(panels.end <= self.panels());
        let tiled = x.rows / ROWS_PER_TILE * ROWS_PER_TILE;
        for p in panels {
            let panel = &self.packed[p * self.panel_bytes()..(p + 1) * self.panel_bytes()];
            // The last panel may be padded past the matrix's rows.
            let first_row = p * PANEL_ROWS;
            let valid = PANEL_ROWS.min(self.rows - first_row);
            let write = |m: usize, values: &[f32; PANEL_ROWS]| {
                // SAFETY: `first_row + valid <= self.rows` and `m < x.rows`, and `matmul`
                // checked that `out` holds `x.rows * self.rows` values; bands are disjoint
                // ranges of panels, so no two tasks write one value.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        values.as_ptr(),
                        out.add(m * self.rows + first_row),
                        valid,
                    )
                };
            };
            for m in (0..tiled).step_by(ROWS_PER_TILE) {
                let values = kernel.panel_product::<ROWS_PER_TILE>(self.format, panel, x, m);
                for (r, values) in values.iter().enumerate() {
                    write(m + r, values);
                }
            }
            for m in tiled..x.rows {
                let [values] = kernel.panel_product::<1>(self.format, panel, x, m);
                write(m, &values);
            }
        }
    }
}

/// The output, shared by the bands of one product (each writes its own columns).
struct OutPtr(*mut f32);

// SAFETY: see `panels_into`: bands write disjoint elements, and `Pool::run` returns only
// when every band has finished.
unsafe impl Sync for OutPtr {}
