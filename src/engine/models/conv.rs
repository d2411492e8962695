//! 2-D convolution for the UNet and the VAE decoder. On the CPU in f32 it is lowered to one
//! matrix product per image, `W [cout, cin·kh·kw] × cols [cin·kh·kw, oh·ow]`, whose result
//! is already NCHW: the column matrix is built row by row (each row is the input plane
//! shifted by one kernel tap: contiguous copies, split over the CPU threads), and no
//! transpose follows. With few output positions the product is turned around
//! (`colsᵀ × Wᵀ`, then the small result transposed). candle's own CPU path measured up to
//! 3× the time of its matrix product alone (see BENCHMARKS.md). bf16 on the CPU (which
//! candle's CPU convolution lacks) is widened to f32 for the product; other devices and
//! dtypes use candle's `conv2d`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A convolution layer with diffusers' weight names (`weight`, `bias`).
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: Some(vb.get(cout, "bias")?),
            stride,
            padding,
        })
    }

    /// A convolution without bias (`weight` only).
    pub fn no_bias(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: None,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.stride, self.padding)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// `SD_STUDIO_CANDLE_CONV=1`: candle's convolution everywhere (for A/B measurements).
fn candle_only() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SD_STUDIO_CANDLE_CONV").is_ok_and(|v| v == "1"))
}

/// Output positions from which 3×3 convolutions go through Winograd's F(2×2, 3×3)
/// (`winograd.rs`); below, the blocks are too few to keep the threads busy.
const WINOGRAD_MIN: usize = 16 * 16;

/// `SD_STUDIO_WINOGRAD=0`: the column convolution for every 3×3 (for A/B measurements).
fn winograd_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SD_STUDIO_WINOGRAD").map_or(true, |v| v != "0"))
}

/// Output positions (oh·ow) from which `W × cols` is computed directly (32×32 measured 1.5×
/// faster than candle's path, 16×16 the same, 8×8 slower); below, `colsᵀ × Wᵀ` (8×8 ×1280
/// channels: about 3× faster than candle's path). Above it, copying colsᵀ costs more than
/// it saves (a 256² VAE decode took 2.4× longer that way).
const MIN_POSITIONS: usize = 512;

/// `x` [b, cin, h, w] ⊛ `w` [cout, cin, kh, kw], no bias.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::BF16 && w.dtype() == DType::BF16 {
        // candle's CPU convolution has no bf16 kernel: bf16 values, accumulated in f32 (as
        // a GPU's bf16 convolution accumulates), rounded back once.
        let y = conv2d(
            &x.to_dtype(DType::F32)?,
            &w.to_dtype(DType::F32)?,
            stride,
            padding,
        )?;
        return y.to_dtype(DType::BF16);
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 || candle_only() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, wcin, kh, kw) = w.dims4()?;
    if wcin != cin || h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
        // Let candle produce its own error message for bad shapes.
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let oh = (h + 2 * padding - kh) / stride + 1;
    let ow = (wd + 2 * padding - kw) / stride + 1;
    if (kh, kw, stride, padding) == (3, 3, 1, 1) && oh * ow >= WINOGRAD_MIN && winograd_on() {
        return super::winograd::conv3x3(x, w);
    }
    let k = cin * kh * kw;
    let w2 = w.reshape((cout, k))?;
    let cols = if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        x.reshape((b, cin, h * wd))?
    } else {
        x.contiguous()?.apply_op1_no_bwd(&Columns {
            kh,
            kw,
            stride,
            padding,
        })?
    };
    if oh * ow >= MIN_POSITIONS {
        return super::linear::left_matmul(&w2, &cols)?.reshape((b, cout, oh, ow));
    }
    // Few output positions: `W × cols` would be a skinny product; `colsᵀ × Wᵀ` (positions
    // as rows; colsᵀ copied, it is small; Wᵀ read transposed in place) runs near full speed,
    // and the small result is transposed back to NCHW.
    cols.transpose(1, 2)?
        .contiguous()?
        .broadcast_matmul(&w2.t()?)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, cout, oh, ow))
}

/// Nearest-neighbour upsampling of `x` [b, c, h, w] to [b, c, oh, ow], as candle's
/// `upsample_nearest2d` (source pixel ⌊i · (h / oh)⌋ in f64), on the CPU in f32 without candle's
/// zeroed output buffer (see `linear.rs`: a zeroed request costs a page fault per 4 KiB; the
/// VAE's last upsampling writes 268 MB per image). Other devices and dtypes: candle's.
pub fn upsample_nearest2d(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || candle_only() {
        return x.upsample_nearest2d(oh, ow);
    }
    x.contiguous()?.apply_op1_no_bwd(&Nearest { oh, ow })
}

struct Nearest {
    oh: usize,
    ow: usize,
}

impl CustomOp1 for Nearest {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let x = super::attention::f32s(s, l, "upsampling input")?;
        let (oh, ow) = (self.oh, self.ow);
        // Source row and column of each output row and column, by candle's formula.
        let index = |n: usize, src: usize| -> Vec<usize> {
            let scale = src as f64 / n as f64;
            (0..n)
                .map(|i| ((i as f64 * scale) as usize).min(src - 1))
                .collect()
        };
        let (rows, cols) = (index(oh, h), index(ow, w));
        let mut out = Vec::with_capacity(b * c * oh * ow);
        let mut row = vec![0f32; ow];
        for plane in x.chunks_exact(h * w) {
            for (i, &r) in rows.iter().enumerate() {
                // A source row already expanded for the last output row is copied again.
                if i == 0 || rows[i - 1] != r {
                    let src = &plane[r * w..][..w];
                    for (d, &j) in row.iter_mut().zip(&cols) {
                        *d = src[j];
                    }
                }
                out.extend_from_slice(&row);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c, oh, ow))))
    }
}

/// [b, cin, h, w] → [b, cin·kh·kw, oh·ow]: row (ci·kh + ky)·kw + kx holds the input plane
/// ci sampled at tap (ky, kx) for every output position, zero outside the picture.
struct Columns {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Columns {
    /// Fills the rows of one input plane (`plane`: h × w) into `out` (kh·kw rows of oh·ow).
    #[allow(clippy::too_many_arguments)]
    fn plane(&self, plane: &[f32], h: usize, w: usize, oh: usize, ow: usize, out: &mut [f32]) {
        let (s, p) = (self.stride, self.padding as isize);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let row = &mut out[(ky * self.kw + kx) * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * s) as isize + ky as isize - p;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    // Output columns whose input column ox·s + kx − p lies inside the row.
                    let shift = kx as isize - p;
                    let first = if shift < 0 {
                        ((-shift) as usize).div_ceil(s)
                    } else {
                        0
                    };
                    let last = ((w as isize - 1 - shift).div_euclid(s as isize) + 1)
                        .clamp(0, ow as isize) as usize;
                    let first = first.min(last);
                    dst[..first].fill(0.0);
                    dst[last..].fill(0.0);
                    if s == 1 {
                        let start = (first as isize + shift) as usize;
                        dst[first..last].copy_from_slice(&src[start..start + last - first]);
                    } else {
                        for (ox, d) in dst[first..last].iter_mut().enumerate() {
                            *d = src[((first + ox) * s) + kx - self.padding];
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Columns {
    fn name(&self) -> &'static str {
        "conv-columns"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("conv columns: f32 only, got {:?}", s.dtype());
        };
        let (b, cin, h, w) = l.shape().dims4()?;
        let x = &data[l.start_offset()..l.start_offset() + b * cin * h * w];
        let oh = (h + 2 * self.padding - self.kh) / self.stride + 1;
        let ow = (w + 2 * self.padding - self.kw) / self.stride + 1;
        let per_plane = self.kh * self.kw * oh * ow;
        let mut out = super::attention::zeros_f32(b * cin * per_plane);
        // On rayon's pool (threads spawned per call cost a fresh stack each, and their exit
        // a flush of the allocator's thread cache).
        out.par_chunks_mut(per_plane)
            .enumerate()
            .for_each(|(plane, dst)| {
                self.plane(&x[plane * h * w..(plane + 1) * h * w], h, w, oh, ow, dst);
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((b, cin * self.kh * self.kw, oh * ow)),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nearest_upsampling_matches_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev).unwrap();
        for (oh, ow) in [(10, 14), (5, 7), (11, 15), (15, 21)] {
            let want = x.upsample_nearest2d(oh, ow).unwrap();
            let got = upsample_nearest2d(&x, oh, ow).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{oh}x{ow}");
        }
        // A non-contiguous input is copied first.
        let xt = x.transpose(2, 3).unwrap();
        let want = xt.upsample_nearest2d(14, 10).unwrap();
        let got = upsample_nearest2d(&xt, 14, 10).unwrap();
        let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn matches_candle_conv2d() {
        let dev = Device::Cpu;
        for (cin, cout, h, w, k, stride, padding) in [
            (5, 7, 9, 11, 3, 1, 1),
            (5, 7, 9, 11, 3, 2, 1),
            (4, 6, 8, 8, 3, 2, 0),
            (3, 4, 6, 7, 1, 1, 0),
            (3, 4, 2, 3, 3, 1, 1),
            (3, 4, 40, 30, 3, 1, 1),
            (3, 4, 61, 47, 3, 2, 1),
            (2, 3, 48, 48, 3, 2, 0),
            (2, 3, 32, 32, 1, 1, 0),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
            let want = x.conv2d(&wt, padding, stride, 1, 1).unwrap();
            let got = conv2d(&x, &wt, stride, padding).unwrap();
            assert_eq!(got.dims(), want.dims(), "k{k} s{stride} p{padding}");
            let e = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(e < 1e-4, "k{k} s{stride} p{padding}: max error {e}");
        }
    }
}
