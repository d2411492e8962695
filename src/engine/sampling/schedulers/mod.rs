//! Samplers ("schedulers" in diffusers): each file implements one, built from the model's
//! `scheduler/scheduler_config.json` the way diffusers' `from_config` builds it — config
//! keys override, absent keys take that scheduler's own defaults.
//!
//! Shared math lives here: the training noise schedule (betas → alphas_cumprod, computed in
//! f32 as PyTorch does), timestep spacings, Karras sigmas and sigma→timestep mapping.

pub mod ddim;
pub mod ddpm;
pub mod dpm2;
pub mod dpm2_ancestral;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod unipc;

use candle_core::Tensor;

use crate::engine::config::JsonConfig;
use crate::engine::error::{Error, Result};

/// Draws standard normal noise shaped like the sample, one generator per image.
pub type NoiseFn<'a> = dyn FnMut() -> Result<Tensor> + 'a;

/// What one denoising step returns.
pub struct StepOutput {
    /// The sample for the next timestep.
    pub prev_sample: Tensor,
    /// The model's current estimate of the clean latent (for previews).
    pub pred_original: Option<Tensor>,
}

/// One sampler, set up for a number of inference steps.
pub trait Scheduler: Send {
    /// The timesteps handed to the UNet, in order (PNDM has one more than the step count).
    fn timesteps(&self) -> &[f64];
    /// The noise levels, one per timestep plus a final 0, for sigma-space samplers.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;
    /// Scales the UNet input at step `i` (identity for DDIM-style samplers).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;
    /// Noises a clean latent to the level of timestep index `i` (where img2img starts), as
    /// diffusers' `add_noise` after `set_begin_index(i)`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;
    /// Model calls per step (2 for Heun and DPM2): img2img skips `order ×` whole steps.
    fn order(&self) -> usize {
        1
    }
    /// Advances the sample from step `i` given the (guided) model output.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseFn,
    ) -> Result<StepOutput>;
}

/// The samplers we offer, by A1111 name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Heun,
    Lms,
    LmsKarras,
    Dpm2,
    Dpm2Ancestral,
    DpmPp2M,
    DpmPp2MKarras,
    DpmPp2MSde,
    DpmPp2MSdeKarras,
    Ddim,
    Pndm,
    UniPc,
    Ddpm,
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 16] = [
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::Lms,
        Self::LmsKarras,
        Self::Dpm2,
        Self::Dpm2Ancestral,
        Self::DpmPp2M,
        Self::DpmPp2MKarras,
        Self::DpmPp2MSde,
        Self::DpmPp2MSdeKarras,
        Self::Ddim,
        Self::Pndm,
        Self::UniPc,
        Self::Ddpm,
        Self::Lcm,
    ];

    /// The CLI name (kebab-case).
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Heun => "heun",
            Self::Lms => "lms",
            Self::LmsKarras => "lms-karras",
            Self::Dpm2 => "dpm2",
            Self::Dpm2Ancestral => "dpm2-a",
            Self::DpmPp2M => "dpm++2m",
            Self::DpmPp2MKarras => "dpm++2m-karras",
            Self::DpmPp2MSde => "dpm++2m-sde",
            Self::DpmPp2MSdeKarras => "dpm++2m-sde-karras",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::UniPc => "unipc",
            Self::Ddpm => "ddpm",
            Self::Lcm => "lcm",
        }
    }

    /// A1111's sampler name and schedule type, as written in PNG metadata.
    pub fn a1111_name(self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Euler => ("Euler", None),
            Self::EulerAncestral => ("Euler a", None),
            Self::Heun => ("Heun", None),
            Self::Lms => ("LMS", None),
            Self::LmsKarras => ("LMS", Some("Karras")),
            Self::Dpm2 => ("DPM2", None),
            Self::Dpm2Ancestral => ("DPM2 a", None),
            Self::DpmPp2M => ("DPM++ 2M", None),
            Self::DpmPp2MKarras => ("DPM++ 2M", Some("Karras")),
            Self::DpmPp2MSde => ("DPM++ 2M SDE", None),
            Self::DpmPp2MSdeKarras => ("DPM++ 2M SDE", Some("Karras")),
            Self::Ddim => ("DDIM", None),
            Self::Pndm => ("PLMS", None),
            Self::UniPc => ("UniPC", None),
            Self::Ddpm => ("DDPM", None),
            Self::Lcm => ("LCM", None),
        }
    }

    /// The name shown in the UI: A1111's, with the schedule type ("DPM++ 2M Karras").
    pub fn label(self) -> String {
        match self.a1111_name() {
            (n, Some(s)) => format!("{n} {s}"),
            (n, None) => n.to_string(),
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Self::Euler => {
                "Euler method on the probability-flow ODE (Karras et al. 2022); deterministic"
            }
            Self::EulerAncestral => "Euler with fresh noise every step; varied, never converges",
            Self::Heun => {
                "Heun's second-order method: two model calls per step, sharper at few steps"
            }
            Self::Lms => "Linear multistep (k-diffusion), fourth order",
            Self::LmsKarras => "Linear multistep with Karras sigmas",
            Self::Dpm2 => "DPM-Solver-2: second order via a midpoint model call",
            Self::Dpm2Ancestral => "DPM2 with fresh noise every step",
            Self::DpmPp2M => "DPM-Solver++ second-order multistep (Lu et al. 2022)",
            Self::DpmPp2MKarras => "DPM-Solver++ 2M with Karras sigmas; A1111's favourite",
            Self::DpmPp2MSde => "DPM-Solver++ 2M, stochastic: fresh noise every step",
            Self::DpmPp2MSdeKarras => "DPM++ 2M SDE with Karras sigmas",
            Self::Ddim => "Denoising diffusion implicit models (Song et al. 2020), eta 0",
            Self::Pndm => "Pseudo numerical methods (PLMS); Stable Diffusion 1.5's default",
            Self::UniPc => "Unified predictor-corrector (Zhao et al. 2023), good at 5-10 steps",
            Self::Ddpm => "The original ancestral sampler (Ho et al. 2020); needs many steps",
            Self::Lcm => "Latent consistency: 2-8 steps with LCM models or LCM-LoRA",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name() == n || k.label().to_ascii_lowercase() == n)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.cli_name()).collect();
                Error::invalid(
                    "scheduler",
                    format!("unknown scheduler {name:?} (known: {})", names.join(", ")),
                )
            })
    }

    /// The diffusers class that implements this sampler.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::Lms | Self::LmsKarras => "LMSDiscreteScheduler",
            Self::Dpm2 => "KDPM2DiscreteScheduler",
            Self::Dpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            Self::DpmPp2M | Self::DpmPp2MKarras | Self::DpmPp2MSde | Self::DpmPp2MSdeKarras => {
                "DPMSolverMultistepScheduler"
            }
            Self::Ddim => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// Builds the sampler for `steps` from the model's config, as diffusers runs it (see
    /// [`SchedulerConfig::as_loaded_for`]).
    pub fn build(self, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        let cfg = &cfg.as_loaded_for(self)?;
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if steps > cfg.num_train_timesteps {
            return Err(Error::invalid(
                "steps",
                format!(
                    "{steps} exceeds the model's {} training timesteps",
                    cfg.num_train_timesteps
                ),
            ));
        }
        Ok(match self {
            Self::Euler => Box::new(euler::Euler::new(cfg, steps)?),
            Self::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(cfg, steps)?),
            Self::Heun => Box::new(heun::Heun::new(cfg, steps, false)?),
            Self::Lms => Box::new(lms::Lms::new(cfg, steps, false)?),
            Self::LmsKarras => Box::new(lms::Lms::new(cfg, steps, true)?),
            Self::Dpm2 => Box::new(dpm2::Dpm2::new(cfg, steps, false)?),
            Self::Dpm2Ancestral => Box::new(dpm2_ancestral::Dpm2Ancestral::new(cfg, steps, false)?),
            Self::DpmPp2M => Box::new(dpmpp_2m::DpmPp2M::new(cfg, steps, false, false)?),
            Self::DpmPp2MKarras => Box::new(dpmpp_2m::DpmPp2M::new(cfg, steps, true, false)?),
            Self::DpmPp2MSde => Box::new(dpmpp_2m::DpmPp2M::new(cfg, steps, false, true)?),
            Self::DpmPp2MSdeKarras => Box::new(dpmpp_2m::DpmPp2M::new(cfg, steps, true, true)?),
            Self::Ddim => Box::new(ddim::Ddim::new(cfg, steps)?),
            Self::Pndm => Box::new(pndm::Pndm::new(cfg, steps)?),
            Self::UniPc => Box::new(unipc::UniPc::new(cfg, steps)?),
            Self::Ddpm => Box::new(ddpm::Ddpm::new(cfg, steps)?),
            Self::Lcm => Box::new(lcm::Lcm::new(cfg, steps)?),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "leading" => Some(Self::Leading),
            "trailing" => Some(Self::Trailing),
            "linspace" => Some(Self::Linspace),
            _ => None,
        }
    }
}

/// The parts of `scheduler_config.json` every sampler shares, plus the raw file for the
/// keys only some samplers read.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub raw: JsonConfig,
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
    pub steps_offset: usize,
    /// None: the sampler's own default (Euler, DPM++: linspace; DDIM, PNDM: leading).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// The training schedule's cumulative alpha products, f32 as PyTorch computes them.
    pub alphas_cumprod: Vec<f32>,
}

impl SchedulerConfig {
    pub fn from_json(raw: JsonConfig) -> Result<Self> {
        let n = raw.usize_or("num_train_timesteps", 1000)?;
        if n < 2 {
            return Err(raw.err("num_train_timesteps", "must be at least 2"));
        }
        let prediction_type = match raw.str_or("prediction_type", "epsilon")? {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err(raw.err(
                    "prediction_type",
                    format!("{other:?} is not supported (epsilon, v_prediction)"),
                ))
            }
        };
        let timestep_spacing = match raw.get("timestep_spacing") {
            None => None,
            Some(v) => Some(v.as_str().and_then(TimestepSpacing::parse).ok_or_else(|| {
                raw.err(
                    "timestep_spacing",
                    format!("{v} is not one of leading, trailing, linspace"),
                )
            })?),
        };
        let betas = betas(&raw, n)?;
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1f32;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        if raw.bool_or("rescale_betas_zero_snr", false)? {
            return Err(raw.err("rescale_betas_zero_snr", "true is not supported yet"));
        }
        Ok(Self {
            num_train_timesteps: n,
            prediction_type,
            steps_offset: raw.usize_or("steps_offset", 0)?,
            timestep_spacing,
            alphas_cumprod,
            raw,
        })
    }

    /// The config as a diffusers user runs `kind` with it: `StableDiffusionPipeline` loads
    /// the model's scheduler and rewrites two outdated settings — `steps_offset` ≠ 1 becomes
    /// 1 and `clip_sample` true becomes false (with a deprecation warning) — and another
    /// sampler is made with `Kind.from_config(pipe.scheduler.config)`, which keeps the keys
    /// the file had (rewritten) and gives the rest the new class's own defaults. So:
    /// - the file's own keys: rewritten as the pipeline does, for every sampler;
    /// - keys the file lacks: for the sampler the file names (`_class_name`) the pipeline's
    ///   values (steps_offset 1, clip_sample false); for any other sampler its defaults
    ///   (DDIM and DDPM then clip x0 to ±1, as diffusers does).
    pub fn as_loaded_for(&self, kind: SchedulerKind) -> Result<Self> {
        let raw = &self.raw;
        let native = raw.str_or("_class_name", "")? == kind.diffusers_class();
        let mut map = raw.map.clone();
        let offset_set = raw.get("steps_offset").is_some();
        if (offset_set && raw.usize_or("steps_offset", 0)? != 1) || (!offset_set && native) {
            map.insert("steps_offset".into(), 1.into());
        }
        let clip_set = raw.get("clip_sample").is_some();
        if (clip_set && raw.bool_or("clip_sample", false)?) || (!clip_set && native) {
            map.insert("clip_sample".into(), false.into());
        }
        if map == raw.map {
            return Ok(self.clone());
        }
        let json = JsonConfig {
            path: raw.path.clone(),
            map,
        };
        Ok(Self::from_json(json)?.with_spacing(self.timestep_spacing))
    }

    /// Overrides the config's spacing (the CLI's `--timestep-spacing`).
    pub fn with_spacing(mut self, spacing: Option<TimestepSpacing>) -> Self {
        if spacing.is_some() {
            self.timestep_spacing = spacing;
        }
        self
    }

    /// sqrt((1 - ᾱ) / ᾱ) per training timestep, in f32.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`, element for element.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

fn betas(c: &JsonConfig, n: usize) -> Result<Vec<f32>> {
    if let Some(v) = c.get("trained_betas") {
        let list = v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_f64().map(|f| f as f32))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| c.err("trained_betas", "expected a list of numbers"))?;
        if list.len() != n {
            return Err(c.err(
                "trained_betas",
                format!("{} values for {n} timesteps", list.len()),
            ));
        }
        return Ok(list);
    }
    let start = c.f64_or("beta_start", 0.0001)?;
    let end = c.f64_or("beta_end", 0.02)?;
    match c.str_or("beta_schedule", "linear")? {
        "linear" => Ok(torch_linspace_f32(start as f32, end as f32, n)),
        "scaled_linear" => Ok(
            torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
        ),
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            Ok((0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect())
        }
        other => Err(c.err(
            "beta_schedule",
            format!("{other:?} is not supported (linear, scaled_linear, squaredcos_cap_v2)"),
        )),
    }
}

/// numpy's `np.interp(x, arange(len(ys)), ys)` for x within range.
pub(crate) fn interp(x: f64, ys: &[f32]) -> f64 {
    if x <= 0.0 {
        return ys[0] as f64;
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last] as f64;
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    let (a, b) = (ys[i] as f64, ys[i + 1] as f64);
    a + (b - a) * w
}

/// Karras et al. (2022) sigma schedule, rho = 7, from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 {
                0.0
            } else {
                i as f64 / (steps - 1) as f64
            };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// The fractional training timestep whose sigma is `sigma`, interpolating in log-sigma
/// between neighbouring timesteps (diffusers' `_sigma_to_t`).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let mut low = 0;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Integer timesteps (descending) for DDIM/PNDM-style samplers.
pub(crate) fn integer_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    steps: usize,
    offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as i64)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let last = (n_train - 1) as f64;
            (0..steps)
                .rev()
                .map(|i| {
                    let x = if steps == 1 {
                        0.0
                    } else {
                        last * i as f64 / (steps - 1) as f64
                    };
                    round_half_even(x) as i64
                })
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            (0..steps)
                .map(|i| round_half_even(n_train as f64 - i as f64 * ratio) as i64 - 1)
                .collect()
        }
    }
}

/// numpy rounds halves to even.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Multiplies each tensor by a scalar and sums: Σ cᵢ·xᵢ.
pub(crate) fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    use crate::engine::error::Context;
    let mut acc: Option<Tensor> = None;
    for (c, x) in terms {
        let t = (*x * *c).ctx("scheduler")?;
        acc = Some(match acc {
            None => t,
            Some(a) => (a + t).ctx("scheduler")?,
        });
    }
    acc.ok_or_else(|| Error::invalid("scheduler", "empty combination"))
}

/// add_noise for samplers in sigma space: x0 + σ·ε.
pub(crate) fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    lincomb(&[(1.0, original), (sigma, noise)])
}

/// add_noise for samplers in ᾱ form: √ᾱ·x0 + √(1-ᾱ)·ε.
pub(crate) fn add_noise_alpha(
    original: &Tensor,
    noise: &Tensor,
    alpha_cumprod: f64,
) -> Result<Tensor> {
    lincomb(&[
        (alpha_cumprod.sqrt(), original),
        ((1.0 - alpha_cumprod).sqrt(), noise),
    ])
}

/// Integer timesteps and sigmas (plus a final 0) of diffusers' multistep solvers
/// (DPMSolverMultistep, UniPC): steps + 1 points with the last dropped, or Karras sigmas
/// with their timesteps rounded.
pub(crate) fn multistep_schedule(
    cfg: &SchedulerConfig,
    steps: usize,
    karras: bool,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let n = cfg.num_train_timesteps;
    let ts: Vec<i64> = match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => (1..=steps)
            .rev()
            .map(|i| round_half_even((n - 1) as f64 * i as f64 / steps as f64) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n / (steps + 1);
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            (0..steps)
                .map(|i| round_half_even(n as f64 - i as f64 * ratio) as i64 - 1)
                .collect()
        }
    };
    ddim::check_range(&ts, n)?;
    let train = cfg.train_sigmas();
    let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if karras {
        let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
        let sig = karras_sigmas(train[0] as f64, train[n - 1] as f64, steps);
        let t = sig
            .iter()
            .map(|&s| round_half_even(sigma_to_t(s, &log_sigmas)))
            .collect();
        (t, sig.into_iter().map(|s| s as f32).collect())
    } else {
        (
            ts.iter().map(|&t| t as f64).collect(),
            ts.iter()
                .map(|&t| interp(t as f64, &train) as f32)
                .collect(),
        )
    };
    sigmas.push(0.0);
    Ok((timesteps, sigmas))
}

/// (α_t, σ_t) of the variance-preserving process at noise level σ (diffusers'
/// `_sigma_to_alpha_sigma_t`).
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half log signal-to-noise ratio λ = ln α − ln σ.
pub(crate) fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}
