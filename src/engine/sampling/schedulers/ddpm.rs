//! DDPM (Ho et al. 2020, arXiv:2006.11239): ancestral sampling of the learned reverse
//! process with the posterior variance ("fixed_small"), fresh noise at every step but the
//! one that reaches t = 0. Mirrors diffusers' `DDPMScheduler`.
//!
//! Config fields read (default when absent): `timestep_spacing` ("leading"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `variance_type` ("fixed_small";
//! "fixed_large" accepted), `clip_sample` (true), `clip_sample_range` (1.0),
//! `thresholding` (false; true is refused).

use candle_core::Tensor;

use super::{
    integer_timesteps, lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput,
    TimestepSpacing,
};
use crate::engine::error::{Context, Result};

pub struct Ddpm {
    timesteps: Vec<f64>,
    acp: Vec<f32>,
    prediction: PredictionType,
    clip: Option<f64>,
    fixed_large: bool,
}

impl Ddpm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let raw = &cfg.raw;
        if raw.bool_or("thresholding", false)? {
            return Err(raw.err("thresholding", "true is not supported"));
        }
        raw.expect_str_in("variance_type", &["fixed_small", "fixed_large"])?;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let ts = integer_timesteps(spacing, cfg.num_train_timesteps, steps, cfg.steps_offset);
        super::ddim::check_range(&ts, cfg.num_train_timesteps)?;
        let clip = if raw.bool_or("clip_sample", true)? {
            Some(raw.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            acp: cfg.alphas_cumprod.clone(),
            prediction: cfg.prediction_type,
            clip,
            fixed_large: raw.str_or("variance_type", "fixed_small")? == "fixed_large",
        })
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::add_noise_alpha(original, noise, self.acp[self.timesteps[i] as usize] as f64)
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let t = self.timesteps[i] as usize;
        let a_t = self.acp[t] as f64;
        let a_prev = if i + 1 < self.timesteps.len() {
            self.acp[self.timesteps[i + 1] as usize] as f64
        } else {
            1.0
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let mut x0 = match self.prediction {
            PredictionType::Epsilon => lincomb(&[
                (1.0 / a_t.sqrt(), sample),
                (-b_t.sqrt() / a_t.sqrt(), model_output),
            ])?,
            PredictionType::VPrediction => {
                lincomb(&[(a_t.sqrt(), sample), (-b_t.sqrt(), model_output)])?
            }
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r).ctx("ddpm clip")?;
        }
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let sample_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let prev = if t > 0 {
            let variance = if self.fixed_large {
                cur_beta
            } else {
                (b_prev / b_t * cur_beta).max(1e-20)
            };
            let eps = noise()?;
            lincomb(&[
                (x0_coeff, &x0),
                (sample_coeff, sample),
                (variance.sqrt(), &eps),
            ])?
        } else {
            lincomb(&[(x0_coeff, &x0), (sample_coeff, sample)])?
        };
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
