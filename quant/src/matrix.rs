//! A quantized weight matrix (rows of GGUF blocks, as stored in the file) and its product
//! with quantized activations, split by weight rows over threads when the work is large
//! enough to pay for them.

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

/// `rows` output features by `cols` input features, row-major, in GGUF blocks.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, QuantError> {
        if cols % BLOCK != 0 {
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
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// The f32 values of weight row `row` (an embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let bytes = self.row_bytes();
        crate::scalar::dequantize(self.format, &self.data[row * bytes..(row + 1) * bytes], out);
    }

    /// `out[m * rows + n] = x[m] . w[n]` for every activation row `m` and weight row `n`,
    /// in bands of weight rows spread over `pool`.
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
        let work = x.rows * self.rows * (self.cols / BLOCK);
        if work < BLOCKS_PER_BAND || pool.threads() == 1 {
            self.rows_into(kernel, x, 0..self.rows, out.as_mut_ptr(), self.rows);
            return;
        }
        // A few bands per thread, so that a thread that starts late still finds work.
        let bands = (work / BLOCKS_PER_BAND)
            .clamp(1, pool.threads() * 4)
            .min(self.rows);
        let per_band = self.rows.div_ceil(bands);
        let out = OutPtr(out.as_mut_ptr());
        pool.run(bands, &|band| {
            let start = (band * per_band).min(self.rows);
            let end = ((band + 1) * per_band).min(self.rows);
            let out = &out;
            self.rows_into(kernel, x, start..end, out.0, self.rows);
        });
    }

    /// Weight row `n`'s blocks.
    pub fn row(&self, n: usize) -> &[u8] {
        let bytes = self.row_bytes();
        &self.data[n * bytes..(n + 1) * bytes]
    }

    /// Weight rows `rows` against every activation row, into `out[m * stride + n]`.
    fn rows_into(
        &self,
        kernel: KernelChoice,
        x: &QuantizedActivations,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        stride: usize,
    ) {
        assert!(rows.end <= self.rows && stride >= self.rows);
        if x.rows == 1 {
            // Generation: one activation row, so the band's outputs are contiguous.
            let bytes = self.row_bytes();
            // SAFETY: as below, for `m == 0`: `out[rows]` lies within the output.
            let out = unsafe { std::slice::from_raw_parts_mut(out.add(rows.start), rows.len()) };
            let w = &self.data[rows.start * bytes..rows.end * bytes];
            kernel.dot_band(self.format, w, x, 0, out);
            return;
        }
        // SAFETY (of the writes): `n < self.rows <= stride` and `m < x.rows`, and `matmul`
        // checked that `out` holds `x.rows * self.rows` values with `stride == self.rows`;
        // bands are disjoint ranges of `n`, so no two tasks write one value.
        let four_rows = x.rows / 4 * 4;
        let mut n = rows.start;
        while n < rows.end {
            // Tiles of two weight rows by four activation rows; the odd row alone.
            let tile = if n + 2 <= rows.end { 2 } else { 1 };
            for m in (0..four_rows).step_by(4) {
                let (pair, single);
                let values: &[[f32; 4]] = if tile == 2 {
                    pair = kernel.dot_tile(self.format, [self.row(n), self.row(n + 1)], x, m);
                    &pair
                } else {
                    single = kernel.dot_tile(self.format, [self.row(n)], x, m);
                    &single
                };
                for (i, four) in values.iter().enumerate() {
                    for (r, value) in four.iter().enumerate() {
                        unsafe { *out.add((m + r) * stride + n + i) = *value };
                    }
                }
            }
            for i in 0..tile {
                for m in four_rows..x.rows {
                    let value = kernel.dot(self.format, self.row(n + i), x, m);
                    unsafe { *out.add(m * stride + n + i) = value };
                }
            }
            n += tile;
        }
    }
}

/// The output, shared by the bands of one product (each writes its own columns).
struct OutPtr(*mut f32);

// SAFETY: see `rows_into`: bands write disjoint elements, and `Pool::run` returns only
// when every band has finished.
unsafe impl Sync for OutPtr {}
