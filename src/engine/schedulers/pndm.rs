//! PNDM in its PLMS form (Liu et al. 2022, arXiv:2202.09778): a fourth-order linear
//! multistep method on the noise prediction, warmed up with lower orders; Stable
//! Diffusion 1.x ships it as the default. Mirrors diffusers' `PNDMScheduler` with
//! `skip_prk_steps` (the Runge-Kutta warm-up is not implemented and is refused).
//! The second timestep is run twice (one more UNet call than steps), as diffusers does.
//!
//! Config fields read (default when absent): `timestep_spacing` ("leading"),
//! `steps_offset` (0), `prediction_type` ("epsilon"), `set_alpha_to_one` (false),
//! `skip_prk_steps` (false: refused).

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
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let raw = &cfg.raw;
        if !raw.bool_or("skip_prk_steps", false)? {
            return Err(raw.err(
                "skip_prk_steps",
                "false (Runge-Kutta warm-up) is not supported; PLMS needs skip_prk_steps true",
            ));
        }
        let n = cfg.num_train_timesteps;
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        // Ascending base timesteps, then [.., t[-2], t[-2], t[-1]] reversed.
        let mut base = integer_timesteps(spacing, n, steps, cfg.steps_offset);
        base.reverse();
        super::ddim::check_range(&base, n)?;
        let mut plms: Vec<i64> = base[..base.len() - 1].to_vec();
        if base.len() >= 2 {
            plms.push(base[base.len() - 2]);
        }
        plms.push(base[base.len() - 1]);
        plms.reverse();
        let final_alpha_cumprod = if raw.bool_or("set_alpha_to_one", false)? {
            1.0
        } else {
            cfg.alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: plms.iter().map(|&t| t as f64).collect(),
            acp: cfg.alphas_cumprod.clone(),
            final_alpha_cumprod,
            ratio: (n / steps) as i64,
            prediction: cfg.prediction_type,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
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
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            PredictionType::Epsilon => eps,
            PredictionType::VPrediction => lincomb(&[(a_t.sqrt(), &eps), (b_t.sqrt(), &sample)])?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let prev = lincomb(&[(sample_coeff, &sample), (-(a_prev - a_t) / denom, &eps)])?;
        let x0 = lincomb(&[
            (1.0 / a_t.sqrt(), &sample),
            (-b_t.sqrt() / a_t.sqrt(), &eps),
        ])?;
        self.counter += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original: Some(x0),
        })
    }
}
