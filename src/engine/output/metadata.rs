//! A1111-compatible generation metadata (the PNG `parameters` text chunk) and atomic PNG
//! writing.
//!
//! Layout, as AUTOMATIC1111 writes it: the prompt, `Negative prompt: …` when non-empty, then
//! one line of `Key: value` pairs in A1111's key order; a value containing `,` `:` or a
//! newline is JSON-quoted.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::engine::error::{Error, Result};

/// The values behind one image's `parameters` chunk.
#[derive(Debug, Clone, Default)]
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
    /// "Model hash": the first 10 hex digits of the checkpoint file's sha256.
    pub model_hash: Option<String>,
    /// "VAE" (file name) and "VAE hash" when a replacement VAE was used.
    pub vae: Option<String>,
    pub vae_hash: Option<String>,
    /// "Variation seed" and "Variation seed strength".
    pub variation: Option<(u64, f64)>,
    /// "Denoising strength" (img2img).
    pub denoising_strength: Option<f64>,
    /// "Clip skip", written when above 1.
    pub clip_skip: Option<usize>,
    /// A1111 writes "RNG: CPU" when noise did not come from the (default) GPU generator.
    pub rng: Option<String>,
    /// SDXL's size conditions when not the image's own: "Original size", "Crop coords
    /// top left", "Target size" (diffusers' argument names).
    pub sdxl_sizes: Vec<(&'static str, String)>,
    /// "Lora hashes": (tag name, A1111's 12-digit LoRA hash) for every LoRA applied.
    pub lora_hashes: Vec<(String, String)>,
    /// "TI hashes": (name, 12-digit sha256) for every embedding the prompts used.
    pub ti_hashes: Vec<(String, String)>,
    /// "ControlNet 0", "ControlNet 1", … as A1111's ControlNet extension writes them.
    pub controlnets: Vec<ControlNetUnit>,
    /// Hires. fix: "Hires upscale" (or "Hires resize: WxH"), "Hires steps", "Hires upscaler";
    /// its strength is "Denoising strength".
    pub hires: Option<HiresParams>,
}

/// A1111's Hires. fix fields.
#[derive(Debug, Clone, PartialEq)]
pub struct HiresParams {
    /// "Hires upscale" when made by a scale, else "Hires resize" (width, height).
    pub scale: Option<f64>,
    pub resize: (usize, usize),
    /// "Hires steps": written when set (A1111's 0 = the first pass's).
    pub steps: Option<usize>,
    /// "Hires upscaler", A1111's name.
    pub upscaler: String,
}

/// One ControlNet's metadata entry: `Module: canny, Model: NAME [HASH], Weight: 1.0,
/// Guidance Start: 0.0, Guidance End: 1.0`.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetUnit {
    /// The preprocessor ("canny", "none").
    pub module: String,
    /// `NAME [HASH]` (A1111's short model hash).
    pub model: String,
    pub weight: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
}

impl ControlNetUnit {
    pub fn to_a1111(&self) -> String {
        format!(
            "Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}",
            self.module,
            self.model,
            py_float(self.weight),
            py_float(self.guidance_start),
            py_float(self.guidance_end)
        )
    }

    /// Reads an entry back; None when it is not one.
    pub fn parse(v: &str) -> Option<Self> {
        let pairs = parse_pairs(v)?;
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let num = |k: &str, d: f64| get(k).map_or(Some(d), |v| v.parse().ok());
        Some(Self {
            module: get("Module")?.to_string(),
            model: get("Model")?.to_string(),
            weight: num("Weight", 1.0)?,
            guidance_start: num("Guidance Start", 0.0)?,
            guidance_end: num("Guidance End", 1.0)?,
        })
    }

    /// The model's name without the ` [hash]`.
    pub fn model_name(&self) -> &str {
        match self.model.rsplit_once(" [") {
            Some((n, h)) if h.ends_with(']') => n,
            _ => &self.model,
        }
    }
}

/// A1111's `"name: hash, name: hash"` list.
fn hash_list(v: &[(String, String)]) -> String {
    v.iter()
        .map(|(n, h)| format!("{n}: {h}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a `"name: hash, …"` list back.
pub fn parse_hash_list(v: &str) -> Vec<(String, String)> {
    v.split(',')
        .filter_map(|item| {
            let (n, h) = item.rsplit_once(':')?;
            let (n, h) = (n.trim(), h.trim());
            (!n.is_empty() && !h.is_empty()).then(|| (n.to_string(), h.to_string()))
        })
        .collect()
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

/// A number as A1111 writes a slider value that may be whole: 2 → "2", 1.5 → "1.5".
fn py_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
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
        if let Some(h) = &self.model_hash {
            pairs.push(("Model hash", h.clone()));
        }
        pairs.push(("Model", self.model.clone()));
        if let Some(h) = &self.vae_hash {
            pairs.push(("VAE hash", h.clone()));
        }
        if let Some(v) = &self.vae {
            pairs.push(("VAE", v.clone()));
        }
        if let Some((seed, strength)) = self.variation {
            pairs.push(("Variation seed", seed.to_string()));
            pairs.push(("Variation seed strength", py_float(strength)));
        }
        if let Some(d) = self.denoising_strength {
            pairs.push(("Denoising strength", py_float(d)));
        }
        if let Some(h) = &self.hires {
            match h.scale {
                Some(s) => pairs.push(("Hires upscale", py_num(s))),
                None => pairs.push(("Hires resize", format!("{}x{}", h.resize.0, h.resize.1))),
            }
            if let Some(n) = h.steps {
                pairs.push(("Hires steps", n.to_string()));
            }
            pairs.push(("Hires upscaler", h.upscaler.clone()));
        }
        if let Some(c) = self.clip_skip {
            pairs.push(("Clip skip", c.to_string()));
        }
        if let Some(r) = &self.rng {
            pairs.push(("RNG", r.clone()));
        }
        for (k, v) in &self.sdxl_sizes {
            pairs.push((k, v.clone()));
        }
        if !self.lora_hashes.is_empty() {
            pairs.push(("Lora hashes", hash_list(&self.lora_hashes)));
        }
        if !self.ti_hashes.is_empty() {
            pairs.push(("TI hashes", hash_list(&self.ti_hashes)));
        }
        let units: Vec<(String, String)> = self
            .controlnets
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("ControlNet {i}"), u.to_a1111()))
            .collect();
        let mut pairs: Vec<(&str, String)> = pairs;
        for (k, v) in &units {
            pairs.push((k.as_str(), v.clone()));
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

/// Removes temporary files that [`write_atomic`] left in `dir` when its process was killed
/// mid-write (`.NAME.PID.tmp` whose process is gone). Returns how many were removed.
pub fn clean_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let me = std::process::id();
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
            continue;
        };
        let Some(pid) = rest.rsplit('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != me && !process_alive(pid) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether process `pid` still runs (Linux: /proc; elsewhere assumed alive).
fn process_alive(pid: u32) -> bool {
    if Path::new("/proc/self").exists() {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
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
mod format_tests {
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
            ..Default::default()
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

/// Generation parameters read back from A1111-style `parameters` text. Fields A1111 may
/// leave out are `Option`; keys we do not use are kept in `other`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub sampler: Option<String>,
    pub schedule_type: Option<String>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub model: Option<String>,
    pub other: Vec<(String, String)>,
}

impl ParsedParameters {
    /// A value kept in `other`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.other
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// "Lora hashes" as (name, hash) pairs.
    pub fn lora_hashes(&self) -> Vec<(String, String)> {
        self.get("Lora hashes")
            .map(parse_hash_list)
            .unwrap_or_default()
    }

    /// "ControlNet 0", "ControlNet 1", … in order (entries that do not parse are skipped).
    pub fn controlnets(&self) -> Vec<ControlNetUnit> {
        let mut units: Vec<(usize, ControlNetUnit)> = self
            .other
            .iter()
            .filter_map(|(k, v)| {
                let i = k.strip_prefix("ControlNet ")?.parse().ok()?;
                Some((i, ControlNetUnit::parse(v)?))
            })
            .collect();
        units.sort_by_key(|(i, _)| *i);
        units.into_iter().map(|(_, u)| u).collect()
    }

    /// A1111's Hires. fix fields, when "Hires upscale" or "Hires resize" is there ("Hires
    /// upscaler" defaults to Latent, as A1111's).
    pub fn hires(&self) -> Option<HiresParams> {
        let scale = self
            .get("Hires upscale")
            .and_then(|v| v.trim().parse::<f64>().ok());
        let resize = self.get("Hires resize").and_then(|v| {
            let (w, h) = v.split_once('x')?;
            Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
        });
        if scale.is_none() && resize.is_none() {
            return None;
        }
        Some(HiresParams {
            scale,
            resize: resize.unwrap_or((0, 0)),
            steps: self
                .get("Hires steps")
                .and_then(|v| v.trim().parse().ok())
                .filter(|&n: &usize| n > 0),
            upscaler: self.get("Hires upscaler").unwrap_or("Latent").to_string(),
        })
    }

    /// "TI hashes" as (name, hash) pairs.
    pub fn ti_hashes(&self) -> Vec<(String, String)> {
        self.get("TI hashes")
            .map(parse_hash_list)
            .unwrap_or_default()
    }

    /// Our sampler for A1111's `Sampler` + `Schedule type` (old files put "Karras" in the
    /// sampler name itself); `None` when absent or not one we have.
    pub fn scheduler(&self) -> Option<crate::engine::schedulers::SchedulerKind> {
        use crate::engine::schedulers::SchedulerKind;
        let s = self.sampler.as_deref()?;
        match self.schedule_type.as_deref() {
            None | Some("Automatic") => SchedulerKind::parse(s).ok(),
            Some(t) => SchedulerKind::parse(&format!("{s} {t}")).ok().or_else(|| {
                SchedulerKind::parse(s)
                    .ok()
                    .filter(|_| t == "Normal" || t == "Uniform")
            }),
        }
    }
}

/// Splits A1111's `Key: value, Key: "json, quoted", …` line. `None` when the line is not
/// such a list.
fn parse_pairs(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim();
        if key.is_empty() || key.contains(',') || key.contains('"') {
            return None;
        }
        rest = rest[colon + 1..].trim_start();
        let value;
        if rest.starts_with('"') {
            // A JSON string: find its closing quote, honouring backslash escapes.
            let bytes = rest.as_bytes();
            let mut i = 1;
            let mut end = None;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'"' => {
                        end = Some(i);
                        break;
                    }
                    _ => i += 1,
                }
            }
            let end = end?;
            value = serde_json::from_str::<String>(&rest[..=end]).ok()?;
            rest = rest[end + 1..].trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest);
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = rest.get(end + 1..).unwrap_or("");
        }
        out.push((key.to_string(), value));
        rest = rest.trim_start();
    }
    Some(out)
}

/// Parses A1111's `parameters` text: prompt lines, optional `Negative prompt:` lines, and a
/// last line of `Key: value` pairs that must include `Steps`.
pub fn parse_a1111(text: &str) -> Result<ParsedParameters> {
    let bad = |reason: String| Error::invalid("parameters", reason);
    let text = text.trim();
    if text.is_empty() {
        return Err(bad("the text is empty".into()));
    }
    let (head, last) = match text.rfind('\n') {
        Some(i) => (&text[..i], &text[i + 1..]),
        None => ("", text),
    };
    let pairs = parse_pairs(last)
        .filter(|p| p.iter().any(|(k, _)| k == "Steps"))
        .ok_or_else(|| {
            bad("no settings line (\"Steps: …, Sampler: …, Seed: …\") at the end".into())
        })?;
    let mut p = ParsedParameters::default();
    match head
        .find("\nNegative prompt:")
        .map(|i| i + 1)
        .or_else(|| head.starts_with("Negative prompt:").then_some(0))
    {
        Some(i) => {
            p.prompt = head[..i].trim().to_string();
            p.negative_prompt = head[i + "Negative prompt:".len()..].trim().to_string();
        }
        None => p.prompt = head.trim().to_string(),
    }
    let num_err = |k: &str, v: &str| bad(format!("{k}: {v:?} is not a number"));
    for (k, v) in pairs {
        match k.as_str() {
            "Steps" => p.steps = Some(v.parse().map_err(|_| num_err(&k, &v))?),
            "Sampler" => p.sampler = Some(v),
            "Schedule type" => p.schedule_type = Some(v),
            "CFG scale" => p.cfg_scale = Some(v.parse().map_err(|_| num_err(&k, &v))?),
            "Seed" => p.seed = Some(v.parse().map_err(|_| num_err(&k, &v))?),
            "Size" => {
                let (w, h) = v
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
                    .ok_or_else(|| bad(format!("Size: {v:?} is not WIDTHxHEIGHT")))?;
                p.width = Some(w);
                p.height = Some(h);
            }
            "Model" => p.model = Some(v),
            _ => p.other.push((k, v)),
        }
    }
    Ok(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::schedulers::SchedulerKind;

    #[test]
    fn parses_a1111_with_schedule_type_and_quoted_values() {
        let text = "masterpiece, a cat on a windowsill, (soft light:1.2)\nsecond line\n\
Negative prompt: blurry, lowres\n\
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3735928559, \
Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
Lora hashes: \"add_detail: 7c6bad76eb54, more: \\\"x\\\"\", Version: v1.9.4";
        let p = parse_a1111(text).unwrap();
        assert_eq!(
            p.prompt,
            "masterpiece, a cat on a windowsill, (soft light:1.2)\nsecond line"
        );
        assert_eq!(p.negative_prompt, "blurry, lowres");
        assert_eq!(p.steps, Some(28));
        assert_eq!(p.sampler.as_deref(), Some("DPM++ 2M"));
        assert_eq!(p.schedule_type.as_deref(), Some("Karras"));
        assert_eq!(p.scheduler(), Some(SchedulerKind::DpmPp2MKarras));
        assert_eq!(p.cfg_scale, Some(6.5));
        assert_eq!(p.seed, Some(3735928559));
        assert_eq!((p.width, p.height), (Some(512), Some(768)));
        assert_eq!(p.model.as_deref(), Some("v1-5-pruned-emaonly"));
        assert!(p.other.contains(&(
            "Lora hashes".to_string(),
            "add_detail: 7c6bad76eb54, more: \"x\"".to_string()
        )));
        assert!(p
            .other
            .contains(&("Version".to_string(), "v1.9.4".to_string())));
    }

    #[test]
    fn parses_without_negative_prompt_and_old_karras_names() {
        let p = parse_a1111(
            "a lighthouse\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64",
        )
        .unwrap();
        assert_eq!(p.prompt, "a lighthouse");
        assert_eq!(p.negative_prompt, "");
        assert_eq!(p.scheduler(), Some(SchedulerKind::DpmPp2MKarras));
        assert_eq!(p.cfg_scale, Some(7.0));
        let p = parse_a1111("Steps: 5, Sampler: Euler a, Seed: 9").unwrap();
        assert_eq!(p.prompt, "");
        assert_eq!(p.scheduler(), Some(SchedulerKind::EulerAncestral));
        let p = parse_a1111("x\nSteps: 5, Sampler: Heun, Schedule type: Karras").unwrap();
        assert_eq!(p.scheduler(), None);
    }

    #[test]
    fn our_own_text_round_trips() {
        let params = Parameters {
            prompt: "a \"quoted\" prompt, with: colons".into(),
            negative_prompt: "bad hands".into(),
            steps: 12,
            sampler: "DPM++ 2M".into(),
            schedule_type: Some("Karras".into()),
            cfg_scale: 7.5,
            seed: 42,
            width: 640,
            height: 384,
            model: "tiny, model".into(),
            variation: Some((7, 0.25)),
            denoising_strength: None,
            clip_skip: Some(2),
            rng: Some("CPU".into()),
            ..Default::default()
        };
        let p = parse_a1111(&params.to_a1111()).unwrap();
        assert_eq!(p.prompt, params.prompt);
        assert_eq!(p.negative_prompt, "bad hands");
        assert_eq!(p.steps, Some(12));
        assert_eq!(p.scheduler(), Some(SchedulerKind::DpmPp2MKarras));
        assert_eq!(p.cfg_scale, Some(7.5));
        assert_eq!(p.seed, Some(42));
        assert_eq!((p.width, p.height), (Some(640), Some(384)));
        assert_eq!(p.model.as_deref(), Some("tiny, model"));
    }

    #[test]
    fn lora_and_ti_hashes_as_a1111_writes_them() {
        let params = Parameters {
            prompt: "a cat <lora:pixel:0.8>".into(),
            steps: 4,
            sampler: "Euler".into(),
            lora_hashes: vec![
                ("pixel".into(), "0123456789ab".into()),
                ("detail".into(), "ba9876543210".into()),
            ],
            ti_hashes: vec![("easynegative".into(), "c74b4e810b03".into())],
            ..Default::default()
        };
        let text = params.to_a1111();
        assert!(
            text.contains(r#"Lora hashes: "pixel: 0123456789ab, detail: ba9876543210", TI hashes: "easynegative: c74b4e810b03""#),
            "{text}"
        );
        let p = parse_a1111(&text).unwrap();
        assert_eq!(p.prompt, "a cat <lora:pixel:0.8>");
        assert_eq!(p.lora_hashes(), params.lora_hashes);
        assert_eq!(p.ti_hashes(), params.ti_hashes);
    }

    #[test]
    fn hires_fields_round_trip_as_a1111_writes_them() {
        let p = Parameters {
            prompt: "a castle".into(),
            steps: 20,
            sampler: "Euler".into(),
            cfg_scale: 7.0,
            seed: 1,
            width: 512,
            height: 512,
            model: "m".into(),
            denoising_strength: Some(0.55),
            hires: Some(HiresParams {
                scale: Some(2.0),
                resize: (1024, 1024),
                steps: Some(10),
                upscaler: "Latent (nearest)".into(),
            }),
            ..Default::default()
        };
        let text = p.to_a1111();
        assert!(
            text.contains("Size: 512x512, Model: m, Denoising strength: 0.55, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (nearest)"),
            "{text}"
        );
        let back = parse_a1111(&text).unwrap().hires().unwrap();
        assert_eq!(back.scale, Some(2.0));
        assert_eq!(back.steps, Some(10));
        assert_eq!(back.upscaler, "Latent (nearest)");
        // A1111's own: a resize and no steps (0 = the first pass's).
        let a1111 = "x\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x768, Denoising strength: 0.7, Hires resize: 1024x1536, Hires steps: 0, Hires upscaler: Lanczos";
        let h = parse_a1111(a1111).unwrap().hires().unwrap();
        assert_eq!((h.scale, h.resize, h.steps), (None, (1024, 1536), None));
        assert_eq!(h.upscaler, "Lanczos");
        assert!(parse_a1111("x\nSteps: 20, Seed: 1")
            .unwrap()
            .hires()
            .is_none());
    }

    #[test]
    fn bad_text_gives_a_clear_error() {
        for (text, want) in [
            ("", "empty"),
            ("just a prompt", "no settings line"),
            ("p\nSteps: many, Seed: 1", "Steps: \"many\" is not a number"),
            ("p\nSteps: 3, Size: big", "Size"),
            ("p\nSteps: 3, Lora: \"unterminated", "no settings line"),
        ] {
            let e = parse_a1111(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
