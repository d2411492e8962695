//! The model cache: recently used models stay loaded (least recently used out first, within
//! a byte budget), and components whose weight files are identical — the same VAE or text
//! encoder in two fine-tunes, a VAE shared through `--vae` — are loaded once and shared.
//!
//! Identity is by content: a component's key is the sha256 of its weight files (cached on
//! disk by [`crate::engine::hash`]; free for hub downloads, whose blobs are named by it), plus the
//! part of a single file it comes from, its config, dtype and device. Loading reports
//! progress, and a model that cannot fit in free memory is refused with a clear message
//! before any weights are read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use candle_core::DType;

use crate::engine::clip::ClipTextModel;
use crate::engine::hash;
use crate::engine::memory::{self, MemoryMode, Part};
use crate::engine::metadata::Parameters;
use crate::engine::model::ModelFiles;
use crate::engine::pipeline::{GenerateRequest, GeneratedImage, StableDiffusion};
use crate::engine::unet::UNet;
use crate::engine::vae_decoder::VaeDecoder;
use crate::engine::{Error, Result};

/// What to load: a model and the options that change its weights.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadOptions {
    /// Hub id, diffusers folder or single `.safetensors` file.
    pub model: String,
    /// `cpu` or `cuda` (`cuda:N`).
    pub device: String,
    /// `f32`, `f16` or `bf16`.
    pub dtype: String,
    /// A replacement VAE.
    pub vae: Option<String>,
    /// A diffusers folder or hub id describing a single file's architecture.
    pub config: Option<String>,
    /// A single file predicts v.
    pub v_prediction: bool,
    /// Where the weights live while generating (full, medvram, lowvram or auto).
    pub memory: MemoryMode,
}

impl LoadOptions {
    pub fn new(model: &str, device: &str, dtype: &str) -> Self {
        Self {
            model: model.to_string(),
            device: device.to_string(),
            dtype: dtype.to_string(),
            vae: None,
            config: None,
            v_prediction: false,
            memory: MemoryMode::Auto,
        }
    }
}

/// A loaded model and what A1111 writes about it.
pub struct CachedModel {
    pub sd: StableDiffusion,
    /// "Model": a single file's stem, a folder's name, or the hub id.
    pub label: String,
    /// "Model hash" (first 10 hex of the file's sha256), for single-file checkpoints: hashed
    /// on a thread of its own on first sight, so loading never waits for it.
    pub hash: Option<Arc<hash::Pending>>,
    /// "VAE" and "VAE hash" when a replacement VAE is in use.
    pub vae: Option<(String, String)>,
    /// Memory its components take (each counted in full, shared or not).
    pub bytes: u64,
    /// Where its weights live, and why (for the status line).
    pub placement: String,
    parts: [PartKey; 3],
}

impl CachedModel {
    /// "Model hash", waiting for it if it is still being computed (None without one, or if
    /// the file could not be read again).
    pub fn model_hash(&self) -> Option<String> {
        self.hash
            .as_ref()
            .and_then(|h| h.wait().ok())
            .map(|h| hash::short(&h))
    }

    /// A1111's parameters for `img`, made by this model from `req`.
    pub fn parameters(&self, req: &GenerateRequest, img: &GeneratedImage) -> Parameters {
        let (sampler, schedule_type) = req.scheduler.a1111_name();
        Parameters {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            steps: req.steps,
            sampler: sampler.into(),
            schedule_type: schedule_type.map(str::to_string),
            cfg_scale: req.guidance,
            seed: img.seed,
            // A1111's "Size" is the first pass's (the base size with Hires. fix).
            width: req.width,
            height: req.height,
            model: self.label.clone(),
            model_hash: self.model_hash(),
            vae: self.vae.as_ref().map(|v| v.0.clone()),
            vae_hash: self.vae.as_ref().map(|v| v.1.clone()),
            variation: img.variation_seed.zip(req.variation.map(|v| v.strength)),
            denoising_strength: req
                .init_image
                .as_ref()
                .map(|i| i.strength)
                .or(req.hires.map(|h| h.strength)),
            clip_skip: (req.clip_skip > 1).then_some(req.clip_skip),
            rng: req.rng.a1111_name().map(str::to_string),
            sdxl_sizes: if self.sd.files.family.dual_text_encoders() {
                let c = &req.size_conditions;
                let mut v = Vec::new();
                if let Some((w, h)) = c.original {
                    v.push(("Original size", format!("{w}x{h}")));
                }
                if c.crop != (0, 0) {
                    v.push(("Crop coords top left", format!("{},{}", c.crop.0, c.crop.1)));
                }
                if let Some((w, h)) = c.target {
                    v.push(("Target size", format!("{w}x{h}")));
                }
                v
            } else {
                Vec::new()
            },
            lora_hashes: img.lora_hashes.clone(),
            ti_hashes: img.ti_hashes.clone(),
            controlnets: img.controlnets.clone(),
            hires: req.hires.map(|h| crate::engine::metadata::HiresParams {
                scale: h.scale,
                resize: (h.width, h.height),
                steps: h.steps,
                upscaler: h.upscaler.a1111_name().to_string(),
            }),
        }
    }
}

/// Files up to this size are hashed while loading (text encoders, VAEs: well under a
/// second); larger ones are identified by path, size and time until hashed.
const HASH_NOW_BYTES: u64 = 512 << 20;

/// A component's identity: content ids of its weights, then config, dtype, device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PartKey(String);

/// Counters for tests and the status line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Models found in the cache.
    pub hits: usize,
    /// Components read from disk: text encoders, UNets, VAEs.
    pub loaded: [usize; 3],
    /// Components reused from another cached model instead.
    pub shared: usize,
    /// Models dropped to stay within the budget.
    pub evicted: usize,
}

/// Recently used models, least recently used first.
pub struct ModelCache {
    budget: u64,
    entries: Vec<(LoadOptions, Arc<CachedModel>)>,
    text: HashMap<PartKey, Weak<Part<ClipTextModel>>>,
    unet: HashMap<PartKey, Weak<Part<UNet>>>,
    vae: HashMap<PartKey, Weak<Part<VaeDecoder>>>,
    bytes_of: HashMap<PartKey, u64>,
    pub stats: CacheStats,
}

/// Progress while loading: a message and, when known, the fraction done.
pub type Progress<'a> = &'a mut dyn FnMut(&str, Option<f32>);

const GIB: f64 = (1u64 << 30) as f64;

impl ModelCache {
    /// A cache keeping models while their components take at most `budget` bytes together
    /// (the model in use always stays, even alone over budget).
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            entries: Vec::new(),
            text: HashMap::new(),
            unet: HashMap::new(),
            vae: HashMap::new(),
            bytes_of: HashMap::new(),
            stats: CacheStats::default(),
        }
    }

    /// A budget from the machine: half the available RAM for CPU models, else 16 GiB.
    /// `device` as the user gave it (`auto` resolves to what it would run on).
    pub fn default_budget(device: &str) -> u64 {
        let cpu = match device {
            "auto" => !candle_core::utils::cuda_is_available(),
            d => d == "cpu",
        };
        match (cpu, available_ram()) {
            (true, Some(free)) => free / 2,
            _ => 16 << 30,
        }
    }

    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
        self.evict(None);
    }

    /// The cached models' options, least recently used first.
    pub fn keys(&self) -> Vec<&LoadOptions> {
        self.entries.iter().map(|(k, _)| k).collect()
    }

    /// Bytes the cached models hold, shared components counted once.
    pub fn resident_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .flat_map(|(_, m)| m.parts.iter())
            .filter(|p| seen.insert((*p).clone()))
            .map(|p| self.bytes_of.get(p).copied().unwrap_or(0))
            .sum()
    }

    /// Drops every model.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The model for `opts`: from the cache (it becomes the most recently used) or loaded,
    /// sharing identical components with cached models; older models are evicted to stay
    /// within the budget.
    pub fn get(&mut self, opts: &LoadOptions, progress: Progress) -> Result<Arc<CachedModel>> {
        if let Some(i) = self.entries.iter().position(|(k, _)| k == opts) {
            let e = self.entries.remove(i);
            let m = e.1.clone();
            self.entries.push(e);
            self.stats.hits += 1;
            return Ok(m);
        }
        let m = Arc::new(self.load(opts, progress)?);
        self.entries.push((opts.clone(), m.clone()));
        self.evict(Some(opts));
        Ok(m)
    }

    fn evict(&mut self, keep: Option<&LoadOptions>) {
        while self.resident_bytes() > self.budget && self.entries.len() > 1 {
            let Some(i) = self.entries.iter().position(|(k, _)| Some(k) != keep) else {
                break;
            };
            self.entries.remove(i);
            self.stats.evicted += 1;
        }
    }

    fn load(&mut self, opts: &LoadOptions, progress: Progress) -> Result<CachedModel> {
        let device = crate::engine::device(&opts.device)?;
        let dtype = crate::engine::dtype_for(&opts.dtype, &device)?;
        let fp16 = dtype != DType::F32;
        progress(&format!("reading {}", opts.model), Some(0.0));
        let files = ModelFiles::open(
            &opts.model,
            fp16,
            opts.config.as_deref(),
            opts.v_prediction,
            opts.vae.as_deref(),
        )?;

        // Content ids: a file's sha256 (read the first time a small file is seen); a large
        // one goes by path, size and time until its hash is known, so a first load never
        // waits for hashing gigabytes (identical large files at two paths are then loaded
        // twice, until hashed).
        let mut ids: HashMap<PathBuf, String> = HashMap::new();
        let mut content = |paths: &[PathBuf], progress: Progress| -> Result<String> {
            let mut out = Vec::new();
            for p in paths {
                if let Some(h) = ids.get(p) {
                    out.push(h.clone());
                    continue;
                }
                let big = std::fs::metadata(p).is_ok_and(|m| m.len() > HASH_NOW_BYTES);
                if big {
                    let id = match hash::known(p) {
                        Some(h) => h,
                        None => hash::quick_id(p)?,
                    };
                    ids.insert(p.clone(), id.clone());
                    out.push(id);
                    continue;
                }
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                let msg = format!("hashing {name} (first time only)");
                let h = hash::sha256(p, &mut |f| progress(&msg, Some(f * 0.3)))?;
                ids.insert(p.clone(), h.clone());
                out.push(h);
            }
            Ok(out.join("+"))
        };
        // Sizes decide an automatic memory mode, which is part of each component's identity.
        let sizes = component_bytes(&files, dtype)?;
        let free = memory::free_memory(&device);
        let offload = memory::choose_offload(opts.memory, !device.is_cpu(), free, sizes);
        let placement = match (opts.memory, free) {
            (MemoryMode::Auto, Some(f)) if !device.is_cpu() => format!(
                "{} (auto: {:.1} GiB free, weights {:.1} GiB)",
                offload.name(),
                f as f64 / GIB,
                sizes.iter().sum::<u64>() as f64 / GIB
            ),
            _ => offload.name().to_string(),
        };
        let tail = format!("{:?}|{}|{}", dtype, opts.device, offload.name());
        let single = files.single.is_some();
        let part = |ids: String, what: &str, config: String| {
            PartKey(format!("{ids}#{what}|{config}|{tail}"))
        };
        let text_key = part(
            content(&files.text_encoder_weights, progress)?,
            if single { "text" } else { "" },
            format!("{:?}", files.clip_config),
        );
        let unet_key = part(
            content(&files.unet_weights, progress)?,
            if single { "unet" } else { "" },
            format!("{:?}", files.unet_config),
        );
        let vae_from_file = files.single.is_some() && files.vae_override.is_none();
        let vae_key = part(
            content(&files.vae_weights, progress)?,
            if vae_from_file { "vae" } else { "" },
            format!("{:?}", files.vae_config),
        );
        let hash = files
            .single
            .as_ref()
            .map(|f| hash::Pending::start(f.path.clone()));
        let vae = match &files.vae_override {
            Some(v) => Some((
                v.label.clone(),
                hash::short(&content(&files.vae_weights[..1], progress)?),
            )),
            None => None,
        };

        // Whether the new parts fit in free memory.
        let keys = [text_key, unet_key, vae_key];
        let new_bytes: u64 = keys
            .iter()
            .zip(sizes)
            .filter(|(k, _)| !self.is_live(k))
            .map(|(_, b)| b)
            .sum();
        if device.is_cpu() {
            if let Some(free) = available_ram() {
                // Cached models can make room; the one being loaded cannot.
                while new_bytes > available_ram().unwrap_or(free) && !self.entries.is_empty() {
                    self.entries.remove(0);
                    self.stats.evicted += 1;
                }
                let free = available_ram().unwrap_or(free);
                if new_bytes > free {
                    return Err(Error::invalid(
                        "model",
                        format!(
                            "{} needs about {:.1} GiB of memory in {}, but only {:.1} GiB is free: close other programs{}",
                            opts.model,
                            new_bytes as f64 / GIB,
                            opts.dtype,
                            free as f64 / GIB,
                            if dtype == DType::F32 { " or use --dtype f16 on a GPU" } else { "" }
                        ),
                    ));
                }
            }
        }
        for (k, b) in keys.iter().zip(sizes) {
            self.bytes_of.insert(k.clone(), b);
        }

        // Components: shared when identical, else read.
        let oom = |e: Error| out_of_memory(e, &opts.model);
        progress("loading the text encoder", Some(0.35));
        let stats = &mut self.stats;
        let text = share_or_load(&mut self.text, &keys[0], stats, 0, || {
            files.text_part(dtype, &device, offload).map_err(oom)
        })?;
        progress("loading the UNet", Some(0.45));
        let unet = share_or_load(&mut self.unet, &keys[1], stats, 1, || {
            files.unet_part(dtype, &device, offload).map_err(oom)
        })?;
        progress("loading the VAE", Some(0.9));
        let vae_model = share_or_load(&mut self.vae, &keys[2], stats, 2, || {
            files.vae_part(dtype, &device, offload).map_err(oom)
        })?;
        self.text.retain(|_, w| w.strong_count() > 0);
        self.unet.retain(|_, w| w.strong_count() > 0);
        self.vae.retain(|_, w| w.strong_count() > 0);
        let label = model_label(&opts.model);
        let sd = StableDiffusion::from_parts(files, device, dtype, text, unet, vae_model, offload)?;
        progress("ready", Some(1.0));
        Ok(CachedModel {
            sd,
            label,
            hash,
            vae,
            bytes: sizes.iter().sum(),
            placement,
            parts: keys,
        })
    }

    fn is_live(&self, k: &PartKey) -> bool {
        self.text.get(k).is_some_and(|w| w.strong_count() > 0)
            || self.unet.get(k).is_some_and(|w| w.strong_count() > 0)
            || self.vae.get(k).is_some_and(|w| w.strong_count() > 0)
    }
}

/// The live component under `key`, else `load()`ed and remembered (weakly: it lives as long
/// as a cached model holds it). `slot` counts the load in `stats.loaded`.
fn share_or_load<T>(
    live: &mut HashMap<PartKey, Weak<T>>,
    key: &PartKey,
    stats: &mut CacheStats,
    slot: usize,
    load: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    if let Some(t) = live.get(key).and_then(Weak::upgrade) {
        stats.shared += 1;
        return Ok(t);
    }
    let t = Arc::new(load()?);
    stats.loaded[slot] += 1;
    live.insert(key.clone(), Arc::downgrade(&t));
    Ok(t)
}

/// A1111's "Model" field: a single file's stem, a folder's name, or the hub id as given.
pub fn model_label(spec: &str) -> String {
    let p = Path::new(spec);
    if p.is_file() {
        p.file_stem()
    } else if p.is_dir() {
        p.file_name()
    } else {
        None
    }
    .and_then(|n| n.to_str())
    .unwrap_or(spec)
    .to_string()
}

/// A load that ran out of (GPU) memory becomes a message with what to try.
fn out_of_memory(e: Error, model: &str) -> Error {
    let text = e.to_string();
    if text.to_lowercase().contains("out of memory") {
        Error::invalid(
            "model",
            format!("{model} does not fit in GPU memory ({text}): load it in f16, or lower the model cache budget so fewer models stay loaded"),
        )
    } else {
        e
    }
}

#[derive(Clone, Copy)]
enum Component {
    Text,
    Unet,
    Vae,
}

/// Bytes of text encoder, UNet and VAE in `dtype`, from the safetensors headers alone.
pub fn component_bytes(files: &ModelFiles, dtype: DType) -> Result<[u64; 3]> {
    let elem = dtype.size_in_bytes() as u64;
    Ok([
        component_elems(files, Component::Text)? * elem,
        component_elems(files, Component::Unet)? * elem,
        component_elems(files, Component::Vae)? * elem,
    ])
}

/// Elements in one component's tensors, from the safetensors headers alone.
fn component_elems(files: &ModelFiles, c: Component) -> Result<u64> {
    let single = files.single.is_some();
    let (paths, prefix): (&[PathBuf], &str) = match c {
        Component::Text if single => (
            &files.text_encoder_weights,
            if files.family == crate::engine::family::Family::Sdxl {
                "conditioner."
            } else {
                "cond_stage_model."
            },
        ),
        Component::Unet if single => (&files.unet_weights, "model.diffusion_model."),
        Component::Vae if single && files.vae_override.is_none() => {
            (&files.vae_weights, "first_stage_model.")
        }
        Component::Text => {
            // SDXL: both text encoders count as the text component (a single file's
            // second encoder is counted with its `conditioner.` prefix above).
            let second = match &files.text_encoder_2 {
                Some(t) => sum_elems(&t.weights, "")?,
                None => 0,
            };
            return Ok(sum_elems(&files.text_encoder_weights, "")? + second);
        }
        Component::Unet => (&files.unet_weights, ""),
        Component::Vae => (&files.vae_weights, ""),
    };
    sum_elems(paths, prefix)
}

/// Elements of the tensors named `prefix…` in `paths` (headers only).
fn sum_elems(paths: &[PathBuf], prefix: &str) -> Result<u64> {
    let mut total = 0u64;
    for p in paths {
        if p.extension().is_some_and(|e| e == "json") {
            continue; // a shard index: its shards are listed separately
        }
        for (name, shape) in crate::engine::scan::tensor_shapes(p)? {
            if name.starts_with(prefix) {
                total += shape.iter().product::<usize>() as u64;
            }
        }
    }
    Ok(total)
}

/// MemAvailable from /proc/meminfo (Linux); `None` elsewhere.
pub fn available_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
