//! Causal self-attention on the CPU over plain f32 rows, with a per-layer KV cache of f16
//! (as llama.cpp keeps it) reserved for the model's whole context at the first token: the
//! rotary embedding, scores, softmax and weighted sum run fused per head over blocks of
//! queries against tiles of keys, so prefill computes only the causal half of the scores,
//! never holds them for every head at once, and generation writes one row into the cache
//! instead of concatenating it anew.

use std::sync::Mutex;

use candle_core::Result;
use half::f16;
use nanofleet_quant::Pool;

/// Queries per task of a prefill: enough to pay for a task and reuse each key tile, few
/// enough to spread a prompt's causal triangle over the threads.
const QUERIES_PER_TASK: usize = 32;

/// Positions per tile: keys are kept transposed in tiles of eight positions, so that one
/// vector holds one dimension of eight keys and a score needs no horizontal sum.
const TILE: usize = 8;

/// Queries scored together against one key tile, so that each loaded key feeds several.
const QUERY_GROUP: usize = 4;

/// The attention's sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary embedding tables: row `p` holds the `head_dim / 2` cosines (and sines) of
/// position `p`.
#[derive(Debug)]
pub(crate) struct Rotary {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// Positions the tables cover.
    pub positions: usize,
}

/// Keys and values of the positions seen so far, as f16. The room for every position the
/// rotary tables cover is mapped at the first token (anonymous memory, so only the pages
/// written become resident) and never moves or grows after.
///
/// Layout in f16 words, for `capacity` positions: the keys of kv head `h` from
/// `h * span`, tile by tile, each tile `head_dim` columns of [`TILE`] positions; then the
/// values of kv head `h` from `(kv_heads + h) * span`, one row of `head_dim` per position
/// (`span = capacity * head_dim`).
#[derive(Debug, Default)]
pub(crate) struct KvCache {
    storage: Option<memmap2::MmapMut>,
    /// The sizes the storage was mapped for.
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
}

impl KvCache {
    fn words(&self) -> &[u16] {
        self.storage
            .as_ref()
            .map_or(&[], |map| bytemuck::cast_slice(map))
    }

    /// Appends the rows of `k` and `v` (`kv_heads * head_dim` each), rounded to f16; the
    /// first append maps room for `capacity` positions of `dims`.
    fn append(&mut self, dims: Dims, capacity: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let Dims {
            kv_heads,
            head_dim: d,
            ..
        } = dims;
        let map = match &mut self.storage {
            Some(map) => map,
            storage @ None => {
                let capacity = capacity.next_multiple_of(TILE);
                let bytes = 2 * kv_heads * capacity * d * size_of::<u16>();
                let map = memmap2::MmapMut::map_anon(bytes).map_err(candle_core::Error::wrap)?;
                self.kv_heads = kv_heads;
                self.head_dim = d;
                self.capacity = capacity;
                storage.insert(map)
            }
        };
        let span = self.capacity * d;
        let first = self.len;
        let words: &mut [u16] = bytemuck::cast_slice_mut(map);
        let narrow = |x: f32| f16::from_f32(x).to_bits();
        for (t, (k_row, v_row)) in k
            .chunks_exact(kv_heads * d)
            .zip(v.chunks_exact(kv_heads * d))
            .enumerate()
        {
            let p = first + t;
            for h in 0..kv_heads {
                let tile = h * span + p / TILE * d * TILE;
                for (i, &x) in k_row[h * d..(h + 1) * d].iter().enumerate() {
                    words[tile + i * TILE + p % TILE] = narrow(x);
                }
                let row = (kv_heads + h) * span + p * d;
                for (word, &x) in words[row..row + d]
                    .iter_mut()
                    .zip(&v_row[h * d..(h + 1) * d])
                {
                    *word = narrow(x);
                }
            }
        }
        self.len += k.len() / (kv_heads * d);
        Ok(())
    }
}

impl Clone for KvCache {
    /// A cache of its own with the same positions: a fresh map with only the written part
    /// copied, so that the copy too is resident only as far as it is written.
    fn clone(&self) -> Self {
        let Some(map) = &self.storage else {
            return Self::default();
        };
        // Failing to map leaves the copy empty; its first `attend` maps again or fails.
        let Ok(mut fresh) = memmap2::MmapMut::map_anon(map.len()) else {
            return Self::default();
        };
        let (d, span) = (self.head_dim, self.capacity * self.head_dim);
        let (from, to): (&[u16], &mut [u16]) = (
            bytemuck::cast_slice(map),
            bytemuck::cast_slice_mut(&mut fresh),
        );
        let written_keys = self.len.div_ceil(TILE) * TILE * d;
        for h in 0..self.kv_heads {
            for start in [h * span, (self.kv_heads + h) * span] {
                let range = start..start + written_keys.min(span);
                to[range.clone()].copy_from_slice(&from[range]);
            }
        }
        Self {
            storage: Some(fresh),
            ..*self
        }
    }
}

/// Rotates each head's interleaved pairs `(x[2i], x[2i + 1])` of the rows of `x`
/// (`heads * head_dim` wide) by the angles of positions `position..`, as llama.cpp's
/// "norm" rope does.
fn rotate(x: &mut [f32], heads: usize, head_dim: usize, rotary: &Rotary, position: usize) {
    let half = head_dim / 2;
    for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let at = (position + t) * half;
        let (cos, sin) = (&rotary.cos[at..at + half], &rotary.sin[at..at + half]);
        for head in row.chunks_exact_mut(head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// `2^112`: an f16's exponent and mantissa bits, moved into an f32's places, read as
/// that f32 times `2^-112` (subnormals included).
const F16_REBIAS: f32 = f32::from_bits((127 + 112) << 23);

/// f16 words to f32, in operations that vectorize.
#[inline(always)]
fn widen(words: &[u16], out: &mut [f32]) {
    for (o, &word) in out.iter_mut().zip(words) {
        let word = u32::from(word);
        let magnitude = if word & 0x7c00 == 0x7c00 {
            0x7f80_0000 | (word & 0x03ff) << 13
        } else {
            (f32::from_bits((word & 0x7fff) << 13) * F16_REBIAS).to_bits()
        };
        *o = f32::from_bits(magnitude | (word & 0x8000) << 16);
    }
}

/// `e^x` for `x <= 0` to about 2e-7 relative: `2^n e^r` with `|r| <= ln 2 / 2` and a
/// degree-6 polynomial for `e^r`, in operations that vectorize (libm's `expf` does not).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // Below this e^x is under f32's normal range: the weight is zero to softmax.
    let x = x.max(-87.0);
    // Round to nearest by the float adder: 1.5 * 2^23 leaves no fraction bits.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let poly = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r / 720.0)))));
    poly * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A block of consecutive queries of one head and what they attend over.
struct QueryBlock<'a> {
    /// The block's query rows of this head, `head_dim` each, already scaled by
    /// `1 / sqrt(head_dim)`.
    queries: &'a [f32],
    cache: &'a KvCache,
    head_dim: usize,
    /// The kv head the queries read.
    kv: usize,
    kv_heads: usize,
    /// The position of the block's first query; query `i` sees keys `0..=first + i`.
    first: usize,
}

/// Scratch of one block: its scores and one converted tile.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    tile: Vec<f32>,
}

/// The softmax-weighted sums of the values for the block's queries into `out` (one row of
/// `head_dim` per query). Compiled twice: for the baseline CPU and, where the CPU has
/// them, for AVX2 and FMA (the agent ships one binary for every x86-64 CPU, so the wider
/// vectors are chosen at run time).
fn attend_block(block: &QueryBlock, scratch: &mut Scratch, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features just checked.
        return unsafe { attend_block_avx2(block, scratch, out) };
    }
    attend_block_body::<Unfused>(block, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_block_avx2(block: &QueryBlock, scratch: &mut Scratch, out: &mut [f32]) {
    attend_block_body::<Fused>(block, scratch, out)
}

/// How `a * b + c` is computed: fused where the code is compiled for FMA; as a product and
/// a sum otherwise, where `mul_add` would call libm's software `fmaf`.
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Fused;

struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Scores of `N` queries (rows of `d`) against one key tile (`d` columns of [`TILE`]),
/// each summed in `P` partial sums (over every `P`-th column) so that `N * P` independent
/// chains of multiply-adds hide their latency.
#[inline(always)]
fn tile_scores<M: MulAdd, const N: usize, const P: usize>(
    queries: &[f32],
    tile: &[f32],
    d: usize,
) -> [[f32; TILE]; N] {
    let mut acc = [[[0f32; TILE]; N]; P];
    let queries: [&[f32]; N] = std::array::from_fn(|n| &queries[n * d..(n + 1) * d]);
    for (i, columns) in tile.chunks_exact(TILE * P).enumerate() {
        for p in 0..P {
            let column = &columns[p * TILE..(p + 1) * TILE];
            for n in 0..N {
                let q = queries[n][i * P + p];
                for l in 0..TILE {
                    acc[p][n][l] = M::mul_add(q, column[l], acc[p][n][l]);
                }
            }
        }
    }
    let mut scores = acc[0];
    for partial in &acc[1..] {
        for n in 0..N {
            for l in 0..TILE {
                scores[n][l] += partial[n][l];
            }
        }
    }
    scores
}

/// `out += sum over l of weights[l] * tile row l` for one query: `W` vectors of `out`
/// held in registers at a time, independent chains over the tile's rows.
#[inline(always)]
fn weigh_tile<M: MulAdd, const W: usize>(weights: &[f32], tile: &[f32], d: usize, out: &mut [f32]) {
    for (c, out) in out.chunks_exact_mut(TILE * W).enumerate() {
        let mut acc = [[0f32; TILE]; W];
        for (k, acc) in acc.iter_mut().enumerate() {
            acc.copy_from_slice(&out[k * TILE..(k + 1) * TILE]);
        }
        for (l, &w) in weights.iter().enumerate() {
            let v = &tile[l * d + c * TILE * W..][..TILE * W];
            for k in 0..W {
                for j in 0..TILE {
                    acc[k][j] = M::mul_add(w, v[k * TILE + j], acc[k][j]);
                }
            }
        }
        for (k, acc) in acc.iter().enumerate() {
            out[k * TILE..(k + 1) * TILE].copy_from_slice(acc);
        }
    }
}

#[inline(always)]
fn attend_block_body<M: MulAdd>(block: &QueryBlock, scratch: &mut Scratch, out: &mut [f32]) {
    // Plain loops, no closures: a closure is compiled apart, without the caller's target
    // features.
    let &QueryBlock {
        queries,
        cache,
        head_dim: d,
        kv,
        kv_heads,
        first,
    } = block;
    let count = queries.len() / d;
    // Keys the last query sees, and the tiles that hold them.
    let total = first + count;
    let tiles = total.div_ceil(TILE);
    let stride = tiles * TILE;
    let span = cache.capacity * d;
    let words = cache.words();
    let Scratch { scores, tile } = scratch;
    scores.clear();
    scores.resize(count * stride, 0.0);
    tile.clear();
    tile.resize(d * TILE, 0.0);

    // Scores, tile by tile; a tile past a group's last visible key is skipped (masked below).
    for t in 0..tiles {
        let at = kv * span + t * d * TILE;
        widen(&words[at..at + d * TILE], tile);
        let mut n = 0;
        while n < count {
            let group = QUERY_GROUP.min(count - n);
            if t * TILE < first + n + group {
                let rows = &queries[n * d..(n + group) * d];
                let at = t * TILE;
                if group == QUERY_GROUP {
                    let acc = tile_scores::<M, QUERY_GROUP, 2>(rows, tile, d);
                    for (g, acc) in acc.iter().enumerate() {
                        scores[(n + g) * stride + at..][..TILE].copy_from_slice(acc);
                    }
                } else {
                    for g in 0..group {
                        let [acc] = tile_scores::<M, 1, 8>(&rows[g * d..], tile, d);
                        scores[(n + g) * stride + at..][..TILE].copy_from_slice(&acc);
                    }
                }
            }
            n += group;
        }
    }

    // Softmax per query over the keys it sees; the rest of its row is weight 0.
    let mut sums = [0f32; QUERIES_PER_TASK];
    for (n, row) in scores.chunks_exact_mut(stride).enumerate() {
        let seen = first + n + 1;
        let (visible, hidden) = row.split_at_mut(seen);
        let mut maxima = [f32::NEG_INFINITY; TILE];
        let chunks = visible.chunks_exact(TILE);
        let mut max = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for chunk in chunks {
            for l in 0..TILE {
                maxima[l] = maxima[l].max(chunk[l]);
            }
        }
        for m in maxima {
            max = max.max(m);
        }
        // Apart from the sum, so that the exponentials vectorize.
        for s in visible.iter_mut() {
            *s = exp_nonpositive(*s - max);
        }
        let mut lanes = [0f32; TILE];
        let chunks = visible.chunks_exact(TILE);
        let mut sum = chunks.remainder().iter().sum::<f32>();
        for chunk in chunks {
            for l in 0..TILE {
                lanes[l] += chunk[l];
            }
        }
        sum += lanes.iter().sum::<f32>();
        sums[n] = sum;
        hidden.fill(0.0);
    }

    // Weighted sums of the values, tile by tile: each query's row held in registers,
    // eight columns at a time.
    out.fill(0.0);
    for t in 0..tiles {
        let valid = TILE.min(total - t * TILE);
        let at = (kv_heads + kv) * span + t * TILE * d;
        widen(&words[at..at + valid * d], &mut tile[..valid * d]);
        tile[valid * d..].fill(0.0);
        for (n, o) in out.chunks_exact_mut(d).enumerate() {
            if t * TILE > first + n {
                continue;
            }
            let weights = &scores[n * stride + t * TILE..][..TILE];
            match d % (8 * TILE) {
                0 => weigh_tile::<M, 8>(weights, tile, d, o),
                _ => weigh_tile::<M, 1>(weights, tile, d, o),
            }
        }
    }
    for (o, sum) in out.chunks_exact_mut(d).zip(sums) {
        let inverse = 1.0 / sum;
        for x in o.iter_mut() {
            *x *= inverse;
        }
    }
}

/// Attention of the rows `q` (`heads * head_dim` each) at positions `position..` over
/// the cache and the new keys `k` and values `v` (`kv_heads * head_dim` each), which
/// join the cache; `q` and `k` are rotated in place. Returns one row of
/// `heads * head_dim` per query. A `position` of 0 starts the cache afresh.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    dims: Dims,
    cache: &mut KvCache,
    q: &mut [f32],
    k: &mut [f32],
    v: &[f32],
    rotary: &Rotary,
    position: usize,
    pool: &Pool,
) -> Result<Vec<f32>> {
    let Dims {
        heads,
        kv_heads,
        head_dim,
    } = dims;
    let (q_row, kv_row) = (heads * head_dim, kv_heads * head_dim);
    let seq = q.len() / q_row;
    if position == 0 {
        cache.len = 0;
    }
    let cached = cache.len;
    if cached != position || k.len() != seq * kv_row || v.len() != seq * kv_row {
        candle_core::bail!(
            "attention at position {position} over {cached} cached positions with {seq} new"
        );
    }
    if position + seq > rotary.positions {
        candle_core::bail!(
            "position {} is past the model's {} positions",
            position + seq,
            rotary.positions
        );
    }
    if head_dim % TILE != 0 {
        candle_core::bail!(
            "the CPU's attention takes heads of a multiple of {TILE} dimensions, not {head_dim}"
        );
    }
    rotate(q, heads, head_dim, rotary, position);
    rotate(k, kv_heads, head_dim, rotary, position);
    cache.append(dims, rotary.positions, k, v)?;

    let scale = 1.0 / (head_dim as f32).sqrt();
    let group = heads / kv_heads;
    let chunks = seq.div_ceil(QUERIES_PER_TASK);
    let cache = &*cache;
    let q = &*q;
    // Task `head * chunks + c`: its head's outputs for queries of chunk `c`.
    let results: Vec<Mutex<Vec<f32>>> = (0..heads * chunks).map(|_| Mutex::default()).collect();
    pool.run(heads * chunks, &|task| {
        let (head, chunk) = (task / chunks, task % chunks);
        let start = chunk * QUERIES_PER_TASK;
        let end = (start + QUERIES_PER_TASK).min(seq);
        let mut queries = Vec::with_capacity((end - start) * head_dim);
        for t in start..end {
            let at = t * q_row + head * head_dim;
            queries.extend(q[at..at + head_dim].iter().map(|x| x * scale));
        }
        let block = QueryBlock {
            queries: &queries,
            cache,
            head_dim,
            kv: head / group,
            kv_heads,
            first: position + start,
        };
        let mut out = vec![0f32; queries.len()];
        attend_block(&block, &mut Scratch::default(), &mut out);
        *results[task].lock().unwrap_or_else(|e| e.into_inner()) = out;
    });
    let mut y = vec![0f32; seq * q_row];
    for (task, result) in results.into_iter().enumerate() {
        let (head, chunk) = (task / chunks, task % chunks);
        let result = result.into_inner().unwrap_or_else(|e| e.into_inner());
        for (i, values) in result.chunks_exact(head_dim).enumerate() {
            let at = (chunk * QUERIES_PER_TASK + i) * q_row + head * head_dim;
            y[at..at + head_dim].copy_from_slice(values);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention of the definition, in f64, one query at a time: rotate, score every
    /// position up to the query's own, softmax, weigh the values.
    fn reference(dims: Dims, q: &[f32], k: &[f32], v: &[f32], rotary: &Rotary) -> Vec<f32> {
        let Dims {
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let (mut q, mut k) = (q.to_vec(), k.to_vec());
        rotate(&mut q, heads, d, rotary, 0);
        rotate(&mut k, kv_heads, d, rotary, 0);
        // The cache holds keys and values as f16.
        let to_f16 = |x: &f32| f16::from_f32(*x).to_f32();
        let k: Vec<f32> = k.iter().map(to_f16).collect();
        let v: Vec<f32> = v.iter().map(to_f16).collect();
        let seq = q.len() / (heads * d);
        let mut out = vec![0f32; q.len()];
        for t in 0..seq {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let query = &q[(t * heads + h) * d..][..d];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let key = &k[(j * kv_heads + kv) * d..][..d];
                        query
                            .iter()
                            .zip(key)
                            .map(|(a, b)| f64::from(a * b))
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for i in 0..d {
                    let value: f64 = (0..=t)
                        .map(|j| weights[j] * f64::from(v[(j * kv_heads + kv) * d + i]))
                        .sum();
                    out[(t * heads + h) * d + i] = (value / sum) as f32;
                }
            }
        }
        out
    }

    /// A 45-token prefill (a full block and one of 13: groups of four and a remainder),
    /// then 3 tokens generated one by one on a clone of the cache, against the definition.
    fn prefill_then_generation(dims: Dims) {
        let Dims {
            heads,
            kv_heads,
            head_dim: d,
        } = dims;
        let (seq, extra) = (45, 3);
        let total = seq + extra;
        let half = d / 2;
        let angles: Vec<f32> = (0..total * half)
            .map(|i| (i / half) as f32 / (1 + i % half) as f32)
            .collect();
        let rotary = Rotary {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            positions: total,
        };
        let values = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + salt) % 1000) as f32 / 250.0 - 2.0)
                .collect()
        };
        let (q_row, kv_row) = (heads * d, kv_heads * d);
        let q = values(total * q_row, 1);
        let k = values(total * kv_row, 2);
        let v = values(total * kv_row, 3);
        let expected = reference(dims, &q, &k, &v, &rotary);
        let pool = Pool::new(2);
        let mut cache = KvCache::default();
        // Tokens `tokens` placed at `position`.
        let step = |cache: &mut KvCache, tokens: std::ops::Range<usize>, position| {
            attend(
                dims,
                cache,
                &mut q[tokens.start * q_row..tokens.end * q_row].to_vec(),
                &mut k[tokens.start * kv_row..tokens.end * kv_row].to_vec(),
                &v[tokens.start * kv_row..tokens.end * kv_row],
                &rotary,
                position,
                &pool,
            )
        };
        // A stale cache from an earlier prompt is dropped at position 0.
        step(&mut cache, 0..1, 0).unwrap();
        let mut got = step(&mut cache, 0..seq, 0).unwrap();
        let mut session = cache.clone();
        for t in seq..total {
            got.extend(step(&mut session, t..t + 1, t).unwrap());
        }
        for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
            assert!(
                (got - expected).abs() < 1e-4,
                "value {i}: {got} against {expected}"
            );
        }
        assert_eq!(got.len(), expected.len());
        assert_eq!((cache.len, session.len), (seq, total));
        // A gap in the positions is refused, and leaves the cache as it was.
        let error = step(&mut session, 0..1, total + 1);
        assert!(error.is_err());
        assert_eq!(session.len, total);
    }

    #[test]
    fn prefill_then_generation_equal_the_definition() {
        // Heads of 16 (one vector of the output per step) and of 64 (eight at a time).
        for head_dim in [16, 64] {
            prefill_then_generation(Dims {
                heads: 6,
                kv_heads: 2,
                head_dim,
            });
        }
    }

    #[test]
    fn widening_agrees_with_f16_for_every_word() {
        let words: Vec<u16> = (0..=u16::MAX).collect();
        let mut got = vec![0f32; words.len()];
        widen(&words, &mut got);
        for (&word, got) in words.iter().zip(got) {
            let exact = f16::from_bits(word).to_f32();
            assert!(
                got.to_bits() == exact.to_bits() || (got.is_nan() && exact.is_nan()),
                "{word:#06x}: {got} against {exact}"
            );
        }
    }

    #[test]
    fn the_fast_exponential_is_within_a_few_ulps() {
        // Down to -87, below which the weights are all but zero and held at e^-87.
        for i in 0..=17_400 {
            let x = -(i as f32) / 200.0;
            let (got, exact) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - exact).abs() <= 4e-7 * exact + f32::MIN_POSITIVE,
                "e^{x}: {got} against {exact}"
            );
        }
        assert_eq!(exp_nonpositive(-1000.0), exp_nonpositive(-87.0));
    }
}
