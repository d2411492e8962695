//! Heun (A1111 "Heun"): Karras et al. 2022 (arXiv:2206.00364) Algorithm 1 — an Euler step,
//! then a correction with the derivative at the new point averaged in. Two UNet calls per
//! step except the last (a plain Euler step to sigma 0), so N steps take 2N - 1 calls.
//! Mirrors diffusers' `HeunDiscreteScheduler`: each sigma after the first appears twice.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `use_karras_sigmas` (false),
//! `clip_sample` (false), `clip_sample_range` (1.0).

use candle_core::Tensor;

use super::euler::SigmaSchedule;
use super::{lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput};
use crate::engine::error::{Context, Result};

pub struct Heun {
    timesteps: Vec<f64>,
    /// diffusers' layout: [s0, s1, s1, s2, s2, …, s(n-1), s(n-1), 0].
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    clip: Option<f64>,
    /// First-order state kept for the correction: (derivative, dt, sample).
    pending: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let karras = karras || cfg.raw.bool_or("use_karras_sigmas", false)?;
        let base = SigmaSchedule::new(cfg, steps, karras)?;
        let n = steps;
        let mut sigmas = vec![base.sigmas[0]];
        for s in &base.sigmas[1..n] {
            sigmas.extend([*s, *s]);
        }
        sigmas.push(0.0);
        let mut timesteps = vec![base.timesteps[0]];
        for t in &base.timesteps[1..] {
            timesteps.extend([*t, *t]);
        }
        let clip = if cfg.raw.bool_or("clip_sample", false)? {
            Some(cfg.raw.f64_or("clip_sample_range", 1.0)?)
        } else {
            None
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: base.init_noise_sigma,
            prediction: cfg.prediction_type,
            clip,
            pending: None,
        })
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i] as f64;
        lincomb(&[(1.0 / (s * s + 1.0).sqrt(), sample)])
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::add_noise_sigma(original, noise, self.sigmas[i] as f64)
    }
    fn order(&self) -> usize {
        2
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let first = self.pending.is_none();
        let (sigma, sigma_next) = if first {
            (self.sigmas[i] as f64, self.sigmas[i + 1] as f64)
        } else {
            (self.sigmas[i - 1] as f64, self.sigmas[i] as f64)
        };
        let sigma_input = if first { sigma } else { sigma_next };
        let mut x0 =
            SigmaSchedule::pred_original(self.prediction, sigma_input, model_output, sample)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r).ctx("heun clip")?;
        }
        let prev = match self.pending.take() {
            None => {
                let d = lincomb(&[(1.0 / sigma, sample), (-1.0 / sigma, &x0)])?;
                let dt = sigma_next - sigma;
                let prev = lincomb(&[(1.0, sample), (dt, &d)])?;
                // The last step is plain Euler to sigma 0: nothing to correct afterwards.
                if i + 1 < self.timesteps.len() {
                    self.pending = Some((d, dt, sample.clone()));
                }
                prev
            }
            Some((d_prev, dt, x_prev)) => {
                // Average of the derivative at the start and at the Euler estimate.
                let d = lincomb(&[(1.0 / sigma_next, sample), (-1.0 / sigma_next, &x0)])?;
                lincomb(&[(1.0, &x_prev), (0.5 * dt, &d_prev), (0.5 * dt, &d)])?
            }
        };
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
