//! UniPC (A1111 "UniPC"): unified predictor-corrector (Zhao et al. 2023,
//! arXiv:2302.04867), order 2, B(h) = e^h - 1 ("bh2"), in data-prediction form. Each step
//! first corrects the previous step's result with the new model output, then predicts.
//! Mirrors diffusers' `UniPCMultistepScheduler` defaults (solver_order 2, bh2,
//! predict_x0, lower_order_final, no disabled correctors).
//!
//! Config fields read (default when absent): `timestep_spacing` ("linspace"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `use_karras_sigmas` (false),
//! `solver_order` (2: other values refused), `solver_type` ("bh2"; "bh1" accepted).

use candle_core::Tensor;

use super::{
    alpha_sigma, lambda, lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput,
};
use crate::engine::error::Result;

pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: PredictionType,
    bh2: bool,
    /// Converted (x0) model outputs of the last two steps, most recent last.
    outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    last_order: usize,
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let raw = &cfg.raw;
        if raw.usize_or("solver_order", 2)? != 2 {
            return Err(raw.err("solver_order", "only 2 is supported"));
        }
        raw.expect_str_in("solver_type", &["bh1", "bh2"])?;
        raw.expect_str_in("final_sigmas_type", &["zero"])?;
        if !raw.bool_or("predict_x0", true)? {
            return Err(raw.err("predict_x0", "false is not supported"));
        }
        let bh2 = raw.str_or("solver_type", "bh2")? == "bh2";
        let karras = raw.bool_or("use_karras_sigmas", false)?;
        let (timesteps, sigmas) = super::multistep_schedule(cfg, steps, karras)?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            bh2,
            outputs: Vec::new(),
            last_sample: None,
            last_order: 0,
        })
    }

    /// h·φ and B(h) for step from sigma_s0 to sigma_t, with hh = -h.
    fn coefficients(&self, sigma_t: f64, sigma_s0: f64) -> (f64, f64, f64) {
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        (hh, h_phi_1, b_h)
    }
}

impl Scheduler for UniPc {
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
        _noise: &mut NoiseFn,
    ) -> Result<StepOutput> {
        let sigma = self.sigmas[i] as f64;
        let (alpha, sig) = alpha_sigma(sigma);
        let x0 = match self.prediction {
            PredictionType::Epsilon => {
                lincomb(&[(1.0 / alpha, sample), (-sig / alpha, model_output)])?
            }
            PredictionType::VPrediction => lincomb(&[(alpha, sample), (-sig, model_output)])?,
        };

        // Corrector (UniC): refine this step's sample with the new model output.
        let mut sample = sample.clone();
        if let (true, Some(last)) = (i > 0, self.last_sample.as_ref()) {
            let (sigma_t, sigma_s0) = (self.sigmas[i] as f64, self.sigmas[i - 1] as f64);
            let (alpha_t, sig_t) = alpha_sigma(sigma_t);
            let (_, sig_s0) = alpha_sigma(sigma_s0);
            let (hh, h_phi_1, b_h) = self.coefficients(sigma_t, sigma_s0);
            let m0 = &self.outputs[self.outputs.len() - 1];
            let base = [(sig_t / sig_s0, last), (-alpha_t * h_phi_1, m0)];
            sample = if self.last_order == 1 {
                // rhos_c = [0.5]
                let c = -alpha_t * b_h * 0.5;
                lincomb(&[base[0], base[1], (c, &x0), (-c, m0)])?
            } else {
                let m1 = &self.outputs[self.outputs.len() - 2];
                let h = -hh;
                let rk = (lambda(self.sigmas[i - 2] as f64) - lambda(sigma_s0)) / h;
                let phi_k0 = h_phi_1 / hh - 1.0;
                let b1 = phi_k0 / b_h;
                let phi_k1 = phi_k0 / hh - 0.5;
                let b2 = phi_k1 * 2.0 / b_h;
                // Solve [[1, 1], [rk, 1]] · [r0, r1] = [b1, b2].
                let r0 = (b1 - b2) / (1.0 - rk);
                let r1 = b1 - r0;
                // corr = r0 · (m1 - m0)/rk + r1 · (x0 - m0)
                let k = -alpha_t * b_h;
                lincomb(&[
                    base[0],
                    base[1],
                    (k * r0 / rk, m1),
                    (-k * r0 / rk - k * r1, m0),
                    (k * r1, &x0),
                ])?
            };
        }

        if self.outputs.len() == 2 {
            self.outputs.remove(0);
        }
        self.outputs.push(x0.clone());
        let remaining = self.timesteps.len() - i;
        let order = 2.min(remaining).min(self.outputs.len());
        self.last_order = order;
        self.last_sample = Some(sample.clone());

        // Predictor (UniP).
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1] as f64, self.sigmas[i] as f64);
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let (hh, h_phi_1, b_h) = self.coefficients(sigma_t, sigma_s0);
        let m0 = &self.outputs[self.outputs.len() - 1];
        let ratio = if sig_t == 0.0 { 0.0 } else { sig_t / sig_s0 };
        let prev = if order == 1 {
            lincomb(&[(ratio, &sample), (-alpha_t * h_phi_1, m0)])?
        } else {
            let m1 = &self.outputs[0];
            let h = -hh;
            let rk = (lambda(self.sigmas[i - 1] as f64) - lambda(sigma_s0)) / h;
            // pred_res = 0.5 · (m1 - m0) / rk
            let k = -alpha_t * b_h * 0.5 / rk;
            lincomb(&[(ratio, &sample), (-alpha_t * h_phi_1 - k, m0), (k, m1)])?
        };
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
