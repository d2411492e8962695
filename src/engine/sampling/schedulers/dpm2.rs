//! DPM2 (A1111 "DPM2"): k-diffusion's `sample_dpm_2` — a second-order step that evaluates
//! the model again at the geometric midpoint sigma. Two UNet calls per step except the
//! last. Mirrors diffusers' `KDPM2DiscreteScheduler`, whose interleaved layout we keep.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `use_karras_sigmas` (false).

use candle_core::Tensor;

use super::euler::SigmaSchedule;
use super::{lincomb, sigma_to_t, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput};
use crate::engine::error::Result;

/// `[a0, a1, a1, a2, a2, …, a(n-1), a(n-1), a(n)]` from `[a0 … a(n)]`, as diffusers interleaves.
pub(crate) fn interleave(v: &[f32]) -> Vec<f32> {
    let mut out = vec![v[0]];
    for x in &v[1..] {
        out.extend([*x, *x]);
    }
    out.push(v[v.len() - 1]);
    out
}

pub struct Dpm2 {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    /// The sample at the start of the step, kept for the second evaluation.
    first_sample: Option<Tensor>,
}

impl Dpm2 {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let karras = karras || cfg.raw.bool_or("use_karras_sigmas", false)?;
        let base = SigmaSchedule::with_rounding(cfg, steps, karras, true)?;
        let s = &base.sigmas; // n + 1 values, last 0
        let n = s.len();
        // Geometric midpoint with the previous sigma (the first one pairs with the final 0).
        let interpol: Vec<f32> = (0..n)
            .map(|i| ((s[i].ln() + s[(i + n - 1) % n].ln()) * 0.5).exp())
            .collect();
        let log_sigmas: Vec<f32> = cfg.train_sigmas().iter().map(|x| x.ln()).collect();
        let t_interpol: Vec<f64> = interpol
            .iter()
            .map(|&x| sigma_to_t(x as f64, &log_sigmas))
            .collect();
        let mut timesteps = vec![base.timesteps[0]];
        for (ti, t) in t_interpol.iter().zip(&base.timesteps).skip(1) {
            timesteps.push(*ti);
            timesteps.push(*t);
        }
        Ok(Self {
            timesteps,
            sigmas: interleave(s),
            sigmas_interpol: interleave(&interpol),
            init_noise_sigma: base.init_noise_sigma,
            prediction: cfg.prediction_type,
            first_sample: None,
        })
    }
}

impl Scheduler for Dpm2 {
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
        let s = if i.is_multiple_of(2) {
            self.sigmas[i]
        } else {
            self.sigmas_interpol[i]
        } as f64;
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
        let (x0, prev) = match self.first_sample.take() {
            None => {
                let sigma = self.sigmas[i] as f64;
                let sigma_interpol = self.sigmas_interpol[i + 1] as f64;
                let x0 =
                    SigmaSchedule::pred_original(self.prediction, sigma, model_output, sample)?;
                let dt = sigma_interpol - sigma;
                let prev = lincomb(&[(1.0 + dt / sigma, sample), (-dt / sigma, &x0)])?;
                if i + 1 < self.timesteps.len() {
                    self.first_sample = Some(sample.clone());
                }
                (x0, prev)
            }
            Some(start) => {
                let sigma = self.sigmas[i - 1] as f64;
                let sigma_interpol = self.sigmas_interpol[i] as f64;
                let sigma_next = self.sigmas[i] as f64;
                let x0 = SigmaSchedule::pred_original(
                    self.prediction,
                    sigma_interpol,
                    model_output,
                    sample,
                )?;
                let dt = sigma_next - sigma;
                // derivative at the midpoint, applied from the step's start
                let prev = lincomb(&[
                    (1.0, &start),
                    (dt / sigma_interpol, sample),
                    (-dt / sigma_interpol, &x0),
                ])?;
                (x0, prev)
            }
        };
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
