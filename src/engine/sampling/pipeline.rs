//! Text to image, step by step as diffusers' `StableDiffusionPipeline.__call__`: check
//! inputs; encode the prompt (and the negative prompt for guidance); set up the sampler's
//! timesteps; draw the initial latents (one generator per image: image i uses seed + i);
//! denoise with classifier-free guidance in one batched UNet call per step; decode each
//! image with the VAE. img2img and inpainting start from an encoded picture instead.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::engine::vae_decoder::VaeDecoder;
use candle_core::{DType, Device, Tensor};

use crate::engine::apply::{self, AdapterCache, EmbeddingSet, Networks};
use crate::engine::clip::ClipTextModel;
use crate::engine::control::ControlUse;
use crate::engine::controlnet::ControlNet;
use crate::engine::controlnet_files::{self, ControlNetFiles};
use crate::engine::error::{Context, Error, Result};
use crate::engine::lora::{Component, KeyMap};
use crate::engine::memory::{self, MemoryOptions, Offload, Part};
use crate::engine::metadata::ControlNetUnit;
use crate::engine::model::ModelFiles;
use crate::engine::prompt;
use crate::engine::rng::{NoiseStream, RngKind};
use crate::engine::schedulers::{Scheduler, SchedulerKind, TimestepSpacing};
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::unet::{self, UNet};
use crate::engine::vae_encoder::VaeEncoder;

mod hires;
pub use hires::{Hires, HiresUpscaler};

/// Everything that decides an image.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub batch: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub width: usize,
    pub height: usize,
    pub rng: RngKind,
    /// Replaces the drawn noise, as diffusers' `latents=`: f32 [batch, 4, h/8, w/8] on the CPU.
    pub init_latents: Option<Tensor>,
    /// A1111's variation seed: blends in another seed's noise.
    pub variation: Option<Variation>,
    /// A1111's "Clip skip": 1 = the text encoder's last layer, 2 = the one before, …
    pub clip_skip: usize,
    /// img2img: start from this picture instead of pure noise.
    pub init_image: Option<InitImage>,
    /// Overrides the scheduler config's timestep spacing (flags, model presets).
    pub spacing: Option<TimestepSpacing>,
    /// SDXL's size conditions (ignored by other families).
    pub size_conditions: SizeConditions,
    /// LoRAs (besides the prompt's `<lora:…>` tags) and where tags and embeddings are found.
    pub networks: Networks,
    /// ControlNets steering every image (several: their residuals add up, as diffusers'
    /// MultiControlNet).
    pub controls: Vec<ControlUse>,
    /// A1111's Hires. fix: a second, img2img pass at a larger size.
    pub hires: Option<Hires>,
}

/// SDXL's micro-conditioning (A1111's and diffusers' `original_size`,
/// `crops_coords_top_left`, `target_size`): None sizes are the image's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SizeConditions {
    /// (width, height).
    pub original: Option<(usize, usize)>,
    /// (left, top) in pixels.
    pub crop: (usize, usize),
    /// (width, height).
    pub target: Option<(usize, usize)>,
}

impl SizeConditions {
    /// diffusers' `add_time_ids`: original (h, w), crop (top, left), target (h, w).
    pub fn time_ids(&self, width: usize, height: usize) -> [f32; 6] {
        let (ow, oh) = self.original.unwrap_or((width, height));
        let (tw, th) = self.target.unwrap_or((width, height));
        let (cl, ct) = self.crop;
        [oh, ow, ct, cl, th, tw].map(|v| v as f32)
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// img2img's starting picture, already at the request's size.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// Row-major RGB8, width × height × 3.
    pub rgb: Vec<u8>,
    /// 0..1: how much of the schedule to run (1 = ignore the picture's content).
    pub strength: f64,
    /// Inpainting: grayscale, width × height, white = repaint. With an inpainting model
    /// (9-channel UNet) the model sees the mask; with an ordinary one the known region is
    /// blended back after every step.
    pub mask: Option<Vec<u8>>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            batch: 1,
            steps: 20,
            guidance: 7.5,
            scheduler: SchedulerKind::DpmPp2MKarras,
            width: 512,
            height: 512,
            rng: RngKind::TorchCuda,
            init_latents: None,
            variation: None,
            clip_skip: 1,
            init_image: None,
            spacing: None,
            size_conditions: SizeConditions::default(),
            networks: Networks::default(),
            controls: Vec::new(),
            hires: None,
        }
    }
}

/// A1111's "Variation seed" and "Variation seed strength": the initial noise is the
/// spherical interpolation from the main seed's noise towards the variation seed's.
/// In a batch every image keeps the main seed and image i uses variation seed + i.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variation {
    pub seed: u64,
    /// 0 = the main seed's image, 1 = the variation seed's.
    pub strength: f64,
}

impl GenerateRequest {
    /// The (seed, variation seed) of image `i`, as A1111 assigns them.
    pub fn seeds_of(&self, i: usize) -> (u64, Option<u64>) {
        match self.variation {
            Some(v) if v.strength != 0.0 => (self.seed, Some(v.seed.wrapping_add(i as u64))),
            _ => (self.seed.wrapping_add(i as u64), None),
        }
    }
}

/// A1111's `slerp` on one image's noise [c, h, w]: angles are taken per (channel, column)
/// over the rows (its `dim=1` on a batchless tensor), which is what reproduces its images.
pub fn slerp_a1111(t: f64, low: &[f32], high: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let idx = |ci: usize, y: usize, x: usize| (ci * h + y) * w + x;
    let mut norm_low = vec![0f64; c * w];
    let mut norm_high = vec![0f64; c * w];
    for ci in 0..c {
        for x in 0..w {
            let (mut a, mut b) = (0f64, 0f64);
            for y in 0..h {
                a += (low[idx(ci, y, x)] as f64).powi(2);
                b += (high[idx(ci, y, x)] as f64).powi(2);
            }
            norm_low[ci * w + x] = a.sqrt();
            norm_high[ci * w + x] = b.sqrt();
        }
    }
    let mut dots = vec![0f64; c * w];
    for ci in 0..c {
        for x in 0..w {
            let k = ci * w + x;
            dots[k] = (0..h)
                .map(|y| {
                    low[idx(ci, y, x)] as f64 / norm_low[k] * high[idx(ci, y, x)] as f64
                        / norm_high[k]
                })
                .sum();
        }
    }
    let mut out = vec![0f32; low.len()];
    if dots.iter().sum::<f64>() / dots.len() as f64 > 0.9995 {
        // Nearly parallel: A1111 falls back to a linear blend (with these weights).
        for (o, (l, hi)) in out.iter_mut().zip(low.iter().zip(high)) {
            *o = (*l as f64 * t + *hi as f64 * (1.0 - t)) as f32;
        }
        return out;
    }
    for ci in 0..c {
        for x in 0..w {
            let omega = dots[ci * w + x].clamp(-1.0, 1.0).acos();
            let so = omega.sin();
            let (a, b) = (((1.0 - t) * omega).sin() / so, (t * omega).sin() / so);
            for y in 0..h {
                let i = idx(ci, y, x);
                out[i] = (a * low[i] as f64 + b * high[i] as f64) as f32;
            }
        }
    }
    out
}

/// What inpainting carries through the denoising loop.
struct Inpaint {
    /// [1, 1, h/8, w/8], 1 = repaint.
    mask: Tensor,
    /// The masked picture's latents (inpainting models' extra input), [n, 4, h/8, w/8].
    masked_latents: Tensor,
    /// The picture's latents and the initial noise (the legacy blend re-noises them).
    image_latents: Tensor,
    noise: Tensor,
}

/// The text conditioning of one job.
enum Conditioning {
    /// No guidance: the prompt alone.
    Single(Embeds),
    /// Negative and positive prompt stacked in one batch (one UNet call per step).
    Batched(Embeds),
    /// Different lengths: one UNet call each.
    Separate { uncond: Embeds, cond: Embeds },
}

/// What the UNet is conditioned on for one prompt: the text context [rows, tokens, width]
/// and, for SDXL, the added conditions [rows, pooled + 6] (pooled text embedding, then the
/// six size numbers).
#[derive(Clone)]
pub struct Embeds {
    pub context: Tensor,
    pub added: Option<Tensor>,
}

impl Embeds {
    fn repeat(&self, n: usize) -> Result<Self> {
        Ok(Self {
            context: self.context.repeat((n, 1, 1)).ctx("context")?,
            added: self
                .added
                .as_ref()
                .map(|a| a.repeat((n, 1)))
                .transpose()
                .ctx("added conditions")?,
        })
    }

    fn cat(a: &Self, b: &Self) -> Result<Self> {
        Ok(Self {
            context: Tensor::cat(&[&a.context, &b.context], 0).ctx("context")?,
            added: match (&a.added, &b.added) {
                (Some(x), Some(y)) => Some(Tensor::cat(&[x, y], 0).ctx("added conditions")?),
                _ => None,
            },
        })
    }

    /// diffusers' `force_zeros_for_empty_prompt`: zeros shaped like `like`, keeping its
    /// size conditions (the negative prompt's sizes equal the prompt's).
    fn zeros_like(like: &Self) -> Result<Self> {
        let added = match &like.added {
            None => None,
            Some(a) => {
                let p = a.dim(1).ctx("added conditions")? - 6;
                let zeros = a.narrow(1, 0, p).and_then(|x| x.zeros_like());
                let sizes = a.narrow(1, p, 6);
                Some(
                    zeros
                        .and_then(|z| Tensor::cat(&[&z, &sizes?], 1))
                        .ctx("added conditions")?,
                )
            }
        };
        Ok(Self {
            context: like.context.zeros_like().ctx("context")?,
            added,
        })
    }
}

/// A generation between steps (see [`StableDiffusion::begin`]).
pub struct Run {
    req: GenerateRequest,
    context: Conditioning,
    scheduler: Box<dyn Scheduler>,
    latents: Tensor,
    streams: Vec<NoiseStream>,
    inpaint: Option<Inpaint>,
    /// The first timestep index (img2img starts part-way).
    start: usize,
    /// The next timestep index.
    next: usize,
    nine_channels: bool,
    /// Attention slicing for this run's UNet calls.
    attention_slice: Option<usize>,
    pub timings: Timings,
    /// The LoRAs and embeddings it uses.
    pub adapters: AdapterReport,
    /// Its ControlNets, each with its control map's embedding.
    controls: Vec<RunControl>,
    /// The Hires. fix pass still to come, and its step count.
    hires: Option<Hires>,
    hires_steps: usize,
    /// UNet batch rows (2 × batch with guidance).
    rows: usize,
    /// The size of the pass now running (the request's, or the Hires. fix size).
    size: (usize, usize),
    /// Steps run in earlier passes.
    offset: usize,
}

/// One ControlNet of a run.
struct RunControl {
    net: Arc<Part<ControlNet>>,
    /// The control map through the hint embedding, [1, c, h/f, w/f] (the same every step).
    hint: Tensor,
    unit: ControlUse,
    /// Its metadata entry.
    meta: ControlNetUnit,
}

/// A ControlNet kept loaded between jobs, with what identifies its file.
struct LoadedControl {
    spec: String,
    stamp: Option<(u64, std::time::SystemTime)>,
    name: String,
    hash: String,
    net: Arc<Part<ControlNet>>,
}

impl Run {
    /// True when every step (of both passes with Hires. fix) has run: call
    /// [`StableDiffusion::finish`].
    pub fn is_done(&self) -> bool {
        self.next >= self.scheduler.timesteps().len() && self.hires.is_none()
    }
    /// The number of denoising steps (UNet rounds) this run makes, both passes.
    pub fn total(&self) -> usize {
        let pending = if self.hires.is_some() {
            self.hires_steps
        } else {
            0
        };
        self.offset + self.scheduler.timesteps().len() - self.start + pending
    }
    /// The request it runs.
    pub fn request(&self) -> &GenerateRequest {
        &self.req
    }
}

/// What one [`StableDiffusion::step`] reports.
pub struct RunStep {
    /// 1-based.
    pub step: usize,
    pub total: usize,
    /// The sampler's estimate of the clean latents [batch, 4, h/8, w/8] (for previews).
    pub pred_original: Option<Tensor>,
}

/// Standard-normal noise for every image, each from its own stream.
fn draw_noise(
    streams: &mut [NoiseStream],
    shape: (usize, usize, usize, usize),
    dev: &Device,
) -> Result<Tensor> {
    let per_image = shape.1 * shape.2 * shape.3;
    let data: Vec<f32> = streams
        .iter_mut()
        .flat_map(|s| s.randn(per_image))
        .collect();
    Tensor::from_vec(data, shape, dev).ctx("noise")
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub seed: u64,
    /// The variation seed this image blended in, if any.
    pub variation_seed: Option<u64>,
    pub width: usize,
    pub height: usize,
    /// Row-major RGB8.
    pub rgb: Vec<u8>,
    /// A1111's "Lora hashes" and "TI hashes" for the adapters the job used.
    pub lora_hashes: Vec<(String, String)>,
    pub ti_hashes: Vec<(String, String)>,
    /// The ControlNet extension's "ControlNet i" entries.
    pub controlnets: Vec<ControlNetUnit>,
}

/// The adapters a run uses, as the metadata and the status line report them.
#[derive(Debug, Clone, Default)]
pub struct AdapterReport {
    pub lora_hashes: Vec<(String, String)>,
    pub ti_hashes: Vec<(String, String)>,
    /// Things the user should know (tags not applied, modules that matched nothing).
    pub warnings: Vec<String>,
    /// Weight tensors rewritten to get the LoRA set this job asked for (0 when unchanged).
    pub rewritten: usize,
}

/// Progress of a running job, handed to the caller after every denoising step.
pub struct StepInfo<'a> {
    /// 1-based.
    pub step: usize,
    pub total: usize,
    /// The sampler's current estimate of the clean latents [batch, 4, h/8, w/8].
    pub pred_original: Option<&'a Tensor>,
}

/// Time spent in each phase of the last job, in seconds.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub encode: f64,
    pub steps: Vec<f64>,
    pub decode: f64,
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub files: ModelFiles,
    pub device: Device,
    pub dtype: DType,
    tokenizer: ClipTokenizer,
    text_encoder: Arc<Part<ClipTextModel>>,
    /// SDXL's second tokenizer and text encoder.
    tokenizer_2: Option<ClipTokenizer>,
    text_encoder_2: Option<Arc<Part<ClipTextModel>>>,
    unet: Arc<Part<UNet>>,
    vae: Arc<Part<VaeDecoder>>,
    /// Where the components live (fixed at load).
    pub offload: Offload,
    /// Attention slicing and VAE tiling for the next jobs.
    memory: Mutex<MemoryOptions>,
    vae_f32: OnceLock<Result<VaeDecoder, String>>,
    vae_encoder: OnceLock<Result<VaeEncoder, String>>,
    pub last_timings: Timings,
    /// Parsed LoRA and embedding files.
    adapters: Mutex<AdapterCache>,
    /// At most this many bytes count as free for the memory plan (None: what the device says).
    free_limit: Mutex<Option<u64>>,
    /// The ControlNets of the last job (kept for the next).
    controlnets: Mutex<Vec<LoadedControl>>,
}

/// diffusers' img2img start: `steps - min(int(steps·strength), steps)` steps skipped, times
/// the sampler's order, within the `len` timesteps.
fn img2img_start(steps: usize, strength: f64, order: usize, len: usize) -> usize {
    let skipped = steps - ((steps as f64 * strength).floor() as usize).min(steps);
    (skipped * order).min(len)
}

/// 0..=1 inclusive (NaN is outside).
fn in_unit_range(what: &'static str, x: f64) -> Result<()> {
    if (0.0..=1.0).contains(&x) {
        Ok(())
    } else {
        Err(Error::invalid(what, format!("{x} is outside 0..1")))
    }
}

/// Whether every value of `t` is finite (one reduction: a NaN or infinity anywhere makes the
/// sum non-finite).
fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.sum_all()
        .and_then(|s| s.to_dtype(DType::F32))
        .and_then(|s| s.to_scalar::<f32>())
        .ctx("finite check")?
        .is_finite())
}

fn dims_ok(what: &'static str, v: usize, multiple: usize) -> Result<()> {
    if v == 0 || !v.is_multiple_of(multiple) {
        return Err(Error::invalid(
            what,
            format!("{v} is not a positive multiple of {multiple}"),
        ));
    }
    if v > memory::MAX_SIDE {
        return Err(Error::invalid(
            what,
            format!("{v} is larger than {} pixels", memory::MAX_SIDE),
        ));
    }
    Ok(())
}

impl StableDiffusion {
    pub fn load(files: ModelFiles, device: Device, dtype: DType) -> Result<Self> {
        Self::load_offloaded(files, device, dtype, Offload::Full)
    }

    /// Loads with the components placed as `offload` says (see [`memory`]).
    pub fn load_offloaded(
        files: ModelFiles,
        device: Device,
        dtype: DType,
        offload: Offload,
    ) -> Result<Self> {
        let text_encoder = Arc::new(files.text_part(dtype, &device, offload)?);
        let unet = Arc::new(files.unet_part(dtype, &device, offload)?);
        let vae = Arc::new(files.vae_part(dtype, &device, offload)?);
        Self::from_parts(files, device, dtype, text_encoder, unet, vae, offload)
    }

    /// A model from components loaded elsewhere (the model cache shares identical ones).
    pub fn from_parts(
        files: ModelFiles,
        device: Device,
        dtype: DType,
        text_encoder: Arc<Part<ClipTextModel>>,
        unet: Arc<Part<UNet>>,
        vae: Arc<Part<VaeDecoder>>,
        offload: Offload,
    ) -> Result<Self> {
        let tokenizer = files.load_tokenizer()?;
        let tokenizer_2 = files.load_tokenizer_2()?;
        let text_encoder_2 = files.text2_part(dtype, &device, offload)?.map(Arc::new);
        // Built: the mapped files' pages need not stay resident (see the function).
        crate::engine::weights::release_mapped_pages();
        Ok(Self {
            files,
            device,
            dtype,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            vae,
            offload,
            memory: Mutex::new(MemoryOptions::default()),
            vae_f32: OnceLock::new(),
            vae_encoder: OnceLock::new(),
            last_timings: Timings::default(),
            adapters: Mutex::new(AdapterCache::default()),
            free_limit: Mutex::new(None),
            controlnets: Mutex::new(Vec::new()),
        })
    }

    pub fn root(&self) -> &PathBuf {
        &self.files.root
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The UNet on the device (with medvram, the text encoder and VAE leave it first).
    pub fn unet(&self) -> Result<Arc<UNet>> {
        self.release_text_encoders();
        self.vae.release();
        self.unet.get()
    }

    /// medvram: both text encoders leave the device.
    fn release_text_encoders(&self) {
        self.text_encoder.release();
        if let Some(t) = &self.text_encoder_2 {
            t.release();
        }
    }

    /// The VAE on the device (with medvram, the text encoder and UNet leave it first).
    pub fn vae(&self) -> Result<Arc<VaeDecoder>> {
        self.release_text_encoders();
        self.unet.release();
        self.vae.get()
    }

    fn text_encoder(&self) -> Result<Arc<ClipTextModel>> {
        self.unet.release();
        self.vae.release();
        self.text_encoder.get()
    }

    /// The prompt's conditioning as this model's family takes it: one encoder's last
    /// hidden state (SD 1.x/2.x), or SDXL's two penultimate states side by side with the
    /// pooled second-encoder embedding and the size conditions.
    pub fn encode(&self, text: &str, req: &GenerateRequest) -> Result<Embeds> {
        Ok(self.encode_with(text, req, &EmbeddingSet::empty())?.0)
    }

    /// [`Self::encode`] with textual-inversion embeddings; also returns the indices of the
    /// embeddings of `set` the text used.
    pub fn encode_with(
        &self,
        text: &str,
        req: &GenerateRequest,
        set: &EmbeddingSet,
    ) -> Result<(Embeds, Vec<usize>)> {
        let (Some(tok2), Some(te2)) = (&self.tokenizer_2, &self.text_encoder_2) else {
            let (context, used) = self.encode_prompt_with(text, req.clip_skip, set)?;
            return Ok((
                Embeds {
                    context,
                    added: None,
                },
                used,
            ));
        };
        let t1 = prompt::tokenize_with(&self.tokenizer, text, set.words(0))?;
        let t2 = prompt::tokenize_with(tok2, text, set.words(1))?;
        if t1.chunks.len() != t2.chunks.len() {
            return Err(Error::invalid(
                "prompt",
                "the two SDXL tokenizers split it into different chunks",
            ));
        }
        let e1 = self.text_encoder()?;
        let e2 = te2.get()?;
        let mut parts = Vec::with_capacity(t1.chunks.len());
        let mut pooled = None;
        for (c1, c2) in t1.chunks.iter().zip(&t2.chunks) {
            let ids = |c: &prompt::Chunk| {
                Tensor::new(c.ids.as_slice(), &self.device)
                    .and_then(|t| t.unsqueeze(0))
                    .ctx("prompt ids")
            };
            let f1 = self.fixes(set, c1, 0, e1.hidden_size(), true)?;
            let f2 = self.fixes(set, c2, 1, e2.hidden_size(), true)?;
            let (h1, _) = e1
                .forward_hidden_fixed(&ids(c1)?, req.clip_skip, &as_refs(&f1))
                .ctx("text encoder")?;
            let (h2, p) = e2
                .forward_hidden_fixed(&ids(c2)?, req.clip_skip, &as_refs(&f2))
                .ctx("text encoder 2")?;
            for (h, files, name) in [
                (&h1, &self.files.text_encoder_weights, "text encoder"),
                (&h2, &self.text2_files(), "text encoder 2"),
            ] {
                if !all_finite(h)? {
                    return Err(self.non_finite(name, files, "output".into()));
                }
            }
            let weigh = |h: Tensor, w: &[f32]| {
                if w.iter().all(|&x| x == 1.0) {
                    Ok(h)
                } else {
                    emphasize(&h, w)
                }
            };
            let h = Tensor::cat(&[weigh(h1, &c1.weights)?, weigh(h2, &c2.weights)?], 2)
                .ctx("sdxl context")?;
            parts.push(h);
            // A1111 and diffusers pool the first chunk only.
            if pooled.is_none() {
                pooled = p;
            }
        }
        let context = Tensor::cat(&parts, 1).ctx("prompt chunks")?;
        let pooled = pooled.ok_or_else(|| Error::invalid("prompt", "no pooled embedding"))?;
        let sizes = req.size_conditions.time_ids(req.width, req.height);
        let time_ids = Tensor::new(&sizes, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .and_then(|t| t.to_dtype(pooled.dtype()))
            .ctx("size conditions")?;
        Ok((
            Embeds {
                context,
                added: Some(Tensor::cat(&[&pooled, &time_ids], 1).ctx("added conditions")?),
            },
            t1.used,
        ))
    }

    /// A chunk's embedding vectors for encoder `which` of width `width`.
    fn fixes(
        &self,
        set: &EmbeddingSet,
        chunk: &prompt::Chunk,
        which: usize,
        width: usize,
        dual: bool,
    ) -> Result<Vec<(usize, Tensor)>> {
        chunk
            .fixes
            .iter()
            .map(|&(at, e)| Ok((at, set.get(e)?.for_encoder(which, width, dual)?.clone())))
            .collect()
    }

    fn text2_files(&self) -> Vec<PathBuf> {
        self.files
            .text_encoder_2
            .as_ref()
            .map(|t| t.weights.clone())
            .unwrap_or_default()
    }

    /// The components, for tests and the status line: (text encoder, UNet, VAE).
    pub fn parts(&self) -> (&Part<ClipTextModel>, &Part<UNet>, &Part<VaeDecoder>) {
        (&self.text_encoder, &self.unet, &self.vae)
    }

    pub fn memory_options(&self) -> MemoryOptions {
        *self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attention slicing and VAE tiling for the jobs that begin from now on.
    pub fn set_memory_options(&self, m: MemoryOptions) {
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }

    /// The memory plan of a job with `rows` UNet batch rows: queries per attention slice
    /// (the largest self-attention checked against the working budget) and whether the
    /// decode is tiled, with the estimate of what it needs. Refuses the job, before anything
    /// is allocated, when that is more than the device has free.
    pub fn plan_memory(&self, req: &GenerateRequest, rows: usize) -> Result<Option<usize>> {
        let c = &self.files.unet_config;
        let f = self.scale_factor();
        let (lh, lw) = (req.height / f, req.width / f);
        let free = memory::free_memory(&self.device);
        let free = match *self.free_limit.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(limit) => Some(free.map_or(limit, |f| f.min(limit))),
            None => free,
        };
        let opts = self.memory_options();
        let elt = self.dtype.size_in_bytes();
        let blocked = self.blocked_attention();
        let slice = (0..c.block_out_channels.len())
            .filter(|_| !blocked)
            .find(|&i| c.cross_attn[i])
            .and_then(|level| {
                let tokens = (lh >> level).max(1) * (lw >> level).max(1);
                memory::attention_slice(
                    opts.attention,
                    memory::work_budget(free),
                    rows,
                    c.num_heads[level],
                    tokens,
                    elt,
                )
            });
        let tiled = memory::tile_decode(opts.vae_tiling, free, req.width, req.height, elt, blocked);
        let shape = memory::JobShape {
            batch: req.batch,
            rows,
            width: req.width,
            height: req.height,
            elt,
            blocked_attention: blocked,
            controlnets: req.controls.len(),
        };
        let needs = memory::job_needs(c, &self.files.vae_config, shape, slice, tiled);
        let Some(free) = free else {
            return Ok(slice);
        };
        if needs.peak() <= free {
            return Ok(slice);
        }
        let mut advice = vec![if req.batch > 1 {
            "a smaller batch or image size"
        } else {
            "a smaller image size"
        }
        .to_string()];
        if needs.attention > needs.unet / 2 {
            advice.push(match opts.attention {
                memory::Slicing::Off => "attention slicing on".to_string(),
                _ => "a smaller attention slice (e.g. 64)".to_string(),
            });
        }
        if needs.decode > needs.unet + needs.attention && !tiled {
            advice.push("tiled VAE decode on".to_string());
        }
        let on_gpu = !matches!(self.device, Device::Cpu);
        if on_gpu && self.offload == memory::Offload::Full {
            advice.push("Memory: medvram or lowvram".to_string());
        }
        Err(Error::WontFit {
            what: format!(
                "{} image{} at {}x{}",
                req.batch,
                if req.batch == 1 { "" } else { "s" },
                req.width,
                req.height
            ),
            needs: format!(
                "{} (UNet {}, attention {}, VAE decode {})",
                memory::human_bytes(needs.peak()),
                memory::human_bytes(needs.unet),
                memory::human_bytes(needs.attention),
                memory::human_bytes(needs.decode)
            ),
            place: if on_gpu { "GPU memory" } else { "RAM" },
            free: memory::human_bytes(free),
            advice: format!("try {}", advice.join(", or ")),
        })
    }

    /// The error for a component whose output holds NaN or infinity: its weights do, or it
    /// overflows in reduced precision.
    fn non_finite(&self, component: &'static str, files: &[PathBuf], what: String) -> Error {
        let hint = if self.dtype == DType::F32 {
            String::new()
        } else {
            format!(", or it overflows in {:?} (try f32)", self.dtype)
        };
        Error::Weights {
            component,
            path: files.first().cloned().unwrap_or_default(),
            reason: format!("its {what} is not finite (NaN or infinity): the weights hold non-finite values{hint}"),
        }
    }

    /// Pixels per latent cell.
    /// True for inpainting models (UNet input = latents + mask + masked-image latents).
    pub fn is_inpainting_model(&self) -> bool {
        self.files.unet_config.in_channels != self.files.vae_config.latent_channels
    }

    pub fn scale_factor(&self) -> usize {
        self.files.vae_config.scale_factor()
    }

    /// Prompt → `last_hidden_state` [1, 77, dim] in the model dtype. Warns on truncation.
    pub fn encode_prompt(&self, text: &str, clip_skip: usize) -> Result<Tensor> {
        Ok(self
            .encode_prompt_with(text, clip_skip, &EmbeddingSet::empty())?
            .0)
    }

    /// [`Self::encode_prompt`] with embeddings, and the indices of those used.
    fn encode_prompt_with(
        &self,
        text: &str,
        clip_skip: usize,
        set: &EmbeddingSet,
    ) -> Result<(Tensor, Vec<usize>)> {
        let tokens = prompt::tokenize_with(&self.tokenizer, text, set.words(0))?;
        let text_encoder = self.text_encoder()?;
        let mut parts = Vec::with_capacity(tokens.chunks.len());
        for chunk in &tokens.chunks {
            let ids = Tensor::new(chunk.ids.as_slice(), &self.device)
                .and_then(|t| t.unsqueeze(0))
                .ctx("prompt ids")?;
            let fixes = self.fixes(set, chunk, 0, text_encoder.hidden_size(), false)?;
            let z = text_encoder
                .forward_skip_fixed(&ids, clip_skip, &as_refs(&fixes))
                .ctx("text encoder")?;
            if !all_finite(&z)? {
                return Err(self.non_finite(
                    "text encoder",
                    &self.files.text_encoder_weights,
                    "output".into(),
                ));
            }
            parts.push(if chunk.weights.iter().all(|&w| w == 1.0) {
                z
            } else {
                emphasize(&z, &chunk.weights)?
            });
        }
        Ok((Tensor::cat(&parts, 1).ctx("prompt chunks")?, tokens.used))
    }

    /// Whether attention runs without a score matrix here: nothing for attention slicing to
    /// bound.
    fn blocked_attention(&self) -> bool {
        crate::engine::attention::score_free_on(&self.device, self.dtype)
    }

    /// Plan jobs as if at most `limit` bytes were free (None: what the device reports).
    pub fn set_free_memory_limit(&self, limit: Option<u64>) {
        *self.free_limit.lock().unwrap_or_else(|p| p.into_inner()) = limit;
    }

    /// Bytes of original weights kept aside while LoRAs are merged.
    pub fn kept_original_bytes(&self) -> u64 {
        let mut n = self.text_encoder.weights().kept_bytes() + self.unet.weights().kept_bytes();
        if let Some(t) = &self.text_encoder_2 {
            n += t.weights().kept_bytes();
        }
        n
    }

    /// The model's weights by LoRA key.
    fn key_map(&self) -> KeyMap {
        let mut keys = KeyMap::new(self.files.family, self.files.unet_config.layers_per_block);
        keys.add(Component::Text, self.text_encoder.weights().shapes());
        if let Some(t) = &self.text_encoder_2 {
            keys.add(Component::Text2, t.weights().shapes());
        }
        keys.add(Component::Unet, self.unet.weights().shapes());
        keys
    }

    /// Puts the job's LoRAs on the weights (taking off those it does not use) and finds its
    /// embeddings: the prompt without tags, the embeddings the prompts may use, the report.
    pub fn prepare_adapters(
        &self,
        req: &GenerateRequest,
    ) -> Result<(String, EmbeddingSet, AdapterReport)> {
        let resolved = apply::resolve_loras(&req.prompt, &req.negative_prompt, &req.networks)?;
        let mut cache = self.adapters.lock().unwrap_or_else(|p| p.into_inner());
        // With no LoRA the key map (every weight's name) is not needed: only restoring is.
        let terms = if resolved.uses.is_empty() {
            apply::LoraTerms::default()
        } else {
            apply::lora_terms(&mut cache, &resolved.uses, &self.key_map())?
        };
        let mut report = AdapterReport {
            lora_hashes: terms.hashes,
            warnings: resolved.warnings,
            ..Default::default()
        };
        report.warnings.extend(terms.warnings);
        let empty = HashMap::new();
        let want = |c| terms.want.get(&c).unwrap_or(&empty);
        let apply_to =
            |c: Component, part_weights: &crate::engine::patch::WeightTable| -> Result<usize> {
                part_weights
                    .apply(want(c))
                    .map(|a| a.rewritten)
                    .ctx(&format!("merging LoRAs into the {}", c.name()))
            };
        let n = apply_to(Component::Text, self.text_encoder.weights())?;
        if n > 0 {
            self.text_encoder.release();
        }
        report.rewritten += n;
        if let Some(t) = &self.text_encoder_2 {
            let n = apply_to(Component::Text2, t.weights())?;
            if n > 0 {
                t.release();
            }
            report.rewritten += n;
        }
        let n = apply_to(Component::Unet, self.unet.weights())?;
        if n > 0 {
            self.unet.release();
        }
        report.rewritten += n;
        if report.rewritten > 0 {
            // Originals were read back from the mapped files.
            crate::engine::weights::release_mapped_pages();
        }
        let set = EmbeddingSet::for_prompts(
            &mut cache,
            &req.networks.embedding_dirs,
            &[&resolved.prompt, &req.negative_prompt],
            [Some(&self.tokenizer), self.tokenizer_2.as_ref()],
        )?;
        Ok((resolved.prompt, set, report))
    }

    pub fn encode_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.text_encoder()?
            .forward(&ids.to_device(&self.device).ctx("ids")?)
            .ctx("text encoder")
    }

    /// The job's ControlNets: each opened, checked against this UNet, loaded (or kept from
    /// the last job while its file is unchanged; memory checked before loading) and its
    /// control map embedded once for the whole run.
    fn prepare_controls(&self, req: &GenerateRequest) -> Result<Vec<RunControl>> {
        let mut loaded = self.controlnets.lock().unwrap_or_else(|p| p.into_inner());
        let mut old: Vec<LoadedControl> = std::mem::take(&mut *loaded);
        let mut out = Vec::with_capacity(req.controls.len());
        for (i, unit) in req.controls.iter().enumerate() {
            let stamp = std::fs::metadata(&unit.model)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            let same = |l: &LoadedControl| l.spec == unit.model && l.stamp == stamp;
            let at = match loaded.iter().position(same) {
                Some(at) => at,
                None => {
                    let entry = match old.iter().position(same) {
                        Some(p) => old.swap_remove(p),
                        None => {
                            old.clear(); // free what this job does not use first
                            self.load_controlnet(&unit.model, stamp, i)?
                        }
                    };
                    loaded.push(entry);
                    loaded.len() - 1
                }
            };
            let l = &loaded[at];
            let net = l.net.get()?;
            let image = crate::engine::controlnet::image_tensor(
                &unit.image,
                req.width,
                req.height,
                self.dtype,
                &self.device,
            )
            .ctx("control image")?;
            let hint = net.embed_hint(&image).ctx("controlnet hint")?;
            out.push(RunControl {
                net: l.net.clone(),
                hint,
                unit: unit.clone(),
                meta: ControlNetUnit {
                    module: unit.module.clone(),
                    model: format!("{} [{}]", l.name, l.hash),
                    weight: unit.scale,
                    guidance_start: unit.start,
                    guidance_end: unit.end,
                },
            });
        }
        Ok(out)
    }

    fn load_controlnet(
        &self,
        spec: &str,
        stamp: Option<(u64, std::time::SystemTime)>,
        i: usize,
    ) -> Result<LoadedControl> {
        let mut files = ControlNetFiles::open(spec, self.dtype != DType::F32)?;
        files.check_fits(&self.files.unet_config, self.scale_factor())?;
        files.adapt_to(&self.files.unet_config);
        let need = files.loaded_bytes(self.dtype)?;
        let place_free = match self.offload {
            memory::Offload::Full => memory::free_memory(&self.device),
            _ => memory::free_memory(&Device::Cpu),
        };
        let limit = *self.free_limit.lock().unwrap_or_else(|p| p.into_inner());
        let free = match (place_free, limit) {
            (Some(f), Some(l)) => Some(f.min(l)),
            (f, l) => f.or(l),
        };
        if let Some(free) = free {
            if need > free {
                return Err(Error::WontFit {
                    what: format!("ControlNet {i} ({})", files.name),
                    needs: memory::human_bytes(need),
                    place: if matches!(self.device, Device::Cpu) {
                        "RAM"
                    } else {
                        "GPU memory"
                    },
                    free: memory::human_bytes(free),
                    advice: "try fewer ControlNets, a smaller model, or Memory: medvram".into(),
                });
            }
        }
        let net = Arc::new(files.load(self.dtype, &self.device, self.offload)?);
        crate::engine::weights::release_mapped_pages();
        let hash = controlnet_files::legacy_hash(&files.weights)?;
        Ok(LoadedControl {
            spec: spec.to_string(),
            stamp,
            name: files.name,
            hash,
            net,
        })
    }

    /// The ControlNets kept loaded: `NAME [hash]`, whether staged in RAM (medvram,
    /// lowvram) and whether a device copy exists now.
    pub fn loaded_controlnets(&self) -> Vec<(String, bool, bool)> {
        self.controlnets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|l| {
                (
                    format!("{} [{}]", l.name, l.hash),
                    l.net.is_staged(),
                    l.net.on_device(),
                )
            })
            .collect()
    }

    /// The request's sampler, built from the model's scheduler config as diffusers runs it.
    fn scheduler_for(&self, req: &GenerateRequest) -> Result<Box<dyn Scheduler>> {
        let config = self
            .files
            .scheduler_config
            .clone()
            .with_spacing(req.spacing);
        req.scheduler.build(&config, req.steps)
    }

    /// Checks a request against this model before any work starts.
    pub fn check(&self, req: &GenerateRequest) -> Result<()> {
        let f = self.scale_factor();
        dims_ok("width", req.width, f)?;
        dims_ok("height", req.height, f)?;
        if req.batch == 0 {
            return Err(Error::invalid("batch", "must be at least 1"));
        }
        if req.batch > memory::MAX_BATCH {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} is more than {} images in one run; run several",
                    req.batch,
                    memory::MAX_BATCH
                ),
            ));
        }
        if req.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(Error::invalid(
                "guidance",
                format!("{} is not a finite number ≥ 0", req.guidance),
            ));
        }
        if let Some(init) = &req.init_image {
            in_unit_range("strength", init.strength)?;
        }
        if let Some(v) = &req.variation {
            in_unit_range("variation strength", v.strength)?;
        }
        if let Some(h) = &req.hires {
            self.check_hires(req, h)?;
            if self.hires_steps(req)? == 0 {
                return Err(Error::invalid(
                    "hires strength",
                    format!(
                        "{} of {} steps runs no step: raise the strength or the hires steps",
                        h.strength,
                        h.steps.unwrap_or(req.steps)
                    ),
                ));
            }
        }
        for (i, c) in req.controls.iter().enumerate() {
            c.check(i)?;
            if c.image.len() != req.width * req.height * 3 {
                return Err(Error::invalid(
                    "control image",
                    format!(
                        "ControlNet {i}: the map is {} bytes, not {}x{} RGB",
                        c.image.len(),
                        req.width,
                        req.height
                    ),
                ));
            }
        }
        if let Some(l) = &req.init_latents {
            let want = [
                req.batch,
                self.files.vae_config.latent_channels,
                req.height / f,
                req.width / f,
            ];
            if l.dims() != want {
                return Err(Error::invalid(
                    "init latents",
                    format!(
                        "shape {:?}, expected {:?} for batch {} at {}x{}",
                        l.dims(),
                        want,
                        req.batch,
                        req.width,
                        req.height
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs a whole job. `on_step` sees every step; returning an error (e.g.
    /// [`Error::Cancelled`]) stops the job there.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(StepInfo) -> Result<()>,
    ) -> Result<Vec<GeneratedImage>> {
        let mut run = self.begin(req)?;
        while !run.is_done() {
            let out = self.step(&mut run)?;
            on_step(StepInfo {
                step: out.step,
                total: out.total,
                pred_original: out.pred_original.as_ref(),
            })?;
        }
        let (images, timings) = self.finish(run)?;
        self.last_timings = timings;
        Ok(images)
    }

    /// Steps 1–4: checks the request, encodes the prompt, sets up the sampler and the
    /// initial latents. The returned [`Run`] is advanced by [`Self::step`] and ended by
    /// [`Self::finish`], so a caller can interleave the steps of several runs (compare mode).
    pub fn begin(&self, req: &GenerateRequest) -> Result<Run> {
        // 1. Check inputs, and that the job fits in memory (before allocating any of it).
        self.check(req)?;
        let guided = req.guidance > 1.0;
        let rows = if guided { 2 * req.batch } else { req.batch };
        let attention_slice = self.plan_memory(req, rows)?;
        if let Some(h) = &req.hires {
            // The large pass must fit too: refused now, before anything is allocated.
            self.plan_memory(&h.request(req), rows)?;
        }
        let hires_steps = self.hires_steps(req)?;
        let f = self.scale_factor();
        let (lh, lw) = (req.height / f, req.width / f);
        let channels = self.files.vae_config.latent_channels;
        let n = req.batch;
        let dev = self.device.clone();
        let mut timings = Timings::default();

        // 2. Encode the prompt; guidance > 1 adds the negative prompt as a batch half.
        let t0 = Instant::now();
        let (prompt_text, set, mut adapters) = self.prepare_adapters(req)?;
        let (cond1, mut used) = self.encode_with(&prompt_text, req, &set)?;
        let cond = cond1.repeat(n)?;
        // Prompts of different lengths (in 77-token chunks) cannot share a batch: then the
        // negative prompt gets its own UNet call, as A1111 does by default.
        let context = if guided {
            let uncond = if self.files.force_zeros_for_empty_prompt
                && req.negative_prompt.trim().is_empty()
            {
                Embeds::zeros_like(&cond1)?
            } else {
                let (e, u) = self.encode_with(&req.negative_prompt, req, &set)?;
                used.extend(u);
                e
            }
            .repeat(n)?;
            if uncond.context.dim(1).ctx("context")? == cond.context.dim(1).ctx("context")? {
                Conditioning::Batched(Embeds::cat(&uncond, &cond)?)
            } else {
                Conditioning::Separate { uncond, cond }
            }
        } else {
            Conditioning::Single(cond)
        };
        adapters.ti_hashes = set.hashes(
            &mut self.adapters.lock().unwrap_or_else(|p| p.into_inner()),
            &used,
        )?;
        timings.encode = t0.elapsed().as_secs_f64();

        // 2b. ControlNets: loaded, their control maps embedded once.
        let controls = self.prepare_controls(req)?;

        // 3. Timesteps.
        let scheduler = self.scheduler_for(req)?;
        let steps_total = scheduler.timesteps().len();

        // 4. Initial latents: each image's own generator, so the batch never changes an image.
        let mut streams: Vec<NoiseStream> = (0..n)
            .map(|i| NoiseStream::new(req.rng, req.seeds_of(i).0))
            .collect();
        let shape = (n, channels, lh, lw);
        let per_image = channels * lh * lw;
        let latents = match (&req.init_latents, req.variation) {
            // img2img draws its noise later, after the VAE sample (step 4b).
            _ if req.init_image.is_some() => {
                Tensor::zeros(shape, DType::F32, &dev).ctx("latents")?
            }
            (Some(l), _) => l
                .to_dtype(DType::F32)
                .and_then(|l| l.to_device(&dev))
                .ctx("init latents")?,
            (None, Some(v)) if v.strength != 0.0 => {
                let mut data = Vec::with_capacity(n * per_image);
                for (i, stream) in streams.iter_mut().enumerate() {
                    let main = stream.randn(per_image);
                    let sub_seed = req.seeds_of(i).1.unwrap_or_default();
                    let sub = NoiseStream::new(req.rng, sub_seed).randn(per_image);
                    data.extend(slerp_a1111(v.strength, &main, &sub, channels, lh, lw));
                }
                Tensor::from_vec(data, shape, &dev).ctx("noise")?
            }
            (None, _) => draw_noise(&mut streams, shape, &dev)?,
        };
        let mut latents = (latents * scheduler.init_noise_sigma()).ctx("latents")?;

        // 4b. img2img: start part-way, from the encoded image noised to that level;
        //     inpainting also prepares the mask and the masked image's latents.
        let mut start = 0;
        let mut inpaint: Option<Inpaint> = None;
        if let Some(init) = &req.init_image {
            start = img2img_start(req.steps, init.strength, scheduler.order(), steps_total);
            if init.mask.is_some() {
                let (l, ip) = self.inpaint_latents(
                    init,
                    req,
                    &mut streams,
                    lh,
                    lw,
                    channels,
                    scheduler.as_ref(),
                    start,
                )?;
                latents = l;
                inpaint = Some(ip);
            } else {
                latents = self.img2img_latents(
                    init,
                    req,
                    &mut streams,
                    lh,
                    lw,
                    channels,
                    scheduler.as_ref(),
                    start,
                )?;
            }
        }
        let nine_channels = self.files.unet_config.in_channels != channels;
        if nine_channels && inpaint.is_none() {
            return Err(Error::invalid(
                "mask",
                "this is an inpainting model (9 input channels): give an init image and a mask",
            ));
        }
        Ok(Run {
            req: req.clone(),
            context,
            scheduler,
            latents,
            streams,
            inpaint,
            start,
            next: start,
            nine_channels,
            attention_slice,
            timings,
            adapters,
            controls,
            hires: req.hires,
            hires_steps,
            rows,
            size: (req.width, req.height),
            offset: 0,
        })
    }

    /// Step 5, once: one denoising step of `run` (call until [`Run::is_done`]).
    pub fn step(&self, run: &mut Run) -> Result<RunStep> {
        if run.next >= run.scheduler.timesteps().len() && run.hires.is_some() {
            self.start_hires(run)?;
        }
        let timesteps = run.scheduler.timesteps();
        let Some(&t) = timesteps.get(run.next) else {
            return Err(Error::invalid("step", "the run has no steps left"));
        };
        let (i, n, len) = (run.next, run.req.batch, timesteps.len());
        let ts = Instant::now();
        let unet_model = self.unet()?;
        let slice = run.attention_slice;
        // ControlNets that steer this step (diffusers' controlnet_keep; a zero scale adds
        // nothing, so it is not run).
        let active: Vec<(Arc<ControlNet>, &RunControl)> = run
            .controls
            .iter()
            .filter(|c| c.unit.scale != 0.0 && c.unit.active(i - run.start, len - run.start))
            .map(|c| Ok((c.net.get()?, c)))
            .collect::<Result<_>>()?;
        let control_residuals = |x: &Tensor,
                                 e: &Embeds,
                                 added: Option<(&Tensor, &Tensor)>|
         -> Result<Option<unet::Residuals>> {
            let mut sum: Option<unet::Residuals> = None;
            let x = x.to_dtype(self.dtype).ctx("controlnet input")?;
            for (net, c) in &active {
                let r = net
                    .forward(
                        &x,
                        t,
                        &e.context,
                        &c.hint,
                        c.unit.scale,
                        unet::Forward {
                            attention_slice: slice,
                            added,
                            control: None,
                        },
                    )
                    .ctx("controlnet")?;
                sum = Some(match sum {
                    None => r,
                    Some(s) => s.add(&r).ctx("controlnet")?,
                });
            }
            Ok(sum)
        };
        let scheduler = &mut run.scheduler;
        let unet = |x: &Tensor, e: &Embeds| -> Result<Tensor> {
            let added = match &e.added {
                None => None,
                Some(a) => {
                    let p = a.dim(1).ctx("added conditions")? - 6;
                    Some((
                        a.narrow(1, 0, p).ctx("added conditions")?,
                        a.narrow(1, p, 6).ctx("added conditions")?,
                    ))
                }
            };
            let added = added.as_ref().map(|(p, t)| (p, t));
            let mut x = scheduler.scale_model_input(x, i)?;
            let residuals = control_residuals(&x, e, added)?;
            let fwd = unet::Forward {
                attention_slice: slice,
                added,
                control: residuals.as_ref(),
            };
            if let (true, Some(ip)) = (run.nine_channels, &run.inpaint) {
                // The inpainting UNet also sees the mask and the masked picture.
                let rows = x.dim(0).ctx("unet input")?;
                let reps = rows / n;
                let m = ip.mask.repeat((rows, 1, 1, 1)).ctx("mask")?;
                let mi = ip.masked_latents.repeat((reps, 1, 1, 1)).ctx("mask")?;
                x = Tensor::cat(&[&x, &m, &mi], 1).ctx("inpaint input")?;
            }
            unet_model
                .forward_with(
                    &x.to_dtype(self.dtype).ctx("unet input")?,
                    t,
                    &e.context,
                    fwd,
                )
                .and_then(|p| p.to_dtype(DType::F32))
                .ctx("unet")
        };
        let guidance = run.req.guidance;
        let cfg = |uncond: Tensor, cond: Tensor| -> Result<Tensor> {
            (&uncond + ((cond - &uncond).ctx("cfg")? * guidance).ctx("cfg")?).ctx("cfg")
        };
        let latents = &run.latents;
        let pred = match &run.context {
            Conditioning::Single(ctx) => unet(latents, ctx)?,
            Conditioning::Batched(ctx) => {
                let both = unet(&Tensor::cat(&[latents, latents], 0).ctx("cfg batch")?, ctx)?;
                cfg(
                    both.narrow(0, 0, n).ctx("cfg")?,
                    both.narrow(0, n, n).ctx("cfg")?,
                )?
            }
            Conditioning::Separate { uncond, cond } => {
                cfg(unet(latents, uncond)?, unet(latents, cond)?)?
            }
        };
        if !all_finite(&pred)? {
            return Err(self.non_finite(
                "unet",
                &self.files.unet_weights,
                format!("output at step {}", i + 1 - run.start),
            ));
        }
        let shape = latents.dims4().ctx("latents")?;
        let (streams, dev) = (&mut run.streams, &self.device);
        let mut noise = || draw_noise(streams, shape, dev);
        let out = run.scheduler.step(&pred, i, &run.latents, &mut noise)?;
        let mut latents = out.prev_sample;
        if let (false, Some(ip)) = (run.nine_channels, &run.inpaint) {
            // Ordinary model (legacy inpainting): put the known region back, noised to
            // the next step's level.
            let known = if i + 1 < len {
                run.scheduler
                    .add_noise(&ip.image_latents, &ip.noise, i + 1)?
            } else {
                ip.image_latents.clone()
            };
            let keep = (1.0 - &ip.mask).ctx("mask")?;
            latents = (known.broadcast_mul(&keep).ctx("blend")?
                + latents.broadcast_mul(&ip.mask).ctx("blend")?)
            .ctx("blend")?;
        }
        run.latents = latents;
        run.next += 1;
        run.timings.steps.push(ts.elapsed().as_secs_f64());
        Ok(RunStep {
            step: run.offset + i + 1 - run.start,
            total: run.total(),
            pred_original: out.pred_original,
        })
    }

    /// Step 6: decodes one image at a time (same result, a fraction of the memory).
    pub fn finish(&self, run: Run) -> Result<(Vec<GeneratedImage>, Timings)> {
        let Run {
            req,
            latents,
            mut timings,
            adapters,
            controls,
            size,
            ..
        } = run;
        // medvram: the ControlNets leave the device with the UNet.
        for c in &controls {
            c.net.release();
        }
        let units: Vec<ControlNetUnit> = controls.into_iter().map(|c| c.meta).collect();
        let t0 = Instant::now();
        let mut images = Vec::with_capacity(req.batch);
        for i in 0..req.batch {
            let l = latents.narrow(0, i, 1).ctx("decode")?;
            let rgb = self.decode(&l)?;
            let (seed, variation_seed) = req.seeds_of(i);
            images.push(GeneratedImage {
                seed,
                variation_seed,
                width: size.0,
                height: size.1,
                rgb,
                lora_hashes: adapters.lora_hashes.clone(),
                ti_hashes: adapters.ti_hashes.clone(),
                controlnets: units.clone(),
            });
        }
        timings.decode = t0.elapsed().as_secs_f64();
        Ok((images, timings))
    }

    /// One VAE sample (mean + std·ε, ε from `stream`) of the picture's latent distribution,
    /// times the scaling factor.
    fn sample_latents(&self, dist: &(Tensor, Tensor), stream: &mut NoiseStream) -> Result<Tensor> {
        let (mean, std) = dist;
        let c = &self.files.vae_config;
        let eps = Tensor::from_vec(stream.randn(mean.elem_count()), mean.dims(), &self.device)
            .ctx("vae sample")?;
        let sample = (mean + (std * eps).ctx("vae sample")?).ctx("vae sample")?;
        ((sample - c.shift_factor).ctx("latents")? * c.scaling_factor).ctx("latents")
    }

    fn encode_pixels(&self, rgb_unit: Vec<f32>, w: usize, h: usize) -> Result<(Tensor, Tensor)> {
        let image = Tensor::from_vec(rgb_unit, (1, h, w, 3), &self.device)
            .and_then(|t| t.permute((0, 3, 1, 2)))
            .and_then(|t| t.to_dtype(self.dtype))
            .ctx("init image")?;
        let (mean, std) = self.encoder()?.encode(&image).ctx("vae encode")?;
        Ok((
            mean.to_dtype(DType::F32).ctx("vae encode")?,
            std.to_dtype(DType::F32).ctx("vae encode")?,
        ))
    }

    /// Inpainting set-up in diffusers' order of draws: the picture's VAE sample from the
    /// first image's generator, each image's noise from its own, then the masked picture's
    /// VAE sample from the first image's generator again.
    #[allow(clippy::too_many_arguments)]
    fn inpaint_latents(
        &self,
        init: &InitImage,
        req: &GenerateRequest,
        streams: &mut [NoiseStream],
        lh: usize,
        lw: usize,
        channels: usize,
        scheduler: &dyn crate::engine::schedulers::Scheduler,
        start: usize,
    ) -> Result<(Tensor, Inpaint)> {
        let (w, h) = (req.width, req.height);
        let mask_px = init.mask.as_deref().unwrap_or_default();
        if init.rgb.len() != w * h * 3 || mask_px.len() != w * h {
            return Err(Error::invalid(
                "mask",
                format!("picture and mask must both be {w}x{h}"),
            ));
        }
        // Binarise at one half: 1 = repaint.
        let m: Vec<f32> = mask_px
            .iter()
            .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
            .collect();
        let unit: Vec<f32> = init
            .rgb
            .iter()
            .map(|&v| v as f32 / 255.0 * 2.0 - 1.0)
            .collect();
        let masked: Vec<f32> = unit
            .iter()
            .enumerate()
            .map(|(k, &v)| if m[k / 3] < 0.5 { v } else { 0.0 })
            .collect();
        let f = w / lw;
        let small: Vec<f32> = (0..lh)
            .flat_map(|y| (0..lw).map(move |x| (y, x)))
            .map(|(y, x)| m[(y * f) * w + x * f])
            .collect();
        let mask = Tensor::from_vec(small, (1, 1, lh, lw), &self.device).ctx("mask")?;
        let n = streams.len();
        let dist = self.encode_pixels(unit, w, h)?;
        let first = streams
            .first_mut()
            .ok_or_else(|| Error::invalid("batch", "empty"))?;
        // diffusers skips this sample (and its draw) for an inpainting model at strength 1.
        let nine = self.files.unet_config.in_channels != channels;
        let image_latents = if nine && init.strength >= 1.0 {
            Tensor::zeros((n, channels, lh, lw), DType::F32, &self.device).ctx("latents")?
        } else {
            self.sample_latents(&dist, first)?
                .repeat((n, 1, 1, 1))
                .ctx("latents")?
        };
        let per = channels * lh * lw;
        let noise: Vec<f32> = streams.iter_mut().flat_map(|s| s.randn(per)).collect();
        let noise = Tensor::from_vec(noise, (n, channels, lh, lw), &self.device).ctx("noise")?;
        let masked_dist = self.encode_pixels(masked, w, h)?;
        let first = streams
            .first_mut()
            .ok_or_else(|| Error::invalid("batch", "empty"))?;
        let masked_latents = self
            .sample_latents(&masked_dist, first)?
            .repeat((n, 1, 1, 1))
            .ctx("latents")?;
        let latents = if init.strength >= 1.0 {
            (&noise * scheduler.init_noise_sigma()).ctx("latents")?
        } else if start < scheduler.timesteps().len() {
            scheduler.add_noise(&image_latents, &noise, start)?
        } else {
            image_latents.clone()
        };
        Ok((
            latents,
            Inpaint {
                mask,
                masked_latents,
                image_latents,
                noise,
            },
        ))
    }

    /// The VAE encoder, loaded on first use (only img2img needs it).
    fn encoder(&self) -> Result<&VaeEncoder> {
        let e = self.vae_encoder.get_or_init(|| {
            let vb = self
                .files
                .vae_vb(self.dtype, &self.device)
                .map_err(|e| e.to_string())?;
            VaeEncoder::new(vb, &self.files.vae_config).map_err(|e| {
                format!(
                    "vae encoder weights: {}",
                    crate::engine::model::candle_msg(&e)
                )
            })
        });
        e.as_ref().map_err(|m| Error::Weights {
            component: "vae",
            path: self.files.vae_weights[0].clone(),
            reason: m.clone(),
        })
    }

    /// Encodes the init image once per batch image with that image's generator (the VAE
    /// sample, then the noise — diffusers' order), and noises it to timestep index `start`.
    #[allow(clippy::too_many_arguments)]
    fn img2img_latents(
        &self,
        init: &InitImage,
        req: &GenerateRequest,
        streams: &mut [NoiseStream],
        lh: usize,
        lw: usize,
        channels: usize,
        scheduler: &dyn crate::engine::schedulers::Scheduler,
        start: usize,
    ) -> Result<Tensor> {
        let (w, h) = (req.width, req.height);
        if init.rgb.len() != w * h * 3 {
            return Err(Error::invalid(
                "init image",
                format!("{} bytes, expected {w}x{h} RGB", init.rgb.len()),
            ));
        }
        let unit: Vec<f32> = init
            .rgb
            .iter()
            .map(|&v| v as f32 / 255.0 * 2.0 - 1.0)
            .collect();
        let dist = self.encode_pixels(unit, w, h)?;
        let mut out = Vec::with_capacity(streams.len());
        for stream in streams.iter_mut() {
            let x0 = self.sample_latents(&dist, stream)?;
            let noise = Tensor::from_vec(
                stream.randn(channels * lh * lw),
                (1, channels, lh, lw),
                &self.device,
            )
            .ctx("noise")?;
            out.push(if start < scheduler.timesteps().len() {
                scheduler.add_noise(&x0, &noise, start)?
            } else {
                x0
            });
        }
        Tensor::cat(&out, 0).ctx("img2img latents")
    }

    /// Latents [1, 4, h, w] (unscaled, as the sampler leaves them) → RGB8 pixels. In reduced
    /// precision, an image with non-finite values is decoded again in f32 (logged once).
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<u8>> {
        let c = &self.files.vae_config;
        let z = ((latents / c.scaling_factor).ctx("decode")? + c.shift_factor).ctx("decode")?;
        let (_, _, lh, lw) = z.dims4().ctx("decode")?;
        let f = self.scale_factor();
        let tiled = memory::tile_decode(
            self.memory_options().vae_tiling,
            memory::free_memory(&self.device),
            lw * f,
            lh * f,
            self.dtype.size_in_bytes(),
            self.blocked_attention(),
        )
        .then(|| c.tile());
        let img = decode_with(&*self.vae()?, &z.to_dtype(self.dtype).ctx("decode")?, tiled)?;
        let finite = img
            .flatten_all()
            .and_then(|x| x.to_vec1::<f32>())
            .ctx("vae decode")?
            .iter()
            .all(|v| v.is_finite());
        let img = if finite {
            img
        } else if self.dtype == DType::F32 {
            return Err(self.non_finite("vae", &self.files.vae_weights, "decoded image".into()));
        } else {
            let vae32 = self.vae_f32.get_or_init(|| {
                eprintln!(
                    "note: the VAE overflowed in {:?}; decoding in f32 instead",
                    self.dtype
                );
                self.files
                    .load_vae(DType::F32, &self.device)
                    .map_err(|e| e.to_string())
            });
            let vae32 = vae32
                .as_ref()
                .map_err(|e| Error::invalid("vae", e.clone()))?;
            decode_with(vae32, &z.to_dtype(DType::F32).ctx("decode")?, tiled)?
        };
        to_rgb8(&img)
    }
}

/// The VAE's picture [1, 3, h, w] in f32 for latents `z` [1, c, h/f, w/f] (already
/// unscaled): whole, or with `tile` = (latent cells, pixels) per tile side, as diffusers'
/// `tiled_decode`: tiles start every ¾ tile, each is blended into the one above and the one
/// to its left over ¼ tile (linear ramps, in raster order, with the neighbours already
/// blended), then cropped to ¾ tile.
pub fn decode_with(vae: &VaeDecoder, z: &Tensor, tile: Option<(usize, usize)>) -> Result<Tensor> {
    let whole = |z: &Tensor| {
        vae.decode(z)
            .and_then(|x| x.to_dtype(DType::F32))
            .ctx("vae decode")
    };
    let Some((tl, tp)) = tile else {
        return whole(z);
    };
    let (_, _, lh, lw) = z.dims4().ctx("vae decode")?;
    if lh <= tl && lw <= tl {
        return whole(z);
    }
    let stride = (tl as f64 * 0.75) as usize;
    let blend = (tp as f64 * 0.25) as usize;
    let limit = tp - blend;
    if stride == 0 {
        return whole(z);
    }
    // Decoded tiles, [3, h, w] each, on the host.
    let mut rows: Vec<Vec<HostImage>> = Vec::new();
    for i in (0..lh).step_by(stride) {
        let mut row = Vec::new();
        for j in (0..lw).step_by(stride) {
            let t = z
                .narrow(2, i, tl.min(lh - i))
                .and_then(|t| t.narrow(3, j, tl.min(lw - j)))
                .and_then(|t| t.contiguous())
                .ctx("vae tile")?;
            let d = whole(&t)?;
            let (_, c, h, w) = d.dims4().ctx("vae tile")?;
            let data = d
                .flatten_all()
                .and_then(|x| x.to_vec1::<f32>())
                .ctx("vae tile")?;
            row.push(HostImage { c, h, w, data });
        }
        rows.push(row);
    }
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            if i > 0 {
                let (above, below) = rows.split_at_mut(i);
                blend_v(&above[i - 1][j], &mut below[0][j], blend);
            }
            if j > 0 {
                let (left, right) = rows[i].split_at_mut(j);
                blend_h(&left[j - 1], &mut right[0], blend);
            }
        }
    }
    let c = rows[0][0].c;
    let height: usize = rows.iter().map(|r| r[0].h.min(limit)).sum();
    let width: usize = rows[0].iter().map(|t| t.w.min(limit)).sum();
    let mut out = vec![0f32; c * height * width];
    let mut y0 = 0;
    for row in &rows {
        let mut x0 = 0;
        for t in row {
            let (th, tw) = (t.h.min(limit), t.w.min(limit));
            for ch in 0..c {
                for y in 0..th {
                    let src = (ch * t.h + y) * t.w;
                    let dst = (ch * height + y0 + y) * width + x0;
                    out[dst..dst + tw].copy_from_slice(&t.data[src..src + tw]);
                }
            }
            x0 += tw;
        }
        y0 += row[0].h.min(limit);
    }
    Tensor::from_vec(out, (1, c, height, width), &Device::Cpu).ctx("vae tiles")
}

/// A decoded tile on the host: channels × h × w, f32.
struct HostImage {
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

/// Ramps the top `extent` rows of `b` from `a`'s bottom rows into `b`'s own.
fn blend_v(a: &HostImage, b: &mut HostImage, extent: usize) {
    let e = extent.min(a.h).min(b.h);
    for ch in 0..b.c {
        for y in 0..e {
            let wb = (y as f64 / e as f64) as f32;
            let wa = (1.0 - y as f64 / e as f64) as f32;
            let ra = (ch * a.h + a.h - e + y) * a.w;
            let rb = (ch * b.h + y) * b.w;
            for x in 0..b.w.min(a.w) {
                b.data[rb + x] = a.data[ra + x] * wa + b.data[rb + x] * wb;
            }
        }
    }
}

/// Ramps the left `extent` columns of `b` from `a`'s right columns into `b`'s own.
fn blend_h(a: &HostImage, b: &mut HostImage, extent: usize) {
    let e = extent.min(a.w).min(b.w);
    for ch in 0..b.c {
        for y in 0..b.h.min(a.h) {
            let ra = (ch * a.h + y) * a.w;
            let rb = (ch * b.h + y) * b.w;
            for x in 0..e {
                let wb = (x as f64 / e as f64) as f32;
                let wa = (1.0 - x as f64 / e as f64) as f32;
                b.data[rb + x] = a.data[ra + a.w - e + x] * wa + b.data[rb + x] * wb;
            }
        }
    }
}

/// A1111's "Original" emphasis: scale each token's hidden state by its weight, then
/// rescale the whole tensor so its mean is what it was.
fn emphasize(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    let f = || -> candle_core::Result<Tensor> {
        let dtype = z.dtype();
        let z = z.to_dtype(DType::F32)?;
        let before = z.mean_all()?.to_scalar::<f32>()?;
        let w = Tensor::from_slice(weights, (1, weights.len(), 1), z.device())?;
        let z = z.broadcast_mul(&w)?;
        let after = z.mean_all()?.to_scalar::<f32>()?;
        (z * (before / after) as f64)?.to_dtype(dtype)
    };
    f().ctx("prompt weights")
}

/// [1, 3, h, w] in [-1, 1] → RGB8, as diffusers: (x/2 + 0.5).clamp(0, 1) * 255, rounded.
pub fn to_rgb8(img: &Tensor) -> Result<Vec<u8>> {
    let x = ((img / 2.0).ctx("rgb")? + 0.5)
        .and_then(|x| x.clamp(0f32, 1f32))
        .ctx("rgb")?;
    let x = (x * 255.0).and_then(|x| x.round()).ctx("rgb")?;
    let x = x
        .squeeze(0)
        .and_then(|x| x.permute((1, 2, 0)))
        .and_then(|x| x.flatten_all())
        .ctx("rgb")?;
    Ok(x.to_vec1::<f32>()
        .ctx("rgb")?
        .into_iter()
        .map(|v| v as u8)
        .collect())
}

/// Borrowed views of (position, vectors) pairs for the text encoder.
fn as_refs(f: &[(usize, Tensor)]) -> Vec<(usize, &Tensor)> {
    f.iter().map(|(p, t)| (*p, t)).collect()
}
