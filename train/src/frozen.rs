//! The base model's frozen linear layers: candle's quantized matmul wrapped in a custom op
//! whose backward sends the gradient to the layer's input, so LoRA parameters upstream learn.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Tensor,
};
use nanofleet_inference::CpuQuantMatMul;

/// `y = x Wᵀ` with `W` (out, in) quantized. candle runs `QMatMul` through `apply_op1_no_bwd`,
/// which cuts the graph: nothing before a quantized layer would get a gradient. This op runs
/// the serving engine's kernels forward (nanofleet's own on the CPU for the formats they
/// read, candle's otherwise) and supplies the missing backward.
struct QuantizedMatMul(Arc<FrozenWeight>);

/// A frozen weight, held once: in the CPU kernels' form where they read its format, as
/// candle's `QTensor` otherwise.
#[derive(Debug)]
pub(crate) enum FrozenWeight {
    Cpu(CpuQuantMatMul),
    Candle(Arc<QTensor>),
}

impl FrozenWeight {
    fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Cpu(op) => Ok(op.dims()),
            Self::Candle(weight) => weight.shape().dims2(),
        }
    }

    fn dequantize(&self, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Self::Cpu(op) => op.dequantize(device),
            Self::Candle(weight) => weight.dequantize(device),
        }
    }

    /// candle's weight, for the GPU forward passes (the CPU form is only made on the CPU).
    fn candle(&self) -> Result<&QTensor> {
        match self {
            Self::Candle(weight) => Ok(weight),
            Self::Cpu(_) => candle_core::bail!("a CPU-kernel weight on a GPU device"),
        }
    }
}

impl CustomOp1 for QuantizedMatMul {
    fn name(&self) -> &'static str {
        "frozen-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match &*self.0 {
            FrozenWeight::Cpu(op) => op.cpu_fwd(storage, layout),
            FrozenWeight::Candle(weight) => weight.cpu_fwd(storage, layout),
        }
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.0.candle()?.cuda_fwd(storage, layout)
    }

    fn metal_fwd(&self, storage: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        self.0.candle()?.metal_fwd(storage, layout)
    }

    /// The weight is frozen, so only the input has a gradient: `dX = dY · W`. `W` is
    /// dequantized here, per backward, rather than kept: training then holds only the
    /// quantized copy (a 4-bit base stays about 8× smaller than its f32 form), and
    /// dequantizing costs O(out·in), a small fraction of the O(tokens·out·in) matmul beside it.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let weight = self.0.dequantize(grad_res.device())?;
        let (out, inputs) = weight.dims2()?;
        let mut dims = grad_res.dims().to_vec();
        let rows = grad_res.elem_count() / out;
        let grad = grad_res.reshape((rows, out))?.matmul(&weight)?;
        if let Some(last) = dims.last_mut() {
            *last = inputs;
        }
        Ok(Some(grad.reshape(dims)?))
    }
}

/// One frozen weight matrix of the base model.
#[derive(Debug, Clone)]
pub(crate) enum FrozenLinear {
    /// The training path: quantized forward, custom backward.
    Quantized(Arc<FrozenWeight>),
    /// The dequantized weight as a plain tensor under ordinary autograd: the reference that
    /// the gradient checks compare the custom backward with.
    #[cfg(test)]
    Dense(Tensor),
}

impl FrozenLinear {
    pub(crate) fn new(weight: Arc<QTensor>) -> Result<Self> {
        // The CPU form copies the weight's blocks; the `QTensor` is dropped with this
        // function unless someone else holds it, so training keeps one copy.
        let cpu = match weight.device() {
            candle_core::Device::Cpu => CpuQuantMatMul::new(&weight)?,
            _ => None,
        };
        Ok(Self::Quantized(Arc::new(match cpu {
            Some(op) => FrozenWeight::Cpu(op),
            None => FrozenWeight::Candle(weight),
        })))
    }

    /// (out, in).
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Quantized(frozen) => frozen.dims(),
            #[cfg(test)]
            Self::Dense(weight) => weight.dims2(),
        }
    }

    /// `xs` (…, in) → (…, out).
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            // The quantized kernel reads its input as one contiguous block.
            Self::Quantized(weight) => xs
                .contiguous()?
                .apply_op1(QuantizedMatMul(Arc::clone(weight))),
            #[cfg(test)]
            Self::Dense(weight) => xs.broadcast_matmul(&weight.t()?),
        }
    }

    #[cfg(test)]
    pub(crate) fn dequantized(&self) -> Result<Self> {
        match self {
            Self::Quantized(frozen) => {
                let device = match &**frozen {
                    FrozenWeight::Cpu(_) => candle_core::Device::Cpu,
                    FrozenWeight::Candle(weight) => weight.device(),
                };
                Ok(Self::Dense(frozen.dequantize(&device)?))
            }
            Self::Dense(weight) => Ok(Self::Dense(weight.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// The op's input gradient equals plain autograd's through the dequantized weight. With an
    /// f32 "quantization" the forward is exact and so must be the gradient; with Q8_0 the
    /// kernel also rounds the *input* to 8 bits, so the forward (and the gradients of what
    /// follows it) differ by that rounding, well under 1%.
    #[test]
    fn input_gradient_matches_dense_autograd() {
        let device = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut uniform = |dims: &[usize], bound: f32| {
            let count = dims.iter().product();
            let values: Vec<f32> = (0..count).map(|_| rng.gen_range(-bound..bound)).collect();
            Tensor::from_vec(values, dims, &device).unwrap()
        };
        for (dtype, tolerance) in [(GgmlDType::F32, 1e-5), (GgmlDType::Q8_0, 1e-2)] {
            // Scaled so that outputs are O(1), where tanh is neither flat nor linear.
            let weight = uniform(&[48, 64], 0.2);
            let q = Arc::new(QTensor::quantize(&weight, dtype).unwrap());
            let quantized = FrozenLinear::new(Arc::clone(&q)).unwrap();
            let dense = quantized.dequantized().unwrap();
            let x = Var::from_tensor(&uniform(&[2, 3, 64], 1.0)).unwrap();
            let probe = uniform(&[2, 3, 48], 1.0);
            let grad_of = |layer: &FrozenLinear| {
                // A nonlinear loss so that dY depends on Y (a forward error shows up in dX).
                let y = layer.forward(x.as_tensor()).unwrap();
                let loss = (y.tanh().unwrap() * &probe).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                grads
                    .get(x.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (a, b) = (grad_of(&quantized), grad_of(&dense));
            let diff: f32 = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).powi(2))
                .sum::<f32>()
                .sqrt();
            let norm: f32 = b.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                diff / norm < tolerance,
                "{dtype:?}: relative error {}",
                diff / norm
            );
        }
    }
}
