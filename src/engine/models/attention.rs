//! Attention without the score matrix, on the CPU: `softmax(q kᵀ) v` computed one block of
//! queries against one block of keys at a time with an online softmax (FlashAttention's
//! recurrence, Dao et al. 2022: a running row maximum `m`, a running sum `l`, and the output
//! accumulator rescaled by `exp(m_old − m_new)` whenever the maximum grows). Only a
//! `Q_BLOCK × K_BLOCK` tile of scores exists at a time, per thread, reused for every tile,
//! so a 4096-token self-attention no longer allocates (and page-faults in) a fresh
//! batch × heads × 4096 × 4096 matrix per call: PyTorch's CPU `scaled_dot_product_attention`
//! works the same way. Threads split the (head, query block) pairs.
//!
//! The block products go to the `gemm` crate (candle's own CPU matrix kernel) with one
//! thread each; `exp` is a polynomial written so the compiler vectorises it (AVX2+FMA when
//! the CPU has them), accurate to a few ulp.
//!
//! Half precision on the CPU is widened to f32 for it. On CUDA, [`attention`] hands over to
//! `attention_cuda.rs`'s kernel when `SD_STUDIO_CUDA_ATTENTION=1`. Other devices, and shapes
//! too small to gain, take the plain path (`matmul`, `softmax_last_dim`, `matmul`), which
//! the tests also use as the reference.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Queries per tile.
const Q_BLOCK: usize = 64;
/// Keys per tile.
const K_BLOCK: usize = 256;
/// From this many query × key pairs per head the blocked path is used (below it the plain
/// path's few, small allocations cost less than the tiling).
const MIN_PAIRS: usize = 64 * 64;

/// `SD_STUDIO_PLAIN_ATTENTION=1`: the plain path everywhere (for A/B measurements).
fn plain_only() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SD_STUDIO_PLAIN_ATTENTION").is_ok_and(|v| v == "1"))
}

/// `SD_STUDIO_CUDA_ATTENTION=1`: the fused CUDA kernel (`attention_cuda.rs`) on a GPU.
/// Off by default until a GPU run has checked it.
pub fn cuda_fused() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SD_STUDIO_CUDA_ATTENTION").is_ok_and(|v| v == "1"))
}

/// Whether attention on `device` in `dtype` runs without a score matrix (the CPU in any
/// float dtype, half precision widened; CUDA with the fused kernel on, for the head widths
/// it takes): then attention slicing has nothing to bound.
pub fn score_free_on(device: &Device, dtype: DType) -> bool {
    if device.is_cpu() {
        return enabled() && dtype.is_float();
    }
    device.is_cuda() && cfg!(feature = "cuda") && cuda_fused()
}

/// [`score_free_on`] for heads of width `d` (the CUDA kernels take up to 512).
fn score_free(q: &Tensor, d: usize) -> bool {
    if !score_free_on(q.device(), q.dtype()) {
        return false;
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::attention_cuda::supports(d);
    }
    let _ = d;
    true
}

/// False only when `SD_STUDIO_PLAIN_ATTENTION=1` asks for the plain path.
pub fn enabled() -> bool {
    !plain_only()
}

/// `softmax(q kᵀ) v` for q [n, t, d] (already scaled), k and v [n, s, d]; → [n, t, d].
/// Without a score matrix where [`score_free_on`] says so; else (and for shapes too small
/// to gain) the plain path.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, t, d) = q.dims3()?;
    let s = k.dim(1)?;
    if !score_free(q, d) {
        return plain(q, k, v);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::attention_cuda::attention(q, k, v);
    }
    if q.dtype() != DType::F32 {
        // Half precision on the CPU: products and softmax in f32 (as a GPU's fused
        // attention accumulates), the result rounded once.
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        return attention(&f32(q)?, &f32(k)?, &f32(v)?)?.to_dtype(q.dtype());
    }
    if t * s < MIN_PAIRS {
        return plain(q, k, v);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &Blocked)
}

/// The plain path: the whole score matrix, softmax, product.
pub fn plain(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

struct Blocked;

/// A contiguous f32 CPU tensor's values (for the CPU kernels here and in `winograd.rs`).
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what} is not f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what} is not contiguous"),
    }
}

/// `n` zeros for a CPU kernel's output or scratch, written by a fill rather than taken
/// from `calloc` as `vec![0.0; n]` is: jemalloc serves a zeroed request from a block it has
/// used before by handing the block's pages back to the kernel (`MADV_DONTNEED`, so they
/// read as zero), and then every page faults in again on first touch. At batch 8 this was
/// most of the remaining page faults.
pub(crate) fn zeros_f32(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // Filled through `black_box`, so the compiler cannot turn allocate-then-memset back
    // into a zeroed allocation.
    v.resize(n, std::hint::black_box(0.0));
    v
}

/// max |a − b| / max |b| (the kernels' tests).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max((a - b).unwrap()) / max(b.clone()).max(1e-12)
}

impl CustomOp3 for Blocked {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, t, d) = l1.shape().dims3()?;
        let (nk, s, dk) = l2.shape().dims3()?;
        if (nk, dk) != (n, d) || l3.shape().dims3()? != (n, s, d) {
            candle_core::bail!(
                "blocked attention: q {:?}, k {:?}, v {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (q, k, v) = (
            f32s(s1, l1, "attention q")?,
            f32s(s2, l2, "attention k")?,
            f32s(s3, l3, "attention v")?,
        );
        let mut out = zeros_f32(n * t * d);
        let blocks = t.div_ceil(Q_BLOCK);
        // One work item per (head, query block): its rows of the output.
        let mut items: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(n * blocks);
        for (h, head_out) in out.chunks_mut(t * d).enumerate() {
            for (b, rows) in head_out.chunks_mut(Q_BLOCK * d).enumerate() {
                items.push((h, b, rows));
            }
        }
        items.into_par_iter().for_each(|(h, b, rows)| {
            SCRATCH.with(|cell| {
                let mut scratch = cell.borrow_mut();
                scratch.fit(d);
                let q0 = h * t * d + b * Q_BLOCK * d;
                let rq = rows.len() / d;
                let kv = h * s * d..(h + 1) * s * d;
                scratch.attend(&q[q0..q0 + rq * d], &k[kv.clone()], &v[kv], d, rows);
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((n, t, d))))
    }
}

/// One thread's tiles, reused for every work item it takes (and kept between calls).
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

impl Scratch {
    /// Grows the buffers for heads of width `d` (once per thread and width).
    fn fit(&mut self, d: usize) {
        self.scores.resize(Q_BLOCK * K_BLOCK, 0.0);
        if self.acc.len() < Q_BLOCK * d {
            self.acc.resize(Q_BLOCK * d, 0.0);
        }
        self.max.resize(Q_BLOCK, f32::NEG_INFINITY);
        self.sum.resize(Q_BLOCK, 0.0);
    }

    /// `out` [rq, d] = softmax(q kᵀ) v for q [rq, d], k and v [s, d].
    fn attend(&mut self, q: &[f32], k: &[f32], v: &[f32], d: usize, out: &mut [f32]) {
        let rq = q.len() / d;
        let s = k.len() / d;
        let acc = &mut self.acc[..rq * d];
        acc.fill(0.0);
        let (max, sum) = (&mut self.max[..rq], &mut self.sum[..rq]);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        for k0 in (0..s).step_by(K_BLOCK) {
            let rk = K_BLOCK.min(s - k0);
            let scores = &mut self.scores[..rq * rk];
            // scores [rq, rk] = q [rq, d] · k[k0..k0+rk]ᵀ
            matmul(
                rq,
                rk,
                d,
                scores,
                (rk, 1),
                q,
                (d, 1),
                &k[k0 * d..(k0 + rk) * d],
                (1, d),
                false,
            );
            for i in 0..rq {
                let row = &mut scores[i * rk..(i + 1) * rk];
                let m_new = row_max(row).max(max[i]);
                let rescale = exp_one(max[i] - m_new);
                let row_sum = exp_shifted(row, m_new);
                sum[i] = sum[i] * rescale + row_sum;
                max[i] = m_new;
                if rescale != 1.0 {
                    for x in &mut acc[i * d..(i + 1) * d] {
                        *x *= rescale;
                    }
                }
            }
            // acc [rq, d] += probs [rq, rk] · v[k0..k0+rk] [rk, d]
            matmul(
                rq,
                d,
                rk,
                acc,
                (d, 1),
                scores,
                (rk, 1),
                &v[k0 * d..(k0 + rk) * d],
                (d, 1),
                true,
            );
        }
        for i in 0..rq {
            let inv = 1.0 / sum[i];
            for (o, a) in out[i * d..(i + 1) * d]
                .iter_mut()
                .zip(&acc[i * d..(i + 1) * d])
            {
                *o = a * inv;
            }
        }
    }
}

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]`, strides given as (row, column), one thread.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_s: (usize, usize),
    lhs: &[f32],
    lhs_s: (usize, usize),
    rhs: &[f32],
    rhs_s: (usize, usize),
    accumulate: bool,
) {
    gemm_f32(
        m, n, k, dst, dst_s, lhs, lhs_s, rhs, rhs_s, accumulate, 1.0, 1,
    );
}

/// `dst [m, n] = (accumulate ? dst : 0) + beta · lhs [m, k] · rhs [k, n]`, strides as
/// (row, column), on `threads` threads (candle's own matrix kernel, the `gemm` crate).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_s: (usize, usize),
    lhs: &[f32],
    lhs_s: (usize, usize),
    rhs: &[f32],
    rhs_s: (usize, usize),
    accumulate: bool,
    beta: f32,
    threads: usize,
) {
    // The product writes (and reads) exactly this extent of `dst`: checked here, so the
    // raw pointer never leaves the slice.
    assert!(
        dst.len() >= super::linear::extent(m, n, dst_s),
        "matrix product: output tile out of bounds"
    );
    // SAFETY: `dst` is a unique borrow covering the extent checked just above.
    #[allow(unsafe_code)]
    unsafe {
        super::linear::gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s,
            lhs,
            lhs_s,
            rhs,
            rhs_s,
            accumulate,
            beta,
            threads,
        )
    };
}

/// The largest value of `row` (eight running maxima, so the loop vectorises).
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l = if *x > *l { *x } else { *l };
        }
    }
    rest.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of `row` (eight running sums, so the loop vectorises).
#[inline(always)]
fn row_sum(row: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `x / (1 + exp(−x))` in place (SiLU), with the vectorised `exp`.
pub(crate) fn silu_in_place(xs: &mut [f32]) {
    let mut tmp = [0f32; 256];
    for chunk in xs.chunks_mut(256) {
        let t = &mut tmp[..chunk.len()];
        for (t, x) in t.iter_mut().zip(chunk.iter()) {
            *t = -*x;
        }
        exp_shifted(t, 0.0);
        for (x, e) in chunk.iter_mut().zip(t.iter()) {
            *x /= 1.0 + *e;
        }
    }
}

/// `exp(x)` for one value (the same polynomial as [`exp_shifted`]).
fn exp_one(x: f32) -> f32 {
    let mut v = [x];
    exp_in_place(&mut v, 0.0);
    v[0]
}

/// `row[i] = exp(row[i] − shift)`; returns the sum.
fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            #[allow(unsafe_code)]
            return unsafe { exp_shifted_avx2(row, shift) };
        }
    }
    exp_in_place(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_shifted_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_in_place(row, shift)
}

/// Cephes-style `exp`: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a degree-6 polynomial,
/// 2ⁿ from the exponent bits. Inputs below −87 give 0 (the softmax's far tail); `-inf`
/// gives 0, as `exp` does. Written as straight-line arithmetic per element so the loop
/// vectorises.
#[inline(always)]
fn exp_in_place(row: &mut [f32], shift: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp_f32(*x - shift);
    }
    row_sum(row)
}

/// One element of [`exp_in_place`] (inlined into vectorised loops elsewhere too).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let a = x.clamp(-87.0, 88.0);
    let n = (a * LOG2E + 0.5).floor();
    let r = a - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = (p * r * r + r) + 1.0;
    let bits = ((n as i32 + 127) << 23) as u32;
    let y = e * f32::from_bits(bits);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(shape: (usize, usize, usize), seed: u64, scale: f32) -> Tensor {
        // A small LCG: deterministic values in [-scale, scale).
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut xs: Vec<f32> = (0..20000).map(|i| -90.0 + i as f32 * 0.0045).collect();
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_shifted(&mut xs, 0.0);
        for (g, w) in xs.iter().zip(&want) {
            if *w > 1e-37 {
                assert!(((g - w) / w).abs() < 2e-7, "exp: {g} vs {w}");
            } else {
                assert!(*g < 1e-30);
            }
        }
        let mut inf = [f32::NEG_INFINITY, 0.0];
        exp_shifted(&mut inf, 0.0);
        assert_eq!(inf, [0.0, 1.0]);
    }

    #[test]
    fn blocked_matches_the_plain_path() {
        // Self-attention with ragged tiles (t and s not multiples of the blocks), cross
        // attention with 77 keys, SD 1.5's head width 40 and a VAE-like single 512-wide head;
        // large logits, so the running maximum moves and rescaling is exercised.
        for (n, t, s, d, scale) in [
            (3, 200, 200, 40, 1.0),
            (2, 130, 77, 64, 3.0),
            (1, 300, 300, 512, 0.2),
            (2, 64, 513, 8, 8.0),
        ] {
            let q = rand((n, t, d), 1, scale);
            let k = rand((n, s, d), 2, scale);
            let v = rand((n, s, d), 3, 1.0);
            let got = q.apply_op3_no_bwd(&k, &v, &Blocked).unwrap();
            let want = plain(&q, &k, &v).unwrap();
            let e = max_rel_err(&got, &want);
            assert!(e < 1e-5, "({n}, {t}, {s}, {d}): relative error {e}");
        }
    }
}
