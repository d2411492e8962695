//! ControlNet requests: what a job asks of each ControlNet (model, control map, scale,
//! guidance window), the preprocessors that turn a picture into a control map (`none`,
//! built-in `canny`; depth/pose would need their own models and slot in as further
//! [`Preprocess`] variants), the control image fit and diffusers' per-step window test.
pub mod canny;

use crate::engine::error::{Error, Result};

/// How the picture becomes the control map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocess {
    /// The picture is the map (an edge/depth/pose map made elsewhere).
    None,
    /// Canny edges with OpenCV's semantics (A1111's defaults: 100, 200).
    Canny { low: f64, high: f64 },
}

impl Preprocess {
    pub const CANNY: Preprocess = Preprocess::Canny {
        low: 100.0,
        high: 200.0,
    };

    /// `none` or `canny` (A1111's preprocessor names).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "canny" => Ok(Self::CANNY),
            other => Err(Error::invalid(
                "control preprocess",
                format!(
                    "{other:?} is not one of: none, canny (depth and pose need their own models)"
                ),
            )),
        }
    }

    /// The name A1111 writes as "Module".
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Canny { .. } => "canny",
        }
    }

    /// The control map (RGB8, `w`×`h`) of a picture already at that size.
    pub fn apply(self, rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        match self {
            Self::None => rgb.to_vec(),
            Self::Canny { low, high } => canny::canny(rgb, w, h, 3, low, high)
                .into_iter()
                .flat_map(|v| [v, v, v])
                .collect(),
        }
    }
}

/// A picture resized to exactly `w`×`h` as diffusers' control image processor does it
/// (PIL's Lanczos, aspect ratio not kept; the same size is left untouched).
pub fn fit(rgb: &[u8], src_w: usize, src_h: usize, w: usize, h: usize) -> Result<Vec<u8>> {
    if rgb.len() != src_w * src_h * 3 {
        return Err(Error::invalid(
            "control image",
            format!("{} bytes for {src_w}x{src_h} RGB", rgb.len()),
        ));
    }
    if (src_w, src_h) == (w, h) {
        return Ok(rgb.to_vec());
    }
    let img = image::RgbImage::from_raw(src_w as u32, src_h as u32, rgb.to_vec())
        .ok_or_else(|| Error::invalid("control image", "pixel buffer does not match its size"))?;
    Ok(image::imageops::resize(
        &img,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    )
    .into_raw())
}

/// One ControlNet of a job.
#[derive(Debug, Clone)]
pub struct ControlUse {
    /// A diffusers folder, a `.safetensors` file or a hub id.
    pub model: String,
    /// The control map, RGB8 at the request's size (already preprocessed).
    pub image: Vec<u8>,
    /// The preprocessor that made it ("Module" in the metadata).
    pub module: String,
    /// diffusers' `controlnet_conditioning_scale`.
    pub scale: f64,
    /// diffusers' `control_guidance_start` / `_end`: fractions of the steps.
    pub start: f64,
    pub end: f64,
}

impl ControlUse {
    /// Scale finite, 0 ≤ start < end ≤ 1 (diffusers refuses start ≥ end); `i` numbers it
    /// in messages.
    pub fn check(&self, i: usize) -> Result<()> {
        let bad =
            |reason: String| Error::invalid("controlnet", format!("ControlNet {i}: {reason}"));
        if !self.scale.is_finite() {
            return Err(bad(format!(
                "control scale {} is not a finite number",
                self.scale
            )));
        }
        for (name, v) in [("control start", self.start), ("control end", self.end)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(format!("{name} {v} is outside 0..1")));
            }
        }
        if self.start >= self.end {
            return Err(bad(format!(
                "control start {} must be smaller than control end {}",
                self.start, self.end
            )));
        }
        Ok(())
    }

    /// Whether it steers step `i` of `len` (0-based, as run): diffusers' `controlnet_keep`
    /// (off when `i/len < start` or `(i+1)/len > end`).
    pub fn active(&self, i: usize, len: usize) -> bool {
        let len = len.max(1) as f64;
        !((i as f64) / len < self.start || (i as f64 + 1.0) / len > self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(start: f64, end: f64) -> ControlUse {
        ControlUse {
            model: String::new(),
            image: Vec::new(),
            module: "none".into(),
            scale: 1.0,
            start,
            end,
        }
    }

    #[test]
    fn window_matches_diffusers_keep() {
        // diffusers: keep = 1 - (i/len < s or (i+1)/len > e).
        let on: Vec<bool> = (0..10).map(|i| unit(0.2, 0.7).active(i, 10)).collect();
        assert_eq!(
            on,
            [false, false, true, true, true, true, true, false, false, false]
        );
        assert!((0..7).all(|i| unit(0.0, 1.0).active(i, 7)));
    }

    #[test]
    fn bad_windows_and_scales_are_named() {
        assert!(unit(0.5, 0.5)
            .check(0)
            .unwrap_err()
            .to_string()
            .contains("smaller"));
        assert!(unit(-0.1, 0.5)
            .check(1)
            .unwrap_err()
            .to_string()
            .contains("ControlNet 1"));
        let mut u = unit(0.0, 1.0);
        u.scale = f64::NAN;
        assert!(u.check(0).unwrap_err().to_string().contains("finite"));
        assert!(Preprocess::parse("depth").is_err());
        assert_eq!(Preprocess::parse("Canny").unwrap(), Preprocess::CANNY);
    }
}
