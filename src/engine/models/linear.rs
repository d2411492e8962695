//! Linear layers and the convolutions' matrix products on the CPU in f32, with outputs the
//! allocator can hand back without touching the kernel.
//!
//! candle's CPU matrix product allocates its result as `vec![0.0; n]`: a zeroed request,
//! which jemalloc serves from a block it has used before by returning the block's pages to
//! the kernel (`MADV_DONTNEED`) so they read as zero; every page then faults in again when
//! the product writes it. At batch 8 and 512² the feed-forward's output alone is 671 MB per
//! call. Here the output is allocated uninitialised and the product writes every element
//! (the `gemm` crate with `read_dst` off), or, for a layer with bias, the rows are first
//! filled with the bias and the product adds onto them (the bias add of candle's `Linear`
//! comes free, without its second output tensor).
//!
//! Other devices and dtypes use candle's own `matmul`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::attention::f32s;

/// `y = x wᵀ + b` with diffusers' weight names (`weight` [out, in], `bias` [out]).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((cout, cin), "weight")?,
        bias: Some(vb.get(cout, "bias")?),
    })
}

pub fn linear_no_bias(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((cout, cin), "weight")?,
        bias: None,
    })
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !ours(x, &self.weight) {
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        let dims = x.dims();
        let (cout, cin) = self.weight.dims2()?;
        if dims.last() != Some(&cin) {
            // candle's error message for a bad shape.
            return candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x);
        }
        let rows = x.elem_count() / cin.max(1);
        let x2 = x.contiguous()?.reshape((rows, cin))?;
        let w = self.weight.contiguous()?;
        let y = match &self.bias {
            Some(b) => x2.apply_op3_no_bwd(&w, &b.contiguous()?, &LinearOp)?,
            None => x2.apply_op2_no_bwd(&w, &LinearOp)?,
        };
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = cout;
        }
        y.reshape(out)
    }
}

/// Whether the product of `a` and `b` runs here (the CPU, both f32).
fn ours(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32
}

/// `w` [m, k] × `x` [b, k, n] → [b, m, n] (the column convolution's product).
pub fn left_matmul(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if !ours(x, w) {
        return w.broadcast_matmul(x);
    }
    let (w, x) = (w.contiguous()?, x.contiguous()?);
    x.apply_op2_no_bwd(&w, &LeftOp)
}

/// `n` f32 values, every one written by `fill` before the vector is returned.
///
/// `fill` receives the uninitialised buffer as a raw pointer and must write all `n`
/// elements (the products below do: `gemm` with `read_dst` off writes its whole output).
fn written(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(v.spare_capacity_mut().as_mut_ptr().cast());
    // SAFETY: the capacity is `n`, and `fill` wrote all `n` elements (its contract).
    #[allow(unsafe_code)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// Elements spanned by a `rows × cols` matrix at strides `s` (row, column).
pub(crate) fn extent(rows: usize, cols: usize, s: (usize, usize)) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * s.0 + (cols - 1) * s.1 + 1
    }
}

/// `dst [m, n] = (accumulate ? dst : ·) + beta · lhs [m, k] · rhs [k, n]` (strides as (row,
/// column)) on `threads` threads: the one call into the `gemm` crate for our CPU products.
/// With `accumulate` off, `dst` is only written.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of the `m × n` elements
/// at `dst_s`, and not accessed by anything else during the call; `lhs` and `rhs` must hold
/// the extents their strides reach (checked here).
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_s: (usize, usize),
    lhs: &[f32],
    lhs_s: (usize, usize),
    rhs: &[f32],
    rhs_s: (usize, usize),
    accumulate: bool,
    beta: f32,
    threads: usize,
) {
    assert!(
        lhs.len() >= extent(m, k, lhs_s) && rhs.len() >= extent(k, n, rhs_s),
        "matrix product: operand out of bounds"
    );
    // SAFETY: operand extents checked above; `dst`'s is the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_s.1 as isize,
            dst_s.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_s.1 as isize,
            lhs_s.0 as isize,
            rhs.as_ptr(),
            rhs_s.1 as isize,
            rhs_s.0 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// candle's CPU thread count (what its own products use).
fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// x [rows, cin] · wᵀ (w [cout, cin]) (+ bias [cout]) → [rows, cout].
struct LinearOp;

impl LinearOp {
    fn run(
        &self,
        x: &[f32],
        xl: &Layout,
        w: &[f32],
        wl: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cin) = xl.shape().dims2()?;
        let (cout, wcin) = wl.shape().dims2()?;
        if wcin != cin || bias.is_some_and(|b| b.len() != cout) {
            candle_core::bail!("linear: input {:?}, weight {:?}", xl.shape(), wl.shape());
        }
        let y = match bias {
            Some(b) => {
                // Rows start as the bias; the product adds onto them.
                let mut y = Vec::with_capacity(rows * cout);
                for _ in 0..rows {
                    y.extend_from_slice(b);
                }
                // SAFETY: `y` holds rows × cout initialised elements, read and written.
                #[allow(unsafe_code)]
                unsafe {
                    gemm_raw(
                        rows,
                        cout,
                        cin,
                        y.as_mut_ptr(),
                        (cout, 1),
                        x,
                        (cin, 1),
                        w,
                        (1, cin),
                        true,
                        1.0,
                        threads(),
                    )
                };
                y
            }
            // SAFETY: the buffer has rows × cout elements; `gemm` without accumulation
            // writes each of them.
            #[allow(unsafe_code)]
            None => written(rows * cout, |dst| unsafe {
                gemm_raw(
                    rows,
                    cout,
                    cin,
                    dst,
                    (cout, 1),
                    x,
                    (cin, 1),
                    w,
                    (1, cin),
                    false,
                    1.0,
                    threads(),
                )
            }),
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, cout))))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(
            f32s(s1, l1, "linear input")?,
            l1,
            f32s(s2, l2, "linear weight")?,
            l2,
            None,
        )
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
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
        let b = f32s(s3, l3, "linear bias")?;
        self.run(
            f32s(s1, l1, "linear input")?,
            l1,
            f32s(s2, l2, "linear weight")?,
            l2,
            Some(b),
        )
    }
}

/// x [b, k, n] with w [m, k] → w · x[i] for each i: [b, m, n].
struct LeftOp;

impl CustomOp2 for LeftOp {
    fn name(&self) -> &'static str {
        "left-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, k, n) = l1.shape().dims3()?;
        let (m, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("matmul: {:?} × {:?}", l2.shape(), l1.shape());
        }
        let (x, w) = (f32s(s1, l1, "matmul rhs")?, f32s(s2, l2, "matmul lhs")?);
        let y = written(b * m * n, |dst| {
            for i in 0..b {
                // SAFETY: image i's output is the m × n block at i·m·n of the b·m·n
                // buffer; `gemm` without accumulation writes all of it.
                #[allow(unsafe_code)]
                unsafe {
                    gemm_raw(
                        m,
                        n,
                        k,
                        dst.add(i * m * n),
                        (n, 1),
                        w,
                        (k, 1),
                        &x[i * k * n..(i + 1) * k * n],
                        (n, 1),
                        false,
                        1.0,
                        threads(),
                    )
                };
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, m, n))))
    }
}

/// diffusers' GEGLU gate: `h` [.., 2f] → `h[.., :f] · gelu(h[.., f:])` with the exact (erf)
/// GELU, on the CPU in f32 in one pass over rows (candle's narrow + `gelu_erf` + multiply
/// made two strided passes and two outputs, and its `erf` is scalar f64: 362 ms per SD 1.5
/// step at 512², PyTorch's gelu + mul 116 ms). Other devices and dtypes: candle's ops.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let last = h.dim(candle_core::D::Minus1)?;
    if !h.device().is_cpu() || h.dtype() != DType::F32 || last % 2 != 0 {
        let half = last / 2;
        let (a, b) = (
            h.narrow(candle_core::D::Minus1, 0, half)?,
            h.narrow(candle_core::D::Minus1, half, half)?,
        );
        return a * b.gelu_erf()?;
    }
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let h = f32s(s, l, "GEGLU input")?;
        let dims = l.dims();
        let two_f = dims.last().copied().unwrap_or(0);
        let f = two_f / 2;
        let rows = h.len() / two_f.max(1);
        let mut out = super::attention::zeros_f32(rows * f);
        out.par_chunks_mut(f.max(1) * 16)
            .zip(h.par_chunks(two_f.max(1) * 16))
            .for_each(|(o, h)| {
                for (o, h) in o.chunks_mut(f).zip(h.chunks(two_f)) {
                    gate_row(o, &h[..f], &h[f..]);
                }
            });
        let mut shape = dims.to_vec();
        if let Some(d) = shape.last_mut() {
            *d = f;
        }
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// `o[i] = a[i] · gelu(g[i])` (AVX2 + FMA when the CPU has them).
fn gate_row(o: &mut [f32], a: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            #[allow(unsafe_code)]
            return unsafe { gate_row_avx2(o, a, g) };
        }
    }
    gate_row_plain(o, a, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gate_row_avx2(o: &mut [f32], a: &[f32], g: &[f32]) {
    gate_row_plain(o, a, g)
}

#[inline(always)]
fn gate_row_plain(o: &mut [f32], a: &[f32], g: &[f32]) {
    for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
        *o = a * gelu_erf(g);
    }
}

/// `x · Φ(x)` = `x/2 · (1 + erf(x/√2))`, with `erfc` by the Chebyshev-fitted formula of
/// Numerical Recipes (`erfcc`: relative error below 1.2e-7 everywhere, so the tails stay
/// accurate too): for z ≥ 0, `erfc(z) = t·exp(−z² + P(t))`, `t = 1/(1 + z/2)`. Then
/// `1 + erf(z)` is `2 − erfc(z)` for z ≥ 0 and `erfc(−z)` for z < 0: never `1 − (1 − …)`, no
/// cancellation where GELU is small. Straight-line arithmetic, so loops over it vectorise.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    const C: [f32; 10] = [
        -1.265_512_2,
        1.000_023_7,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_204,
        1.488_515_9,
        -0.822_152_23,
        0.170_872_77,
    ];
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let az = z.abs();
    let t = 1.0 / (1.0 + 0.5 * az);
    let mut p = C[9];
    for &c in C[..9].iter().rev() {
        p = p * t + c;
    }
    let erfc = t * super::attention::exp_f32(-az * az + p);
    // 1 + erf(z): 2 − erfc(z) for z ≥ 0, erfc(−z) for z < 0.
    let one_plus_erf = if z >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn geglu_matches_candle_gelu_erf() {
        let dev = Device::Cpu;
        // Values across GELU's range, including the far tails.
        let h = Tensor::randn(0f32, 3.0, (3, 7, 2 * 37), &dev).unwrap();
        let want = {
            let (a, b) = (h.narrow(2, 0, 37).unwrap(), h.narrow(2, 37, 37).unwrap());
            (a * b.gelu_erf().unwrap()).unwrap()
        };
        let got = geglu(&h).unwrap();
        assert_eq!(got.dims(), &[3, 7, 37]);
        let e = super::super::attention::max_rel_err(&got, &want);
        assert!(e < 1e-6, "{e}");
        // Element by element against f64 erf, relative where GELU is tiny.
        for x in [
            -12.0f32, -6.0, -3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 9.0,
        ] {
            // x·Φ(x) = x/2 · erfc(−x/√2), exact in the tails. Relative 4e-6: in f32 the
            // exponent −z² itself rounds (at x = −6, z² = 18: 1e-6 of e^{−18}'s argument).
            let want = {
                let x = x as f64;
                0.5 * x * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2)
            };
            let got = gelu_erf(x) as f64;
            assert!(
                (got - want).abs() <= 4e-6 * want.abs() + 1e-30,
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn matches_candle_linear_and_matmul() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
        for bias in [None, Some(b)] {
            let want = candle_nn::Linear::new(w.clone(), bias.clone())
                .forward(&x)
                .unwrap();
            let got = Linear::new(w.clone(), bias).forward(&x).unwrap();
            assert_eq!(got.dims(), &[2, 5, 3]);
            assert!(super::super::attention::max_rel_err(&got, &want) < 1e-6);
        }
        // A transposed (non-contiguous) input is made contiguous first. (candle 0.11.1's
        // own `Linear` gets this case wrong: its matmul stacks the batches of a
        // batch-invariant product into one matrix even when the lhs rows are not evenly
        // spaced across batches; relative error 1.27 here. Reference: contiguous input.)
        let xt = Tensor::randn(0f32, 1.0, (2, 7, 5), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let want = candle_nn::Linear::new(w.clone(), None)
            .forward(&xt.contiguous().unwrap())
            .unwrap();
        let got = Linear::new(w.clone(), None).forward(&xt).unwrap();
        let e = super::super::attention::max_rel_err(&got, &want);
        assert!(e < 1e-6, "{e}");
        // w [m, k] × x [b, k, n].
        let x = Tensor::randn(0f32, 1.0, (3, 7, 11), &dev).unwrap();
        let want = w.broadcast_matmul(&x).unwrap();
        let got = left_matmul(&w, &x).unwrap();
        assert_eq!(got.dims(), &[3, 3, 11]);
        assert!(super::super::attention::max_rel_err(&got, &want) < 1e-6);
        // Bad shapes are named.
        let e = Linear::new(w, None)
            .forward(&Tensor::zeros((2, 4), DType::F32, &dev).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape") || e.contains("mismatch"), "{e}");
    }
}
