//! A1111-compatible generation metadata (the PNG `parameters` text chunk) and atomic PNG
//! writing.
//!
//! Layout, as AUTOMATIC1111 writes it: the prompt, `Negative prompt: …` when non-empty, then
//! one line of `Key: value` pairs in A1111's key order; a value containing `,` `:` or a
//! newline is JSON-quoted.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{Error, Result};

/// The values behind one image's `parameters` chunk.
#[derive(Debug, Clone)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: String,
    pub schedule_type: Option<String>,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// "Variation seed" and "Variation seed strength".
    pub variation: Option<(u64, f64)>,
    /// "Denoising strength" (img2img).
    pub denoising_strength: Option<f64>,
    /// "Clip skip", written when above 1.
    pub clip_skip: Option<usize>,
    /// A1111 writes "RNG: CPU" when noise did not come from the (default) GPU generator.
    pub rng: Option<String>,
}

fn quote(v: &str) -> String {
    if v.contains(',') || v.contains(':') || v.contains('\n') {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// Formats a float as Python's `str()` would for A1111's values (7.0 → "7.0", 7.5 → "7.5").
fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

impl Parameters {
    /// The `parameters` text.
    pub fn to_a1111(&self) -> String {
        let mut pairs: Vec<(&str, String)> = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
        ];
        if let Some(s) = &self.schedule_type {
            pairs.push(("Schedule type", s.clone()));
        }
        pairs.push(("CFG scale", py_float(self.cfg_scale)));
        pairs.push(("Seed", self.seed.to_string()));
        pairs.push(("Size", format!("{}x{}", self.width, self.height)));
        pairs.push(("Model", self.model.clone()));
        if let Some((seed, strength)) = self.variation {
            pairs.push(("Variation seed", seed.to_string()));
            pairs.push(("Variation seed strength", py_float(strength)));
        }
        if let Some(d) = self.denoising_strength {
            pairs.push(("Denoising strength", py_float(d)));
        }
        if let Some(c) = self.clip_skip {
            pairs.push(("Clip skip", c.to_string()));
        }
        if let Some(r) = &self.rng {
            pairs.push(("RNG", r.clone()));
        }
        pairs.push((
            "Version",
            format!("sd-studio {}", env!("CARGO_PKG_VERSION")),
        ));
        let line = pairs
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let neg = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{}\n{}", self.prompt, neg, line)
            .trim()
            .to_string()
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// crash never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let werr = |e: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

/// Encodes RGB8 pixels as PNG with the `parameters` text chunk (tEXt when Latin-1, else iTXt).
pub fn encode_png(rgb: &[u8], width: usize, height: usize, parameters: &str) -> Result<Vec<u8>> {
    let perr = |e: png::EncodingError| Error::invalid("png", e.to_string());
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())
                .map_err(perr)?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())
                .map_err(perr)?;
        }
        let mut w = enc.write_header().map_err(perr)?;
        w.write_image_data(rgb).map_err(perr)?;
        w.finish().map_err(perr)?;
    }
    Ok(out)
}

/// Reads the `parameters` text back from a PNG (ours or A1111's).
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| Error::read(path, e))?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.get_text().map_err(|e| Error::read(path, e))?));
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.get_text().map_err(|e| Error::read(path, e))?));
    }
    Ok(None)
}

/// `dir/{stem}.png`, or `dir/{stem}-2.png`, … if taken; the stem is the seed, or `{seed}-{variation seed}`.
pub fn output_path(dir: &Path, stem: &str) -> PathBuf {
    let first = dir.join(format!("{stem}.png"));
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|k| dir.join(format!("{stem}-{k}.png")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Parameters {
        Parameters {
            prompt: "a cat".into(),
            negative_prompt: String::new(),
            steps: 20,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.0,
            seed: 1234,
            width: 512,
            height: 768,
            model: "v1-5-pruned-emaonly".into(),
            variation: None,
            denoising_strength: None,
            clip_skip: None,
            rng: None,
        }
    }

    #[test]
    fn a1111_layout_and_key_order() {
        let p = params();
        let text = p.to_a1111();
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(
            text,
            format!("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, Size: 512x768, Model: v1-5-pruned-emaonly, Version: sd-studio {v}")
        );
    }

    #[test]
    fn negative_prompt_variation_rng_and_quoting() {
        let mut p = params();
        p.negative_prompt = "blurry, lowres".into();
        p.model = "my: model, v2".into();
        p.variation = Some((99, 0.25));
        p.rng = Some("CPU".into());
        p.cfg_scale = 7.5;
        let text = p.to_a1111();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "Negative prompt: blurry, lowres");
        assert!(lines[2].contains("CFG scale: 7.5,"));
        assert!(lines[2].contains("Model: \"my: model, v2\", Variation seed: 99, Variation seed strength: 0.25, RNG: CPU, Version"));
    }

    #[test]
    fn png_round_trip_keeps_parameters_latin1_and_utf8() {
        let dir = std::env::temp_dir().join(format!("sd-studio-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for text in ["plain prompt\nSteps: 1", "猫 prompt\nSteps: 1"] {
            let png = encode_png(&[0u8; 2 * 2 * 3], 2, 2, text).unwrap();
            let path = dir.join("t.png");
            write_atomic(&path, &png).unwrap();
            assert_eq!(read_png_parameters(&path).unwrap().as_deref(), Some(text));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
