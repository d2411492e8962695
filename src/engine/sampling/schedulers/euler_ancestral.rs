//! Euler a (A1111 "Euler a"): Euler steps down to sigma_down, then fresh noise of size
//! sigma_up, so every step re-randomises part of the image (k-diffusion's
//! `sample_euler_ancestral`). Mirrors diffusers' `EulerAncestralDiscreteScheduler`: the same
//! sigmas as Euler, one noise draw per step from each image's generator.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon").

use candle_core::Tensor;

use super::euler::SigmaSchedule;
use super::{lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput};
use crate::engine::error::Result;

pub struct EulerAncestral {
    sched: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        Ok(Self {
            sched: SigmaSchedule::new(cfg, steps, false)?,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.sched.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sched.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        self.sched.init_noise_sigma
    }
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        self.sched.scale(sample, i)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        super::add_noise_sigma(original, noise, self.sched.sigmas[i] as f64)
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let sigma_from = self.sched.sigmas[i] as f64;
        let sigma_to = self.sched.sigmas[i + 1] as f64;
        let x0 = SigmaSchedule::pred_original(self.prediction, sigma_from, model_output, sample)?;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let dt = sigma_down - sigma_from;
        let eps = noise()?;
        let prev = lincomb(&[
            (1.0 + dt / sigma_from, sample),
            (-dt / sigma_from, &x0),
            (sigma_up, &eps),
        ])?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
