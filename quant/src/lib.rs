//! Quantized CPU kernels for the GGUF formats nanofleet ships (Q4_0, Q4_1, Q8_0), written
//! from the formats: weights keep their GGUF blocks' bytes, activations are quantized on the
//! fly to 8 bits per 32-element block, and each block's integer dot product runs in SIMD
//! where the CPU has it (AVX2 with FMA and F16C on x86-64, with AVX-512 VNNI's byte dot
//! products where present; NEON on aarch64), chosen once at run time, with a scalar path
//! that every SIMD path is tested against. The weights are packed at load into panels of
//! eight rows (`panels`), so that each SIMD step works on eight rows at once, a whole
//! model's into one region of memory (`region`). Pure computation: no I/O.
//!
//! Block layouts (32 weights each, little-endian):
//! - Q4_0: `d: f16`, 16 bytes of nibbles; weight `j` is the low nibble of byte `j` for
//!   `j < 16` and the high nibble of byte `j - 16` otherwise; value `(q - 8) * d`.
//! - Q4_1: `d: f16`, `m: f16`, the same nibbles; value `q * d + m`.
//! - Q8_0: `d: f16`, 32 signed bytes; value `q * d`.

mod activations;
#[cfg(target_arch = "aarch64")]
mod arm;
mod kernels;
mod matrix;
mod panels;
mod pool;
mod region;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use activations::ActivationRow;
pub use activations::QuantizedActivations;
pub use kernels::{Kernel, KernelChoice};
pub use matrix::{MatrixSource, QuantError, QuantMatrix, RowBytes};
pub use pool::Pool;
pub use region::PackedRegion;

/// Elements per block, in every format here.
pub const BLOCK: usize = 32;

/// A GGUF weight format these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Format {
    /// Bytes of one 32-element block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }

    pub const ALL: [Format; 3] = [Format::Q4_0, Format::Q4_1, Format::Q8_0];
}
