//! Linear layers over quantized weights: nanofleet's own kernels (`nanofleet-quant`) on
//! the CPU for the formats they cover (Q4_0, Q4_1, Q8_0), packed straight from the mapped
//! GGUF file (a Q8_0 token embedding table is read in place there); candle's `QMatMul`
//! otherwise (other formats, GPUs). Prefill runs as one product over all the prompt's
//! rows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor};
use nanofleet_quant::{
    Format, KernelChoice, MatrixSource, PackedRegion, Pool, QuantMatrix, QuantizedActivations,
};

/// A linear layer `y = x W^T` over quantized `W`.
#[derive(Debug, Clone)]
pub(crate) enum QuantLinear {
    Own(Arc<CpuQuantMatMul>),
    Candle(QMatMul),
}

impl QuantLinear {
    /// Weight `name` of the GGUF file: packed for our kernels (from `mapped`) where they
    /// apply, read through candle otherwise.
    pub(crate) fn load<R: Read + Seek>(
        content: &gguf_file::Content,
        reader: &mut R,
        mapped: Option<&MappedWeights>,
        name: &str,
        device: &Device,
    ) -> Result<Self> {
        if let (Device::Cpu, Some(matrix)) = (device, mapped.and_then(|m| m.matrix(name))) {
            return Ok(Self::Own(Arc::new(CpuQuantMatMul::from_matrix(matrix))));
        }
        let weight = content.tensor(reader, name, device)?;
        match (device, CpuQuantMatMul::new(&weight)?) {
            (Device::Cpu, Some(op)) => Ok(Self::Own(Arc::new(op))),
            _ => Ok(Self::Candle(QMatMul::from_qtensor(weight)?)),
        }
    }

    /// Rows `tokens` (any shape of u32 ids) of the weights, as f32 with a trailing
    /// dimension of the weights' columns: an embedding lookup that keeps the table
    /// quantized. `None` for candle's layers, which give no row access.
    pub(crate) fn lookup(&self, tokens: &Tensor) -> Result<Option<Tensor>> {
        let Self::Own(op) = self else {
            return Ok(None);
        };
        let matrix = &op.matrix;
        let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
        let cols = matrix.cols();
        let mut values = vec![0f32; ids.len() * cols];
        for (id, out) in ids.iter().zip(values.chunks_exact_mut(cols)) {
            let row = *id as usize;
            if row >= matrix.rows() {
                candle_core::bail!(
                    "token id {row} is outside the vocabulary ({})",
                    matrix.rows()
                );
            }
            matrix.dequantize_row(row, out);
        }
        let mut shape = tokens.dims().to_vec();
        shape.push(cols);
        Tensor::from_vec(values, shape, tokens.device()).map(Some)
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Own(op) => xs.contiguous()?.apply_op1_no_bwd(op.as_ref()),
            Self::Candle(matmul) => matmul.forward(xs),
        }
    }
}

/// `y = x W^T` as a candle op on the CPU through nanofleet-quant's kernels; the LoRA
/// trainer runs its frozen layers forward with it too, so what is trained is what is
/// served.
#[derive(Debug)]
pub struct CpuQuantMatMul {
    matrix: QuantMatrix,
    kernel: KernelChoice,
}

/// The format and (rows, cols) of a weight the kernels read: 2-D, Q4_0, Q4_1 or Q8_0.
fn kernel_shape(dtype: GgmlDType, shape: &Shape) -> Option<(Format, usize, usize)> {
    let format = match dtype {
        GgmlDType::Q4_0 => Format::Q4_0,
        GgmlDType::Q4_1 => Format::Q4_1,
        GgmlDType::Q8_0 => Format::Q8_0,
        _ => return None,
    };
    let &[rows, cols] = shape.dims() else {
        return None;
    };
    Some((format, rows, cols))
}

impl CpuQuantMatMul {
    /// The op for a 2-D weight in a format the kernels read (Q4_0, Q4_1, Q8_0); `None`
    /// for other formats and shapes.
    pub fn new(weight: &QTensor) -> Result<Option<Self>> {
        let Some((format, rows, cols)) = kernel_shape(weight.dtype(), weight.shape()) else {
            return Ok(None);
        };
        Self::from_blocks(format, rows, cols, &weight.data()?).map(Some)
    }

    fn from_blocks(format: Format, rows: usize, cols: usize, blocks: &[u8]) -> Result<Self> {
        let matrix = QuantMatrix::new(format, rows, cols, blocks, Pool::global())
            .map_err(candle_core::Error::wrap)?;
        Ok(Self::from_matrix(matrix))
    }

    fn from_matrix(matrix: QuantMatrix) -> Self {
        Self {
            matrix,
            kernel: KernelChoice::detect(),
        }
    }

    /// (rows, cols): (out, in) of the layer.
    pub fn dims(&self) -> (usize, usize) {
        (self.matrix.rows(), self.matrix.cols())
    }

    /// The weight as an f32 tensor (rows, cols), as candle's `QTensor::dequantize` gives it.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = self.dims();
        let mut values = vec![0f32; rows * cols];
        for (row, out) in values.chunks_exact_mut(cols).enumerate() {
            self.matrix.dequantize_row(row, out);
        }
        Tensor::from_vec(values, (rows, cols), device)
    }
}

/// A GGUF file mapped read-only into memory, so that weights are packed from the page
/// cache without first being copied into a buffer of their own.
#[derive(Debug, Clone)]
pub(crate) struct MappedFile(Arc<memmap2::Mmap>);

impl MappedFile {
    /// `None` where the file cannot be mapped (the weights are then read instead).
    pub(crate) fn new(file: &std::fs::File) -> Option<Self> {
        // SAFETY: the map is read-only and private, and kept while a token embedding
        // table is read from it. Changing the file in place under it would change those
        // bytes (cutting it short would fault), as under llama.cpp's mapped weights; the
        // agent never does: it writes each model to a new file and renames it into place.
        unsafe { memmap2::Mmap::map(file) }
            .ok()
            .map(|map| Self(Arc::new(map)))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn bytes(&self, start: usize, len: usize) -> Option<&[u8]> {
        self.0.get(start..start.checked_add(len)?)
    }

    /// Drops the pages of `start..start + len` from this process's memory once packed,
    /// so that the file and its packed copy are not resident together; the page cache
    /// keeps them for the next reader.
    fn release(&self, start: usize, len: usize) {
        // SAFETY: the mapping is read-only and file-backed: pages given back are read from
        // the file again if touched, with the same bytes, so no live reference sees a
        // change. Failure only leaves the pages resident.
        let _ = unsafe {
            self.0
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
        };
    }
}

/// A tensor's bytes in a mapped file, which it keeps mapped.
#[derive(Debug)]
struct TensorBytes {
    file: MappedFile,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        &self.file.0[self.start..self.start + self.len]
    }
}

/// The weights of a mapped GGUF file that the kernels read: packed into one region (so
/// that they can sit on huge pages) as one run of tasks (so that the threads stay busy
/// from the first to the last), except a Q8_0 token embedding table, which is read where
/// it lies (its only product is one row's logits, which gains little from panels).
pub(crate) struct MappedWeights {
    matrices: HashMap<String, QuantMatrix>,
}

impl MappedWeights {
    /// Packs every weight of `content` that the kernels read from `file`, letting go of
    /// the header's pages and of each weight's once it is packed, so that the file and
    /// its packed copy are not resident together.
    pub(crate) fn pack(file: &MappedFile, content: &gguf_file::Content) -> Result<Self> {
        // The header was parsed into `content`; the map is kept (for a table read in
        // place), its pages need not be.
        if let Ok(header) = usize::try_from(content.tensor_data_offset) {
            file.release(0, header);
        }
        // (start in the file, length, name, blocks) of each to pack.
        let mut tensors = Vec::new();
        let mut matrices = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let Some((format, rows, cols)) = kernel_shape(info.ggml_dtype, &info.shape) else {
                continue;
            };
            let start = usize::try_from(content.tensor_data_offset + info.offset)
                .map_err(candle_core::Error::wrap)?;
            let len = rows * cols / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let Some(data) = file.bytes(start, len) else {
                candle_core::bail!("tensor {name} lies past the end of the file");
            };
            if name == "token_embd.weight" && format == Format::Q8_0 {
                let bytes = Arc::new(TensorBytes {
                    file: file.clone(),
                    start,
                    len,
                });
                let matrix = QuantMatrix::in_place(format, rows, cols, bytes)
                    .map_err(candle_core::Error::wrap)?;
                matrices.insert(name.clone(), matrix);
                continue;
            }
            let source = MatrixSource {
                format,
                rows,
                cols,
                data,
            };
            tensors.push((start, len, name, source));
        }
        // In the file's order, so that its pages are read front to back.
        tensors.sort_unstable_by_key(|&(start, ..)| start);
        let sources: Vec<MatrixSource> = tensors.iter().map(|&(.., source)| source).collect();
        let capacity = sources
            .iter()
            .map(|s| QuantMatrix::room(s.format, s.rows, s.cols))
            .sum::<std::result::Result<usize, _>>()
            .map_err(candle_core::Error::wrap)?;
        let region = PackedRegion::new(capacity).map_err(candle_core::Error::wrap)?;
        let release = |i: usize| {
            let (start, len, ..) = tensors[i];
            file.release(start, len);
        };
        let packed = QuantMatrix::pack_all(&region, &sources, Pool::global(), &release)
            .map_err(candle_core::Error::wrap)?;
        matrices.extend(
            tensors
                .iter()
                .map(|&(_, _, name, _)| name.clone())
                .zip(packed),
        );
        Ok(Self { matrices })
    }

    /// The packed weight `name`; `None` where the kernels do not read it.
    fn matrix(&self, name: &str) -> Option<QuantMatrix> {
        self.matrices.get(name).cloned()
    }
}

thread_local! {
    /// The quantized activations' buffers, reused by every layer a thread runs: one per
    /// layer would keep a prompt's worth of activations per layer alive.
    static ACTIVATIONS: RefCell<QuantizedActivations> = RefCell::default();
}

impl CustomOp1 for CpuQuantMatMul {
    fn name(&self) -> &'static str {
        "nanofleet-quant-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("quantized linear layers take f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized linear layers take contiguous activations");
        };
        let x = &values[start..end];
        let dims = layout.shape().dims();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.matrix.cols() {
            candle_core::bail!(
                "activations have {cols} features, the weights {}",
                self.matrix.cols()
            );
        }
        let rows = x.len() / cols.max(1);
        let mut out = vec![0f32; rows * self.matrix.rows()];
        ACTIVATIONS.with_borrow_mut(|activations| {
            activations.quantize_into(self.kernel, x, rows, cols);
            self.matrix
                .matmul(self.kernel, activations, &mut out, Pool::global());
        });
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("activations have a last dimension") = self.matrix.rows();
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_form_dequantizes_as_candle_does_and_refuses_other_formats() {
        let device = Device::Cpu;
        let values: Vec<f32> = (0..64 * 96)
            .map(|i| ((i * 37 % 211) as f32 - 105.0) / 50.0)
            .collect();
        let dense = Tensor::from_vec(values, (64, 96), &device).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let weight = QTensor::quantize(&dense, dtype).unwrap();
            let op = CpuQuantMatMul::new(&weight)
                .unwrap()
                .expect("a format the kernels read");
            assert_eq!(op.dims(), (64, 96));
            let ours = op.dequantize(&device).unwrap().to_vec2::<f32>().unwrap();
            let candle = weight
                .dequantize(&device)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(ours, candle, "{dtype:?}");
        }
        let k_quant = QTensor::quantize(&dense.repeat((1, 8)).unwrap(), GgmlDType::Q4K).unwrap();
        assert!(CpuQuantMatMul::new(&k_quant).unwrap().is_none());
    }
}
