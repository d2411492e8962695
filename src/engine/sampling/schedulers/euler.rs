//! Euler (A1111 "Euler"): first-order step of the probability-flow ODE in sigma space,
//! Karras et al. 2022 (arXiv:2206.00364) Algorithm 2 with s_churn = 0.
//! Mirrors diffusers' `EulerDiscreteScheduler`.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0, leading spacing only), `prediction_type` ("epsilon"),
//! `interpolation_type` ("linear"), `use_karras_sigmas` (false), `final_sigmas_type` ("zero").

use candle_core::Tensor;

use super::{
    interp, karras_sigmas, sigma_to_t, PredictionType, Scheduler, SchedulerConfig, StepOutput,
    TimestepSpacing,
};
use super::{lincomb, NoiseFn};
use crate::engine::error::Result;

/// Sigmas and float timesteps as diffusers' Euler-family samplers compute them.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than the timesteps: the final sigma is 0.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
}

impl SigmaSchedule {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        Self::with_rounding(cfg, steps, karras, false)
    }

    /// `round_karras_t`: the DPM2 samplers round the timesteps of Karras sigmas.
    pub fn with_rounding(
        cfg: &SchedulerConfig,
        steps: usize,
        karras: bool,
        round_karras_t: bool,
    ) -> Result<Self> {
        let raw = &cfg.raw;
        raw.expect_str_in("interpolation_type", &["linear"])?;
        raw.expect_str_in("final_sigmas_type", &["zero"])?;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let n = cfg.num_train_timesteps;
        let ts: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => (0..steps)
                .rev()
                .map(|i| {
                    if steps == 1 {
                        0.0
                    } else {
                        ((n - 1) as f64 * i as f64 / (steps - 1) as f64) as f32
                    }
                })
                .collect(),
            _ => super::integer_timesteps(spacing, n, steps, cfg.steps_offset)
                .into_iter()
                .map(|t| t as f32)
                .collect(),
        };
        let train = cfg.train_sigmas();
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| interp(t as f64, &train)).collect();
        let mut timesteps: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        if karras {
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = karras_sigmas(lo, hi, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round_karras_t {
                        super::round_half_even(t)
                    } else {
                        t as f32 as f64
                    }
                })
                .collect();
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(0.0f32, f32::max) as f64;
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    pub fn scale(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigmas[i] as f64;
        lincomb(&[(1.0 / (s * s + 1.0).sqrt(), sample)])
    }

    /// x0 from the model output at sigma.
    pub fn pred_original(
        pt: PredictionType,
        sigma: f64,
        model_output: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        match pt {
            PredictionType::Epsilon => lincomb(&[(1.0, sample), (-sigma, model_output)]),
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                lincomb(&[(-sigma / s2.sqrt(), model_output), (1.0 / s2, sample)])
            }
        }
    }
}

pub struct Euler {
    sched: SigmaSchedule,
    prediction: PredictionType,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let karras = cfg.raw.bool_or("use_karras_sigmas", false)?;
        Ok(Self {
            sched: SigmaSchedule::new(cfg, steps, karras)?,
            prediction: cfg.prediction_type,
        })
    }
}

impl Scheduler for Euler {
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
        let next = self.sched.sigmas[i + 1] as f64;
        let x0 = SigmaSchedule::pred_original(self.prediction, sigma, model_output, sample)?;
        // derivative d = (x - x0) / sigma; x_next = x + d * (next - sigma)
        let dt = next - sigma;
        let prev = lincomb(&[(1.0 + dt / sigma, sample), (-dt / sigma, &x0)])?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
