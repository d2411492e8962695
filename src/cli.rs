//! The command line: `sd-studio` or `sd-studio studio` opens the window (feature `gui`);
//! `sd-studio generate`, `sd-studio bench`, `sd-studio schedulers` run headless.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};

use crate::engine::metadata::{encode_png, output_path, write_atomic, Parameters};
use crate::engine::model::{self, ModelFiles, DEFAULT_MODEL};
use crate::engine::pipeline::{GenerateRequest, StableDiffusion};
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
pub enum Command {
    /// Open the studio window (the default).
    Studio(StudioArgs),
    /// Generate images from a prompt and write them as PNGs with A1111 metadata.
    Generate(GenerateArgs),
    /// Time text encoding, denoising steps and decoding for a model.
    Bench(BenchArgs),
    /// List the samplers with a one-line description each.
    Schedulers,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Diffusers folder or Hugging Face hub id (owner/name), resolved in the hub cache.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Compute device: cpu or cuda (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and compute precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampler: euler, euler-a, ddim, dpm++2m, dpm++2m-karras, pndm (A1111 names work too).
    #[arg(long, default_value = "dpm++2m-karras")]
    pub scheduler: String,
    /// Override the config's timestep spacing: leading, trailing or linspace.
    #[arg(long)]
    pub timestep_spacing: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (CFG); 1 or less skips the negative prompt.
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,
    /// Image width in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Image height in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Number of images; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
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
    /// Noise source: torch-cpu (identical to torch.Generator("cpu")).
    #[arg(long, default_value = "torch-cpu")]
    pub rng: String,
    /// Safetensors file with tensor `latents` (f32 [batch,4,H/8,W/8]) used instead of drawn noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
}

#[derive(Args, Debug, Clone, Default)]
pub struct StudioArgs {
    /// Model to load at start: diffusers folder or hub id (default: the last one used).
    #[arg(long)]
    pub model: Option<String>,
    /// Compute device: cpu or cuda.
    #[arg(long)]
    pub device: Option<String>,
    /// Precision: f32, f16 or bf16.
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
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => studio(cli.studio),
        Some(Command::Studio(a)) => studio(a),
        Some(Command::Generate(a)) => generate(&a),
        Some(Command::Bench(a)) => bench(&a),
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

/// Checks everything that needs no weights, so bad input fails before a slow load.
struct Prepared {
    device: Device,
    dtype: DType,
    scheduler: SchedulerKind,
    files: ModelFiles,
}

fn prepare(m: &ModelArgs, s: &SamplingArgs) -> Result<Prepared> {
    let scheduler = SchedulerKind::parse(&s.scheduler)?;
    let spacing = match &s.timestep_spacing {
        None => None,
        Some(x) => Some(TimestepSpacing::parse(x).ok_or_else(|| {
            Error::invalid(
                "timestep spacing",
                format!("{x:?} is not leading, trailing or linspace"),
            )
        })?),
    };
    if s.steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    if !s.guidance.is_finite() || s.guidance < 0.0 {
        return Err(Error::invalid(
            "guidance",
            format!("{} is not a finite number ≥ 0", s.guidance),
        ));
    }
    for (what, v) in [("width", s.width), ("height", s.height)] {
        if v == 0 || v % 8 != 0 {
            return Err(Error::invalid(
                what,
                format!("{v} is not a positive multiple of 8"),
            ));
        }
    }
    if s.batch == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    let dtype = engine::dtype(&m.dtype)?;
    let device = engine::device(&m.device)?;
    let root = model::resolve(&m.model, dtype != DType::F32)?;
    let mut files = ModelFiles::from_dir(&root, dtype != DType::F32)?;
    files.scheduler_config = files.scheduler_config.clone().with_spacing(spacing);
    // Fail on a bad step count now rather than after loading.
    scheduler.build(&files.scheduler_config, s.steps)?;
    Ok(Prepared {
        device,
        dtype,
        scheduler,
        files,
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

fn model_label(spec: &str) -> String {
    let p = Path::new(spec);
    if p.exists() {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(spec)
            .to_string()
    } else {
        spec.to_string()
    }
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let rng = RngKind::parse(&a.rng)
        .ok_or_else(|| Error::invalid("rng", format!("{:?} is not torch-cpu", a.rng)))?;
    let init_latents = a
        .init_latents
        .as_deref()
        .map(load_init_latents)
        .transpose()?;
    let p = prepare(&a.model, &a.sampling)?;
    ensure_writable_dir(&a.out)?;
    let seed = match a.seed {
        Some(s) => s,
        None => {
            let s = random_seed();
            eprintln!("seed: {s}");
            s
        }
    };
    let s = &a.sampling;
    let req = GenerateRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        seed,
        batch: s.batch,
        steps: s.steps,
        guidance: s.guidance,
        scheduler: p.scheduler,
        width: s.width,
        height: s.height,
        rng,
        init_latents,
    };
    let label = model_label(&a.model.model);
    let start = Instant::now();
    eprintln!(
        "loading {} ({:?}, {:?})",
        p.files.root.display(),
        p.device,
        p.dtype
    );
    let mut sd = StableDiffusion::load(p.files, p.device, p.dtype)?;
    sd.check(&req)?;
    let images = sd.generate(&req, &mut |info| {
        eprintln!("step {}/{}", info.step, info.total);
        Ok(())
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let (sampler, schedule_type) = p.scheduler.a1111_name();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for img in images {
        let params = Parameters {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            steps: req.steps,
            sampler: sampler.into(),
            schedule_type: schedule_type.map(str::to_string),
            cfg_scale: req.guidance,
            seed: img.seed,
            width: img.width,
            height: img.height,
            model: label.clone(),
            rng: match rng {
                RngKind::TorchCpu => Some("CPU".into()),
            },
        };
        let png = encode_png(&img.rgb, img.width, img.height, &params.to_a1111())?;
        let path = output_path(&a.out, img.seed);
        write_atomic(&path, &png)?;
        let line = serde_json::json!({
            "seed": img.seed,
            "path": path,
            "model": label,
            "scheduler": p.scheduler.cli_name(),
            "steps": req.steps,
            "guidance": req.guidance,
            "width": img.width,
            "height": img.height,
            "elapsed": (elapsed * 1000.0).round() / 1000.0,
        });
        let _ = writeln!(out, "{line}");
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(a: &BenchArgs) -> Result<()> {
    if a.threads > 0 {
        // candle's CPU kernels size their pools from RAYON_NUM_THREADS when first used.
        std::env::set_var("RAYON_NUM_THREADS", a.threads.to_string());
    }
    let p = prepare(&a.model, &a.sampling)?;
    let s = &a.sampling;
    let t0 = Instant::now();
    let mut sd = StableDiffusion::load(p.files, p.device, p.dtype)?;
    let load = t0.elapsed().as_secs_f64();
    let req = GenerateRequest {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: String::new(),
        seed: 0,
        batch: s.batch,
        steps: s.steps,
        guidance: s.guidance,
        scheduler: p.scheduler,
        width: s.width,
        height: s.height,
        rng: RngKind::TorchCpu,
        init_latents: None,
    };
    let (mut enc, mut step, mut dec) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=a.runs {
        sd.generate(&req, &mut |_| Ok(()))?;
        if run == 0 {
            continue; // warm-up
        }
        let t = &sd.last_timings;
        enc.push(t.encode);
        step.extend(t.steps.iter().copied());
        dec.push(t.decode);
    }
    let (e, st, d) = (median(&mut enc), median(&mut step), median(&mut dec));
    let line = serde_json::json!({
        "model": a.model.model, "device": a.model.device, "dtype": a.model.dtype,
        "width": s.width, "height": s.height, "batch": s.batch, "guidance": s.guidance,
        "scheduler": p.scheduler.cli_name(), "steps": s.steps, "runs": a.runs,
        "threads": if a.threads > 0 { a.threads } else { candle_core::utils::get_num_threads() },
        "load_s": load, "text_encode_s": e, "step_s": st, "it_per_s": if st > 0.0 { 1.0 / st } else { 0.0 }, "decode_s": d,
    });
    eprintln!(
        "text encode {:.4} s, step {:.4} s (median of {} steps), decode {:.4} s",
        e,
        st,
        step.len(),
        d
    );
    println!("{line}");
    Ok(())
}
