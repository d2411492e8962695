//! A1111's "Hires. fix": the job runs at its base size, the result is upscaled, and a
//! second img2img pass at `strength` denoises it at the large size. The second pass is
//! diffusers' StableDiffusionImg2ImgPipeline on the upscaled latents (Latent, Latent
//! (nearest): `F.interpolate` bilinear without antialiasing, or nearest) or on the decoded
//! picture resized with Lanczos (then encoded again); its noise comes from the same seeds,
//! drawn afresh at the large size.

use candle_core::{DType, Tensor};

use super::{
    img2img_start, slerp_a1111, Conditioning, Embeds, GenerateRequest, InitImage, Run,
    StableDiffusion,
};
use crate::engine::error::{Context, Error, Result};
use crate::engine::rng::NoiseStream;

/// How the first pass's result is brought to the large size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiresUpscaler {
    /// A1111's "Latent": the latents, bilinear (antialias off).
    Latent,
    /// "Latent (nearest)".
    LatentNearest,
    /// "Lanczos": the decoded picture, Lanczos-resized, encoded again.
    Lanczos,
}

impl HiresUpscaler {
    pub const ALL: [HiresUpscaler; 3] = [Self::Latent, Self::LatentNearest, Self::Lanczos];

    /// `latent`, `latent-nearest`, `lanczos`, or A1111's names.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "latent" => Ok(Self::Latent),
            "latent-nearest" | "latent (nearest)" => Ok(Self::LatentNearest),
            "lanczos" => Ok(Self::Lanczos),
            other => Err(Error::invalid(
                "hires upscaler",
                format!("{other:?} is not one of: latent, latent-nearest, lanczos"),
            )),
        }
    }

    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Latent => "latent",
            Self::LatentNearest => "latent-nearest",
            Self::Lanczos => "lanczos",
        }
    }

    /// What A1111 writes as "Hires upscaler".
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Latent => "Latent",
            Self::LatentNearest => "Latent (nearest)",
            Self::Lanczos => "Lanczos",
        }
    }
}

/// The second pass of a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hires {
    /// The final size (multiples of the VAE's scale factor).
    pub width: usize,
    pub height: usize,
    /// The second pass's steps (None: the first pass's), of which `strength` run.
    pub steps: Option<usize>,
    /// A1111's "Denoising strength" for the second pass, 0..1.
    pub strength: f64,
    pub upscaler: HiresUpscaler,
    /// What the metadata says: `Some(scale)` → "Hires upscale", None → "Hires resize".
    pub scale: Option<f64>,
}

impl Hires {
    /// The final size for a base size and A1111's choices: a scale, or a width and/or
    /// height (one given: the other keeps the aspect ratio); floored to multiples of `f`.
    pub fn target(
        base: (usize, usize),
        scale: Option<f64>,
        width: Option<usize>,
        height: Option<usize>,
        f: usize,
    ) -> Result<(usize, usize)> {
        let (w, h) = (base.0 as f64, base.1 as f64);
        let (tw, th) = match (width, height, scale) {
            (Some(tw), Some(th), _) => (tw as f64, th as f64),
            (Some(tw), None, _) => (tw as f64, h * tw as f64 / w),
            (None, Some(th), _) => (w * th as f64 / h, th as f64),
            (None, None, Some(s)) => {
                if !s.is_finite() || s < 1.0 {
                    return Err(Error::invalid(
                        "hires scale",
                        format!("{s} is not a number ≥ 1"),
                    ));
                }
                (w * s, h * s)
            }
            (None, None, None) => {
                return Err(Error::invalid(
                    "hires",
                    "give --hires-scale or --hires-width/--hires-height",
                ))
            }
        };
        let floor = |v: f64| ((v.floor() as usize) / f * f).max(f);
        Ok((floor(tw), floor(th)))
    }

    /// The request of the second pass: the base request at the large size (the run keeps
    /// the base request itself: what the metadata describes).
    pub(super) fn request(&self, base: &GenerateRequest) -> GenerateRequest {
        GenerateRequest {
            width: self.width,
            height: self.height,
            steps: self.steps.unwrap_or(base.steps),
            hires: None,
            init_latents: None,
            ..base.clone()
        }
    }
}

/// `e` with its SDXL size conditions for `req` (the large size).
fn resized_embeds(
    e: &Embeds,
    req: &GenerateRequest,
    device: &candle_core::Device,
) -> Result<Embeds> {
    let Some(a) = &e.added else {
        return Ok(e.clone());
    };
    let (rows, cols) = a.dims2().ctx("added conditions")?;
    let sizes = req.size_conditions.time_ids(req.width, req.height);
    let ids = Tensor::new(&sizes, device)
        .and_then(|t| t.unsqueeze(0))
        .and_then(|t| t.repeat((rows, 1)))
        .and_then(|t| t.to_dtype(a.dtype()))
        .ctx("size conditions")?;
    let pooled = a.narrow(1, 0, cols - 6).ctx("added conditions")?;
    Ok(Embeds {
        context: e.context.clone(),
        added: Some(Tensor::cat(&[&pooled, &ids], 1).ctx("added conditions")?),
    })
}

impl StableDiffusion {
    /// Checks a hires request: sizes, strength, what it combines with.
    pub(super) fn check_hires(&self, req: &GenerateRequest, h: &Hires) -> Result<()> {
        if req.init_image.is_some() {
            return Err(Error::invalid(
                "hires",
                "Hires. fix is for txt2img (A1111 has it there only): drop --init-image or the hires flags",
            ));
        }
        if !(0.0..=1.0).contains(&h.strength) {
            return Err(Error::invalid(
                "hires strength",
                format!("{} is outside 0..1", h.strength),
            ));
        }
        if h.steps == Some(0) {
            return Err(Error::invalid("hires steps", "must be at least 1"));
        }
        if h.width < req.width || h.height < req.height {
            return Err(Error::invalid(
                "hires",
                format!(
                    "{}x{} is smaller than the base size {}x{}",
                    h.width, h.height, req.width, req.height
                ),
            ));
        }
        self.check(&h.request(req))
    }

    /// How many steps the second pass of `req` runs (0 without hires).
    pub(super) fn hires_steps(&self, req: &GenerateRequest) -> Result<usize> {
        let Some(h) = &req.hires else {
            return Ok(0);
        };
        let r = h.request(req);
        let s = self.scheduler_for(&r)?;
        Ok(
            s.timesteps().len()
                - img2img_start(r.steps, h.strength, s.order(), s.timesteps().len()),
        )
    }

    /// Ends the first pass of `run` and sets up the second: upscale, fresh noise from the
    /// same seeds, the sampler at the large size started part-way as img2img.
    pub(super) fn start_hires(&self, run: &mut Run) -> Result<()> {
        let Some(h) = run.hires.take() else {
            return Ok(());
        };
        let req = h.request(&run.req);
        let f = self.scale_factor();
        let (lh, lw) = (req.height / f, req.width / f);
        let channels = self.files.vae_config.latent_channels;
        let n = req.batch;
        let rows = run.rows;
        run.attention_slice = self.plan_memory(&req, rows)?;
        let scheduler = self.scheduler_for(&req)?;
        let len = scheduler.timesteps().len();
        let start = img2img_start(req.steps, h.strength, scheduler.order(), len);
        let mut streams: Vec<NoiseStream> = (0..n)
            .map(|i| NoiseStream::new(req.rng, req.seeds_of(i).0))
            .collect();
        let latents = match h.upscaler {
            HiresUpscaler::Latent | HiresUpscaler::LatentNearest => {
                let up = match h.upscaler {
                    HiresUpscaler::Latent => run.latents.upsample_bilinear2d(lh, lw, false),
                    _ => run.latents.upsample_nearest2d(lh, lw),
                }
                .ctx("hires upscale")?;
                let per_image = channels * lh * lw;
                let mut out = Vec::with_capacity(n);
                for (i, stream) in streams.iter_mut().enumerate() {
                    let main = stream.randn(per_image);
                    let noise = match (req.variation, req.seeds_of(i).1) {
                        (Some(v), Some(sub)) if v.strength != 0.0 => {
                            let sub = NoiseStream::new(req.rng, sub).randn(per_image);
                            slerp_a1111(v.strength, &main, &sub, channels, lh, lw)
                        }
                        _ => main,
                    };
                    let noise = Tensor::from_vec(noise, (1, channels, lh, lw), &self.device)
                        .ctx("noise")?;
                    let x0 = up.narrow(0, i, 1).ctx("hires")?;
                    out.push(if start < len {
                        scheduler.add_noise(&x0, &noise, start)?
                    } else {
                        x0
                    });
                }
                Tensor::cat(&out, 0).ctx("hires latents")?
            }
            HiresUpscaler::Lanczos => {
                let mut out = Vec::with_capacity(n);
                for (i, stream) in streams.iter_mut().enumerate() {
                    let rgb = self.decode(&run.latents.narrow(0, i, 1).ctx("hires")?)?;
                    let img =
                        image::RgbImage::from_raw(run.req.width as u32, run.req.height as u32, rgb)
                            .ok_or_else(|| Error::invalid("hires", "decoded picture size"))?;
                    let big = image::imageops::resize(
                        &img,
                        req.width as u32,
                        req.height as u32,
                        image::imageops::FilterType::Lanczos3,
                    );
                    let init = InitImage {
                        rgb: big.into_raw(),
                        strength: h.strength,
                        mask: None,
                    };
                    out.push(self.img2img_latents(
                        &init,
                        &req,
                        std::slice::from_mut(stream),
                        lh,
                        lw,
                        channels,
                        scheduler.as_ref(),
                        start,
                    )?);
                }
                Tensor::cat(&out, 0).ctx("hires latents")?
            }
        };
        // SDXL conditions on the size: the second pass is told the large one.
        run.context = match &run.context {
            Conditioning::Single(e) => Conditioning::Single(resized_embeds(e, &req, &self.device)?),
            Conditioning::Batched(e) => {
                Conditioning::Batched(resized_embeds(e, &req, &self.device)?)
            }
            Conditioning::Separate { uncond, cond } => Conditioning::Separate {
                uncond: resized_embeds(uncond, &req, &self.device)?,
                cond: resized_embeds(cond, &req, &self.device)?,
            },
        };
        // ControlNets see their maps at the large size.
        for c in &mut run.controls {
            let map = crate::engine::control::fit(
                &c.unit.image,
                run.req.width,
                run.req.height,
                req.width,
                req.height,
            )?;
            let net = c.net.get()?;
            let image = crate::engine::controlnet::image_tensor(
                &map,
                req.width,
                req.height,
                self.dtype,
                &self.device,
            )
            .ctx("control image")?;
            c.hint = net.embed_hint(&image).ctx("controlnet hint")?;
            c.unit.image = map;
        }
        run.offset += run.scheduler.timesteps().len() - run.start;
        run.latents = latents.to_dtype(DType::F32).ctx("hires latents")?;
        run.scheduler = scheduler;
        run.streams = streams;
        run.start = start;
        run.next = start;
        run.size = (req.width, req.height);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_a1111() {
        assert_eq!(
            Hires::target((512, 512), Some(2.0), None, None, 8).unwrap(),
            (1024, 1024)
        );
        assert_eq!(
            Hires::target((512, 768), Some(1.5), None, None, 8).unwrap(),
            (768, 1152)
        );
        // One side given: the other keeps the aspect ratio (floored to a multiple of 8).
        assert_eq!(
            Hires::target((512, 768), None, Some(1000), None, 8).unwrap(),
            (1000, 1496)
        );
        assert_eq!(
            Hires::target((512, 512), Some(1.3), None, None, 8).unwrap(),
            (664, 664)
        );
        assert!(Hires::target((512, 512), Some(0.5), None, None, 8).is_err());
        assert!(Hires::target((512, 512), None, None, None, 8).is_err());
    }

    #[test]
    fn upscaler_names() {
        for u in HiresUpscaler::ALL {
            assert_eq!(HiresUpscaler::parse(u.cli_name()).unwrap(), u);
            assert_eq!(HiresUpscaler::parse(u.a1111_name()).unwrap(), u);
        }
        assert!(HiresUpscaler::parse("ESRGAN_4x").is_err());
    }
}
