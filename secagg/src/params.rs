//! Round parameters: what every client and the server must agree on, validated once.

use std::sync::Arc;

use crate::{ClientId, Graph, SecAggError};

/// The public configuration of one aggregation round.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Round number; bound into every key derivation and message so that nothing from
    /// one round is accepted in another.
    pub round: u64,
    /// Number of clients sampled for the round (ids `0..num_clients`).
    pub num_clients: u32,
    /// Neighbourhood size `k`, the client itself included: each client shares its
    /// secrets with, and masks against, `k - 1` others. `k == num_clients` is full
    /// SecAgg; otherwise `k` must be odd so that the neighbour ring is symmetric.
    pub group_size: u32,
    /// Shamir reconstruction threshold `t`: `t` shares reveal a secret, `t - 1` nothing.
    pub threshold: u32,
    /// Public seed of the neighbour graph, e.g. drawn by the coordinator per round.
    pub graph_seed: [u8; 32],
    /// Length of every client's input vector.
    pub vector_len: usize,
    /// Inputs are clipped to `[-clipping_range, clipping_range]` before quantization.
    pub clipping_range: f64,
    /// Clipped inputs map onto the integers `0..=quantization_range`.
    pub quantization_range: u64,
    /// The ring is `Z_{2^modulus_bits}`, `1 <= modulus_bits <= 32`: elements are 32-bit
    /// words, as with Flower's default modulus 2^32.
    pub modulus_bits: u32,
}

impl Config {
    /// Full SecAgg over `num_clients` with threshold `2k/3 + 1` and Flower's default
    /// ranges (clipping 8.0, quantization 2^22, modulus 2^32), round 0, zero graph seed.
    pub fn new(num_clients: u32, vector_len: usize) -> Self {
        Config {
            round: 0,
            num_clients,
            group_size: num_clients,
            threshold: 2 * num_clients / 3 + 1,
            graph_seed: [0; 32],
            vector_len,
            clipping_range: 8.0,
            quantization_range: 1 << 22,
            modulus_bits: 32,
        }
    }
}

/// A validated [`Config`] with its neighbour graph; cheap to clone.
#[derive(Clone, Debug)]
pub struct Params {
    config: Config,
    graph: Arc<Graph>,
}

impl Params {
    /// Checks the configuration and builds the neighbour graph.
    pub fn new(config: Config) -> Result<Self, SecAggError> {
        validate(&config).map_err(SecAggError::InvalidParams)?;
        let graph = Graph::new(config.num_clients, config.group_size, &config.graph_seed);
        Ok(Params {
            config,
            graph: Arc::new(graph),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub(crate) fn round(&self) -> u64 {
        self.config.round
    }

    pub(crate) fn threshold(&self) -> usize {
        self.config.threshold as usize
    }

    pub(crate) fn check_round(&self, got: u64) -> Result<(), SecAggError> {
        if got == self.config.round {
            Ok(())
        } else {
            Err(SecAggError::WrongRound {
                expected: self.config.round,
                got,
            })
        }
    }

    pub(crate) fn check_client(&self, id: ClientId) -> Result<(), SecAggError> {
        if id < self.config.num_clients {
            Ok(())
        } else {
            Err(SecAggError::UnknownClient(id))
        }
    }

    pub(crate) fn ring_mask(&self) -> u32 {
        u32::MAX >> (32 - self.config.modulus_bits)
    }
}

fn validate(c: &Config) -> Result<(), String> {
    if c.num_clients < 2 {
        return Err(format!(
            "num_clients is {}; at least 2 are needed",
            c.num_clients
        ));
    }
    if c.group_size < 2 || c.group_size > c.num_clients {
        return Err(format!(
            "group_size is {}; it must lie in 2..={} (num_clients)",
            c.group_size, c.num_clients
        ));
    }
    if c.group_size < c.num_clients && c.group_size.is_multiple_of(2) {
        return Err(format!(
            "group_size is {} (even) and below num_clients; use an odd size such as {} so that the neighbour ring is symmetric",
            c.group_size,
            c.group_size + 1
        ));
    }
    if c.threshold < 2 || c.threshold > c.group_size {
        return Err(format!(
            "threshold is {}; it must lie in 2..={} (group_size)",
            c.threshold, c.group_size
        ));
    }
    if c.vector_len == 0 {
        return Err("vector_len is 0; there is nothing to aggregate".into());
    }
    if !(c.clipping_range.is_finite() && c.clipping_range > 0.0) {
        return Err(format!(
            "clipping_range is {}; it must be a positive finite number",
            c.clipping_range
        ));
    }
    if c.modulus_bits == 0 || c.modulus_bits > 32 {
        return Err(format!(
            "modulus_bits is {}; it must lie in 1..=32",
            c.modulus_bits
        ));
    }
    if c.quantization_range == 0 {
        return Err("quantization_range is 0; at least 1 is needed".into());
    }
    // The sum of all clients' quantized values must stay below the modulus, or it wraps.
    let largest_sum = u128::from(c.num_clients) * u128::from(c.quantization_range);
    if largest_sum >= 1u128 << c.modulus_bits {
        return Err(format!(
            "num_clients * quantization_range = {largest_sum} does not fit below 2^{}; lower quantization_range or raise modulus_bits",
            c.modulus_bits
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flower_defaults_are_valid() {
        let params = Params::new(Config::new(100, 10)).unwrap();
        assert_eq!(params.config().threshold, 67);
        assert_eq!(params.ring_mask(), u32::MAX);
    }

    #[test]
    fn refuses_even_partial_group_and_wrapping_sums() {
        let mut config = Config::new(100, 10);
        config.group_size = 20;
        config.threshold = 14;
        let err = Params::new(config.clone()).unwrap_err().to_string();
        assert!(err.contains("odd"), "{err}");

        config.group_size = 21;
        config.modulus_bits = 28;
        let err = Params::new(config).unwrap_err().to_string();
        assert!(err.contains("modulus_bits"), "{err}");
    }

    #[test]
    fn refuses_threshold_above_group() {
        let mut config = Config::new(5, 10);
        config.threshold = 6;
        assert!(matches!(
            Params::new(config),
            Err(SecAggError::InvalidParams(_))
        ));
    }

    #[test]
    fn rings_wider_than_32_bits_are_refused() {
        let mut config = Config::new(5, 10);
        config.modulus_bits = 33;
        let err = Params::new(config.clone()).unwrap_err().to_string();
        assert!(err.contains("1..=32"), "{err}");
        config.modulus_bits = 20;
        config.quantization_range = 1 << 16;
        assert_eq!(Params::new(config).unwrap().ring_mask(), (1 << 20) - 1);
    }
}
