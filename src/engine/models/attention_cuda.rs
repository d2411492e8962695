//! Attention without the score matrix on CUDA: one kernel that streams the keys and values
//! past each query with FlashAttention's online softmax (running maximum, running sum, the
//! accumulator rescaled when the maximum grows), in f32 whatever the storage dtype, the
//! output rounded once. Nothing of size queries × keys exists: the 4096-token
//! self-attention at 512² no longer builds batch × heads × 4096² scores, nor the VAE's
//! mid-block one 16384² matrix at 1024².
//!
//! Two kernels (compiled with NVRTC at first use, `cuda_kernels.rs`):
//! - head widths in [`ROW_DIMS`] (SD 1.x: 40; SD 2.x and SDXL: 64): one thread per query,
//!   its query row and accumulator in registers; the block's 128 queries share tiles of 32
//!   keys and values in shared memory. Keys are taken one at a time and the accumulator is
//!   rescaled only when the row's maximum grows (a fully unrolled tile made NVRTC take 75 s
//!   per compile);
//! - any other width up to [`WARP_MAX_D`] (the VAE's single 512-wide head): one warp per
//!   query, each lane holding every 32nd element, the dot product summed across the warp.
//!
//! Not yet run on a GPU: off unless `SD_STUDIO_CUDA_ATTENTION=1` ([`super::attention`]),
//! until tests/gpu_parity.py has checked it there. `tests/nvrtc_check.py` compiles it here.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// Head widths with a one-thread-per-query kernel.
pub const ROW_DIMS: [usize; 6] = [16, 32, 40, 64, 80, 96];
/// The widest head the one-warp-per-query kernel takes.
pub const WARP_MAX_D: usize = 512;

/// Queries per block in the row kernel (one thread each).
const ROW_THREADS: u32 = 128;
/// Queries per block in the warp kernel (one warp each).
const WARP_ROWS: u32 = 8;

const SRC: &str = r#"
#define NEG_INF __int_as_float(0xff800000)

template <typename T, int D, int BK>
__device__ __forceinline__ void attn_rows(const typename T::bits* __restrict__ q,
                                          const typename T::bits* __restrict__ k,
                                          const typename T::bits* __restrict__ v,
                                          typename T::bits* __restrict__ o, int t, int s) {
    __shared__ float ks[BK * D];
    __shared__ float vs[BK * D];
    const long head = blockIdx.y;
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = row < t;
    float qr[D], acc[D];
    const typename T::bits* qp = q + (head * t + (live ? row : 0)) * D;
#pragma unroll
    for (int i = 0; i < D; ++i) { qr[i] = live ? ld<T>(qp[i]) : 0.0f; acc[i] = 0.0f; }
    const typename T::bits* kh = k + head * s * D;
    const typename T::bits* vh = v + head * s * D;
    float m = NEG_INF, l = 0.0f;
    for (int k0 = 0; k0 < s; k0 += BK) {
        const int rk = min(BK, s - k0);
        __syncthreads();
        for (int i = threadIdx.x; i < rk * D; i += blockDim.x) {
            ks[i] = ld<T>(kh[(long)k0 * D + i]);
            vs[i] = ld<T>(vh[(long)k0 * D + i]);
        }
        __syncthreads();
        // Key by key; the accumulator is rescaled only when the running maximum grows
        // (after the first keys, rarely).
        for (int j = 0; j < rk; ++j) {
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < D; ++i) dot = fmaf(qr[i], ks[j * D + i], dot);
            if (dot > m) {
                const float corr = m == NEG_INF ? 0.0f : __expf(m - dot);
                l *= corr;
#pragma unroll
                for (int i = 0; i < D; ++i) acc[i] *= corr;
                m = dot;
            }
            const float p = __expf(dot - m);
            l += p;
#pragma unroll
            for (int i = 0; i < D; ++i) acc[i] = fmaf(p, vs[j * D + i], acc[i]);
        }
    }
    if (live) {
        const float inv = 1.0f / l;
        typename T::bits* op = o + (head * t + row) * D;
#pragma unroll
        for (int i = 0; i < D; ++i) op[i] = st<T>(acc[i] * inv);
    }
}

// E = the elements each lane holds: d <= 32 * E.
template <typename T, int E>
__device__ __forceinline__ void attn_warp(const typename T::bits* __restrict__ q,
                                          const typename T::bits* __restrict__ k,
                                          const typename T::bits* __restrict__ v,
                                          typename T::bits* __restrict__ o, int t, int s, int d) {
    const int lane = threadIdx.x & 31;
    const long head = blockIdx.y;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= t) return;  // the whole warp: one row per warp
    float qr[E], acc[E];
    const typename T::bits* qp = q + (head * t + row) * (long)d;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int i = lane + 32 * e;
        qr[e] = i < d ? ld<T>(qp[i]) : 0.0f;
        acc[e] = 0.0f;
    }
    const typename T::bits* kh = k + head * s * (long)d;
    const typename T::bits* vh = v + head * s * (long)d;
    float m = NEG_INF, l = 0.0f;
    for (int j = 0; j < s; ++j) {
        const typename T::bits* kj = kh + (long)j * d;
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int i = lane + 32 * e;
            if (i < d) dot = fmaf(qr[e], ld<T>(kj[i]), dot);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const float mn = fmaxf(m, dot);
        const float corr = m == NEG_INF ? 0.0f : __expf(m - mn);
        const float p = __expf(dot - mn);
        l = l * corr + p;
        const typename T::bits* vj = vh + (long)j * d;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int i = lane + 32 * e;
            if (i < d) acc[e] = fmaf(p, ld<T>(vj[i]), acc[e] * corr);
        }
        m = mn;
    }
    const float inv = 1.0f / l;
    typename T::bits* op = o + (head * t + row) * (long)d;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int i = lane + 32 * e;
        if (i < d) op[i] = st<T>(acc[e] * inv);
    }
}

#define ROWS(D, T, name) \
extern "C" __global__ void __launch_bounds__(128) attn_rows_##D##_##name( \
    const T::bits* q, const T::bits* k, const T::bits* v, T::bits* o, int t, int s) { \
    attn_rows<T, D, 32>(q, k, v, o, t, s); }
#define ROWS_ALL(D) ROWS(D, F32, f32) ROWS(D, F16, f16) ROWS(D, BF16, bf16)
ROWS_ALL(16) ROWS_ALL(32) ROWS_ALL(40) ROWS_ALL(64) ROWS_ALL(80) ROWS_ALL(96)

#define WARP(T, name) \
extern "C" __global__ void __launch_bounds__(256) attn_warp_##name( \
    const T::bits* q, const T::bits* k, const T::bits* v, T::bits* o, int t, int s, int d) { \
    attn_warp<T, 16>(q, k, v, o, t, s, d); }
WARP(F32, f32) WARP(F16, f16) WARP(BF16, bf16)
"#;

fn ptx() -> Result<&'static str> {
    static PTX: std::sync::OnceLock<std::result::Result<String, String>> =
        std::sync::OnceLock::new();
    super::cuda_kernels::ptx(&PTX, SRC, "CUDA attention")
}

/// Whether the kernels take heads of width `d`.
pub fn supports(d: usize) -> bool {
    d > 0 && d <= WARP_MAX_D
}

/// `softmax(q kᵀ) v` for q [n, t, d] (already scaled), k and v [n, s, d] on a CUDA device.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &Fused)
}

struct Fused;

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "cuda-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("CUDA attention: called on the CPU (use attention::attention)")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, t, d) = l1.shape().dims3()?;
        let (nk, s, dk) = l2.shape().dims3()?;
        if (nk, dk) != (n, d) || l3.shape().dims3()? != (n, s, d) || s == 0 {
            candle_core::bail!(
                "CUDA attention: q {:?}, k {:?}, v {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        if !supports(d) || n > 65535 {
            candle_core::bail!("CUDA attention: {n} heads of width {d} are not supported");
        }
        let row = ROW_DIMS.contains(&d);
        let cfg = if row {
            LaunchConfig {
                grid_dim: ((t as u32).div_ceil(ROW_THREADS), n as u32, 1),
                block_dim: (ROW_THREADS, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig {
                grid_dim: ((t as u32).div_ceil(WARP_ROWS), n as u32, 1),
                block_dim: (WARP_ROWS * 32, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        let (ti, si, di) = (t as i32, s as i32, d as i32);
        let dev = s1.device.clone();
        macro_rules! launch {
            ($q:expr, $k:expr, $v:expr, $ty:ty, $suffix:literal, $wrap:ident) => {{
                let q = $q.slice(l1.start_offset()..);
                let k = $k.slice(l2.start_offset()..);
                let v = $v.slice(l3.start_offset()..);
                // SAFETY: `o` is freshly allocated with n·t·d elements; every kernel writes
                // each of them exactly once (one query row per thread or warp).
                #[allow(unsafe_code)]
                let o = unsafe { dev.alloc::<$ty>(n * t * d)? };
                let name = if row {
                    format!("attn_rows_{d}_{}", $suffix)
                } else {
                    format!("attn_warp_{}", $suffix)
                };
                let func = dev.get_or_load_custom_func(&name, "sd_studio_attention", ptx()?)?;
                let mut b = func.builder();
                b.arg(&q);
                b.arg(&k);
                b.arg(&v);
                b.arg(&o);
                b.arg(&ti);
                b.arg(&si);
                if !row {
                    b.arg(&di);
                }
                // SAFETY: argument types and order match the kernels' signatures above; the
                // inputs are contiguous [n, t|s, d] as checked.
                #[allow(unsafe_code)]
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::$wrap(o)
            }};
        }
        let slice = match (&s1.slice, &s2.slice, &s3.slice) {
            (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
                launch!(q, k, v, f32, "f32", F32)
            }
            (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
                launch!(q, k, v, half::f16, "f16", F16)
            }
            (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
                launch!(q, k, v, half::bf16, "bf16", BF16)
            }
            _ => candle_core::bail!("CUDA attention: q, k and v must share f32/f16/bf16"),
        };
        Ok((CudaStorage { slice, device: dev }, Shape::from((n, t, d))))
    }
}
