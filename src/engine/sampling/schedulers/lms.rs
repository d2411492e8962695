//! LMS and LMS Karras: k-diffusion's linear multistep sampler — up to fourth-order
//! Adams-Bashforth in sigma, with each past derivative weighted by the integral of its
//! Lagrange basis polynomial over the step. Mirrors diffusers' `LMSDiscreteScheduler`
//! (order 4). diffusers integrates numerically with scipy; the integrand is a polynomial,
//! so we integrate it exactly.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `use_karras_sigmas` (false).

use candle_core::Tensor;

use super::euler::SigmaSchedule;
use super::{lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput};
use crate::engine::error::Result;

const ORDER: usize = 4;

pub struct Lms {
    sched: SigmaSchedule,
    prediction: PredictionType,
    /// Most recent last.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let karras = karras || cfg.raw.bool_or("use_karras_sigmas", false)?;
        Ok(Self {
            sched: SigmaSchedule::new(cfg, steps, karras)?,
            prediction: cfg.prediction_type,
            derivatives: Vec::new(),
        })
    }

    /// ∫ from sigmas[t] to sigmas[t+1] of the Lagrange basis polynomial for node `j`
    /// (nodes sigmas[t], sigmas[t-1], …, sigmas[t-order+1]).
    fn coefficient(&self, order: usize, t: usize, j: usize) -> f64 {
        let s = |k: usize| self.sched.sigmas[t - k] as f64;
        // Polynomial coefficients, lowest degree first.
        let mut poly = vec![1.0f64];
        for k in 0..order {
            if k == j {
                continue;
            }
            let denom = s(j) - s(k);
            let mut next = vec![0.0; poly.len() + 1];
            for (d, c) in poly.iter().enumerate() {
                next[d + 1] += c / denom;
                next[d] -= c * s(k) / denom;
            }
            poly = next;
        }
        let antiderivative = |x: f64| {
            poly.iter()
                .enumerate()
                .map(|(d, c)| c * x.powi(d as i32 + 1) / (d as f64 + 1.0))
                .sum::<f64>()
        };
        antiderivative(self.sched.sigmas[t + 1] as f64)
            - antiderivative(self.sched.sigmas[t] as f64)
    }
}

impl Scheduler for Lms {
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
        _noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let sigma = self.sched.sigmas[i] as f64;
        let x0 = SigmaSchedule::pred_original(self.prediction, sigma, model_output, sample)?;
        let d = lincomb(&[(1.0 / sigma, sample), (-1.0 / sigma, &x0)])?;
        self.derivatives.push(d);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(ORDER);
        let mut terms: Vec<(f64, &Tensor)> = vec![(1.0, sample)];
        for (j, d) in self.derivatives.iter().rev().enumerate().take(order) {
            terms.push((self.coefficient(order, i, j), d));
        }
        let prev = lincomb(&terms)?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
