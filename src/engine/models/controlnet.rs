//! ControlNet (diffusers' `ControlNetModel`): a copy of the UNet's input convolution, time
//! embedding, down path and middle block, fed the latents plus an embedding of the control
//! image (the "hint": a small strided CNN from pixels to latent size), whose every skip
//! connection and middle output goes through a 1×1 "zero convolution" and is added to the
//! UNet's (see [`Residuals`]). Built from `config.json` as diffusers writes it; weight names
//! follow diffusers (single files in A1111's layout are renamed in `loading::controlnet`).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::engine::config::UNetConfig;
use crate::engine::conv::Conv2d;
use crate::engine::profile::scope;
use crate::engine::unet::{
    build_down, build_head, build_mid, Forward, Head, Level, Mid, Residuals,
};

type R<T> = candle_core::Result<T>;

/// The architecture: the UNet half it copies plus the hint embedding's widths.
#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    pub unet: UNetConfig,
    /// `conditioning_embedding_out_channels`: the hint CNN's widths, one stride-2 step
    /// between each (so `2^(len-1)` is the VAE's scale factor).
    pub embedding_channels: Vec<usize>,
    /// `conditioning_channels`: 3 (RGB) for every published ControlNet.
    pub conditioning_channels: usize,
    /// `controlnet_conditioning_channel_order == "bgr"`.
    pub bgr: bool,
    /// `global_pool_conditions` (shuffle models): residuals averaged over the image.
    pub global_pool: bool,
}

impl ControlNetConfig {
    /// Pixels per latent cell the hint CNN expects.
    pub fn scale_factor(&self) -> usize {
        1 << self.embedding_channels.len().saturating_sub(1)
    }

    /// Skip connections of the UNet it feeds: the input convolution, every down resnet,
    /// every downsampler.
    pub fn skip_count(&self) -> usize {
        let n = self.unet.block_out_channels.len();
        1 + n * self.unet.layers_per_block + n.saturating_sub(1)
    }

    /// The channel count of every skip connection, in order.
    pub fn skip_channels(&self) -> Vec<usize> {
        let ch = &self.unet.block_out_channels;
        let mut out = vec![ch[0]];
        for (i, &c) in ch.iter().enumerate() {
            out.extend(std::iter::repeat_n(c, self.unet.layers_per_block));
            if i + 1 < ch.len() {
                out.push(c);
            }
        }
        out
    }
}

/// diffusers' `ControlNetConditioningEmbedding`: conv, SiLU, pairs of (conv, stride-2 conv)
/// each followed by SiLU, then the zero-initialised output conv to the UNet's width.
struct HintEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl HintEmbedding {
    fn new(vb: VarBuilder, c: &ControlNetConfig) -> R<Self> {
        let ch = &c.embedding_channels;
        let mut blocks = Vec::new();
        for i in 0..ch.len() - 1 {
            let bvb = vb.pp("blocks");
            blocks.push(Conv2d::new(ch[i], ch[i], 3, 1, 1, bvb.pp(2 * i))?);
            blocks.push(Conv2d::new(ch[i], ch[i + 1], 3, 2, 1, bvb.pp(2 * i + 1))?);
        }
        Ok(Self {
            conv_in: Conv2d::new(c.conditioning_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            blocks,
            conv_out: Conv2d::new(
                ch[ch.len() - 1],
                c.unet.block_out_channels[0],
                3,
                1,
                1,
                vb.pp("conv_out"),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> R<Tensor> {
        let mut x = candle_nn::ops::silu(&self.conv_in.forward(x)?)?;
        for b in &self.blocks {
            x = candle_nn::ops::silu(&b.forward(&x)?)?;
        }
        self.conv_out.forward(&x)
    }
}

/// A loaded ControlNet.
pub struct ControlNet {
    head: Head,
    hint: HintEmbedding,
    down: Vec<Level>,
    mid: Mid,
    zero_convs: Vec<Conv2d>,
    mid_out: Conv2d,
    config: ControlNetConfig,
}

impl ControlNet {
    pub fn new(vb: VarBuilder, c: &ControlNetConfig) -> R<Self> {
        if c.embedding_channels.is_empty() {
            candle_core::bail!("conditioning_embedding_out_channels is empty");
        }
        let u = &c.unet;
        let n = u.block_out_channels.len();
        let zero_convs = c
            .skip_channels()
            .iter()
            .enumerate()
            .map(|(k, &ch)| Conv2d::new(ch, ch, 1, 1, 0, vb.pp("controlnet_down_blocks").pp(k)))
            .collect::<R<Vec<_>>>()?;
        let last = u.block_out_channels[n - 1];
        Ok(Self {
            head: build_head(&vb, u)?,
            hint: HintEmbedding::new(vb.pp("controlnet_cond_embedding"), c)?,
            down: (0..n).map(|i| build_down(&vb, u, i)).collect::<R<_>>()?,
            mid: build_mid(&vb, u)?,
            zero_convs,
            mid_out: Conv2d::new(last, last, 1, 1, 0, vb.pp("controlnet_mid_block"))?,
            config: c.clone(),
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The control image's embedding, [1, block_out_channels[0], h/f, w/f], from pixels
    /// [1, 3, h, w] in 0..1 (RGB). It does not depend on the step, so a job computes it once.
    pub fn embed_hint(&self, image: &Tensor) -> R<Tensor> {
        let dev = image.device();
        scope("controlnet hint embedding", dev, || {
            let image = if self.config.bgr {
                let c = image.dim(1)?;
                let flipped: Vec<Tensor> = (0..c)
                    .rev()
                    .map(|i| image.narrow(1, i, 1))
                    .collect::<R<_>>()?;
                Tensor::cat(&flipped, 1)?
            } else {
                image.clone()
            };
            self.hint.forward(&image)
        })
    }

    /// The residuals for one UNet pass over `sample` (the scaled model input, every CFG row)
    /// at `timestep`, times `scale` (diffusers' `conditioning_scale`); `opts` as the UNet's
    /// (attention slicing, SDXL's added conditions; its `control` is ignored).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        hint: &Tensor,
        scale: f64,
        opts: Forward<'_>,
    ) -> R<Residuals> {
        let (slice, added) = (opts.attention_slice, opts.added);
        let u = &self.config.unet;
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let dev = sample.device();
        let temb = self.head.embed(u, timestep, b, dtype, dev, added)?;
        let x = self.head.conv_in(sample)?;
        let mut x = scope("controlnet hint embedding", dev, || {
            x.broadcast_add(&hint.to_dtype(dtype)?)
        })?;
        let mut skips = vec![x.clone()];
        for level in &self.down {
            x = level.down(&x, &temb, context, slice, u, &mut skips)?;
        }
        let x = self.mid.forward(&x, &temb, context, slice)?;
        scope("controlnet zero convolutions", dev, || {
            let finish = |t: Tensor| -> R<Tensor> {
                let t = if scale == 1.0 { t } else { (t * scale)? };
                if self.config.global_pool {
                    t.mean_keepdim(3)?.mean_keepdim(2)
                } else {
                    Ok(t)
                }
            };
            let down = skips
                .iter()
                .zip(&self.zero_convs)
                .map(|(s, z)| finish(z.forward(s)?))
                .collect::<R<Vec<_>>>()?;
            let mid = finish(self.mid_out.forward(&x)?)?;
            Ok(Residuals { down, mid })
        })
    }
}

/// Pixels (row-major RGB8, `w`×`h`) as the [1, 3, h, w] 0..1 tensor diffusers' control
/// image processor makes (no normalisation to -1..1).
pub fn image_tensor(
    rgb: &[u8],
    w: usize,
    h: usize,
    dtype: DType,
    dev: &candle_core::Device,
) -> R<Tensor> {
    if rgb.len() != w * h * 3 {
        candle_core::bail!("control image: {} bytes for {w}x{h} RGB", rgb.len());
    }
    let data: Vec<f32> = rgb.iter().map(|&v| v as f32 / 255.0).collect();
    Tensor::from_vec(data, (h, w, 3), dev)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?
        .to_dtype(dtype)
}
