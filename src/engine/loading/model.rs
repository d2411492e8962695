//! Finding and loading a Stable Diffusion model: a diffusers folder (model_index.json,
//! unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub repo id resolved through
//! hf-hub into the cache Python's huggingface_hub uses (HF_HUB_CACHE, HF_HOME,
//! HF_HUB_OFFLINE are honoured, so a model diffusers already downloaded is found offline).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::engine::adapters::patch::WeightTable;

use crate::engine::clip::ClipTextModel;
use crate::engine::config::{ClipConfig, JsonConfig, UNetConfig, VaeConfig};
use crate::engine::error::{Error, Result};
use crate::engine::family::Family;
use crate::engine::memory::{self, Offload, Part};
use crate::engine::schedulers::SchedulerConfig;
use crate::engine::single_file::{SingleFile, VaeFile};
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::unet::UNet;
use crate::engine::vae_decoder::VaeDecoder;

pub const DEFAULT_MODEL: &str = "stable-diffusion-v1-5/stable-diffusion-v1-5";

const PICKLE_EXTS: [&str; 4] = ["ckpt", "bin", "pt", "pth"];

pub(crate) fn is_pickle(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PICKLE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Where the Python hub client keeps its cache: HF_HUB_CACHE, else HF_HOME/hub, else
/// ~/.cache/huggingface/hub.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) =
        std::env::var_os("HF_HUB_CACHE").or_else(|| std::env::var_os("HUGGINGFACE_HUB_CACHE"))
    {
        return PathBuf::from(p);
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        return PathBuf::from(h).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on")
    )
}

pub(crate) fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<_> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !s.starts_with('.')
}

/// Turns `--model` into a local diffusers folder, downloading from the hub if needed.
pub fn resolve(spec: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.is_file() {
        if is_pickle(path) {
            return Err(Error::Pickle {
                path: path.to_path_buf(),
            });
        }
        if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        {
            return Ok(path.to_path_buf()); // a single-file checkpoint
        }
        return Err(Error::invalid(
            "model",
            format!("{spec} is neither a diffusers folder nor a .safetensors checkpoint"),
        ));
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::NotFound {
            what: "model folder".into(),
            path: path.to_path_buf(),
        });
    }
    resolve_hub(spec, prefer_fp16)
}

/// A hub repository to download from, and the files it lists (refused offline, saying
/// that `what` is not in the cache).
fn hub_listing(
    repo: &str,
    cache_dir: PathBuf,
    what: &str,
) -> Result<(hf_hub::api::sync::ApiRepo, Vec<String>)> {
    if offline() {
        return Err(Error::Hub {
            repo: repo.into(),
            reason: format!(
                "{what}not in the cache at {} and HF_HUB_OFFLINE is set",
                cache_dir.display()
            ),
        });
    }
    let hub_err = |e: hf_hub::api::sync::ApiError| Error::Hub {
        repo: repo.into(),
        reason: e.to_string(),
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache_dir)
        .with_progress(true)
        .build()
        .map_err(hub_err)?;
    let r = api.model(repo.to_string());
    let info = r.info().map_err(hub_err)?;
    Ok((r, info.siblings.into_iter().map(|s| s.rfilename).collect()))
}

fn resolve_hub(repo: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let cache_dir = hub_cache_dir();
    let cache = hf_hub::Cache::new(cache_dir.clone());
    let cached = cache.model(repo.to_string());
    if let Some(index) = cached.get("model_index.json") {
        let root = index.parent().map(Path::to_path_buf).unwrap_or_default();
        // A complete download has weights for every component (SDXL: both text encoders).
        let dual = JsonConfig::load(&index)
            .ok()
            .is_some_and(|c| c.get("text_encoder_2").is_some_and(|v| !v[0].is_null()));
        let mut components = vec!["unet", "vae", "text_encoder"];
        if dual {
            components.push("text_encoder_2");
        }
        if components
            .iter()
            .all(|c| find_weights(&root.join(c), prefer_fp16).is_ok())
        {
            return Ok(root);
        }
    }
    let (r, files) = hub_listing(repo, cache_dir, "")?;
    let hub_err = |e: hf_hub::api::sync::ApiError| Error::Hub {
        repo: repo.into(),
        reason: e.to_string(),
    };
    let index = r.get("model_index.json").map_err(hub_err)?;
    for f in [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "text_encoder_2/config.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
    ] {
        if files.iter().any(|x| x == f) {
            r.get(f).map_err(hub_err)?;
        }
    }
    let mut components = vec!["unet", "vae", "text_encoder"];
    if files.iter().any(|f| f.starts_with("text_encoder_2/")) {
        components.push("text_encoder_2"); // SDXL
    }
    for component in components {
        let names: Vec<&str> = files
            .iter()
            .filter_map(|f| f.strip_prefix(&format!("{component}/")))
            .filter(|f| !f.contains('/'))
            .collect();
        let chosen = choose_weight_names(&names, prefer_fp16).ok_or_else(|| Error::Hub {
            repo: repo.into(),
            reason: format!(
                "no .safetensors weights for {component} (pickle weights are never loaded)"
            ),
        })?;
        for name in chosen {
            let p = r.get(&format!("{component}/{name}")).map_err(hub_err)?;
            if name.ends_with(".index.json") {
                for shard in shard_files(&p)? {
                    r.get(&format!("{component}/{shard}")).map_err(hub_err)?;
                }
            }
        }
    }
    Ok(index.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// From a component folder's file names, the safetensors file (or shard index) to load.
fn choose_weight_names<'a>(names: &[&'a str], prefer_fp16: bool) -> Option<Vec<&'a str>> {
    let stems = ["diffusion_pytorch_model", "model"];
    let mut order: Vec<String> = Vec::new();
    for stem in stems {
        let plain = [
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
        ];
        let fp16 = [
            format!("{stem}.fp16.safetensors"),
            format!("{stem}.safetensors.index.fp16.json"),
        ];
        if prefer_fp16 {
            order.extend(fp16.iter().cloned().chain(plain.iter().cloned()));
        } else {
            order.extend(plain.iter().cloned().chain(fp16.iter().cloned()));
        }
    }
    order.iter().find_map(|want| {
        names
            .iter()
            .find(|n| **n == want.as_str())
            .map(|n| vec![*n])
    })
}

fn shard_files(index: &Path) -> Result<Vec<String>> {
    let c = JsonConfig::load(index)?;
    let map = c
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| c.err("weight_map", "missing"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The safetensors files holding one component's weights (`unet/`, `vae/`, `text_encoder/`).
pub fn find_weights(dir: &Path, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            what: "component folder".into(),
            path: dir.to_path_buf(),
        });
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::read(dir, e))?
        .filter_map(|e| {
            e.ok()
                .and_then(|e| e.file_name().to_str().map(str::to_string))
        })
        .collect();
    let names: Vec<&str> = entries.iter().map(String::as_str).collect();
    match choose_weight_names(&names, prefer_fp16) {
        Some(chosen) => {
            let mut out = Vec::new();
            for n in chosen {
                let p = dir.join(n);
                if n.ends_with(".index.json") {
                    out.extend(shard_files(&p)?.into_iter().map(|s| dir.join(s)));
                } else {
                    out.push(p);
                }
            }
            Ok(out)
        }
        None => {
            if let Some(p) = names.iter().map(|n| dir.join(n)).find(|p| is_pickle(p)) {
                return Err(Error::Pickle { path: p });
            }
            Err(Error::NotFound {
                what: "safetensors weights".into(),
                path: dir.to_path_buf(),
            })
        }
    }
}

/// Memory-maps safetensors files as a VarBuilder, checking headers and sizes first.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    component: &'static str,
) -> Result<VarBuilder<'static>> {
    for f in files {
        if !f.is_file() {
            return Err(Error::NotFound {
                what: format!("{component} weights"),
                path: f.clone(),
            });
        }
        if is_pickle(f) {
            return Err(Error::Pickle { path: f.clone() });
        }
    }
    let backend = crate::engine::weights::Checked::open(files).map_err(|e| Error::Weights {
        component,
        path: files.first().cloned().unwrap_or_default(),
        reason: e.to_string(),
    })?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

/// Everything in a model folder, parsed but not yet loaded.
pub struct ModelFiles {
    pub root: PathBuf,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub clip_config: ClipConfig,
    pub scheduler_config: SchedulerConfig,
    pub unet_weights: Vec<PathBuf>,
    pub vae_weights: Vec<PathBuf>,
    pub text_encoder_weights: Vec<PathBuf>,
    /// Set for single-file checkpoints: weights are renamed from the original SD layout.
    pub single: Option<std::sync::Arc<SingleFile>>,
    /// A diffusers folder describing a single file's architecture (`--config`).
    pub config_root: Option<PathBuf>,
    /// A VAE replacing the model's own (`--vae`).
    pub vae_override: Option<VaeOverride>,
    pub family: Family,
    /// SDXL's second text encoder (`text_encoder_2/`, with `tokenizer_2/`).
    pub text_encoder_2: Option<SecondEncoder>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL): an empty negative
    /// prompt conditions on zeros instead of the encoded empty string.
    pub force_zeros_for_empty_prompt: bool,
}

/// The second text encoder of a dual-encoder family.
#[derive(Clone)]
pub struct SecondEncoder {
    pub config: ClipConfig,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
}

/// A VAE from elsewhere: a diffusers VAE folder, or a standalone single file.
#[derive(Clone)]
pub struct VaeOverride {
    /// What the user named (hub id, folder or file), for messages.
    pub spec: String,
    /// A1111's "VAE" field: the file name of the weights (a folder's name for folders).
    pub label: String,
    /// Set for single files (renamed on the fly); folders load `vae_weights` directly.
    pub file: Option<std::sync::Arc<VaeFile>>,
}

/// Turns `--vae` into a standalone VAE file or a VAE folder (`config.json` + weights; a
/// whole model's folder means its `vae/`), downloading a hub VAE (e.g.
/// stabilityai/sd-vae-ft-mse) if needed.
pub fn resolve_vae(spec: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        if is_pickle(path) {
            return Err(Error::Pickle {
                path: path.to_path_buf(),
            });
        }
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return Ok(if path.join("config.json").is_file() {
            path.to_path_buf()
        } else {
            path.join("vae")
        });
    }
    if !looks_like_repo_id(spec) {
        return Err(Error::NotFound {
            what: "VAE".into(),
            path: path.to_path_buf(),
        });
    }
    resolve_hub_component(spec, prefer_fp16, "VAE")
}

/// A hub repository holding one component at its top (`config.json` + weights: a VAE, a
/// ControlNet), from the cache or downloaded.
pub(crate) fn resolve_hub_component(spec: &str, prefer_fp16: bool, what: &str) -> Result<PathBuf> {
    let cache_dir = hub_cache_dir();
    let cached = hf_hub::Cache::new(cache_dir.clone()).model(spec.to_string());
    if let Some(config) = cached.get("config.json") {
        let root = config.parent().map(Path::to_path_buf).unwrap_or_default();
        if find_weights(&root, prefer_fp16).is_ok() {
            return Ok(root);
        }
    }
    let (r, files) = hub_listing(spec, cache_dir, &format!("{what} "))?;
    let hub_err = |e: hf_hub::api::sync::ApiError| Error::Hub {
        repo: spec.into(),
        reason: e.to_string(),
    };
    let names: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| !f.contains('/'))
        .collect();
    let chosen = choose_weight_names(&names, prefer_fp16).ok_or_else(|| Error::Hub {
        repo: spec.into(),
        reason: format!("no .safetensors {what} weights at the top of the repository"),
    })?;
    let config = r.get("config.json").map_err(hub_err)?;
    for name in chosen {
        r.get(name).map_err(hub_err)?;
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

impl ModelFiles {
    /// `--model` (folder, hub id or single file) with its options: `config` (a diffusers
    /// folder or hub id describing a single file's architecture), `v_prediction` (single
    /// files) and `vae` (a replacement VAE).
    pub fn open(
        model: &str,
        prefer_fp16: bool,
        config: Option<&str>,
        v_prediction: bool,
        vae: Option<&str>,
    ) -> Result<Self> {
        let root = resolve(model, prefer_fp16)?;
        let files = if root.is_file() {
            let config = config.map(|c| resolve(c, false)).transpose()?;
            Self::from_single_file(&root, v_prediction.then_some(true), config.as_deref())?
        } else {
            if config.is_some() || v_prediction {
                return Err(Error::invalid(
                    "model",
                    "--config and --v-prediction apply to single-file checkpoints only",
                ));
            }
            Self::from_dir(&root, prefer_fp16)?
        };
        match vae {
            Some(v) => files.with_vae(v, prefer_fp16),
            None => Ok(files),
        }
    }

    /// A single-file checkpoint (original SD key layout). `v_prediction`: None reads an
    /// A1111-style `.yaml` beside the file.
    /// `config`: a diffusers folder whose config files (and tokenizer) describe the
    /// architecture instead of inferring it from tensor shapes, as diffusers'
    /// `from_single_file(config=…)`.
    pub fn from_single_file(
        path: &Path,
        v_prediction: Option<bool>,
        config: Option<&Path>,
    ) -> Result<Self> {
        let (file, scheduler_config) = SingleFile::open(path, v_prediction)?;
        // SDXL's second encoder: its weights are in the file too; its tokenizer is the
        // built-in one padded with "!" (an empty path), or the `--config` folder's.
        let second = |config: ClipConfig, tokenizer: PathBuf| SecondEncoder {
            config,
            weights: vec![path.to_path_buf()],
            tokenizer,
        };
        let (unet_config, vae_config, clip_config, scheduler_config, text_encoder_2) = match config
        {
            None => (
                file.unet_config.clone(),
                file.vae_config.clone(),
                file.clip_config.clone(),
                scheduler_config,
                file.clip2_config.clone().map(|c| second(c, PathBuf::new())),
            ),
            Some(dir) => {
                let c = Self::from_dir(dir, false)?;
                let t2 = c.text_encoder_2.map(|t| second(t.config, t.tokenizer));
                if t2.is_some() != file.is_sdxl {
                    return Err(Error::invalid(
                        "config",
                        format!(
                            "{} describes {} but {} is {}",
                            dir.display(),
                            c.family.name(),
                            path.display(),
                            if file.is_sdxl { "SDXL" } else { "not SDXL" }
                        ),
                    ));
                }
                (
                    c.unet_config,
                    c.vae_config,
                    c.clip_config,
                    c.scheduler_config,
                    t2,
                )
            }
        };
        let family = if file.is_sdxl {
            Family::Sdxl
        } else if file.is_sd2 {
            Family::Sd2
        } else {
            Family::Sd1
        };
        Ok(Self {
            root: path.to_path_buf(),
            config_root: config.map(Path::to_path_buf),
            unet_config,
            vae_config,
            clip_config,
            scheduler_config,
            unet_weights: vec![path.to_path_buf()],
            vae_weights: vec![path.to_path_buf()],
            text_encoder_weights: vec![path.to_path_buf()],
            family,
            text_encoder_2,
            force_zeros_for_empty_prompt: family == Family::Sdxl,
            single: Some(std::sync::Arc::new(file)),
            vae_override: None,
        })
    }

    /// A diffusers folder, or a single `.safetensors` checkpoint.
    pub fn from_dir(root: &Path, prefer_fp16: bool) -> Result<Self> {
        if root.is_file() {
            return Self::from_single_file(root, None, None);
        }
        let index_path = root.join("model_index.json");
        let mut index = None;
        if index_path.is_file() {
            let c = JsonConfig::load(&index_path)?;
            let class = c.str_or("_class_name", "StableDiffusionPipeline")?;
            if class.contains("StableDiffusion3")
                || class.contains("Flux")
                || class.contains("Refiner")
                || class.contains("Kandinsky")
            {
                return Err(c.err(
                    "_class_name",
                    format!("{class} is not supported (Stable Diffusion 1.x/2.x and SDXL)"),
                ));
            }
            index = Some(c);
        } else if !root.join("unet").is_dir() {
            return Err(Error::NotFound {
                what: "diffusers model (model_index.json)".into(),
                path: index_path,
            });
        }
        let unet_config =
            UNetConfig::from_json(&JsonConfig::load(&root.join("unet").join("config.json"))?)?;
        let vae_config =
            VaeConfig::from_json(&JsonConfig::load(&root.join("vae").join("config.json"))?)?;
        let clip_config = ClipConfig::from_json(&JsonConfig::load(
            &root.join("text_encoder").join("config.json"),
        )?)?;
        let scheduler_config = SchedulerConfig::from_json(JsonConfig::load(
            &root.join("scheduler").join("scheduler_config.json"),
        )?)?;
        let family = Family::of_folder(index.as_ref(), &unet_config, &clip_config);
        let text_encoder_2 = if family.dual_text_encoders() {
            let dir = root.join("text_encoder_2");
            let config = ClipConfig::from_json(&JsonConfig::load(&dir.join("config.json"))?)?;
            let tokenizer = root.join("tokenizer_2");
            if !tokenizer.is_dir() {
                return Err(Error::NotFound {
                    what: "SDXL's second tokenizer (tokenizer_2/)".into(),
                    path: tokenizer,
                });
            }
            Some(SecondEncoder {
                weights: find_weights(&dir, prefer_fp16)?,
                config,
                tokenizer,
            })
        } else {
            None
        };
        let context_width =
            clip_config.hidden_size + text_encoder_2.as_ref().map_or(0, |t| t.config.hidden_size);
        let force_zeros_for_empty_prompt = index
            .as_ref()
            .map(|c| c.bool_or("force_zeros_for_empty_prompt", family == Family::Sdxl))
            .transpose()?
            .unwrap_or(family == Family::Sdxl);
        if context_width != unet_config.cross_attention_dim {
            return Err(Error::Config {
                path: root.join("unet").join("config.json"),
                field: "cross_attention_dim".into(),
                reason: format!(
                    "{} does not match the text encoder{}'s width {context_width}",
                    unet_config.cross_attention_dim,
                    if text_encoder_2.is_some() { "s" } else { "" }
                ),
            });
        }
        let l = vae_config.latent_channels;
        // in_channels = latents, or latents + mask + masked-image latents (inpainting models).
        if unet_config.in_channels != l && unet_config.in_channels != 2 * l + 1 {
            return Err(Error::Config {
                path: root.join("unet").join("config.json"),
                field: "in_channels".into(),
                reason: format!("{} channels, but the VAE makes {l} latent channels (expected {l}, or {} for an inpainting model)", unet_config.in_channels, 2 * l + 1),
            });
        }
        Ok(Self {
            unet_weights: find_weights(&root.join("unet"), prefer_fp16)?,
            vae_weights: find_weights(&root.join("vae"), prefer_fp16)?,
            text_encoder_weights: find_weights(&root.join("text_encoder"), prefer_fp16)?,
            root: root.to_path_buf(),
            single: None,
            config_root: None,
            vae_override: None,
            unet_config,
            vae_config,
            clip_config,
            scheduler_config,
            family,
            text_encoder_2,
            force_zeros_for_empty_prompt,
        })
    }

    /// Replaces the model's VAE with `spec` (see [`resolve_vae`]). The replacement must make
    /// latents of the same shape; a folder's config (scaling factor included) is used, a
    /// single file keeps the model's scaling factor (VAE files carry none).
    pub fn with_vae(mut self, spec: &str, prefer_fp16: bool) -> Result<Self> {
        let path = resolve_vae(spec, prefer_fp16)?;
        let (config, weights, file) = if path.is_file() {
            let f = VaeFile::open(&path)?;
            let mut c = f.config.clone();
            c.scaling_factor = self.vae_config.scaling_factor;
            c.shift_factor = self.vae_config.shift_factor;
            // Group counts are not in the shapes: same layout as the model's own VAE → its
            // value (32 for every released SD VAE).
            if c.block_out_channels == self.vae_config.block_out_channels {
                c.norm_num_groups = self.vae_config.norm_num_groups;
            }
            (c, vec![path.clone()], Some(std::sync::Arc::new(f)))
        } else {
            let c = VaeConfig::from_json(&JsonConfig::load(&path.join("config.json"))?)?;
            (c, find_weights(&path, prefer_fp16)?, None)
        };
        if config.latent_channels != self.vae_config.latent_channels {
            return Err(Error::invalid(
                "vae",
                format!(
                    "{spec} makes {} latent channels, the model needs {}",
                    config.latent_channels, self.vae_config.latent_channels
                ),
            ));
        }
        let label = weights[0]
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| spec.to_string());
        let label = if file.is_some() {
            label
        } else {
            // diffusion_pytorch_model.safetensors says nothing: name the folder or hub id.
            spec.trim_end_matches('/').to_string()
        };
        self.vae_config = config;
        self.vae_weights = weights;
        self.vae_override = Some(VaeOverride {
            spec: spec.to_string(),
            label,
            file,
        });
        Ok(self)
    }

    /// The VAE's weights (diffusers names), from either layout.
    pub fn vae_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match (&self.vae_override, &self.single) {
            (Some(VaeOverride { file: Some(f), .. }), _) => Ok(f.vb(dtype, device)),
            (Some(_), _) | (None, None) => var_builder(&self.vae_weights, dtype, device, "vae"),
            (None, Some(f)) => Ok(f.vae_vb(dtype, device)),
        }
    }

    pub fn load_tokenizer(&self) -> Result<ClipTokenizer> {
        if let Some(dir) = &self.config_root {
            return ClipTokenizer::from_dir(&dir.join("tokenizer"));
        }
        if let Some(f) = &self.single {
            // Single files carry no tokenizer: the built-in CLIP one, padded as SD 2.x pads
            // (SDXL's first encoder pads as SD 1.x does).
            return ClipTokenizer::builtin(if f.is_sd2 { "!" } else { "<|endoftext|>" });
        }
        ClipTokenizer::from_dir(&self.root.join("tokenizer"))
    }

    pub fn text_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.single {
            Some(f) => Ok(f.text_vb(dtype, device)),
            None => var_builder(&self.text_encoder_weights, dtype, device, "text encoder"),
        }
    }

    pub fn unet_vb(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.single {
            Some(f) => Ok(f.unet_vb(dtype, device)),
            None => var_builder(&self.unet_weights, dtype, device, "unet"),
        }
    }

    /// Builds the text encoder from `vb` (its weights, on the target device).
    fn text_builder(&self) -> impl Fn(VarBuilder<'static>) -> Result<ClipTextModel> + Send + Sync {
        let (config, path) = (
            self.clip_config.clone(),
            self.text_encoder_weights[0].clone(),
        );
        move |vb| {
            ClipTextModel::new(vb, &config).map_err(|e| Error::Weights {
                component: "text encoder",
                path: path.clone(),
                reason: candle_msg(&e),
            })
        }
    }

    fn vae_builder(&self) -> impl Fn(VarBuilder<'static>) -> Result<VaeDecoder> + Send + Sync {
        let (config, path) = (self.vae_config.clone(), self.vae_weights[0].clone());
        move |vb| {
            VaeDecoder::new(vb, &config).map_err(|e| Error::Weights {
                component: "vae",
                path: path.clone(),
                reason: candle_msg(&e),
            })
        }
    }

    fn unet_error(&self, e: candle_core::Error) -> Error {
        Error::Weights {
            component: "unet",
            path: self.unet_weights[0].clone(),
            reason: candle_msg(&e),
        }
    }

    pub fn load_text_encoder(&self, dtype: DType, device: &Device) -> Result<ClipTextModel> {
        self.text_builder()(self.text_vb(dtype, device)?)
    }

    pub fn load_unet(&self, dtype: DType, device: &Device) -> Result<UNet> {
        self.unet_builder()(self.unet_vb(dtype, device)?)
    }

    pub fn load_vae(&self, dtype: DType, device: &Device) -> Result<VaeDecoder> {
        self.vae_builder()(self.vae_vb(dtype, device)?)
    }

    /// A component for `offload`: built on the device (full), or staged in RAM from its
    /// CPU weights and built on the device while in use.
    fn part<M>(
        &self,
        offload: Offload,
        dtype: DType,
        device: &Device,
        vb: impl Fn(DType, &Device) -> Result<VarBuilder<'static>>,
        build: impl Fn(VarBuilder<'static>) -> Result<M> + Send + Sync + 'static,
    ) -> Result<Part<M>> {
        let weights = WeightTable::new();
        match offload {
            Offload::Full => {
                let m = build(weights.recorder(vb(dtype, device)?))?;
                Ok(Part::resident(m, weights))
            }
            _ => Part::staged(
                memory::staged(weights.recorder(vb(dtype, &Device::Cpu)?), dtype, device),
                Box::new(build),
                weights,
            ),
        }
    }

    fn unet_builder(&self) -> impl Fn(VarBuilder<'static>) -> Result<UNet> + Send + Sync {
        let (config, path) = (self.unet_config.clone(), self.unet_weights[0].clone());
        move |vb| {
            UNet::new(vb, &config).map_err(|e| Error::Weights {
                component: "unet",
                path: path.clone(),
                reason: candle_msg(&e),
            })
        }
    }

    /// The text encoder for `offload`: on the device (full) or staged in RAM.
    pub fn text_part(
        &self,
        dtype: DType,
        device: &Device,
        offload: Offload,
    ) -> Result<Part<ClipTextModel>> {
        self.part(
            offload,
            dtype,
            device,
            |t, d| self.text_vb(t, d),
            self.text_builder(),
        )
    }

    /// SDXL's second text encoder (`CLIPTextModelWithProjection`) for `offload`.
    pub fn text2_part(
        &self,
        dtype: DType,
        device: &Device,
        offload: Offload,
    ) -> Result<Option<Part<ClipTextModel>>> {
        let Some(t) = &self.text_encoder_2 else {
            return Ok(None);
        };
        let (config, path) = (t.config.clone(), t.weights[0].clone());
        let build = move |vb: VarBuilder<'static>| {
            let m = ClipTextModel::new(vb, &config).map_err(|e| Error::Weights {
                component: "text encoder 2",
                path: path.clone(),
                reason: candle_msg(&e),
            })?;
            if !m.has_projection() {
                return Err(Error::Weights {
                    component: "text encoder 2",
                    path: path.clone(),
                    reason: "no text_projection.weight (SDXL's second encoder is a CLIPTextModelWithProjection)".into(),
                });
            }
            Ok(m)
        };
        let weights = t.weights.clone();
        let single = self.single.clone();
        self.part(
            offload,
            dtype,
            device,
            move |dt, d| match &single {
                Some(f) => Ok(f.text2_vb(dt, d)),
                None => var_builder(&weights, dt, d, "text encoder 2"),
            },
            build,
        )
        .map(Some)
    }

    /// SDXL's second tokenizer (pads with "!").
    pub fn load_tokenizer_2(&self) -> Result<Option<ClipTokenizer>> {
        self.text_encoder_2
            .as_ref()
            .map(|t| {
                if t.tokenizer.as_os_str().is_empty() {
                    ClipTokenizer::builtin("!")
                } else {
                    ClipTokenizer::from_dir(&t.tokenizer)
                }
            })
            .transpose()
    }

    /// The UNet for `offload`: on the device (full), staged in RAM and built whole while
    /// denoising (medvram), or built part by part for every step (lowvram).
    pub fn unet_part(&self, dtype: DType, device: &Device, offload: Offload) -> Result<Part<UNet>> {
        if offload == Offload::Lowvram {
            let weights = WeightTable::new();
            let source = weights.recorder(self.unet_vb(dtype, &Device::Cpu)?);
            let vb = memory::staged(source, dtype, device);
            let unet = UNet::streamed(vb, &self.unet_config).map_err(|e| self.unet_error(e))?;
            return Ok(Part::resident(unet, weights));
        }
        self.part(
            offload,
            dtype,
            device,
            |t, d| self.unet_vb(t, d),
            self.unet_builder(),
        )
    }

    pub fn vae_part(
        &self,
        dtype: DType,
        device: &Device,
        offload: Offload,
    ) -> Result<Part<VaeDecoder>> {
        self.part(
            offload,
            dtype,
            device,
            |t, d| self.vae_vb(t, d),
            self.vae_builder(),
        )
    }
}

/// A candle error's message without the backtrace it carries when RUST_BACKTRACE is set.
pub fn candle_msg(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
