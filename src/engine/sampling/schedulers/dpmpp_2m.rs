//! DPM++ 2M and DPM++ 2M Karras: DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095),
//! second-order multistep in data-prediction form with the midpoint solver. Mirrors
//! diffusers' `DPMSolverMultistepScheduler` with its defaults (solver_order 2,
//! algorithm_type "dpmsolver++", solver_type "midpoint", lower_order_final true,
//! final_sigmas_type "zero"), which is what A1111 calls "DPM++ 2M".
//!
//! DPM++ 2M SDE ("sde-dpmsolver++") adds fresh Gaussian noise every step, drawn from each
//! image's generator as diffusers does. A1111/k-diffusion's DPM++ 2M SDE draws from a
//! Brownian tree instead, so its images differ from both; ours match diffusers.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `use_karras_sigmas` (false; the
//! Karras variant forces true). Other algorithm types or solver orders are refused.

use candle_core::Tensor;

use super::{
    alpha_sigma, lambda, lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput,
};
use crate::engine::error::Result;

pub struct DpmPp2M {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// The previous step's x0 prediction.
    last_x0: Option<Tensor>,
    /// "sde-dpmsolver++": fresh noise every step (DPM++ 2M SDE).
    sde: bool,
}

impl DpmPp2M {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool, sde: bool) -> Result<Self> {
        let raw = &cfg.raw;
        raw.expect_str_in("algorithm_type", &["dpmsolver++", "sde-dpmsolver++"])?;
        let sde = sde || raw.str_or("algorithm_type", "dpmsolver++")? == "sde-dpmsolver++";
        raw.expect_str_in("solver_type", &["midpoint"])?;
        raw.expect_str_in("final_sigmas_type", &["zero"])?;
        if raw.usize_or("solver_order", 2)? != 2 {
            return Err(raw.err("solver_order", "only 2 is supported"));
        }
        if raw.bool_or("thresholding", false)? {
            return Err(raw.err("thresholding", "true is not supported"));
        }
        let karras = karras || raw.bool_or("use_karras_sigmas", false)?;
        let (timesteps, sigmas) = super::multistep_schedule(cfg, steps, karras)?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            last_x0: None,
            sde,
        })
    }
}

impl Scheduler for DpmPp2M {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[i] as f64);
        lincomb(&[(a, original), (s, noise)])
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let sigma_s0 = self.sigmas[i] as f64;
        let sigma_t = self.sigmas[i + 1] as f64;
        let (alpha_s0, sig_s0) = alpha_sigma(sigma_s0);
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                lincomb(&[(1.0 / alpha_s0, sample), (-sig_s0 / alpha_s0, model_output)])?
            }
            PredictionType::VPrediction => lincomb(&[(alpha_s0, sample), (-sig_s0, model_output)])?,
        };
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let ratio = if sig_t == 0.0 { 0.0 } else { sig_t / sig_s0 };
        // x_t = cs·x + c0·D0 + ½·c0·D1 (+ cn·ε for the SDE variant), D1 = (x0 - x0_prev) / r0.
        let (cs, c0, cn) = if self.sde {
            let e2h = (-2.0 * h).exp();
            (
                ratio * (-h).exp(),
                alpha_t * (1.0 - e2h),
                sig_t * (1.0 - e2h).sqrt(),
            )
        } else {
            (ratio, -alpha_t * (-h).exp_m1(), 0.0)
        };
        let eps = if self.sde { Some(noise()?) } else { None };
        let last_step = i + 1 == self.timesteps.len();
        let mut terms: Vec<(f64, &Tensor)> = vec![(cs, sample)];
        match (&self.last_x0, last_step) {
            // First order at the start and, with a zero final sigma, at the last step.
            (None, _) | (_, true) => terms.push((c0, &x0)),
            (Some(x0_prev), false) => {
                let sigma_s1 = self.sigmas[i - 1] as f64;
                let r0 = (lambda(sigma_s0) - lambda(sigma_s1)) / h;
                let d1 = 0.5 * c0 / r0;
                terms.push((c0 + d1, &x0));
                terms.push((-d1, x0_prev));
            }
        }
        if let Some(e) = &eps {
            terms.push((cn, e));
        }
        let prev = lincomb(&terms)?;
        self.last_x0 = Some(x0.clone());
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
