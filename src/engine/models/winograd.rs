//! 3×3 convolutions (stride 1, padding 1) on the CPU by Winograd's minimal filtering
//! F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//! each 2×2 block of output comes from a 4×4 input tile as `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`,
//! so the channel mixing is 16 matrix products of `cout × cin` by `cin × tiles`, 2.25× fewer
//! multiplications than the direct convolution's `cout × 9·cin` by `cin·9 × positions`.
//! These convolutions are most of the UNet's and nearly all of the VAE decoder's time.
//!
//! Tiles are taken in blocks per thread; each thread keeps its transformed-input and
//! product buffers for every block it takes, so the column matrix (9 × the input, 1.2 GB for
//! the VAE's last 512² convolutions) is never built. The transforms are exact in f32 up to
//! rounding: results stay within about 1e-5 relative of the direct convolution.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape};

use super::attention::f32s;
use rayon::prelude::*;

/// Tiles per block (the `n` of each block's 16 products).
const TILES: usize = 96;

thread_local! {
    /// Each thread's transformed tiles and products, kept between calls (no fresh pages
    /// per convolution).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// `G g Gᵀ` for every (cout, cin) filter, laid out [cout][16][cin] (so output channels
/// transform in parallel; product ξ reads rows `co·16·cin + ξ·cin`).
fn transform_filters(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = super::attention::zeros_f32(16 * cout * cin);
    u.par_chunks_mut(16 * cin).enumerate().for_each(|(co, uc)| {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..][..9];
            // t = G g: 4×3
            let mut t = [0f32; 12];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                t[c] = g0;
                t[3 + c] = 0.5 * (g0 + g1 + g2);
                t[6 + c] = 0.5 * (g0 - g1 + g2);
                t[9 + c] = g2;
            }
            // (G g) Gᵀ: 4×4
            for r in 0..4 {
                let (a, b, c) = (t[r * 3], t[r * 3 + 1], t[r * 3 + 2]);
                let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (k, v) in row.iter().enumerate() {
                    uc[(r * 4 + k) * cin + ci] = *v;
                }
            }
        }
    });
    u
}

struct Winograd {
    cout: usize,
}

/// `x` [b, cin, h, w] ⊛ `w` [cout, cin, 3, 3], stride 1, padding 1 (f32, CPU).
pub fn conv3x3(x: &candle_core::Tensor, w: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let cout = w.dim(0)?;
    x.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &Winograd { cout })
}

/// Output pointer shared by the threads; each writes only its own tiles' pixels.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every thread writes a disjoint set of output pixels (those of its own tiles),
// and the buffer outlives the parallel loop that uses the pointer.
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes element `at`.
    ///
    /// Callers guarantee `at` is inside the buffer and that no other thread writes it.
    fn write(&self, at: usize, v: f32) {
        // SAFETY: see above; the pointer comes from a live Vec of `out_len` elements.
        #[allow(unsafe_code)]
        unsafe {
            *self.0.add(at) = v;
        }
    }
}

impl CustomOp2 for Winograd {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = l1.shape().dims4()?;
        let (cout, wcin, kh, kw) = l2.shape().dims4()?;
        if (wcin, kh, kw) != (cin, 3, 3) || cout != self.cout {
            candle_core::bail!(
                "winograd: weight {:?} for input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let (x, wt) = (
            f32s(s1, l1, "winograd input")?,
            f32s(s2, l2, "winograd weight")?,
        );
        let u = transform_filters(wt, cout, cin);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = th * tw;
        let blocks = tiles.div_ceil(TILES);
        let mut out = super::attention::zeros_f32(b * cout * h * w);
        let ptr = OutPtr(out.as_mut_ptr());
        let out_len = out.len();
        (0..b * blocks).into_par_iter().for_each(|job| {
            SCRATCH.with(|cell| {
                let mut bufs = cell.borrow_mut();
                let (v, m) = &mut *bufs;
                // Grown once per thread to the largest layer, then reused.
                if v.len() < 16 * cin * TILES {
                    v.resize(16 * cin * TILES, 0.0);
                }
                if m.len() < 16 * cout * TILES {
                    m.resize(16 * cout * TILES, 0.0);
                }
                let (bi, blk) = (job / blocks, job % blocks);
                let t0 = blk * TILES;
                let n = TILES.min(tiles - t0);
                let img = &x[bi * cin * h * w..(bi + 1) * cin * h * w];
                // V[ξ][ci][j] = (Bᵀ d B)[ξ] for tile t0 + j of plane ci.
                for ci in 0..cin {
                    let plane = &img[ci * h * w..(ci + 1) * h * w];
                    for j in 0..n {
                        let t = t0 + j;
                        let (ty, tx) = (t / tw, t % tw);
                        let mut d = [0f32; 16];
                        for r in 0..4 {
                            let iy = (2 * ty + r) as isize - 1;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = &plane[iy as usize * w..(iy as usize + 1) * w];
                            for c in 0..4 {
                                let ix = (2 * tx + c) as isize - 1;
                                if ix >= 0 && ix < w as isize {
                                    d[r * 4 + c] = row[ix as usize];
                                }
                            }
                        }
                        // Bᵀ d: rows
                        let mut e = [0f32; 16];
                        for c in 0..4 {
                            let (d0, d1, d2, d3) = (d[c], d[4 + c], d[8 + c], d[12 + c]);
                            e[c] = d0 - d2;
                            e[4 + c] = d1 + d2;
                            e[8 + c] = d2 - d1;
                            e[12 + c] = d1 - d3;
                        }
                        // (Bᵀ d) B: columns
                        for r in 0..4 {
                            let (e0, e1, e2, e3) =
                                (e[r * 4], e[r * 4 + 1], e[r * 4 + 2], e[r * 4 + 3]);
                            let vals = [e0 - e2, e1 + e2, e2 - e1, e1 - e3];
                            for (k, val) in vals.iter().enumerate() {
                                v[((r * 4 + k) * cin + ci) * TILES + j] = *val;
                            }
                        }
                    }
                }
                // M[ξ] [cout, n] = U[ξ] [cout, cin] · V[ξ] [cin, n]
                for xi in 0..16 {
                    super::attention::gemm_f32(
                        cout,
                        n,
                        cin,
                        &mut m[xi * cout * TILES..(xi + 1) * cout * TILES],
                        (TILES, 1),
                        &u[xi * cin..],
                        (16 * cin, 1),
                        &v[xi * cin * TILES..(xi + 1) * cin * TILES],
                        (TILES, 1),
                        false,
                        1.0,
                        1,
                    );
                }
                // Y = Aᵀ M A per tile, written to its 2×2 output pixels.
                for co in 0..cout {
                    let base = (bi * cout + co) * h * w;
                    for j in 0..n {
                        let t = t0 + j;
                        let (ty, tx) = (t / tw, t % tw);
                        let g = |xi: usize| m[(xi * cout + co) * TILES + j];
                        // Aᵀ M: 2×4
                        let mut s = [0f32; 8];
                        for c in 0..4 {
                            let (m0, m1, m2, m3) = (g(c), g(4 + c), g(8 + c), g(12 + c));
                            s[c] = m0 + m1 + m2;
                            s[4 + c] = m1 - m2 - m3;
                        }
                        for r in 0..2 {
                            let oy = 2 * ty + r;
                            if oy >= h {
                                continue;
                            }
                            let row = &s[r * 4..r * 4 + 4];
                            let ys = [row[0] + row[1] + row[2], row[1] - row[2] - row[3]];
                            for (c, y) in ys.iter().enumerate() {
                                let ox = 2 * tx + c;
                                if ox < w {
                                    let at = base + oy * w + ox;
                                    // In range (image, channel and pixel are), and
                                    // pixel (oy, ox) of this image belongs to tile
                                    // (ty, tx) alone, which only this job handles.
                                    assert!(at < out_len);
                                    ptr.write(at, *y);
                                }
                            }
                        }
                    }
                }
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_the_direct_convolution() {
        let dev = Device::Cpu;
        // Odd and even sizes (partial tiles at the edges), one block and several.
        for (b, cin, cout, h, w) in [
            (1, 3, 4, 5, 7),
            (2, 8, 6, 16, 16),
            (1, 16, 24, 33, 20),
            (2, 5, 3, 1, 9),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev).unwrap();
            let want = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
            let got = conv3x3(&x, &wt).unwrap();
            let e = crate::engine::attention::max_rel_err(&got, &want);
            assert!(e < 1e-5, "({b},{cin},{cout},{h},{w}): relative error {e}");
        }
    }
}
