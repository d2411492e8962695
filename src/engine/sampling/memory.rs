//! Memory modes: where the weights live while a job runs, and how large its working
//! tensors may grow.
//!
//! - **Offload** (A1111's `--medvram` / `--lowvram`): weights are kept in RAM and copied to
//!   the device while needed. *medvram*: only one of text encoder, UNet and VAE is on the
//!   device at a time. *lowvram*: the UNet itself goes one part at a time (input block,
//!   each down level, middle, each up level, output), copied in for every step.
//! - **Attention slicing**: the attention score matrix is computed for a slice of the
//!   queries at a time, so its size is bounded (same result: each query's softmax is its
//!   own row).
//! - **Tiled VAE decode** (diffusers' `enable_tiling`): the latents are decoded in
//!   overlapping tiles blended together, so decoder memory no longer grows with the image.
//!
//! `Auto` picks from free device memory (free VRAM on CUDA, available RAM on the CPU).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::engine::adapters::patch::WeightTable;
use crate::engine::{Error, Result};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Where the weights live (A1111's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum MemoryMode {
    /// Full when the model and a job fit in free memory, else medvram, else lowvram.
    #[default]
    Auto,
    /// Everything on the device: fastest.
    Full,
    /// One of text encoder / UNet / VAE on the device at a time.
    Medvram,
    /// As medvram, and the UNet one part at a time (slowest, least memory).
    Lowvram,
}

impl MemoryMode {
    pub const ALL: [MemoryMode; 4] = [Self::Auto, Self::Full, Self::Medvram, Self::Lowvram];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "full" | "normal" => Self::Full,
            "medvram" | "med" => Self::Medvram,
            "lowvram" | "low" => Self::Lowvram,
            other => {
                return Err(Error::invalid(
                    "memory mode",
                    format!("{other:?} is not auto, full, medvram or lowvram"),
                ))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Full => "full",
            Self::Medvram => "medvram",
            Self::Lowvram => "lowvram",
        }
    }
}

/// Attention slicing: queries per slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Slicing {
    /// Sliced only when the whole score matrix would exceed the working budget.
    #[default]
    Auto,
    Off,
    /// At most this many queries at a time.
    Queries(usize),
}

impl Slicing {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "off" | "no" | "none" => Ok(Self::Off),
            "on" => Ok(Self::Queries(1024)),
            n => match n.parse::<usize>() {
                Ok(q) if q > 0 => Ok(Self::Queries(q)),
                _ => Err(Error::invalid(
                    "attention slicing",
                    format!("{s:?} is not auto, off, on or a positive number of queries"),
                )),
            },
        }
    }
}

/// Tiled VAE decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Tiling {
    /// Tiled only when the whole decode would exceed the working budget.
    #[default]
    Auto,
    On,
    Off,
}

impl Tiling {
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" | "yes" => Ok(Self::On),
            "off" | "no" => Ok(Self::Off),
            _ => Err(Error::invalid(
                "VAE tiling",
                format!("{s:?} is not auto, on or off"),
            )),
        }
    }
}

/// What the user chose; `Auto` everywhere by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct MemoryOptions {
    pub mode: MemoryMode,
    pub attention: Slicing,
    pub vae_tiling: Tiling,
}

/// The resolved placement of a loaded model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Offload {
    Full,
    Medvram,
    Lowvram,
}

impl Offload {
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Medvram => "medvram",
            Self::Lowvram => "lowvram",
        }
    }
}

/// Room a job needs beside the weights (activations of a 2×4 grid at 512² with sliced
/// attention, one-at-a-time VAE decode, the CUDA context's own allocations).
pub const JOB_HEADROOM: u64 = 2 * GIB;

/// Free memory on `device`: free VRAM for CUDA, available RAM for the CPU.
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => crate::engine::cache::available_ram(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The placement for `mode`: `Auto` on a GPU chooses full when all three components and a
/// job's headroom fit in `free`, medvram when the UNet alone and the headroom fit, else
/// lowvram. On the CPU (`free` is RAM, the weights are in it either way) `Auto` is full.
pub fn choose_offload(
    mode: MemoryMode,
    on_gpu: bool,
    free: Option<u64>,
    sizes: [u64; 3],
) -> Offload {
    match mode {
        MemoryMode::Full => Offload::Full,
        MemoryMode::Medvram => Offload::Medvram,
        MemoryMode::Lowvram => Offload::Lowvram,
        MemoryMode::Auto => match (on_gpu, free) {
            (true, Some(free)) => {
                let all: u64 = sizes.iter().sum();
                if free >= all + JOB_HEADROOM {
                    Offload::Full
                } else if free >= sizes[1] + JOB_HEADROOM {
                    Offload::Medvram
                } else {
                    Offload::Lowvram
                }
            }
            _ => Offload::Full,
        },
    }
}

/// Bytes one job's largest temporary (an attention score matrix, a decoder activation)
/// may take: a quarter of free memory, between 64 MiB and 1 GiB (1 GiB when unknown).
pub fn work_budget(free: Option<u64>) -> u64 {
    free.map(|f| (f / 4).clamp(64 * MIB, GIB)).unwrap_or(GIB)
}

/// Queries per attention slice for a self-attention over `tokens` tokens with `rows`
/// batch rows (CFG doubles them) and `heads` heads; None: the whole matrix at once.
/// Auto slices when scores and probabilities together exceed `budget` bytes; slices are
/// multiples of 64 queries, at least 64.
pub fn attention_slice(
    s: Slicing,
    budget: u64,
    rows: usize,
    heads: usize,
    tokens: usize,
    elt: usize,
) -> Option<usize> {
    match s {
        Slicing::Off => None,
        Slicing::Queries(q) => (q < tokens).then_some(q.max(1)),
        Slicing::Auto => {
            let per_query = (rows * heads * tokens * elt * 2).max(1) as u64;
            let fit = (budget / per_query) as usize;
            if fit >= tokens {
                None
            } else {
                Some((fit / 64 * 64).max(64))
            }
        }
    }
}

/// Whether to decode a `width`×`height` image in tiles. Auto tiles when the decoder's
/// full-resolution activations (about six tensors of 256 channels) or its middle
/// attention matrix (one head over every latent cell, f32) would take more than half of
/// `free` memory (8 GiB assumed when unknown). Tiling changes the picture slightly (tiles
/// are blended), so it is not used where the whole decode fits.
///
/// With `blocked` attention (the CPU in f32) the middle attention builds no matrix.
pub fn tile_decode(
    t: Tiling,
    free: Option<u64>,
    width: usize,
    height: usize,
    elt: usize,
    blocked: bool,
) -> bool {
    match t {
        Tiling::On => true,
        Tiling::Off => false,
        Tiling::Auto => {
            let pixels = (width * height) as u64;
            let activations = pixels * 256 * elt as u64 * 6;
            let cells = pixels / 64;
            let attention = if blocked { 0 } else { cells * cells * 4 };
            activations.max(attention) > free.unwrap_or(8 * GIB) / 2
        }
    }
}

/// The largest image side and batch a request may ask for. Larger requests are refused
/// outright (16384² is 4× A1111's largest slider; a batch of 64 is 8 full grids).
pub const MAX_SIDE: usize = 16384;
pub const MAX_BATCH: usize = 64;

/// The shape of one job, as the memory estimate needs it.
#[derive(Debug, Clone, Copy)]
pub struct JobShape {
    /// Images in the batch.
    pub batch: usize,
    /// UNet batch rows (2 × batch with classifier-free guidance).
    pub rows: usize,
    pub width: usize,
    pub height: usize,
    /// Bytes per element of the model dtype.
    pub elt: usize,
    /// Attention runs blocked (the CPU in f32): no score matrix is built.
    pub blocked_attention: bool,
    /// ControlNets run beside the UNet.
    pub controlnets: usize,
}

/// What a job needs in device memory beside the weights, by part, in bytes. An estimate
/// from the architecture (the tensors alive at the worst moment, rounded up), used to
/// refuse a job before it allocates rather than be killed by the OS half-way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobNeeds {
    /// Latents, noise and the sampler's history of them (f32).
    pub latents: u64,
    /// UNet activations: the skip connections kept for the up path plus the working set
    /// of the largest level (ResNet and transformer temporaries, the GEGLU feed-forward).
    pub unet: u64,
    /// The largest attention score matrix (scores and probabilities) at the chosen slicing.
    pub attention: u64,
    /// The VAE decode of one image (whole or one tile; images are decoded one at a time)
    /// and the batch's decoded pictures.
    pub decode: u64,
}

impl JobNeeds {
    /// Denoising and decoding never overlap: the peak is the larger of the two.
    pub fn peak(&self) -> u64 {
        self.latents + (self.unet + self.attention).max(self.decode)
    }
}

/// The estimate for `shape` on a UNet/VAE pair, with `slice` queries per attention slice
/// (None: whole) and the decode `tiled` or not.
pub fn job_needs(
    unet: &crate::engine::config::UNetConfig,
    vae: &crate::engine::config::VaeConfig,
    shape: JobShape,
    slice: Option<usize>,
    tiled: bool,
) -> JobNeeds {
    let f = vae.scale_factor().max(1);
    let (lh, lw) = ((shape.height / f) as u64, (shape.width / f) as u64);
    let (rows, batch, elt) = (shape.rows as u64, shape.batch as u64, shape.elt as u64);
    let cells = lh * lw;
    let latents = rows * vae.latent_channels as u64 * cells * 4 * 12;
    let mut skips = 0u64;
    let mut working = 0u64;
    let mut attention = 0u64;
    for (l, &c) in unet.block_out_channels.iter().enumerate() {
        let tokens = (lh >> l).max(1) * (lw >> l).max(1);
        let c = c as u64;
        skips += c * tokens * (unet.layers_per_block as u64 + 1);
        let attn = unet.cross_attn.get(l).copied().unwrap_or(false);
        // ResNet: input, norm, conv out, skip; transformer: q, k, v, out and a GEGLU
        // feed-forward of 8c then 4c channels; up blocks concatenate a skip (2c).
        working = working.max(c * tokens * if attn { 24 } else { 10 });
        if attn && !shape.blocked_attention {
            let heads = unet.num_heads.get(l).copied().unwrap_or(8) as u64;
            let q = slice.map_or(tokens, |s| (s as u64).min(tokens));
            attention = attention.max(heads * q * tokens * elt * 2);
        }
    }
    // ControlNets: their own skips while running, and the summed residuals kept for the UNet.
    let control_skips = if shape.controlnets > 0 { 2 * skips } else { 0 };
    let unet_bytes = rows * elt * (skips + control_skips + working);
    let attention = rows * attention;
    // One image through the decoder: ~6 live tensors of the widest full-resolution block,
    // and the mid block's single-head attention over every latent cell (f32: the scores,
    // their scaled copy, exponentials and probabilities). Checked against the peak RSS of
    // the tiny model (CFG, batch 1): 512² estimated 0.56 GB, measured 0.57 GB; 1024²
    // estimated 4.3 GB, measured 4.25 GB.
    let (dh, dw) = if tiled {
        let (_, px) = vae.tile();
        (px.min(shape.height) as u64, px.min(shape.width) as u64)
    } else {
        (shape.height as u64, shape.width as u64)
    };
    let widest = vae.block_out_channels.iter().copied().max().unwrap_or(512) as u64;
    let top = vae.block_out_channels.first().copied().unwrap_or(128) as u64;
    let mid_cells = dh * dw / (f * f) as u64;
    let mid_scores = if shape.blocked_attention {
        0
    } else {
        mid_cells * mid_cells * 4 * 4
    };
    let decode_one = (dh * dw * elt * 6 * (2 * top).max(widest / 2))
        .max(mid_scores + mid_cells * widest * elt * 6);
    // Decoded pictures: f32 [3, h, w] and RGB8 for every image of the batch.
    let pictures = batch * shape.height as u64 * shape.width as u64 * 3 * 5;
    JobNeeds {
        latents,
        unet: unet_bytes,
        attention,
        decode: decode_one + pictures,
    }
}

/// Bytes as "3.2 GiB" / "410 MiB".
pub fn human_bytes(b: u64) -> String {
    if b >= GIB {
        format!("{:.1} GiB", b as f64 / GIB as f64)
    } else {
        format!("{} MiB", b.div_ceil(MIB))
    }
}

/// Peak device memory in use while it runs: a thread polls free VRAM (CUDA) every 100 µs;
/// on the CPU it reads the process's peak resident set (VmHWM), which cannot be reset.
pub struct PeakMemory {
    #[cfg(feature = "cuda")]
    cuda: Option<CudaPoll>,
}

#[cfg(feature = "cuda")]
struct CudaPoll {
    total: u64,
    min_free: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakMemory {
    #[allow(unused_variables)]
    pub fn start(device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use std::sync::atomic::{AtomicBool, AtomicU64};
            let ctx = d.cuda_stream().context().clone();
            if let Ok((free, total)) = ctx.mem_get_info() {
                let min_free = Arc::new(AtomicU64::new(free as u64));
                let stop = Arc::new(AtomicBool::new(false));
                let (m, st) = (min_free.clone(), stop.clone());
                let thread = std::thread::spawn(move || {
                    while !st.load(Ordering::Relaxed) {
                        if let Ok((free, _)) = ctx.mem_get_info() {
                            m.fetch_min(free as u64, Ordering::Relaxed);
                        }
                        std::thread::sleep(std::time::Duration::from_micros(100));
                    }
                });
                return Self {
                    cuda: Some(CudaPoll {
                        total: total as u64,
                        min_free,
                        stop,
                        thread: Some(thread),
                    }),
                };
            }
        }
        Self {
            #[cfg(feature = "cuda")]
            cuda: None,
        }
    }

    /// Bytes in use now (device-wide on CUDA; resident set on the CPU).
    pub fn now(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.cuda {
            return Some(c.total - c.min_free.load(Ordering::Relaxed).min(c.total));
        }
        proc_status_kb("VmRSS:")
    }

    /// Starts a new peak from the current use (CUDA only).
    pub fn reset(&self) {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.cuda {
            c.min_free.store(u64::MAX, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The most bytes in use since start or reset (device-wide on CUDA; the process's
    /// peak resident set on the CPU).
    pub fn peak(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.cuda {
            let free = c.min_free.load(Ordering::Relaxed);
            return (free != u64::MAX).then(|| c.total - free.min(c.total));
        }
        proc_status_kb("VmHWM:")
    }
}

#[cfg(feature = "cuda")]
impl Drop for PeakMemory {
    fn drop(&mut self) {
        if let Some(c) = &mut self.cuda {
            c.stop.store(true, Ordering::Relaxed);
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// This process's minor page faults and CPU time so far (Linux: `/proc/self/stat`, as
/// getrusage reports them), for the benchmark's per-step fault and system-time figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessCounters {
    pub minor_faults: u64,
    pub user_s: f64,
    pub sys_s: f64,
}

pub fn process_counters() -> Option<ProcessCounters> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from the state on.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Clock ticks: 100 per second on every Linux we run on (sysconf(_SC_CLK_TCK)).
    let tick = |i: usize| f.get(i)?.parse::<f64>().ok().map(|t| t / 100.0);
    Some(ProcessCounters {
        minor_faults: f.get(7)?.parse().ok()?,
        user_s: tick(11)?,
        sys_s: tick(12)?,
    })
}

fn proc_status_kb(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A component's weights kept in RAM in the model dtype (read once from their source on
/// first use), copied to the device on every build.
struct HostWeights {
    source: VarBuilder<'static>,
    host: Mutex<HashMap<String, Tensor>>,
}

impl HostWeights {
    fn host(&self) -> MutexGuard<'_, HashMap<String, Tensor>> {
        // A panic while holding the lock cannot leave the map inconsistent (inserts only).
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fetch(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let cached = self.host().get(name).cloned();
        let t = match cached {
            Some(t) if t.dtype() == dtype => t,
            _ => {
                let t = self.source.get_unchecked_dtype(name, dtype)?;
                self.host().insert(name.to_string(), t.clone());
                t
            }
        };
        t.to_device(dev)
    }
}

impl SimpleBackend for HostWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.fetch(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            });
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.contains_tensor(name)
    }
}

/// A VarBuilder for `device` whose tensors come from `source` (built for the CPU) through
/// a RAM copy: the first build reads the source, later builds copy from RAM.
pub fn staged(source: VarBuilder<'static>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let host = HostWeights {
        source,
        host: Mutex::new(HashMap::new()),
    };
    VarBuilder::from_backend(Box::new(host), dtype, device.clone())
}

type Build<M> = Box<dyn Fn(VarBuilder<'static>) -> Result<M> + Send + Sync>;

/// One model component: always on the device, or staged in RAM and built on the device
/// while in use, with the table of the weights it was built from (for merging LoRAs in
/// place: the resident tensors, or the RAM copies a staged component is built from).
pub struct Part<M> {
    place: Place<M>,
    weights: Arc<WeightTable>,
}

enum Place<M> {
    Resident(Arc<M>),
    Staged(Staged<M>),
}

pub struct Staged<M> {
    vb: VarBuilder<'static>,
    build: Build<M>,
    live: Mutex<Option<Arc<M>>>,
    builds: AtomicUsize,
}

impl<M> Part<M> {
    /// A component built on the device; `weights` recorded its tensors.
    pub fn resident(m: M, weights: Arc<WeightTable>) -> Self {
        Part {
            place: Place::Resident(Arc::new(m)),
            weights,
        }
    }

    /// A staged component: `vb` from [`staged`] (its source recorded in `weights`); built
    /// once now, so bad weights fail at load time, then released.
    pub fn staged(
        vb: VarBuilder<'static>,
        build: Build<M>,
        weights: Arc<WeightTable>,
    ) -> Result<Self> {
        build(vb.clone())?;
        Ok(Part {
            place: Place::Staged(Staged {
                vb,
                build,
                live: Mutex::new(None),
                builds: AtomicUsize::new(1),
            }),
            weights,
        })
    }

    /// The component on the device (built from RAM if staged and not there).
    pub fn get(&self) -> Result<Arc<M>> {
        match &self.place {
            Place::Resident(m) => Ok(m.clone()),
            Place::Staged(s) => {
                let mut live = s.live.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(m) = live.as_ref() {
                    return Ok(m.clone());
                }
                let m = Arc::new((s.build)(s.vb.clone())?);
                s.builds.fetch_add(1, Ordering::Relaxed);
                *live = Some(m.clone());
                Ok(m)
            }
        }
    }

    /// The weights it is built from.
    pub fn weights(&self) -> &WeightTable {
        &self.weights
    }

    /// Frees the device copy of a staged component (no-op when resident).
    pub fn release(&self) {
        if let Place::Staged(s) = &self.place {
            s.live.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    pub fn is_staged(&self) -> bool {
        matches!(self.place, Place::Staged(_))
    }

    /// Whether a device copy exists now.
    pub fn on_device(&self) -> bool {
        match &self.place {
            Place::Resident(_) => true,
            Place::Staged(s) => s.live.lock().unwrap_or_else(|p| p.into_inner()).is_some(),
        }
    }

    /// Times the component was built on the device (1 for resident components).
    pub fn builds(&self) -> usize {
        match &self.place {
            Place::Resident(_) => 1,
            Place::Staged(s) => s.builds.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: [u64; 3] = [246 * MIB, 1640 * MIB, 160 * MIB]; // f16 text, UNet, VAE

    #[test]
    fn auto_offload_follows_free_memory() {
        let pick = |free| choose_offload(MemoryMode::Auto, true, Some(free), SD15);
        assert_eq!(pick(24 * GIB), Offload::Full);
        assert_eq!(pick(4 * GIB), Offload::Full); // 2 GiB of weights + 2 GiB headroom
        assert_eq!(pick(3900 * MIB), Offload::Medvram);
        assert_eq!(pick(2 * GIB), Offload::Lowvram);
        // The CPU keeps weights in RAM either way; an explicit choice is kept.
        assert_eq!(
            choose_offload(MemoryMode::Auto, false, Some(MIB), SD15),
            Offload::Full
        );
        assert_eq!(
            choose_offload(MemoryMode::Lowvram, true, Some(80 * GIB), SD15),
            Offload::Lowvram
        );
    }

    #[test]
    fn auto_slicing_bounds_the_score_matrix() {
        // SD 1.5 at 512²: 4096 tokens, 8 heads, f16; a 2×4 grid with CFG is 16 rows:
        // 16·8·4096·2·2 B = 2 MiB per query, 8 GiB unsliced.
        let s = attention_slice(Slicing::Auto, GIB, 16, 8, 4096, 2);
        assert_eq!(s, Some(512));
        assert!(16 * 8 * 4096 * 2 * 2 * 512 <= GIB as usize);
        // Batch 1 with CFG fits in 1 GiB whole.
        assert_eq!(attention_slice(Slicing::Auto, GIB, 2, 8, 4096, 2), None);
        assert_eq!(attention_slice(Slicing::Off, 1, 16, 8, 4096, 2), None);
        assert_eq!(
            attention_slice(Slicing::Queries(100), GIB, 1, 1, 4096, 2),
            Some(100)
        );
        assert_eq!(
            attention_slice(Slicing::Queries(9000), GIB, 1, 1, 4096, 2),
            None
        );
        // Never below 64 queries, even on a tiny budget.
        assert_eq!(attention_slice(Slicing::Auto, 1, 16, 8, 4096, 2), Some(64));
    }

    #[test]
    fn auto_tiling_only_for_large_images() {
        // An 80 GB GPU decodes 1024² whole (≈ 3 GiB), tiles 4096² (a 64 GiB attention matrix).
        let h100 = Some(78 * GIB);
        assert!(!tile_decode(Tiling::Auto, h100, 1024, 1024, 2, false));
        assert!(!tile_decode(Tiling::Auto, h100, 2048, 2048, 2, false));
        assert!(tile_decode(Tiling::Auto, h100, 4096, 4096, 2, false));
        // A 4 GB card tiles 1024².
        assert!(tile_decode(
            Tiling::Auto,
            Some(4 * GIB),
            1024,
            1024,
            2,
            false
        ));
        assert!(!tile_decode(
            Tiling::Auto,
            Some(4 * GIB),
            512,
            512,
            2,
            false
        ));
        assert!(tile_decode(Tiling::On, h100, 64, 64, 2, false));
        assert!(!tile_decode(Tiling::Off, Some(1), 4096, 4096, 2, false));
    }

    #[test]
    fn parse_names() {
        assert_eq!(MemoryMode::parse("medvram").unwrap(), MemoryMode::Medvram);
        assert_eq!(Slicing::parse("256").unwrap(), Slicing::Queries(256));
        assert_eq!(Tiling::parse("on").unwrap(), Tiling::On);
        let e = MemoryMode::parse("tiny").unwrap_err().to_string();
        assert!(e.contains("memory mode") && e.contains("tiny"), "{e}");
        assert!(Slicing::parse("0").is_err());
    }
}
