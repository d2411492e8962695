//! DDIM (Song et al. 2020, arXiv:2010.02502) with eta = 0: deterministic, integer timesteps.
//! Mirrors diffusers' `DDIMScheduler`.
//!
//! Config fields read (default when absent): `timestep_spacing` ("leading"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `set_alpha_to_one` (true),
//! `clip_sample` (true), `clip_sample_range` (1.0), `thresholding` (false; true is refused).

use candle_core::Tensor;

use super::{
    integer_timesteps, lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput,
    TimestepSpacing,
};
use crate::engine::error::{Context, Result};

pub struct Ddim {
    timesteps: Vec<f64>,
    acp: Vec<f32>,
    final_alpha_cumprod: f32,
    ratio: i64,
    prediction: PredictionType,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let raw = &cfg.raw;
        if raw.bool_or("thresholding", false)? {
            return Err(raw.err("thresholding", "true is not supported"));
        }
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let n = cfg.num_train_timesteps;
        let ts = integer_timesteps(spacing, n, steps, cfg.steps_offset);
        let final_alpha_cumprod = if raw.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            cfg.alphas_cumprod[0]
        };
        let clip = if raw.bool_or("clip_sample", true)? {
            Some(raw.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        check_range(&ts, n)?;
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            acp: cfg.alphas_cumprod.clone(),
            final_alpha_cumprod,
            ratio: (n / steps) as i64,
            prediction: cfg.prediction_type,
            clip,
        })
    }
}

pub(crate) fn check_range(ts: &[i64], n: usize) -> Result<()> {
    if let Some(t) = ts.iter().find(|&&t| t < 0 || t as usize >= n) {
        return Err(crate::engine::error::Error::invalid(
            "steps",
            format!("timestep {t} falls outside the model's {n} training timesteps (lower steps_offset or the step count)"),
        ));
    }
    Ok(())
}

impl Scheduler for Ddim {
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
        _noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.ratio;
        let a_t = self.acp[t as usize] as f64;
        let a_prev = if prev_t >= 0 {
            self.acp[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        } as f64;
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                lincomb(&[
                    (1.0 / a_t.sqrt(), sample),
                    (-b_t.sqrt() / a_t.sqrt(), model_output),
                ])?,
                model_output.clone(),
            ),
            PredictionType::VPrediction => (
                lincomb(&[(a_t.sqrt(), sample), (-b_t.sqrt(), model_output)])?,
                lincomb(&[(a_t.sqrt(), model_output), (b_t.sqrt(), sample)])?,
            ),
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r).ctx("ddim clip")?;
        }
        let prev = lincomb(&[(a_prev.sqrt(), &x0), ((1.0 - a_prev).sqrt(), &eps)])?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
