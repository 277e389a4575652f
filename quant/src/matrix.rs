//! A quantized weight matrix (GGUF blocks packed into panels of eight rows) and its product
//! with quantized activations, split by panels over threads when the work is large
//! enough to pay for them.

use std::sync::Arc;

use crate::panels::{self, panel_block_bytes, PackJob, PANEL_ROWS};
use crate::region::PackedBytes;
use crate::{Format, KernelChoice, PackedRegion, Pool, QuantizedActivations, BLOCK};

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
    #[error("cannot map {bytes} bytes for packed weights: {reason}")]
    Map { bytes: usize, reason: String },
    #[error("the packed weights' region has {left} bytes left, a matrix needs {needed}")]
    RegionFull { needed: usize, left: usize },
    #[error("{format:?} matrices are packed, not read in place (only Q8_0 is)")]
    NotInPlace { format: Format },
}

/// Blocks of work per band of a product; a product of fewer runs on the calling thread
/// alone, since handing it to the pool would cost about as much as doing it.
const BLOCKS_PER_BAND: usize = 1024;

/// Activation rows per panel product in prefill: each weight block is unpacked once for
/// all of them.
const ROWS_PER_TILE: usize = 4;

/// A matrix to pack: `rows` by `cols` weights of `format`, as GGUF blocks (the file's
/// bytes).
#[derive(Debug, Clone, Copy)]
pub struct MatrixSource<'a> {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl MatrixSource<'_> {
    /// The bytes the matrix takes packed, once its data is known to be its blocks.
    fn checked_packed_len(&self) -> Result<usize, QuantError> {
        let Self {
            format,
            rows,
            cols,
            data,
        } = *self;
        let len = QuantMatrix::packed_len(format, rows, cols)?;
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
        Ok(len)
    }
}

/// Bytes a matrix reads in place: the GGUF file's own rows, kept mapped by their owner.
pub trait RowBytes: AsRef<[u8]> + Send + Sync + std::fmt::Debug {}

impl<T: AsRef<[u8]> + Send + Sync + std::fmt::Debug> RowBytes for T {}

/// `rows` output features by `cols` input features: packed in panels (`panels`), or the
/// file's rows read in place.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    layout: Layout,
}

#[derive(Debug, Clone)]
enum Layout {
    Panels(PackedBytes),
    /// GGUF rows of Q8_0 blocks, where packing costs a load more than it gains: a token
    /// embedding table, whose only product is one row's logits.
    Rows(Arc<dyn RowBytes>),
}

impl QuantMatrix {
    /// The bytes a matrix takes in a [`PackedRegion`]: its packed bytes and the padding
    /// that aligns the next.
    pub fn room(format: Format, rows: usize, cols: usize) -> Result<usize, QuantError> {
        Ok(crate::region::room(Self::packed_len(format, rows, cols)?))
    }

    fn packed_len(format: Format, rows: usize, cols: usize) -> Result<usize, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::PartialBlock { cols });
        }
        Ok(panels::packed_len(format, rows, cols))
    }

    /// The matrix of `rows` rows of GGUF blocks in `data` (as the file stores them),
    /// packed into panels on `pool`, in memory of its own.
    pub fn new(
        format: Format,
        rows: usize,
        cols: usize,
        data: &[u8],
        pool: &Pool,
    ) -> Result<Self, QuantError> {
        let region = PackedRegion::new(Self::room(format, rows, cols)?)?;
        let source = MatrixSource {
            format,
            rows,
            cols,
            data,
        };
        let mut packed = Self::pack_all(&region, &[source], pool, &|_| {})?;
        Ok(packed.pop().expect("one matrix per source"))
    }

    /// Every matrix of `sources`, packed into the next bytes of `region` as one run of
    /// tasks on `pool`; `packed(i)` runs once matrix `i` is done, when its source is no
    /// longer read. Nothing is packed when a source is refused.
    pub fn pack_all(
        region: &PackedRegion,
        sources: &[MatrixSource],
        pool: &Pool,
        packed: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<Self>, QuantError> {
        let mut claims = Vec::with_capacity(sources.len());
        for source in sources {
            claims.push(region.claim(source.checked_packed_len()?)?);
        }
        let jobs = sources
            .iter()
            .zip(claims.iter_mut())
            .map(|(source, claim)| PackJob {
                source: *source,
                out: claim.bytes_mut(),
            })
            .collect();
        panels::pack(jobs, pool, packed);
        Ok(sources
            .iter()
            .zip(claims)
            .map(|(source, claim)| Self {
                format: source.format,
                rows: source.rows,
                cols: source.cols,
                layout: Layout::Panels(claim.into_packed()),
            })
            .collect())
    }

    /// The Q8_0 matrix of `rows` GGUF rows in `data`, read where it lies (no copy): its
    /// products take one weight row at a time ([`KernelChoice`]'s row products).
    pub fn in_place(
        format: Format,
        rows: usize,
        cols: usize,
        data: Arc<dyn RowBytes>,
    ) -> Result<Self, QuantError> {
        if format != Format::Q8_0 {
            return Err(QuantError::NotInPlace { format });
        }
        let source = MatrixSource {
            format,
            rows,
            cols,
            data: (*data).as_ref(),
        };
        source.checked_packed_len()?;
        Ok(Self {
            format,
            rows,
            cols,
            layout: Layout::Rows(data),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// GGUF row `row` of a matrix read in place, whose bytes are `data`.
    fn gguf_row<'a>(&self, data: &'a [u8], row: usize) -> &'a [u8] {
        let row_bytes = self.cols / BLOCK * self.format.block_bytes();
        &data[row * row_bytes..(row + 1) * row_bytes]
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
        match &self.layout {
            Layout::Panels(packed) => {
                let gguf = panels::unpack_row(self.format, packed, self.cols / BLOCK, row);
                crate::scalar::dequantize(self.format, &gguf, out);
            }
            Layout::Rows(data) => {
                crate::scalar::dequantize(self.format, self.gguf_row((**data).as_ref(), row), out)
            }
        }
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
        // Bands of panels, or of rows for a matrix read in place.
        let units = match self.layout {
            Layout::Panels(_) => self.panels(),
            Layout::Rows(_) => self.rows,
        };
        let band_into = |units: std::ops::Range<usize>, out: *mut f32| match &self.layout {
            Layout::Panels(packed) => self.panels_into(kernel, packed, x, units, out),
            Layout::Rows(data) => self.rows_into(kernel, data, x, units, out),
        };
        let work = x.rows * self.rows * (self.cols / BLOCK);
        if work < BLOCKS_PER_BAND || pool.threads() == 1 {
            band_into(0..units, out.as_mut_ptr());
            return;
        }
        // A few bands per thread, so that a thread that starts late still finds work.
        let bands = (work / BLOCKS_PER_BAND)
            .clamp(1, pool.threads() * 4)
            .min(units);
        let per_band = units.div_ceil(bands);
        let out = OutPtr(out.as_mut_ptr());
        pool.run(bands, &|band| {
            let start = (band * per_band).min(units);
            let end = ((band + 1) * per_band).min(units);
            let out = &out;
            band_into(start..end, out.0);
        });
    }

    /// Weight rows `rows` of a matrix read in place against every activation row, into
    /// `out[m * self.rows + n]`.
    fn rows_into(
        &self,
        kernel: KernelChoice,
        data: &Arc<dyn RowBytes>,
        x: &QuantizedActivations,
        rows: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        assert!(rows.end <= self.rows);
        let data = (**data).as_ref();
        for n in rows {
            let weights = self.gguf_row(data, n);
            for m in 0..x.rows {
                let value = kernel.row_dot(self.format, weights, x, m);
                // SAFETY: `n < self.rows` and `m < x.rows`, and `matmul` checked that
                // `out` holds `x.rows * self.rows` values; bands are disjoint ranges of
                // rows, so no two tasks write one value.
                unsafe { out.add(m * self.rows + n).write(value) };
            }
        }
    }

    /// Panels `panels` against every activation row, into `out[m * self.rows + n]`.
    fn panels_into(
        &self,
        kernel: KernelChoice,
        packed: &PackedBytes,
        x: &QuantizedActivations,
        panels: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        assert!(panels.end <= self.panels());
        let tiled = x.rows / ROWS_PER_TILE * ROWS_PER_TILE;
        for p in panels {
            let panel = &packed[p * self.panel_bytes()..(p + 1) * self.panel_bytes()];
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn packing_many_at_once_packs_each_as_alone_and_tells_each_once() {
        let shapes = [
            (Format::Q8_0, 70, 64),
            (Format::Q4_1, 600, 96),
            (Format::Q4_0, 3, 32),
            (Format::Q8_0, 0, 32),
        ];
        let data: Vec<Vec<u8>> = shapes
            .iter()
            .map(|&(format, rows, cols)| {
                (0..rows * cols / BLOCK * format.block_bytes())
                    // Small bytes, so that every f16 scale is finite.
                    .map(|i| (i * 7 % 61) as u8)
                    .collect()
            })
            .collect();
        let sources: Vec<MatrixSource> = shapes
            .iter()
            .zip(&data)
            .map(|(&(format, rows, cols), data)| MatrixSource {
                format,
                rows,
                cols,
                data,
            })
            .collect();
        let room = shapes
            .iter()
            .map(|&(format, rows, cols)| QuantMatrix::room(format, rows, cols).unwrap())
            .sum();
        let region = PackedRegion::new(room).unwrap();
        let told: Vec<AtomicUsize> = shapes.iter().map(|_| AtomicUsize::new(0)).collect();
        let pool = Pool::new(2);
        let packed = QuantMatrix::pack_all(&region, &sources, &pool, &|i| {
            told[i].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert!(told.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        for (matrix, source) in packed.iter().zip(&sources) {
            let alone =
                QuantMatrix::new(source.format, source.rows, source.cols, source.data, &pool)
                    .unwrap();
            let (Layout::Panels(packed), Layout::Panels(alone)) = (&matrix.layout, &alone.layout)
            else {
                panic!("packed matrices in panels");
            };
            assert_eq!(&packed[..], &alone[..]);
        }
        // The region is full now, and a refused source packs nothing.
        let told = AtomicUsize::new(0);
        let refused = QuantMatrix::pack_all(&region, &sources[..1], &pool, &|_| {
            told.fetch_add(1, Ordering::Relaxed);
        });
        assert!(matches!(refused, Err(QuantError::RegionFull { .. })));
        assert_eq!(told.load(Ordering::Relaxed), 0);
    }
}
