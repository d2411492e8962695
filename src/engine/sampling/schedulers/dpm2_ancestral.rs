//! DPM2 a (A1111 "DPM2 a"): k-diffusion's `sample_dpm_2_ancestral` — DPM2 towards
//! sigma_down, then fresh noise of size sigma_up (one draw per completed step). Mirrors
//! diffusers' `KDPM2AncestralDiscreteScheduler`, interleaved layout included.
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `use_karras_sigmas` (false).

use candle_core::Tensor;

use super::dpm2::interleave;
use super::euler::SigmaSchedule;
use super::{lincomb, sigma_to_t, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput};
use crate::engine::error::Result;

pub struct Dpm2Ancestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    first_sample: Option<Tensor>,
}

impl Dpm2Ancestral {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let karras = karras || cfg.raw.bool_or("use_karras_sigmas", false)?;
        let base = SigmaSchedule::with_rounding(cfg, steps, karras, true)?;
        let s = &base.sigmas; // n + 1 values, last 0
        let n = s.len();
        let next = |i: usize| if i + 1 < n { s[i + 1] } else { 0.0 };
        let up: Vec<f32> = (0..n)
            .map(|i| {
                let (a, b) = (s[i], next(i));
                (b * b * (a * a - b * b) / (a * a)).sqrt()
            })
            .collect();
        let mut down: Vec<f32> = (0..n)
            .map(|i| (next(i) * next(i) - up[i] * up[i]).sqrt())
            .collect();
        down[n - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..n)
            .map(|i| ((s[i].ln() + down[i].ln()) * 0.5).exp())
            .collect();
        interpol[n - 1] = 0.0;
        if n >= 2 {
            interpol[n - 2] = 0.0;
        }
        let log_sigmas: Vec<f32> = cfg.train_sigmas().iter().map(|x| x.ln()).collect();
        let t_interpol: Vec<f64> = interpol
            .iter()
            .map(|&x| sigma_to_t(x as f64, &log_sigmas))
            .collect();
        let mut timesteps = vec![base.timesteps[0]];
        for k in 1..base.timesteps.len() {
            timesteps.push(t_interpol[k - 1]);
            timesteps.push(base.timesteps[k]);
        }
        Ok(Self {
            timesteps,
            sigmas: interleave(s),
            sigmas_interpol: interleave(&interpol),
            sigmas_up: interleave(&up),
            sigmas_down: interleave(&down),
            init_noise_sigma: base.init_noise_sigma,
            prediction: cfg.prediction_type,
            first_sample: None,
        })
    }
}

impl Scheduler for Dpm2Ancestral {
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
            self.sigmas_interpol[i - 1]
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
        noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let (x0, prev) = match self.first_sample.take() {
            None => {
                let sigma = self.sigmas[i] as f64;
                let sigma_interpol = self.sigmas_interpol[i] as f64;
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
                let sigma_interpol = self.sigmas_interpol[i - 1] as f64;
                let sigma_up = self.sigmas_up[i - 1] as f64;
                let sigma_down = self.sigmas_down[i - 1] as f64;
                let x0 = SigmaSchedule::pred_original(
                    self.prediction,
                    sigma_interpol,
                    model_output,
                    sample,
                )?;
                let dt = sigma_down - sigma;
                let eps = noise()?;
                let prev = lincomb(&[
                    (1.0, &start),
                    (dt / sigma_interpol, sample),
                    (-dt / sigma_interpol, &x0),
                    (sigma_up, &eps),
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
