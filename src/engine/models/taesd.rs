//! Per-step previews: latents → a small RGB image, cheaply.
//!
//! Two ways, best first:
//! - [`TaesdDecoder`]: the decoder half of TAESD ("Tiny AutoEncoder for Stable Diffusion",
//!   madebyollin/taesd), as diffusers' `AutoencoderTiny` / `DecoderTiny` (`models/autoencoders/
//!   vae.py`) builds it: `tanh(x/3)*3`, a 3×3 conv + ReLU, then per stage `n` residual blocks
//!   (three 3×3 convs with ReLU between, plus the input, then ReLU), a ×2 nearest upsample and
//!   a bias-free 3×3 conv, the last stage ending in a 3×3 conv with bias to RGB; output mapped
//!   from [0, 1] to [-1, 1]. It decodes the sampler's latents as they are (TAESD's
//!   `scaling_factor` is 1), to full resolution, in a few milliseconds on a GPU.
//! - [`linear_rgb`]: a fixed 4×3 matrix from latent channels to RGB at latent resolution
//!   (1/8 of the image side), for when no TAESD weights are at hand, or as the cheap mode.
//!
//! Weight names are diffusers' (`decoder.layers.{i}.conv.{0,2,4}.weight`, …), indexed as
//! the `nn.Sequential` numbers them (ReLU and Upsample take an index but hold no weights).

use crate::engine::family::Family;
use std::path::{Path, PathBuf};

use super::conv::Conv2d;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::engine::config::JsonConfig;
use crate::engine::error::{Context, Error, Result};
use crate::engine::model::{candle_msg, find_weights, var_builder};

/// The hub repo with TAESD for SD 1.x/2.x latents.
pub const TAESD_REPO: &str = "madebyollin/taesd";
/// TAESD for SDXL's latent space.
pub const TAESDXL_REPO: &str = "madebyollin/taesdxl";

/// The TAESD to use for a `family` model when the setting is `spec`: the default TAESD
/// becomes TAESDXL for SDXL; anything else the user chose is kept.
pub fn repo_for(spec: &str, family: Family) -> &str {
    if spec == TAESD_REPO && family == Family::Sdxl {
        TAESDXL_REPO
    } else {
        spec
    }
}

/// Whether two families share a latent space (SD 1.x and 2.x do; SDXL has its own).
pub fn same_latents(a: Family, b: Family) -> bool {
    (a == Family::Sdxl) == (b == Family::Sdxl)
}

/// The decoder's shape, from the `AutoencoderTiny` `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaesdConfig {
    /// `latent_channels` (default 4).
    pub latent_channels: usize,
    /// `out_channels` (default 3).
    pub out_channels: usize,
    /// `decoder_block_out_channels` (default [64, 64, 64, 64]).
    pub block_out_channels: Vec<usize>,
    /// `num_decoder_blocks` (default [3, 3, 3, 1]).
    pub num_blocks: Vec<usize>,
    /// `upsampling_scaling_factor` (default 2).
    pub upsampling_scaling_factor: usize,
}

impl TaesdConfig {
    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        c.expect_str_in("act_fn", &["relu"])?;
        c.expect_str_in("upsample_fn", &["nearest"])?;
        let cfg = Self {
            latent_channels: c.usize_or("latent_channels", 4)?,
            out_channels: c.usize_or("out_channels", 3)?,
            block_out_channels: c.usize_list("decoder_block_out_channels", &[64, 64, 64, 64])?,
            num_blocks: c.usize_list("num_decoder_blocks", &[3, 3, 3, 1])?,
            upsampling_scaling_factor: c.usize_or("upsampling_scaling_factor", 2)?,
        };
        if cfg.block_out_channels.len() != cfg.num_blocks.len() || cfg.num_blocks.is_empty() {
            return Err(c.err(
                "num_decoder_blocks",
                "needs one entry per decoder_block_out_channels entry",
            ));
        }
        Ok(cfg)
    }
}

/// `AutoencoderTinyBlock`: relu(conv(relu(conv(relu(conv(x))))) + x).
struct Block {
    convs: [Conv2d; 3],
}

impl Block {
    fn new(vb: VarBuilder, ch: usize) -> candle_core::Result<Self> {
        let vb = vb.pp("conv");
        Ok(Self {
            convs: [
                Conv2d::new(ch, ch, 3, 1, 1, vb.pp("0"))?,
                Conv2d::new(ch, ch, 3, 1, 1, vb.pp("2"))?,
                Conv2d::new(ch, ch, 3, 1, 1, vb.pp("4"))?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        (h + x)?.relu()
    }
}

enum Layer {
    Conv(Conv2d),
    Relu,
    Block(Block),
    Upsample(usize),
}

/// TAESD's decoder on one device and dtype.
pub struct TaesdDecoder {
    layers: Vec<Layer>,
    pub config: TaesdConfig,
    pub root: PathBuf,
    dtype: DType,
    /// The latent space it decodes (SD 1.x unless loaded for another family).
    pub family: Family,
}

impl TaesdDecoder {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (diffusers'
    /// `AutoencoderTiny` layout; the encoder weights in the file are ignored).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = TaesdConfig::from_json(&JsonConfig::load(&dir.join("config.json"))?)?;
        let files = find_weights(dir, dtype != DType::F32)?;
        let vb = var_builder(&files, dtype, device, "taesd")?;
        let layers =
            Self::build(vb.pp("decoder").pp("layers"), &config).map_err(|e| Error::Weights {
                component: "taesd",
                path: files.first().cloned().unwrap_or_default(),
                reason: candle_msg(&e),
            })?;
        Ok(Self {
            layers,
            config,
            root: dir.to_path_buf(),
            dtype,
            family: Family::Sd1,
        })
    }

    fn build(vb: VarBuilder, c: &TaesdConfig) -> candle_core::Result<Vec<Layer>> {
        let mut layers = Vec::new();
        let first = c.block_out_channels[0];
        layers.push(Layer::Conv(Conv2d::new(
            c.latent_channels,
            first,
            3,
            1,
            1,
            vb.pp(layers.len().to_string()),
        )?));
        layers.push(Layer::Relu);
        let stages = c.num_blocks.len();
        for (i, (&n, &ch)) in c.num_blocks.iter().zip(&c.block_out_channels).enumerate() {
            let last = i + 1 == stages;
            for _ in 0..n {
                let b = Block::new(vb.pp(layers.len().to_string()), ch)?;
                layers.push(Layer::Block(b));
            }
            if !last {
                layers.push(Layer::Upsample(c.upsampling_scaling_factor));
            }
            let at = vb.pp(layers.len().to_string());
            let conv = if last {
                Conv2d::new(ch, c.out_channels, 3, 1, 1, at)?
            } else {
                Conv2d::no_bias(ch, ch, 3, 1, 1, at)?
            };
            layers.push(Layer::Conv(conv));
        }
        Ok(layers)
    }

    /// Latents [n, 4, h, w] (as the sampler holds them) → images [n, 3, h·8, w·8] in
    /// [-1, 1], f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let mut x = ((latents.to_dtype(self.dtype)? / 3.0)?.tanh()? * 3.0)?;
            for layer in &self.layers {
                x = match layer {
                    Layer::Conv(c) => c.forward(&x)?,
                    Layer::Relu => x.relu()?,
                    Layer::Block(b) => b.forward(&x)?,
                    Layer::Upsample(f) => {
                        let (_, _, h, w) = x.dims4()?;
                        x.upsample_nearest2d(h * f, w * f)?
                    }
                };
            }
            (x.to_dtype(DType::F32)? * 2.0)? - 1.0
        };
        run().ctx("taesd decode")
    }
}

/// Finds TAESD weights: a local folder, or a hub id looked up in the hub cache and, unless
/// `HF_HUB_OFFLINE` is set, downloaded (about 10 MB).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let cache = hf_hub::Cache::new(crate::engine::model::hub_cache_dir());
    let cached = cache.model(spec.to_string());
    if let (Some(cfg), Some(_)) = (
        cached.get("config.json"),
        cached.get("diffusion_pytorch_model.safetensors"),
    ) {
        return Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    let offline = matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("yes") | Ok("on")
    );
    if offline || !spec.contains('/') {
        return Err(Error::NotFound {
            what: "TAESD weights".into(),
            path: p.to_path_buf(),
        });
    }
    let hub_err = |e: hf_hub::api::sync::ApiError| Error::Hub {
        repo: spec.into(),
        reason: e.to_string(),
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(crate::engine::model::hub_cache_dir())
        .with_progress(false)
        .build()
        .map_err(hub_err)?;
    let r = api.model(spec.to_string());
    let cfg = r.get("config.json").map_err(hub_err)?;
    r.get("diffusion_pytorch_model.safetensors")
        .map_err(hub_err)?;
    Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Latent channel → RGB weights for SD 1.x and 2.x (both use the same VAE latent space),
/// as A1111's and ComfyUI's cheap previews use them; output roughly in [-1, 1].
pub const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// The same for SDXL's VAE latent space (ComfyUI's factors).
pub const SDXL_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3920, 0.4054, 0.4549],
    [-0.2634, -0.0196, 0.0653],
    [0.0568, 0.1687, -0.0755],
    [-0.3112, -0.2359, -0.2076],
];

/// The linear factors of a family's latent space.
pub fn latent_rgb(family: Family) -> &'static [[f32; 3]; 4] {
    match family {
        Family::Sdxl => &SDXL_LATENT_RGB,
        Family::Sd1 | Family::Sd2 => &SD_LATENT_RGB,
    }
}

/// One latent [4, h, w] (f32, CPU-readable) → RGB8 at latent resolution (w × h pixels).
pub fn linear_rgb(latent: &[f32], h: usize, w: usize) -> Vec<u8> {
    linear_rgb_with(&SD_LATENT_RGB, latent, h, w)
}

/// [`linear_rgb`] with a family's factors.
pub fn linear_rgb_with(factors: &[[f32; 3]; 4], latent: &[f32], h: usize, w: usize) -> Vec<u8> {
    let plane = h * w;
    let mut out = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        for c in 0..3 {
            let mut v = 0f32;
            for (k, row) in factors.iter().enumerate() {
                v += latent.get(k * plane + i).copied().unwrap_or(0.0) * row[c];
            }
            out.push(((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    out
}

/// How previews are made from a step's clean-latent estimate.
pub enum Previewer {
    Taesd(TaesdDecoder),
    Linear,
}

/// One cell's preview image.
pub struct PreviewImage {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Previewer {
    /// TAESD previews without taking ownership of the decoder.
    pub fn previews_with(t: &TaesdDecoder, latents: &Tensor) -> Result<Vec<PreviewImage>> {
        taesd_previews(t, latents)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Previewer::Taesd(_) => "TAESD",
            Previewer::Linear => "linear",
        }
    }

    /// Latents [n, 4, h, w] → one RGB8 image per batch entry.
    pub fn previews(&self, latents: &Tensor) -> Result<Vec<PreviewImage>> {
        self.previews_for(latents, Family::Sd1)
    }

    /// Previews of a `family` model's latents: TAESD when it was made for that latent space
    /// (compare mode can mix SD 1.5 and SDXL rows), else the family's linear factors.
    pub fn previews_for(&self, latents: &Tensor, family: Family) -> Result<Vec<PreviewImage>> {
        match self {
            Previewer::Taesd(t) if same_latents(t.family, family) => taesd_previews(t, latents),
            _ => {
                let (n, c, h, w) = latents.dims4().ctx("linear preview")?;
                if c != 4 {
                    return Err(Error::invalid(
                        "preview",
                        format!("linear previews need 4 latent channels, got {c}"),
                    ));
                }
                let data = latents
                    .to_dtype(DType::F32)
                    .and_then(|x| x.flatten_all())
                    .and_then(|x| x.to_vec1::<f32>())
                    .ctx("linear preview")?;
                let per = c * h * w;
                Ok((0..n)
                    .map(|i| PreviewImage {
                        width: w,
                        height: h,
                        rgb: linear_rgb_with(
                            latent_rgb(family),
                            &data[i * per..(i + 1) * per],
                            h,
                            w,
                        ),
                    })
                    .collect())
            }
        }
    }
}

fn taesd_previews(t: &TaesdDecoder, latents: &Tensor) -> Result<Vec<PreviewImage>> {
    let img = t.decode(latents)?;
    let (n, _, h, w) = img.dims4().ctx("taesd preview")?;
    (0..n)
        .map(|i| {
            let one = img.narrow(0, i, 1).ctx("taesd preview")?;
            Ok(PreviewImage {
                width: w,
                height: h,
                rgb: crate::engine::pipeline::to_rgb8(&one)?,
            })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_gets_taesdxl_unless_another_taesd_was_chosen() {
        assert_eq!(repo_for(TAESD_REPO, Family::Sdxl), TAESDXL_REPO);
        assert_eq!(repo_for(TAESD_REPO, Family::Sd2), TAESD_REPO);
        assert_eq!(repo_for("/my/taesd", Family::Sdxl), "/my/taesd");
        assert!(same_latents(Family::Sd1, Family::Sd2));
        assert!(!same_latents(Family::Sd1, Family::Sdxl));
        // SDXL's linear factors differ from SD's.
        let z = [1.0, 0.0, 0.0, 0.0];
        assert_ne!(
            linear_rgb_with(latent_rgb(Family::Sdxl), &z, 1, 1),
            linear_rgb(&z, 1, 1)
        );
    }

    #[test]
    fn linear_preview_maps_zero_to_grey_and_clamps() {
        let rgb = linear_rgb(&[0.0; 4], 1, 1);
        assert_eq!(rgb, vec![128, 128, 128]);
        let rgb = linear_rgb(&[100.0, 100.0, 100.0, -100.0], 1, 1);
        assert_eq!(rgb, vec![255, 255, 255]);
    }
}
