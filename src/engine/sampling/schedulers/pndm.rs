//! PNDM in its PLMS form (Liu et al. 2022, arXiv:2202.09778): a fourth-order linear
//! multistep method on the noise prediction, warmed up with lower orders; Stable
//! Diffusion 1.x ships it as the default. Mirrors diffusers' `PNDMScheduler`:
//! - `skip_prk_steps` true (SD 1.x's config, A1111's PLMS): the second timestep is run
//!   twice (one more UNet call than steps), as diffusers does;
//! - `skip_prk_steps` false (the class default, so a config without the key): the last
//!   three base timesteps are replaced by a pseudo Runge-Kutta warm-up of four model calls
//!   each (12 calls at the half-step points), then PLMS on the remaining timesteps.
//!
//! Config fields read (default when absent): `timestep_spacing` ("leading"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `set_alpha_to_one` (false),
//! `skip_prk_steps` (false).

use candle_core::Tensor;

use super::{
    integer_timesteps, lincomb, NoiseFn, PredictionType, Scheduler, SchedulerConfig, StepOutput,
    TimestepSpacing,
};
use crate::engine::error::Result;

pub struct Pndm {
    timesteps: Vec<f64>,
    acp: Vec<f32>,
    final_alpha_cumprod: f32,
    ratio: i64,
    prediction: PredictionType,
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
    /// Model calls of the Runge-Kutta warm-up (the first `prk` timesteps); 0 with skip_prk_steps.
    prk: usize,
    /// The Runge-Kutta weighted sum of this group's model outputs so far.
    prk_sum: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let raw = &cfg.raw;
        let skip_prk = raw.bool_or("skip_prk_steps", false)?;
        let n = cfg.num_train_timesteps;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        // Ascending base timesteps.
        let mut base = integer_timesteps(spacing, n, steps, cfg.steps_offset);
        base.reverse();
        super::ddim::check_range(&base, n)?;
        let ratio = (n / steps) as i64;
        let mut timesteps: Vec<i64>;
        let prk;
        if skip_prk {
            // [.., t[-2], t[-2], t[-1]] reversed.
            timesteps = base[..base.len() - 1].to_vec();
            if base.len() >= 2 {
                timesteps.push(base[base.len() - 2]);
            }
            timesteps.push(base[base.len() - 1]);
            timesteps.reverse();
            prk = 0;
        } else {
            if steps < 2 {
                return Err(crate::engine::error::Error::invalid(
                    "steps",
                    "PNDM's Runge-Kutta warm-up (skip_prk_steps false) needs at least 2 steps",
                ));
            }
            // The last (up to) four base timesteps and their half-step points, each
            // repeated twice, without the first and last: t, t+h, t+h, t+2h, …, reversed.
            let last4 = &base[base.len().saturating_sub(4)..];
            let mut pts: Vec<i64> = last4.iter().flat_map(|&t| [t, t + ratio / 2]).collect();
            pts.pop();
            let doubled: Vec<i64> = pts.iter().flat_map(|&t| [t, t]).collect();
            timesteps = doubled[1..doubled.len() - 1].to_vec();
            timesteps.reverse();
            prk = timesteps.len();
            let plms = &base[..base.len().saturating_sub(3)];
            timesteps.extend(plms.iter().rev());
            super::ddim::check_range(&timesteps, n)?;
        }
        let final_alpha_cumprod = if raw.bool_or("set_alpha_to_one", false)? {
            1.0
        } else {
            cfg.alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            acp: cfg.alphas_cumprod.clone(),
            final_alpha_cumprod,
            ratio,
            prediction: cfg.prediction_type,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
            prk,
            prk_sum: None,
        })
    }

    /// diffusers' `_get_prev_sample` (formula 9 of the PNDM paper) and the x0 estimate.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, eps: Tensor) -> Result<StepOutput> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            PredictionType::Epsilon => eps,
            PredictionType::VPrediction => lincomb(&[(a_t.sqrt(), &eps), (b_t.sqrt(), sample)])?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let prev = lincomb(&[(sample_coeff, sample), (-(a_prev - a_t) / denom, &eps)])?;
        let x0 = lincomb(&[(1.0 / a_t.sqrt(), sample), (-b_t.sqrt() / a_t.sqrt(), &eps)])?;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }

    /// One call of the Runge-Kutta warm-up: calls 4k..4k+3 evaluate the model at t, the
    /// half step (twice) and the next step; each moves from the group's starting sample.
    fn step_prk(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<StepOutput> {
        let c = self.counter;
        let diff_to_prev = if c % 2 == 1 { 0 } else { self.ratio / 2 };
        let prev_t = self.timesteps[i] as i64 - diff_to_prev;
        let t = self.timesteps[c / 4 * 4] as i64;
        let add = |sum: Option<Tensor>, w: f64| -> Result<Tensor> {
            let x = lincomb(&[(w, model_output)])?;
            match sum {
                None => Ok(x),
                Some(s) => lincomb(&[(1.0, &s), (1.0, &x)]),
            }
        };
        let eps = match c % 4 {
            0 => {
                self.prk_sum = Some(add(self.prk_sum.take(), 1.0 / 6.0)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.prk_sum = Some(add(self.prk_sum.take(), 1.0 / 3.0)?);
                model_output.clone()
            }
            _ => add(self.prk_sum.take(), 1.0 / 6.0)?,
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        self.counter += 1;
        self.prev_sample(&cur, t, prev_t, eps)
    }

    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.acp[t as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        }
    }
}

impl Scheduler for Pndm {
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
        if self.counter < self.prk {
            return self.step_prk(model_output, i, sample);
        }
        let mut t = self.timesteps[i] as i64;
        let mut prev_t = t - self.ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.clone();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            if let Some(s) = self.cur_sample.take() {
                sample = s;
            }
            lincomb(&[(0.5, model_output), (0.5, &e[0])])?
        } else if k == 2 {
            lincomb(&[(1.5, &e[1]), (-0.5, &e[0])])?
        } else if k == 3 {
            lincomb(&[
                (23.0 / 12.0, &e[2]),
                (-16.0 / 12.0, &e[1]),
                (5.0 / 12.0, &e[0]),
            ])?
        } else {
            lincomb(&[
                (55.0 / 24.0, &e[3]),
                (-59.0 / 24.0, &e[2]),
                (37.0 / 24.0, &e[1]),
                (-9.0 / 24.0, &e[0]),
            ])?
        };
        self.counter += 1;
        self.prev_sample(&sample, t, prev_t, eps)
    }
}
