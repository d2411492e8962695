//! Noise that reproduces PyTorch's CPU generator bit for bit.
//!
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` draws from a
//! Mersenne Twister (MT19937) and turns uniforms into normals two ways, picked by size:
//! - 16 values or more (contiguous float tensors): fill the whole buffer with 24-bit float
//!   uniforms, then Box-Muller in blocks of 16 (value j pairs with j+8); when the length is
//!   not a multiple of 16, the last 16 values are drawn again and transformed once more.
//! - fewer than 16: one double-precision Box-Muller pair per two values from 53-bit
//!   uniforms; the sine half is cached in the generator and returned by the next draw.
//!
//! These facts come from reading PyTorch's ATen CPU distribution kernels; the code is ours.
//! The 16-block transform follows PyTorch's vectorised (AVX2) kernel, which is what x86
//! builds run on most CPUs: the angle 2π·u is formed in f32. Its SIMD `log`/`sin`/`cos` may
//! differ from libm's in the last bit or two, so values agree to a few ulps.

const N: usize = 624;
const M: usize = 397;

/// PyTorch's CPU generator state: MT19937 plus the cached second normal sample.
#[derive(Clone)]
pub struct TorchCpuRng {
    state: [u32; N],
    index: usize,
    cached_normal: Option<f64>,
}

impl TorchCpuRng {
    /// Same as `torch.Generator("cpu").manual_seed(seed)`: the seed is truncated to 32 bits.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            state,
            index: N,
            cached_normal: None,
        }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % N] & LOWER);
            let mut v = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// The next raw 32-bit output of MT19937.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `numel` standard normal values, as `torch.randn` fills a contiguous f32 tensor.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for start in (0..numel - 15).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if !numel.is_multiple_of(16) {
            let start = numel - 16;
            for v in &mut data[start..] {
                *v = self.uniform_f32();
            }
            box_muller_16(&mut data[start..]);
        }
        data
    }
}

/// In-place Box-Muller on 16 uniforms: value j pairs with value j + 8.
fn box_muller_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0f64 * std::f64::consts::PI) as f32 * u2;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}

/// Philox4x32-10 (Salmon et al. 2011), the counter-based generator behind cuRAND's
/// `curandStatePhilox4_32_10_t` and PyTorch's CUDA generator.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (ctr, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// What `torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed))` draws on
/// an NVIDIA GPU (A1111's "GPU"/"NV" noise), computed on the CPU.
///
/// PyTorch's CUDA normal kernel gives element `i` its own Philox subsequence (counter
/// `(offset/4, 0, i, 0)`, key = the 64-bit seed) and keeps the first of the four normals
/// cuRAND's Box-Muller makes: `sqrt(-2 ln u(x)) · sin(2π v(y))` of the first two words.
/// Each draw advances the generator's offset by 4, i.e. the counter's first word by 1.
/// This layout holds while the tensor fits in one wave of the kernel's grid (every image
/// latent up to at least 1024×1024 on current GPUs); beyond that PyTorch's layout depends
/// on the GPU's multiprocessor count.
#[derive(Clone)]
pub struct TorchCudaRng {
    seed: u64,
    calls: u32,
}

impl TorchCudaRng {
    pub fn new(seed: u64) -> Self {
        Self { seed, calls: 0 }
    }

    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        const INV: f32 = 2.328_306_4e-10; // 2^-32, as cuRAND's CURAND_2POW32_INV
        const INV_2PI: f32 = 2.328_306_4e-10 * std::f32::consts::TAU;
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let counter = self.calls;
        self.calls = self.calls.wrapping_add(1);
        (0..numel)
            .map(|i| {
                let r = philox4x32_10([counter, 0, i as u32, (i as u64 >> 32) as u32], key);
                let u = r[0] as f32 * INV + INV / 2.0;
                let v = r[1] as f32 * INV_2PI + INV_2PI / 2.0;
                ((-2.0 * (u as f64).ln()).sqrt() * (v as f64).sin()) as f32
            })
            .collect()
    }
}

/// Which generator draws the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RngKind {
    /// PyTorch's CUDA generator (`torch.Generator("cuda")`): what A1111 (its default "GPU"
    /// noise) and the diffusers docs use, so their seeds reproduce here, on any device.
    TorchCuda,
    /// PyTorch's CPU generator (`torch.Generator("cpu")`).
    TorchCpu,
}

impl RngKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "torch-cuda" | "cuda" | "gpu" | "nv" => Some(Self::TorchCuda),
            "torch-cpu" | "cpu" => Some(Self::TorchCpu),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::TorchCuda => "torch-cuda",
            Self::TorchCpu => "torch-cpu",
        }
    }
    /// A1111's "RNG" metadata value, None for its default (GPU).
    pub fn a1111_name(self) -> Option<&'static str> {
        match self {
            Self::TorchCuda => None,
            Self::TorchCpu => Some("CPU"),
        }
    }
}

#[allow(clippy::large_enum_variant)] // one per image; the MT19937 state is 2.5 KB
enum Source {
    Cpu(TorchCpuRng),
    Cuda(TorchCudaRng),
}

/// One image's noise stream: the initial latents and any per-step noise (ancestral and SDE
/// samplers) come from the same generator, in the order diffusers draws them.
pub struct NoiseStream {
    source: Source,
}

impl NoiseStream {
    pub fn new(kind: RngKind, seed: u64) -> Self {
        let source = match kind {
            RngKind::TorchCpu => Source::Cpu(TorchCpuRng::new(seed)),
            RngKind::TorchCuda => Source::Cuda(TorchCudaRng::new(seed)),
        };
        Self { source }
    }
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        match &mut self.source {
            Source::Cpu(r) => r.randn(numel),
            Source::Cuda(r) => r.randn(numel),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_reference_sequence() {
        // The C++ standard requires the 10000th output of mt19937 seeded 5489 to be 4123659995.
        let mut rng = TorchCpuRng::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = rng.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn philox_matches_random123_known_answers() {
        // Known-answer vectors published with Random123 (kat_vectors), philox4x32 10 rounds.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn cuda_noise_is_standard_normal_and_advances_per_draw() {
        let mut r = TorchCudaRng::new(42);
        let a = r.randn(16384);
        let b = r.randn(16384);
        assert_ne!(a[..8], b[..8]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        // Element i depends only on (seed, draw, i): a shorter draw is a prefix.
        assert_eq!(TorchCudaRng::new(42).randn(10), a[..10].to_vec());
    }
}
