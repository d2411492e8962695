//! The VAE's encoder half (diffusers' `AutoencoderKL.encode`): image → the mean and
//! log-variance of the latent distribution. Built from candle-transformers' public blocks;
//! ours because candle's `encode` samples with its own generator, and img2img must draw that
//! sample from the image's seed the way diffusers does.

use candle_core::{Module, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UNetMidBlock2D, UNetMidBlock2DConfig,
};

use super::config::VaeConfig;

pub struct VaeEncoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: UNetMidBlock2D,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// `vb` is the VAE's root (weights under `encoder.` and `quant_conv.`).
    pub fn new(vb: VarBuilder, c: &VaeConfig) -> candle_core::Result<Self> {
        let e = vb.pp("encoder");
        let ch = &c.block_out_channels;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut down = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let cfg = DownEncoderBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: 1e-6,
                resnet_groups: c.norm_num_groups,
                add_downsample: i + 1 < ch.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            down.push(DownEncoderBlock2D::new(
                e.pp("down_blocks").pp(i),
                cin,
                out,
                cfg,
            )?);
        }
        let last = ch[ch.len() - 1];
        let mid_cfg = UNetMidBlock2DConfig {
            resnet_eps: 1e-6,
            output_scale_factor: 1.0,
            attn_num_head_channels: None,
            resnet_groups: Some(c.norm_num_groups),
            ..Default::default()
        };
        let latent2 = 2 * c.latent_channels;
        Ok(Self {
            conv_in: conv2d(c.in_channels, ch[0], 3, pad1, e.pp("conv_in"))?,
            down,
            mid: UNetMidBlock2D::new(e.pp("mid_block"), last, None, mid_cfg)?,
            norm_out: group_norm(c.norm_num_groups, last, 1e-6, e.pp("conv_norm_out"))?,
            conv_out: conv2d(last, latent2, 3, pad1, e.pp("conv_out"))?,
            quant_conv: if c.use_quant_conv {
                Some(conv2d(
                    latent2,
                    latent2,
                    1,
                    Default::default(),
                    vb.pp("quant_conv"),
                )?)
            } else {
                None
            },
        })
    }

    /// Image [b, 3, h, w] in [-1, 1] → (mean, std) of the latent distribution, each
    /// [b, latent, h/8, w/8], with the log-variance clamped to [-30, 20] as diffusers does.
    pub fn encode(&self, image: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = self.conv_in.forward(image)?;
        for block in &self.down {
            x = block.forward(&x)?;
        }
        x = self.mid.forward(&x, None)?;
        x = self
            .conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&x)?)?)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x)?;
        }
        let half = x.dim(1)? / 2;
        let mean = x.narrow(1, 0, half)?;
        let logvar = x.narrow(1, half, half)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }
}
