//! Fused GroupNorm (+ SiLU): one kernel instead of candle's chain (upcast, mean, subtract,
//! square, mean, divide, downcast, scale, shift, then SiLU: ~15 launches and ~11 passes over
//! the tensor in f16). Statistics are computed in f32 per (image, group), two-pass (mean,
//! then the mean square deviation, as `candle_nn::GroupNorm` does), and the result is
//! rounded once.
//!
//! CPU: plain loops (tested against `candle_nn::GroupNorm` + SiLU). CUDA: a kernel compiled
//! at first use with NVRTC, one thread block per (image, group). Whether it is used is
//! decided by [`enabled_on`]: on the CPU always; on CUDA only with
//! `SD_STUDIO_FUSED_GROUPNORM=1` until it has been measured and checked on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

/// Whether the UNet uses the fused kernel on `device`.
pub fn enabled_on(device: &Device) -> bool {
    // Read once: this is asked for every norm of every step.
    static SETTING: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let setting =
        SETTING.get_or_init(
            || match std::env::var("SD_STUDIO_FUSED_GROUPNORM").ok().as_deref() {
                Some("0") => Some(false),
                Some("1") => Some(true),
                _ => None,
            },
        );
    setting.unwrap_or_else(|| device.is_cpu())
}

/// GroupNorm of `x` [n, c, …] with per-channel `weight` and `bias` [c], then SiLU when
/// `silu`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    x.apply_op3_no_bwd(&weight, &bias, &GroupNormOp { groups, eps, silu })
}

/// GroupNorm with diffusers' weight names: this module's kernel when enabled for the device,
/// else candle's own (then SiLU as a separate op).
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    plain: candle_nn::GroupNorm,
}

pub fn group_norm_layer(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    let plain = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
        plain,
    })
}

impl GroupNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }

    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if enabled_on(x.device()) {
            return crate::engine::fused::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let y = self.plain.forward(x)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// (images, channels, elements per channel), checked.
    fn dims(&self, l: &Layout, lw: &Layout, lb: &Layout) -> Result<(usize, usize, usize)> {
        let d = l.dims();
        if d.len() < 3 || !l.is_contiguous() {
            candle_core::bail!("fused group norm: needs a contiguous [n, c, ...] input, got {d:?}");
        }
        let (n, c) = (d[0], d[1]);
        let hw: usize = d[2..].iter().product();
        if self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!(
                "fused group norm: {} groups do not divide {c} channels",
                self.groups
            );
        }
        if lw.dims() != [c] || lb.dims() != [c] || !lw.is_contiguous() || !lb.is_contiguous() {
            candle_core::bail!("fused group norm: weight and bias must be [{c}]");
        }
        Ok((n, c, hw))
    }
}

/// The CPU kernel over f32 values (the caller converts other dtypes).
#[allow(clippy::too_many_arguments)]
fn cpu_group_norm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let cpg = c / groups;
    let len = cpg * hw;
    let mut out = super::attention::zeros_f32(x.len());
    debug_assert_eq!(x.len(), n * groups * len);
    // One (image, group) per task: statistics in f64, then one scale-and-shift pass per
    // channel in f32 and a vectorised SiLU.
    out.par_chunks_mut(len).enumerate().for_each(|(i, o)| {
        let xs = &x[i * len..(i + 1) * len];
        let mean = lanes_sum(xs, |v| v) / len as f64;
        let var = lanes_sum(xs, |v| (v - mean) * (v - mean)) / len as f64;
        let inv = 1.0 / (var + eps).sqrt();
        let g = i % groups;
        for ch in 0..cpg {
            let cc = g * cpg + ch;
            let scale = (inv * w[cc] as f64) as f32;
            let shift = (b[cc] as f64 - mean * inv * w[cc] as f64) as f32;
            let oc = &mut o[ch * hw..(ch + 1) * hw];
            for (o, &v) in oc.iter_mut().zip(&xs[ch * hw..(ch + 1) * hw]) {
                *o = v * scale + shift;
            }
            if silu {
                super::attention::silu_in_place(oc);
            }
        }
    });
    out
}

/// Σ f(x) in f64 over eight running sums (so the loop vectorises).
#[inline(always)]
fn lanes_sum(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v as f64);
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| f(v as f64)).sum::<f64>()
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
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
        let (n, c, hw) = self.dims(l1, l2, l3)?;
        // f32 is read in place; half precision is widened first.
        fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
            let (a, b) = (l.start_offset(), l.start_offset() + l.shape().elem_count());
            Ok(match s {
                CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[a..b]),
                CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
                CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
                _ => candle_core::bail!("fused group norm: unsupported dtype {:?}", s.dtype()),
            })
        }
        let y = cpu_group_norm(
            &f32s(s1, l1)?,
            &f32s(s2, l2)?,
            &f32s(s3, l3)?,
            n,
            c,
            hw,
            self.groups,
            self.eps,
            self.silu,
        );
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(y),
            DType::F16 => CpuStorage::F16(y.into_iter().map(half::f16::from_f32).collect()),
            DType::BF16 => CpuStorage::BF16(y.into_iter().map(half::bf16::from_f32).collect()),
            d => candle_core::bail!("fused group norm: unsupported dtype {d:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, hw) = self.dims(l1, l2, l3)?;
        cuda::forward(self, s1, l1, s2, l2, s3, l3, n, c, hw)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::GroupNormOp;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape};

    /// One block per (image, group): sum → mean, squared deviations → variance (f32 block
    /// reductions), then normalise, scale, shift, SiLU, round once.
    const SRC: &str = r#"
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

template <typename T>
__device__ void group_norm(const typename T::bits* x, const typename T::bits* w,
                           const typename T::bits* b, typename T::bits* y, int groups, int cpg,
                           int hw, float eps, int silu) {
    __shared__ float shared[32];
    const long len = (long)cpg * hw;
    const long base = (long)blockIdx.x * len;
    const int g = blockIdx.x % groups;
    float s = 0.0f;
    for (long i = threadIdx.x; i < len; i += blockDim.x) s += ld<T>(x[base + i]);
    const float mean = block_sum(s, shared) / (float)len;
    float q = 0.0f;
    for (long i = threadIdx.x; i < len; i += blockDim.x) {
        float d = ld<T>(x[base + i]) - mean;
        q += d * d;
    }
    const float inv = rsqrtf(block_sum(q, shared) / (float)len + eps);
    for (long i = threadIdx.x; i < len; i += blockDim.x) {
        const int c = g * cpg + (int)(i / hw);
        float v = (ld<T>(x[base + i]) - mean) * inv * ld<T>(w[c]) + ld<T>(b[c]);
        if (silu) v = v / (1.0f + __expf(-v));
        y[base + i] = st<T>(v);
    }
}

#define GROUP_NORM(name, T) extern "C" __global__ void name(const T::bits* x, const T::bits* w, const T::bits* b, T::bits* y, int groups, int cpg, int hw, float eps, int silu) { group_norm<T>(x, w, b, y, groups, cpg, hw, eps, silu); }
GROUP_NORM(group_norm_f32, F32)
GROUP_NORM(group_norm_f16, F16)
GROUP_NORM(group_norm_bf16, BF16)
"#;

    fn ptx() -> Result<&'static str> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
            std::sync::OnceLock::new();
        crate::engine::models::cuda_kernels::ptx(&PTX, SRC, "fused group norm")
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        op: &GroupNormOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        n: usize,
        c: usize,
        hw: usize,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let cpg = c / op.groups;
        let cfg = LaunchConfig {
            grid_dim: ((n * op.groups) as u32, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let (groups, cpg, hw, eps, silu) = (
            op.groups as i32,
            cpg as i32,
            hw as i32,
            op.eps as f32,
            op.silu as i32,
        );
        let elems = l1.shape().elem_count();
        macro_rules! launch {
            ($x:expr, $w:expr, $b:expr, $t:ty, $name:literal, $wrap:ident) => {{
                let x = $x.slice(l1.start_offset()..);
                let w = $w.slice(l2.start_offset()..);
                let b = $b.slice(l3.start_offset()..);
                // SAFETY: `y` is freshly allocated with `elems` elements, the kernel writes
                // exactly the n·c·hw elements of the contiguous input's shape.
                #[allow(unsafe_code)]
                let y = unsafe { dev.alloc::<$t>(elems)? };
                let func = dev.get_or_load_custom_func($name, "sd_studio_group_norm", ptx()?)?;
                let mut builder = func.builder();
                builder.arg(&x);
                builder.arg(&w);
                builder.arg(&b);
                builder.arg(&y);
                builder.arg(&groups);
                builder.arg(&cpg);
                builder.arg(&hw);
                builder.arg(&eps);
                builder.arg(&silu);
                // SAFETY: argument types and order match the kernel's signature above.
                #[allow(unsafe_code)]
                unsafe { builder.launch(cfg) }.w()?;
                CudaStorageSlice::$wrap(y)
            }};
        }
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(w), CudaStorageSlice::F32(b)) => {
                launch!(x, w, b, f32, "group_norm_f32", F32)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(w), CudaStorageSlice::F16(b)) => {
                launch!(x, w, b, half::f16, "group_norm_f16", F16)
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(w), CudaStorageSlice::BF16(b)) => {
                launch!(x, w, b, half::bf16, "group_norm_bf16", BF16)
            }
            _ => candle_core::bail!(
                "fused group norm: input, weight and bias must share f32/f16/bf16"
            ),
        };
        Ok((CudaStorage { slice, device: dev }, l1.shape().clone()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Module;

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
        let c = x.dim(1).unwrap();
        let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5).unwrap();
        let y = gn.forward(x).unwrap();
        if silu {
            candle_nn::ops::silu(&y).unwrap()
        } else {
            y
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_candle_group_norm_and_silu() {
        let dev = Device::Cpu;
        // An offset mean and uneven scales, as activations have.
        let x = (Tensor::randn(0f32, 3.0, (2, 12, 5, 7), &dev).unwrap() + 4.0).unwrap();
        let w = Tensor::randn(1f32, 0.5, 12, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 12, &dev).unwrap();
        for silu in [false, true] {
            for groups in [1, 3, 12] {
                let want = reference(&x, &w, &b, groups, silu);
                let got = group_norm(&x, &w, &b, groups, 1e-5, silu).unwrap();
                assert!(max_abs(&got, &want) < 1e-4, "groups {groups} silu {silu}");
            }
        }
        // f16 in, f16 out, within f16 rounding of the f32 result.
        let want = reference(&x, &w, &b, 3, true);
        let (xh, wh, bh) = (
            x.to_dtype(DType::F16).unwrap(),
            w.to_dtype(DType::F16).unwrap(),
            b.to_dtype(DType::F16).unwrap(),
        );
        let got = group_norm(&xh, &wh, &bh, 3, 1e-5, true).unwrap();
        assert_eq!(got.dtype(), DType::F16);
        assert!(max_abs(&got, &want) < 1e-2);
        // Non-contiguous input is made contiguous first; bad groups are named.
        let xt = x.transpose(2, 3).unwrap();
        let want = reference(&xt.contiguous().unwrap(), &w, &b, 4, false);
        let got = group_norm(&xt, &w, &b, 4, 1e-5, false).unwrap();
        assert!(max_abs(&got, &want) < 1e-4);
        let e = group_norm(&x, &w, &b, 5, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 groups do not divide 12 channels"), "{e}");
    }
}
