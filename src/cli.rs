//! The command line: `sd-studio` or `sd-studio studio` opens the window (feature `gui`);
//! `sd-studio generate`, `sd-studio bench`, `sd-studio schedulers` run headless.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};

use crate::engine::cache::{LoadOptions, ModelCache};
use crate::engine::grid::{self, Picture};
use crate::engine::image_ops::{cover_crop, cover_crop_mask};
use crate::engine::memory::{self, MemoryMode, MemoryOptions, Slicing, Tiling};
use crate::engine::metadata::{encode_png, output_path, write_atomic, Parameters};
use crate::engine::model::{self, ModelFiles, DEFAULT_MODEL};
use crate::engine::pipeline::{GenerateRequest, StableDiffusion, Variation};
use crate::engine::presets;
use crate::engine::rng::RngKind;
use crate::engine::schedulers::{SchedulerKind, TimestepSpacing};
use crate::engine::{self, Error, Result};

#[derive(Parser, Debug)]
#[command(name = "sd-studio", version, about = "Stable Diffusion studio: candle engine with diffusers parity", long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Without a subcommand: open the studio window.
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub studio: StudioArgs,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once
pub enum Command {
    /// Open the studio window (the default).
    Studio(StudioArgs),
    /// Generate images from a prompt and write them as PNGs with A1111 metadata.
    Generate(GenerateArgs),
    /// Time text encoding, denoising steps and decoding for a model.
    Bench(BenchArgs),
    /// List the samplers with a one-line description each.
    Schedulers,
    /// Print a prompt's tokens and A1111 weights per 77-token chunk, as JSON.
    Tokenize(TokenizeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Diffusers folder, Hugging Face hub id (owner/name, resolved in the hub cache) or
    /// single .safetensors checkpoint. `generate` takes it more than once to compare models
    /// at the same seeds (settings come from the first model's preset).
    #[arg(long, default_value = DEFAULT_MODEL, action = clap::ArgAction::Append)]
    pub model: Vec<String>,
    /// Compute device: auto (CUDA when this build has it and a GPU answers, else the CPU),
    /// cpu or cuda (needs a build with --features cuda).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Weights and compute precision: auto (f16 on a GPU, f32 on the CPU), f32, f16 or bf16
    /// (half precision on the CPU is slower than f32: for checking the GPU's numerics).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// For a single-file checkpoint: a diffusers folder or hub id whose config files describe
    /// its architecture (default: inferred from the tensor shapes).
    #[arg(long)]
    pub config: Option<String>,
    /// For a single-file checkpoint: it predicts v (SD 2.x 768 models). Default: read from a
    /// `.yaml` beside the file, as A1111 does.
    #[arg(long)]
    pub v_prediction: bool,
    /// A VAE to use instead of the model's own: hub id (stabilityai/sd-vae-ft-mse), diffusers
    /// folder, or single .safetensors file (A1111's models/VAE). Recorded as "VAE"/"VAE hash".
    #[arg(long)]
    pub vae: Option<String>,
    /// Where the weights live while generating: full (all on the device), medvram (one of
    /// text encoder / UNet / VAE at a time), lowvram (the UNet one part at a time), or auto
    /// (from free memory).
    #[arg(long, default_value = "auto")]
    pub memory: String,
    /// Attention slicing: auto (only when the score matrix would not fit), off, on, or the
    /// number of queries per slice.
    #[arg(long, default_value = "auto")]
    pub attention_slicing: String,
    /// Tiled VAE decode (diffusers' enable_tiling): auto (only when a whole decode would not
    /// fit), on or off.
    #[arg(long, default_value = "auto")]
    pub vae_tiling: String,
    /// Keep recently used models loaded up to this many GiB together (compare mode)
    /// [default: half the free RAM for the CPU, 16 GiB on a GPU].
    #[arg(long)]
    pub cache_gib: Option<f64>,
}

impl ModelArgs {
    /// `--memory`, `--attention-slicing`, `--vae-tiling`, checked.
    fn memory_options(&self) -> Result<MemoryOptions> {
        Ok(MemoryOptions {
            mode: MemoryMode::parse(&self.memory)?,
            attention: Slicing::parse(&self.attention_slicing)?,
            vae_tiling: Tiling::parse(&self.vae_tiling)?,
        })
    }

    /// The one model of commands that take one.
    fn single(&self) -> Result<&str> {
        match self.model.as_slice() {
            [m] => Ok(m),
            _ => Err(Error::invalid(
                "model",
                "this command takes one --model (only `generate` compares several)",
            )),
        }
    }

    fn load_options(&self, model: &str) -> LoadOptions {
        LoadOptions {
            model: model.to_string(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            vae: self.vae.clone(),
            config: self.config.clone(),
            v_prediction: self.v_prediction,
            memory: MemoryMode::parse(&self.memory).unwrap_or_default(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampler, by CLI or A1111 name (`sd-studio schedulers` lists them)
    /// [default: the model's preset, else its scheduler config].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Override the config's timestep spacing: leading, trailing or linspace.
    #[arg(long)]
    pub timestep_spacing: Option<String>,
    /// Denoising steps [default: the model's preset, else 20].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (CFG); 1 or less skips the negative prompt
    /// [default: the model's preset, else 7.5].
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Image width in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: the model's native size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Number of images; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
}

/// ControlNets: the i-th image, scale, start, end and preprocessor belong to the i-th
/// `--controlnet` (one value given applies to all).
#[derive(Args, Debug, Clone, Default)]
pub struct ControlArgs {
    /// A ControlNet: diffusers folder, hub id (lllyasviel/control_v11p_sd15_canny) or an
    /// A1111-layout .safetensors (repeat for several).
    #[arg(long)]
    pub controlnet: Vec<String>,
    /// The picture steering it (resized to the output size; then preprocessed).
    #[arg(long)]
    pub control_image: Vec<PathBuf>,
    /// diffusers' controlnet_conditioning_scale [default: 1.0].
    #[arg(long, allow_negative_numbers = true)]
    pub control_scale: Vec<f64>,
    /// First fraction of the steps it steers, 0..1 [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub control_start: Vec<f64>,
    /// Last fraction of the steps it steers, 0..1 [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub control_end: Vec<f64>,
    /// none (the picture is the map) or canny (edges, low 100 / high 200) [default: none].
    #[arg(long)]
    pub control_preprocess: Vec<String>,
}

/// A1111's Hires. fix: generate at the base size, upscale, then an img2img pass.
#[derive(Args, Debug, Clone, Default)]
pub struct HiresArgs {
    /// Upscale factor of the second pass (A1111's "Upscale by", e.g. 2).
    #[arg(long, allow_negative_numbers = true)]
    pub hires_scale: Option<f64>,
    /// The second pass's width instead of a scale (height keeps the aspect unless given).
    #[arg(long)]
    pub hires_width: Option<usize>,
    /// The second pass's height instead of a scale.
    #[arg(long)]
    pub hires_height: Option<usize>,
    /// Denoising strength of the second pass, 0..1 [default: 0.7].
    #[arg(long, allow_negative_numbers = true)]
    pub hires_strength: Option<f64>,
    /// Steps of the second pass (of which strength × steps run) [default: --steps].
    #[arg(long)]
    pub hires_steps: Option<usize>,
    /// latent (bilinear latents, A1111's "Latent"), latent-nearest, or lanczos (the decoded
    /// picture resized, encoded again) [default: latent].
    #[arg(long)]
    pub hires_upscaler: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the first image (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Noise source: torch-cuda (torch.Generator("cuda"), A1111's default "GPU" noise, computed
    /// on any device) or torch-cpu (torch.Generator("cpu")).
    #[arg(long, default_value = "torch-cuda")]
    pub rng: String,
    /// Safetensors file with tensor `latents` (f32 [batch,4,H/8,W/8]) used instead of drawn noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// img2img: start from this picture (resized to cover the size, then center-cropped).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Inpainting mask (grayscale, white = repaint), with --init-image. An inpainting model
    /// (9-channel UNet) sees the mask; an ordinary model gets the known region blended back
    /// every step.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// img2img strength, 0..1: how much of the schedule runs (1 ignores the picture)
    /// [default: 0.75, or 1.0 when inpainting].
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// A1111 "Clip skip": 1 uses the text encoder's last layer, 2 the one before (anime models).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// A1111 variation seed: blend in this seed's noise (image i of a batch uses it + i).
    #[arg(long)]
    pub variation_seed: Option<u64>,
    /// How far towards the variation seed's noise, 0..1.
    #[arg(long, allow_negative_numbers = true)]
    pub variation_strength: Option<f64>,
    /// SDXL size condition: the "original" size WxH the model is told (default: the image's).
    #[arg(long, value_parser = parse_wxh)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL crop condition X,Y: the top-left corner of the crop the model is told (default 0,0).
    #[arg(long, value_parser = parse_xy, allow_hyphen_values = true)]
    pub crops_coords_top_left: Option<(usize, usize)>,
    /// SDXL size condition: the target size WxH (default: the image's).
    #[arg(long, value_parser = parse_wxh)]
    pub target_size: Option<(usize, usize)>,
    /// A LoRA for every image, FILE[:WEIGHT] (weight default 1; negative allowed; repeat
    /// for several). Prompt tags `<lora:NAME:WEIGHT>` add more from --lora-dir.
    #[arg(long, allow_hyphen_values = true)]
    pub lora: Vec<String>,
    /// Folder `<lora:NAME>` tags are looked up in (subfolders searched; repeatable).
    #[arg(long)]
    pub lora_dir: Vec<PathBuf>,
    /// Folder of textual-inversion embeddings: a prompt word that is a file's name uses it
    /// (subfolders searched; repeatable).
    #[arg(long)]
    pub embeddings_dir: Vec<PathBuf>,
    /// An A1111 or ComfyUI folder: its LoRA and embeddings folders are searched too
    /// (A1111: models/Lora, embeddings; ComfyUI: models/loras, models/embeddings).
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub hires: HiresArgs,
    /// Output folder (created if missing).
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// Also write a labelled comparison grid here (.png): one row per --model, one column
    /// per seed, as A1111's X/Y plot.
    #[arg(long)]
    pub grid: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Default)]
pub struct StudioArgs {
    /// Model to load at start: diffusers folder or hub id (default: the last one used).
    #[arg(long)]
    pub model: Option<String>,
    /// Compute device: auto, cpu or cuda.
    #[arg(long)]
    pub device: Option<String>,
    /// Precision: auto (f16 on a GPU, f32 on the CPU), f32, f16 or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Prompt to start with.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Where settings, last prompt and history are kept (default: ~/.config/sd-studio/state.json).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Neither read nor write the state file.
    #[arg(long)]
    pub no_persist: bool,
    /// Generate a grid as soon as the model is loaded.
    #[arg(long)]
    pub auto_generate: bool,
    /// Save screenshots (mid-generation, finished, large view) here, then close and print
    /// frame/preview timings as JSON.
    #[arg(long)]
    pub screenshot_dir: Option<PathBuf>,
    /// Renderer: wgpu or glow.
    #[arg(long, default_value = "wgpu")]
    pub renderer: String,
    /// TAESD preview weights: folder or hub id (default: madebyollin/taesd).
    #[arg(long)]
    pub taesd: Option<String>,
    /// Output folder for finished images.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// Diffusers folder or hub id whose tokenizer to use.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The prompt, in A1111 syntax.
    #[arg(long)]
    pub prompt: String,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Timed repetitions after one warm-up run.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU threads for candle's kernels (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Batch sizes to time, comma-separated (e.g. 1,4,8) [default: --batch].
    #[arg(long)]
    pub batches: Option<String>,
    /// Also time the studio's whole 2×4 grid: 8 images end to end (prompt, every step,
    /// decode), with TAESD previews of all 8 cells after every step when --taesd is given.
    #[arg(long)]
    pub grid: bool,
    /// TAESD weights (folder or hub id) for the preview timings.
    #[arg(long)]
    pub taesd: Option<String>,
    /// Also break one run's UNet time down by part (group norms, convolutions, attention, …),
    /// each timed between device synchronisations: shares, not speed.
    #[arg(long)]
    pub profile: bool,
    /// LoRAs, FILE[:WEIGHT] (repeatable): times merging them into the loaded weights (first
    /// time, the same set again, every weight changed, all removed), then runs the timed
    /// cases with them applied.
    #[arg(long, allow_hyphen_values = true)]
    pub lora: Vec<String>,
    /// ControlNets: the timed cases run with them (a synthetic edge map unless
    /// --control-image is given).
    #[command(flatten)]
    pub control: ControlArgs,
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => studio(cli.studio),
        Some(Command::Studio(a)) => studio(a),
        Some(Command::Generate(a)) => generate(&a),
        Some(Command::Bench(a)) => bench(&a),
        Some(Command::Tokenize(a)) => tokenize(&a),
        Some(Command::Schedulers) => {
            for k in SchedulerKind::ALL {
                let (name, sched) = k.a1111_name();
                let label = match sched {
                    Some(s) => format!("{name} {s}"),
                    None => name.to_string(),
                };
                println!("{:<16} {:<18} {}", k.cli_name(), label, k.description());
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "gui")]
fn studio(a: StudioArgs) -> Result<()> {
    let opts = crate::ui::StudioOptions {
        model: a.model,
        device: a.device,
        dtype: a.dtype,
        state_file: a.state_file,
        no_persist: a.no_persist,
        screenshot_dir: a.screenshot_dir,
        auto_generate: a.auto_generate,
        prompt: a.prompt,
        renderer: a.renderer,
        taesd: a.taesd,
        out: a.out,
    };
    crate::ui::run(opts).map_err(|e| Error::invalid("studio", e))
}

#[cfg(not(feature = "gui"))]
fn studio(_: StudioArgs) -> Result<()> {
    Err(Error::invalid(
        "command",
        "this build has no studio window (built without the `gui` feature); use `sd-studio generate`",
    ))
}

/// A random seed in A1111's range (0 ..= 2^32 - 1).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xffff_ffff
}

/// Settings after model presets filled what the user left out.
struct Settings {
    spacing: Option<TimestepSpacing>,
    scheduler: SchedulerKind,
    steps: usize,
    guidance: f64,
    width: usize,
    height: usize,
}

/// Checks everything that needs no weights, so bad input fails before a slow load.
struct Prepared {
    memory: MemoryOptions,
    device: Device,
    dtype: DType,
    files: ModelFiles,
    settings: Settings,
}

fn prepare(model: &str, m: &ModelArgs, s: &SamplingArgs) -> Result<Prepared> {
    let scheduler = s
        .scheduler
        .as_deref()
        .map(SchedulerKind::parse)
        .transpose()?;
    let spacing = match &s.timestep_spacing {
        None => None,
        Some(x) => Some(TimestepSpacing::parse(x).ok_or_else(|| {
            Error::invalid(
                "timestep spacing",
                format!("{x:?} is not leading, trailing or linspace"),
            )
        })?),
    };
    if s.steps == Some(0) {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    if let Some(g) = s.guidance {
        if !g.is_finite() || g < 0.0 {
            return Err(Error::invalid(
                "guidance",
                format!("{g} is not a finite number ≥ 0"),
            ));
        }
    }
    for (what, v) in [("width", s.width), ("height", s.height)] {
        if let Some(v) = v {
            if v == 0 || v % 8 != 0 {
                return Err(Error::invalid(
                    what,
                    format!("{v} is not a positive multiple of 8"),
                ));
            }
            if v > engine::memory::MAX_SIDE {
                return Err(Error::invalid(
                    what,
                    format!("{v} is larger than {} pixels", engine::memory::MAX_SIDE),
                ));
            }
        }
    }
    if s.batch == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    if s.batch > engine::memory::MAX_BATCH {
        return Err(Error::invalid(
            "batch",
            format!(
                "{} is more than {} images in one run; run several",
                s.batch,
                engine::memory::MAX_BATCH
            ),
        ));
    }
    let memory = m.memory_options()?;
    if let Some(g) = m.cache_gib {
        if !g.is_finite() || g <= 0.0 {
            return Err(Error::invalid(
                "cache-gib",
                format!("{g} is not a positive number of GiB"),
            ));
        }
    }
    let device = engine::device(&m.device)?;
    let dtype = engine::dtype_for(&m.dtype, &device)?;
    let mut files = ModelFiles::open(
        model,
        dtype != DType::F32,
        m.config.as_deref(),
        m.v_prediction,
        m.vae.as_deref(),
    )?;
    let d = presets::defaults_for(model, &files);
    files.scheduler_config = files
        .scheduler_config
        .clone()
        .with_spacing(spacing.or(d.spacing));
    let settings = Settings {
        spacing: spacing.or(d.spacing),
        scheduler: scheduler.unwrap_or(d.scheduler),
        steps: s.steps.unwrap_or(d.steps),
        guidance: s.guidance.unwrap_or(d.guidance),
        width: s.width.unwrap_or(d.width),
        height: s.height.unwrap_or(d.height),
    };
    // Fail on a bad step count now rather than after loading.
    settings
        .scheduler
        .build(&files.scheduler_config, settings.steps)?;
    Ok(Prepared {
        memory,
        device,
        dtype,
        files,
        settings,
    })
}

fn load_init_latents(path: &Path) -> Result<Tensor> {
    if !path.is_file() {
        return Err(Error::NotFound {
            what: "init latents file".into(),
            path: path.to_path_buf(),
        });
    }
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::read(path, e))?;
    let t = tensors
        .get("latents")
        .ok_or_else(|| Error::read(path, "no tensor named `latents`"))?;
    if t.dtype() != DType::F32 {
        return Err(Error::read(
            path,
            format!("`latents` is {:?}, expected f32", t.dtype()),
        ));
    }
    if t.rank() != 4 {
        return Err(Error::read(
            path,
            format!(
                "`latents` has shape {:?}, expected [batch, 4, H/8, W/8]",
                t.dims()
            ),
        ));
    }
    Ok(t.clone())
}

fn open_image(path: &Path) -> Result<image::RgbImage> {
    if !path.is_file() {
        return Err(Error::NotFound {
            what: "image".into(),
            path: path.to_path_buf(),
        });
    }
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::read(path, e))?
        .decode()
        .map_err(|e| Error::read(path, format!("not a readable image: {e}")))?;
    Ok(img.to_rgb8())
}

/// A grayscale mask at `w`×`h` (nearest-neighbour resize, said on stderr, if it differs).
fn load_mask(path: &Path, w: usize, h: usize) -> Result<Vec<u8>> {
    let rgb = open_image(path)?;
    if rgb.pixels().any(|p| p[0] != p[1] || p[1] != p[2]) {
        return Err(Error::read(
            path,
            "the mask must be grayscale (white = repaint, black = keep)",
        ));
    }
    let gray = image::DynamicImage::ImageRgb8(rgb).to_luma8();
    if (gray.width() as usize, gray.height() as usize) != (w, h) {
        eprintln!(
            "note: mask {}x{} fitted to {w}x{h} like the picture (scaled to cover, centre cropped)",
            gray.width(),
            gray.height()
        );
    }
    Ok(cover_crop_mask(gray, w, h))
}

fn ensure_writable_dir(dir: &Path) -> Result<()> {
    let werr = |e: std::io::Error| Error::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(werr)?;
    let probe = dir.join(format!(".sd-studio-write-test.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(werr)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The job's LoRAs and the folders tags and embeddings are looked up in, each LoRA file
/// checked before any model loads.
fn networks(a: &GenerateArgs) -> Result<crate::engine::apply::Networks> {
    use crate::engine::apply;
    let mut n = apply::Networks::default();
    for l in &a.lora {
        let u = apply::parse_lora_arg(l)?;
        crate::engine::lora::LoraFile::open(&u.path)?;
        n.loras.push(u);
    }
    for d in a.lora_dir.iter().chain(&a.embeddings_dir) {
        if !d.is_dir() {
            return Err(Error::NotFound {
                what: "folder".into(),
                path: d.clone(),
            });
        }
    }
    n.lora_dirs = a.lora_dir.clone();
    n.embedding_dirs = a.embeddings_dir.clone();
    if let Some(m) = &a.models_dir {
        let (l, e) = apply::folders_in(m);
        n.lora_dirs.extend(l);
        n.embedding_dirs.extend(e);
    }
    // Tags name files that must exist: say so before the model loads.
    apply::resolve_loras(&a.prompt, &a.negative_prompt, &n)?;
    Ok(n)
}

/// The i-th of `v` for `n` ControlNets: none given → `default`, one → for all, n → each.
fn per_unit<T: Clone>(v: &[T], n: usize, i: usize, flag: &'static str, default: T) -> Result<T> {
    match v.len() {
        0 => Ok(default),
        1 => Ok(v[0].clone()),
        k if k == n => Ok(v[i].clone()),
        k => Err(Error::invalid(
            flag,
            format!("given {k} times for {n} --controlnet (give it once, or once per ControlNet)"),
        )),
    }
}

/// The job's ControlNets, every file and value checked (and each ControlNet's architecture
/// against the model's UNet) before any weights load; maps at the job's size. A hub id is
/// fetched in the variant the model's dtype loads (fp16 weights for f16).
fn controls(
    c: &ControlArgs,
    p: &Prepared,
    synthetic: bool,
) -> Result<Vec<crate::engine::control::ControlUse>> {
    let (files, w, h) = (&p.files, p.settings.width, p.settings.height);
    use crate::engine::control::{self, ControlUse, Preprocess};
    let n = c.controlnet.len();
    if n == 0 {
        for (flag, given) in [
            ("control image", !c.control_image.is_empty()),
            ("control scale", !c.control_scale.is_empty()),
            ("control start", !c.control_start.is_empty()),
            ("control end", !c.control_end.is_empty()),
            ("control preprocess", !c.control_preprocess.is_empty()),
        ] {
            if given {
                return Err(Error::invalid(flag, "needs --controlnet"));
            }
        }
        return Ok(Vec::new());
    }
    if c.control_image.len() != n && !(synthetic && c.control_image.is_empty()) {
        return Err(Error::invalid(
            "control image",
            format!(
                "{} --control-image for {n} --controlnet: give one picture per ControlNet",
                c.control_image.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for (i, spec) in c.controlnet.iter().enumerate() {
        let pre = Preprocess::parse(&per_unit(
            &c.control_preprocess,
            n,
            i,
            "control preprocess",
            "none".to_string(),
        )?)?;
        let picture = match c.control_image.get(i) {
            Some(path) => {
                let img = open_image(path)?;
                let (sw, sh) = (img.width() as usize, img.height() as usize);
                control::fit(img.as_raw(), sw, sh, w, h)?
            }
            None => synthetic_map(w, h),
        };
        let unit = ControlUse {
            model: spec.clone(),
            image: pre.apply(&picture, w, h),
            module: pre.name().to_string(),
            scale: per_unit(&c.control_scale, n, i, "control scale", 1.0)?,
            start: per_unit(&c.control_start, n, i, "control start", 0.0)?,
            end: per_unit(&c.control_end, n, i, "control end", 1.0)?,
        };
        unit.check(i)?;
        let cn = crate::engine::controlnet_files::ControlNetFiles::open(
            spec,
            p.dtype != candle_core::DType::F32,
        )?;
        cn.check_fits(&files.unet_config, files.vae_config.scale_factor())?;
        out.push(unit);
    }
    Ok(out)
}

/// The bench's control map: white squares' outlines on black, every 64 pixels.
fn synthetic_map(w: usize, h: usize) -> Vec<u8> {
    let mut rgb = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            if x % 64 == 16 || y % 64 == 16 {
                rgb[(y * w + x) * 3..][..3].fill(255);
            }
        }
    }
    rgb
}

/// The Hires. fix pass asked for, checked; None without hires flags.
fn hires(
    h: &HiresArgs,
    base: (usize, usize),
    f: usize,
) -> Result<Option<crate::engine::pipeline::Hires>> {
    use crate::engine::pipeline::{Hires, HiresUpscaler};
    let sized = h.hires_scale.is_some() || h.hires_width.is_some() || h.hires_height.is_some();
    if !sized {
        for (flag, given) in [
            ("hires strength", h.hires_strength.is_some()),
            ("hires steps", h.hires_steps.is_some()),
            ("hires upscaler", h.hires_upscaler.is_some()),
        ] {
            if given {
                return Err(Error::invalid(
                    flag,
                    "needs --hires-scale (or --hires-width/--hires-height)",
                ));
            }
        }
        return Ok(None);
    }
    let strength = h.hires_strength.unwrap_or(0.7);
    if !(0.0..=1.0).contains(&strength) || strength.is_nan() {
        return Err(Error::invalid(
            "hires strength",
            format!("{strength} is outside 0..1"),
        ));
    }
    let upscaler = HiresUpscaler::parse(h.hires_upscaler.as_deref().unwrap_or("latent"))?;
    let (width, height) = Hires::target(base, h.hires_scale, h.hires_width, h.hires_height, f)?;
    Ok(Some(Hires {
        width,
        height,
        steps: h.hires_steps,
        strength,
        upscaler,
        scale: h
            .hires_scale
            .filter(|_| h.hires_width.is_none() && h.hires_height.is_none()),
    }))
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let rng = RngKind::parse(&a.rng)
        .ok_or_else(|| Error::invalid("rng", format!("{:?} is not torch-cpu", a.rng)))?;
    let init_latents = a
        .init_latents
        .as_deref()
        .map(load_init_latents)
        .transpose()?;
    let networks = networks(a)?;
    let mut p = prepare(&a.model.model[0], &a.model, &a.sampling)?;
    ensure_writable_dir(&a.out)?;
    if let Some(g) = &a.grid {
        if !g.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            return Err(Error::invalid(
                "grid",
                format!("{} must be a .png file", g.display()),
            ));
        }
        if let Some(dir) = g.parent().filter(|d| !d.as_os_str().is_empty()) {
            ensure_writable_dir(dir)?;
        }
    }
    let seed = match a.seed {
        Some(s) => s,
        None => {
            let s = random_seed();
            eprintln!("seed: {s}");
            s
        }
    };
    let variation = match (a.variation_seed, a.variation_strength) {
        (None, None) => None,
        (seed, strength) => {
            let strength = strength.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&strength) || strength.is_nan() {
                return Err(Error::invalid(
                    "variation strength",
                    format!("{strength} is outside 0..1"),
                ));
            }
            Some(Variation {
                seed: seed.unwrap_or_else(random_seed),
                strength,
            })
        }
    };
    if a.clip_skip == 0 || a.clip_skip > p.files.clip_config.num_hidden_layers {
        return Err(Error::invalid(
            "clip skip",
            format!(
                "{} is outside 1..={} (the text encoder's layers)",
                a.clip_skip, p.files.clip_config.num_hidden_layers
            ),
        ));
    }
    let init_image = match &a.init_image {
        None => {
            if a.strength.is_some() {
                return Err(Error::invalid("strength", "needs --init-image"));
            }
            if a.mask.is_some() {
                return Err(Error::invalid(
                    "mask",
                    "needs --init-image (the picture to repaint)",
                ));
            }
            None
        }
        Some(path) => {
            let strength = a.strength.unwrap_or(0.75);
            if !(0.0..=1.0).contains(&strength) || strength.is_nan() {
                return Err(Error::invalid(
                    "strength",
                    format!("{strength} is outside 0..1"),
                ));
            }
            let img = open_image(path)?;
            // Without an explicit size, img2img keeps the picture's (rounded down to 8).
            if a.sampling.width.is_none() {
                p.settings.width = (img.width() as usize / 8 * 8).max(8);
            }
            if a.sampling.height.is_none() {
                p.settings.height = (img.height() as usize / 8 * 8).max(8);
            }
            let rgb = cover_crop(img, p.settings.width, p.settings.height);
            let mask = a
                .mask
                .as_deref()
                .map(|m| load_mask(m, p.settings.width, p.settings.height))
                .transpose()?;
            let strength = if a.mask.is_some() {
                a.strength.unwrap_or(1.0)
            } else {
                strength
            };
            Some(crate::engine::pipeline::InitImage {
                rgb,
                strength,
                mask,
            })
        }
    };
    let controls = controls(&a.control, &p, false)?;
    let hires = hires(
        &a.hires,
        (p.settings.width, p.settings.height),
        p.files.vae_config.scale_factor(),
    )?;
    let st = &p.settings;
    let req = GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        seed,
        batch: a.sampling.batch,
        steps: st.steps,
        guidance: st.guidance,
        scheduler: st.scheduler,
        width: st.width,
        height: st.height,
        rng,
        init_latents,
        init_image,
        variation,
        clip_skip: a.clip_skip,
        spacing: st.spacing,
        size_conditions: crate::engine::pipeline::SizeConditions {
            original: a.original_size,
            crop: a.crops_coords_top_left.unwrap_or((0, 0)),
            target: a.target_size,
        },
        networks,
        controls,
        hires,
    };
    let mut cache = ModelCache::new(match a.model.cache_gib {
        Some(g) => (g * (1u64 << 30) as f64) as u64,
        None => ModelCache::default_budget(&a.model.device),
    });
    let compare = a.model.model.len() > 1;
    let mut rows: Vec<(String, Vec<Picture>)> = Vec::new();
    let mut first_params: Option<Parameters> = None;
    crate::engine::metadata::clean_stale_temps(&a.out);
    let stdout = std::io::stdout();
    // Compared models are named so that no two rows, files or JSON lines look alike.
    let labels =
        crate::protocol::distinct_labels(&a.model.model, crate::engine::cache::model_label);
    for (model, label) in a.model.model.iter().zip(&labels) {
        let start = Instant::now();
        eprintln!(
            "loading {model} (device {}, {:?})",
            engine::device_name(&p.device),
            p.dtype
        );
        let mut last = String::new();
        let m = cache.get(&a.model.load_options(model), &mut |msg, _| {
            if msg != last {
                eprintln!("  {msg}");
                last = msg.to_string();
            }
        })?;
        let sd = &m.sd;
        eprintln!("memory: {}", m.placement);
        sd.set_memory_options(p.memory);
        sd.check(&req)?;
        if req.init_image.as_ref().is_some_and(|i| i.mask.is_some()) {
            eprintln!(
                "inpainting: {}",
                if sd.is_inpainting_model() {
                    "inpainting model (9-channel UNet sees the mask)"
                } else {
                    "ordinary model: the known region is blended back after every step"
                }
            );
        }
        let mut run = sd.begin(&req)?;
        for w in &run.adapters.warnings {
            eprintln!("warning: {w}");
        }
        if !run.adapters.lora_hashes.is_empty() {
            let names: Vec<&str> = run
                .adapters
                .lora_hashes
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            eprintln!(
                "LoRAs: {} ({} weights merged)",
                names.join(", "),
                run.adapters.rewritten
            );
        }
        while !run.is_done() {
            let s = sd.step(&mut run)?;
            eprintln!("step {}/{}", s.step, s.total);
        }
        let (images, _) = sd.finish(run)?;
        let elapsed = start.elapsed().as_secs_f64();
        let mut pictures = Vec::new();
        for img in images {
            let params = m.parameters(&req, &img);
            let png = encode_png(&img.rgb, img.width, img.height, &params.to_a1111())?;
            let mut stem = match img.variation_seed {
                Some(v) => format!("{}-{v}", img.seed),
                None => img.seed.to_string(),
            };
            if compare {
                stem = format!("{}-{stem}", crate::worker::file_safe(label));
            }
            let path = output_path(&a.out, &stem);
            write_atomic(&path, &png)?;
            let line = serde_json::json!({
                "seed": img.seed,
                "variation_seed": img.variation_seed,
                "path": path,
                "model": label,
                "model_hash": m.model_hash(),
                "vae": m.vae.as_ref().map(|v| &v.0),
                "scheduler": st.scheduler.cli_name(),
                "steps": req.steps,
                "guidance": req.guidance,
                "width": img.width,
                "height": img.height,
                "elapsed": (elapsed * 1000.0).round() / 1000.0,
            });
            let _ = writeln!(stdout.lock(), "{line}");
            first_params.get_or_insert(params);
            pictures.push(Picture {
                width: img.width,
                height: img.height,
                rgb: img.rgb,
            });
        }
        rows.push((label.clone(), pictures));
    }
    if let Some(path) = &a.grid {
        let cols: Vec<String> = (0..req.batch)
            .map(|i| format!("Seed: {}", req.seeds_of(i).0))
            .collect();
        let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let cells: Vec<Vec<Picture>> = rows.into_iter().map(|r| r.1).collect();
        let g = grid::compose(&cells, &labels, &cols)?;
        let text = first_params.map(|p| p.to_a1111()).unwrap_or_default();
        write_atomic(path, &encode_png(&g.rgb, g.width, g.height, &text)?)?;
        let line = serde_json::json!({ "grid": path, "rows": labels, "columns": cols,
            "width": g.width, "height": g.height });
        let _ = writeln!(stdout.lock(), "{line}");
    }
    Ok(())
}

fn tokenize(a: &TokenizeArgs) -> Result<()> {
    let root = model::resolve(&a.model, false)?;
    let tok = crate::engine::tokenizer::ClipTokenizer::from_dir(&root.join("tokenizer"))?;
    let t = crate::engine::prompt::tokenize(&tok, &a.prompt)?;
    let chunks: Vec<_> = t
        .chunks
        .iter()
        .map(|c| serde_json::json!({ "ids": c.ids, "weights": c.weights }))
        .collect();
    println!(
        "{}",
        serde_json::json!({ "token_count": t.token_count, "chunks": chunks })
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median, min and max of `v` (zeros when empty).
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    let m = median(v);
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    (m, if lo.is_finite() { lo } else { 0.0 }, hi)
}

fn bench(a: &BenchArgs) -> Result<()> {
    if a.threads > 0 {
        // candle's CPU kernels size their pools from RAYON_NUM_THREADS when first used.
        std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    }
    let batches: Vec<usize> = match &a.batches {
        None => vec![a.sampling.batch],
        Some(list) => list
            .split(',')
            .map(|x| match x.trim().parse::<usize>() {
                Ok(b) if b > 0 => Ok(b),
                _ => Err(Error::invalid(
                    "batches",
                    format!("{x:?} in {list:?} is not a positive batch size"),
                )),
            })
            .collect::<Result<_>>()?,
    };
    if a.runs == 0 {
        return Err(Error::invalid("runs", "must be at least 1"));
    }
    let p = prepare(a.model.single()?, &a.model, &a.sampling)?;
    let bench_controls = controls(&a.control, &p, true)?;
    let s = &p.settings;
    let device = p.device.clone();
    let sync = |what: &str| {
        device
            .synchronize()
            .map_err(|e| Error::invalid("device", format!("{what}: {e}")))
    };
    let monitor = memory::PeakMemory::start(&device);
    let base = monitor.now().unwrap_or(0);
    let sizes_free = memory::free_memory(&device);
    let t0 = Instant::now();
    let sizes = crate::engine::cache::component_bytes(&p.files, p.dtype)?;
    let offload = memory::choose_offload(p.memory.mode, !device.is_cpu(), sizes_free, sizes);
    let sd = StableDiffusion::load_offloaded(p.files, p.device.clone(), p.dtype, offload)?;
    sd.set_memory_options(p.memory);
    sync("load")?;
    let load = t0.elapsed().as_secs_f64();
    let weights_resident = monitor.now().map(|n| n.saturating_sub(base));
    let taesd = match &a.taesd {
        Some(t) => Some(crate::engine::taesd::TaesdDecoder::load(
            &crate::engine::taesd::resolve(t)?,
            p.dtype,
            &device,
        )?),
        None => None,
    };
    let req = |batch: usize| GenerateRequest {
        size_conditions: Default::default(),
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: String::new(),
        seed: 0,
        batch,
        steps: s.steps,
        guidance: s.guidance,
        scheduler: s.scheduler,
        width: s.width,
        height: s.height,
        rng: RngKind::TorchCpu,
        init_latents: None,
        init_image: None,
        variation: None,
        clip_skip: 1,
        spacing: s.spacing,
        networks: Default::default(),
        controls: bench_controls.clone(),
        hires: None,
    };
    let gib = |b: Option<u64>| b.map(|b| b as f64 / (1u64 << 30) as f64);
    let show = |v: &serde_json::Value| match v.as_f64() {
        Some(g) => format!("{g:.2} GiB"),
        None => "n/a".into(),
    };

    // One run: prompt, every step (synchronised, so a step's time is its GPU time), TAESD
    // previews of every image after each step when `previews`, decode of every image.
    struct Times {
        encode: f64,
        steps: Vec<f64>,
        previews: Vec<f64>,
        decode: f64,
        total: f64,
        /// Minor page faults and system CPU seconds over the denoising steps.
        faults: u64,
        sys: f64,
    }
    let run_once = |req: &GenerateRequest, previews: bool| -> Result<Times> {
        let start = Instant::now();
        let mut run = sd.begin(req)?;
        sync("prompt")?;
        let encode = start.elapsed().as_secs_f64();
        let (mut steps, mut prev) = (Vec::new(), Vec::new());
        let before = memory::process_counters().unwrap_or_default();
        while !run.is_done() {
            let t = Instant::now();
            let out = sd.step(&mut run)?;
            sync("step")?;
            steps.push(t.elapsed().as_secs_f64());
            if let (true, Some(tae), Some(x0)) = (previews, &taesd, &out.pred_original) {
                let t = Instant::now();
                crate::engine::taesd::Previewer::previews_with(tae, x0)?;
                prev.push(t.elapsed().as_secs_f64());
            }
        }
        let after = memory::process_counters().unwrap_or_default();
        let t = Instant::now();
        sd.finish(run)?;
        let decode = t.elapsed().as_secs_f64();
        Ok(Times {
            encode,
            steps,
            previews: prev,
            decode,
            total: start.elapsed().as_secs_f64(),
            faults: after.minor_faults.saturating_sub(before.minor_faults),
            sys: after.sys_s - before.sys_s,
        })
    };

    let mut cases = Vec::new();
    let mut networks = crate::engine::apply::Networks::default();
    for l in &a.lora {
        networks
            .loras
            .push(crate::engine::apply::parse_lora_arg(l)?);
    }
    if !networks.loras.is_empty() {
        let mut r = req(1);
        let time = |r: &GenerateRequest| -> Result<(f64, usize)> {
            let t = Instant::now();
            let (_, _, report) = sd.prepare_adapters(r)?;
            sync("lora")?;
            Ok((t.elapsed().as_secs_f64(), report.rewritten))
        };
        r.networks = networks.clone();
        let (first, n) = time(&r)?;
        let (again, n_again) = time(&r)?;
        let kept = sd.kept_original_bytes();
        for l in &mut r.networks.loras {
            l.te *= 0.5;
            l.unet *= 0.5;
        }
        let (changed, n_changed) = time(&r)?;
        r.networks = Default::default();
        let (removed, n_removed) = time(&r)?;
        let line = serde_json::json!({
            "case": "lora", "loras": networks.loras.len(),
            "first_apply_s": first, "tensors": n,
            "same_set_s": again, "same_set_tensors": n_again,
            "weights_changed_s": changed, "weights_changed_tensors": n_changed,
            "removed_s": removed, "removed_tensors": n_removed,
            "kept_originals_gib": kept as f64 / (1u64 << 30) as f64,
        });
        eprintln!(
            "{} LoRA(s): first apply {first:.3} s ({n} tensors, originals kept {:.2} GiB), same set {again:.4} s, weights changed {changed:.3} s, removed {removed:.3} s",
            networks.loras.len(),
            kept as f64 / (1u64 << 30) as f64
        );
        println!("{line}");
        cases.push(line);
    }
    let req = |batch: usize| GenerateRequest {
        networks: networks.clone(),
        ..req(batch)
    };
    for &batch in &batches {
        let r = req(batch);
        let (mut enc, mut step, mut dec) = (Vec::new(), Vec::new(), Vec::new());
        let (mut faults, mut sys, mut counted) = (0u64, 0.0f64, 0usize);
        run_once(&r, false)?; // warm-up
        monitor.reset();
        for _ in 0..a.runs {
            let t = run_once(&r, false)?;
            faults += t.faults;
            sys += t.sys;
            counted += t.steps.len();
            enc.push(t.encode);
            step.extend(t.steps);
            dec.push(t.decode / batch as f64);
        }
        let (st, st_min, st_max) = spread(&mut step);
        let line = serde_json::json!({
            "case": "steps", "batch": batch, "text_encode_s": median(&mut enc),
            "step_s": st, "step_min_s": st_min, "step_max_s": st_max,
            "it_per_s": if st > 0.0 { 1.0 / st } else { 0.0 },
            "images_per_s_denoising": if st > 0.0 { batch as f64 / (st * s.steps as f64) } else { 0.0 },
            "decode_per_image_s": median(&mut dec),
            "peak_gib": gib(monitor.peak().map(|p| p.saturating_sub(base))),
            "minor_faults_per_step": faults / counted.max(1) as u64,
            "sys_s_per_step": sys / counted.max(1) as f64,
        });
        eprintln!(
            "batch {batch}: step {:.4} s ({:.1} it/s), decode {:.4} s per image, peak {}, per step {} minor faults and {:.2} s system time",
            st,
            if st > 0.0 { 1.0 / st } else { 0.0 },
            line["decode_per_image_s"].as_f64().unwrap_or(0.0),
            show(&line["peak_gib"]),
            faults / counted.max(1) as u64,
            sys / counted.max(1) as f64
        );
        println!("{line}");
        cases.push(line);
    }
    if a.grid {
        let r = req(8);
        run_once(&r, true)?; // warm-up
        monitor.reset();
        let (mut total, mut step, mut prev, mut dec) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut faults, mut sys, mut counted) = (0u64, 0.0f64, 0usize);
        for _ in 0..a.runs {
            let t = run_once(&r, true)?;
            faults += t.faults;
            sys += t.sys;
            counted += t.steps.len();
            total.push(t.total);
            step.extend(t.steps);
            prev.extend(t.previews);
            dec.push(t.decode);
        }
        let (st, pv) = (median(&mut step), median(&mut prev));
        let line = serde_json::json!({
            "case": "grid", "batch": 8, "total_s": median(&mut total), "step_s": st,
            "decode_s": median(&mut dec),
            "preview_per_step_s": if taesd.is_some() { Some(pv) } else { None },
            "preview_fraction_of_step": if taesd.is_some() && st > 0.0 { Some(pv / st) } else { None },
            "peak_gib": gib(monitor.peak().map(|p| p.saturating_sub(base))),
            "minor_faults_per_step": faults / counted.max(1) as u64,
            "sys_s_per_step": sys / counted.max(1) as f64,
        });
        eprintln!(
            "grid 2x4: {:.3} s end to end (previews {}), step {:.4} s, decode {:.3} s, peak {}",
            line["total_s"].as_f64().unwrap_or(0.0),
            if taesd.is_some() {
                format!("{:.4} s per step", pv)
            } else {
                "off".into()
            },
            st,
            line["decode_s"].as_f64().unwrap_or(0.0),
            show(&line["peak_gib"])
        );
        println!("{line}");
        cases.push(line);
    }
    if a.profile {
        let batch = batches[0];
        let r = req(batch);
        crate::engine::profile::take();
        crate::engine::profile::set_enabled(true);
        let t = run_once(&r, false);
        crate::engine::profile::set_enabled(false);
        let t = t?;
        let parts = crate::engine::profile::take();
        // UNet parts against the steps' time, VAE parts ("vae …") against the decode's.
        let (vae, unet): (Vec<_>, Vec<_>) = parts.iter().partition(|p| p.0.starts_with("vae "));
        let steps = t.steps.len().max(1) as f64;
        let total: f64 = t.steps.iter().sum();
        let table = |what: &str,
                     parts: &[&(&'static str, u64, f64)],
                     total: f64,
                     per: f64,
                     unit: &str,
                     rest: &str| {
            let measured: f64 = parts.iter().map(|p| p.2).sum();
            let mut rows: Vec<(String, f64, f64)> = parts
                .iter()
                .map(|(name, calls, secs)| (name.to_string(), *calls as f64 / per, *secs))
                .collect();
            rows.push((rest.to_string(), 0.0, (total - measured).max(0.0)));
            rows.sort_by(|x, y| y.2.total_cmp(&x.2));
            eprintln!(
                "profile, batch {batch}, {what}: {:.2} ms per {unit} with synchronisation after every part",
                total / per * 1e3
            );
            eprintln!(
                "{:>9} {:>7} {:>8}  part",
                format!("ms/{unit}"),
                "share",
                "calls"
            );
            let mut json_rows = Vec::new();
            for (name, calls, secs) in &rows {
                let share = if total > 0.0 { secs / total } else { 0.0 };
                eprintln!(
                    "{:>9.3} {:>6.1}% {:>8.0}  {name}",
                    secs / per * 1e3,
                    share * 100.0,
                    calls
                );
                json_rows.push(serde_json::json!({
                    "part": name, "calls_per_step": calls, "ms_per_step": secs / per * 1e3, "share": share,
                }));
            }
            json_rows
        };
        let unet_rows = table(
            "UNet step",
            &unet,
            total,
            steps,
            "step",
            "rest of the step (sampler, CFG, casts, untimed glue)",
        );
        let images = batch as f64;
        let vae_rows = table(
            "VAE decode",
            &vae,
            t.decode,
            images,
            "image",
            "rest of the decode (casts, copies to the host)",
        );
        let line = serde_json::json!({
            "case": "profile", "batch": batch, "step_s": total / steps, "parts": unet_rows,
            "decode_per_image_s": t.decode / images, "decode_parts": vae_rows,
        });
        println!("{line}");
        cases.push(line);
    }
    let first = &cases[0];
    let summary = serde_json::json!({
        "model": a.model.single()?, "device": a.model.device, "dtype": a.model.dtype,
        "memory": offload.name(), "attention_slicing": a.model.attention_slicing,
        "width": s.width, "height": s.height, "guidance": s.guidance,
        "scheduler": s.scheduler.cli_name(), "steps": s.steps, "runs": a.runs,
        "threads": if a.threads > 0 { a.threads } else { candle_core::utils::get_num_threads() },
        "load_s": load, "weights_gib": gib(weights_resident),
        "controlnets": a.control.controlnet,
        // The first case's numbers at the top level (what tests/bench_diffusers.py reads).
        "batch": first["batch"], "text_encode_s": first["text_encode_s"], "step_s": first["step_s"],
        "it_per_s": first["it_per_s"], "decode_s": first["decode_per_image_s"],
        "cases": cases,
    });
    println!("{summary}");
    Ok(())
}

/// `WxH` → (width, height), both positive.
fn parse_wxh(s: &str) -> std::result::Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    match (w.trim().parse::<usize>(), h.trim().parse::<usize>()) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(format!(
            "{s:?} is not WIDTHxHEIGHT with positive whole numbers"
        )),
    }
}

/// `X,Y` → (x, y).
fn parse_xy(s: &str) -> std::result::Result<(usize, usize), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("{s:?} is not X,Y"))?;
    match (x.trim().parse::<usize>(), y.trim().parse::<usize>()) {
        (Ok(x), Ok(y)) => Ok((x, y)),
        _ => Err(format!("{s:?} is not X,Y with whole numbers ≥ 0")),
    }
}
