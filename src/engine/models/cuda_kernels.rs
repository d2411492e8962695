//! What the engine's own CUDA kernels share: loads and stores of f32, f16 and bf16 as f32
//! without any CUDA header, and their compilation with NVRTC at first use.
//!
//! No header: NVRTC 13 has no built-in `cuda_fp16.h` (compiling with `#include
//! <cuda_fp16.h>` and no include path fails: "could not open source file"), and the GPU
//! machine's headers are not where we could name them. Half values travel as their 16 bits
//! (`unsigned short`, the same pointer ABI as `half::f16`/`half::bf16`); f16 converts with
//! PTX `cvt` (every architecture), bf16 with bit operations (round to nearest even, NaN
//! kept), so the PTX loads on any GPU.
//!
//! `tests/nvrtc_check.py` compiles [`PRELUDE`] + every kernel source (`const SRC`) with
//! NVRTC on a machine without a GPU.

use candle_core::Result;

/// Prepended to every kernel source.
pub(crate) const PRELUDE: &str = r#"
struct F32 { typedef float bits; };
struct F16 { typedef unsigned short bits; };
struct BF16 { typedef unsigned short bits; };
template <typename T> __device__ __forceinline__ float ld(typename T::bits v);
template <> __device__ __forceinline__ float ld<F32>(float v) { return v; }
template <> __device__ __forceinline__ float ld<F16>(unsigned short v) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
}
template <> __device__ __forceinline__ float ld<BF16>(unsigned short v) {
    return __uint_as_float(((unsigned int)v) << 16);
}
template <typename T> __device__ __forceinline__ typename T::bits st(float v);
template <> __device__ __forceinline__ float st<F32>(float v) { return v; }
template <> __device__ __forceinline__ unsigned short st<F16>(float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
}
template <> __device__ __forceinline__ unsigned short st<BF16>(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
"#;

/// The PTX of `PRELUDE + src`, compiled once per process (cached in `cell`); `what` names
/// the kernel in the error.
pub(crate) fn ptx(
    cell: &'static std::sync::OnceLock<std::result::Result<String, String>>,
    src: &str,
    what: &str,
) -> Result<&'static str> {
    cell.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(format!("{PRELUDE}{src}"))
            .map(|p| p.to_src())
            .map_err(|e| format!("{what}: NVRTC: {e:?}"))
    })
    .as_ref()
    .map(|s| s.as_str())
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}
