//! LCM (A1111 "LCM"): latent consistency model sampling (Luo et al. 2023,
//! arXiv:2310.04378) — each step jumps to the consistency function's clean estimate, then
//! re-noises to the next timestep with fresh noise. For LCM-distilled models and LCM-LoRA,
//! 2–8 steps. Mirrors diffusers' `LCMScheduler`: timesteps come from the
//! `original_inference_steps`-point distillation schedule, not from `timestep_spacing`.
//!
//! Config fields read (default when absent): `original_inference_steps` (50),
//! `timestep_scaling` (10.0), `prediction_type` ("epsilon"), `clip_sample` (false),
//! `clip_sample_range` (1.0), `thresholding` (false; true is refused).

use candle_core::Tensor;

use super::{lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput};
use crate::engine::error::{Context, Error, Result};

pub struct Lcm {
    timesteps: Vec<f64>,
    acp: Vec<f32>,
    prediction: PredictionType,
    clip: Option<f64>,
    timestep_scaling: f64,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let raw = &cfg.raw;
        if raw.bool_or("thresholding", false)? {
            return Err(raw.err("thresholding", "true is not supported"));
        }
        let n = cfg.num_train_timesteps;
        let original = raw.usize_or("original_inference_steps", 50)?;
        if original == 0 || original > n {
            return Err(raw.err(
                "original_inference_steps",
                format!("{original} must be between 1 and {n}"),
            ));
        }
        if steps > original {
            return Err(Error::invalid(
                "steps",
                format!("LCM takes at most {original} steps (the distillation schedule's length)"),
            ));
        }
        let k = n / original;
        // The distillation schedule k-1, 2k-1, …, reversed; `steps` evenly spaced picks.
        let origin: Vec<i64> = (1..=original).rev().map(|i| (i * k) as i64 - 1).collect();
        let timesteps = (0..steps)
            .map(|j| origin[j * original / steps] as f64)
            .collect();
        let clip = if raw.bool_or("clip_sample", false)? {
            Some(raw.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        Ok(Self {
            timesteps,
            acp: cfg.alphas_cumprod.clone(),
            prediction: cfg.prediction_type,
            clip,
            timestep_scaling: raw.f64_or("timestep_scaling", 10.0)?,
        })
    }
}

impl Scheduler for Lcm {
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
        let last = i + 1 == self.timesteps.len();
        let t_prev = if last {
            t
        } else {
            self.timesteps[i + 1] as usize
        };
        let a_t = self.acp[t] as f64;
        let a_prev = self.acp[t_prev] as f64;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let scaled = t as f64 * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
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
            x0 = x0.clamp(-r, r).ctx("lcm clip")?;
        }
        let denoised = lincomb(&[(c_out, &x0), (c_skip, sample)])?;
        let prev = if last {
            denoised.clone()
        } else {
            let eps = noise()?;
            lincomb(&[(a_prev.sqrt(), &denoised), (b_prev.sqrt(), &eps)])?
        };
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(denoised),
        })
    }
}
