//! Shared helpers for the integration tests: fixture paths, loading the tiny models, and
//! comparing against diffusers' reference outputs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sd_studio::engine::model::ModelFiles;
use sd_studio::engine::pipeline::StableDiffusion;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The fixture folder of a model. `tiny-sd15-inpaint` is tiny-sd15 with the 9-channel UNet
/// of `tiny-sd15-inpaint-unet/`, assembled once in a temporary folder (only that UNet is
/// committed, not a second copy of the rest).
pub fn model_path(name: &str) -> PathBuf {
    if name != "tiny-sd15-inpaint" {
        return model_dir(name);
    }
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("sd-studio-tiny-inpaint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&model_dir("tiny-sd15"), &dir);
        std::fs::remove_dir_all(dir.join("unet")).expect("remove unet");
        copy_dir(&model_dir("tiny-sd15-inpaint-unet"), &dir.join("unet"));
        dir
    })
    .clone()
}

pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).expect("create dir");
    for e in std::fs::read_dir(src).expect("read dir") {
        let e = e.expect("dir entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
        }
    }
}

pub fn load_model(name: &str) -> StableDiffusion {
    let files = ModelFiles::from_dir(&model_path(name), false).expect("fixture model files");
    StableDiffusion::load(files, Device::Cpu, DType::F32).expect("load fixture model")
}

pub fn refs_json(name: &str) -> serde_json::Value {
    let p = fixtures().join("refs").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("read refs json"))
        .expect("parse refs json")
}

pub fn load_safetensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("refs").join(name), &Device::Cpu)
        .expect("load refs safetensors")
}

/// max |a - b| / max |b|: the relative error the parity tests bound.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// RGB8 pixels of a PNG.
pub fn read_png_rgb(path: &std::path::Path) -> (usize, usize, Vec<u8>) {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .to_rgb8();
    (img.width() as usize, img.height() as usize, img.into_raw())
}

/// Largest per-channel difference between two RGB8 images.
pub fn max_pixel_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Mean |a − b| over all bytes of two images of the same size.
pub fn mean_pixel_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    sum as f64 / a.len().max(1) as f64
}

/// A safetensors file split into its header (as JSON) and its data section.
pub struct RawSafetensors {
    pub header: serde_json::Map<String, serde_json::Value>,
    pub data: Vec<u8>,
}

impl RawSafetensors {
    pub fn read(path: &std::path::Path) -> Self {
        let bytes = std::fs::read(path).expect("read safetensors");
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).expect("header json");
        Self {
            header,
            data: bytes[8 + n..].to_vec(),
        }
    }

    /// Writes the file with `header_text` as the header verbatim (for headers JSON maps
    /// cannot hold, such as a name twice), else the header map.
    pub fn write(&self, path: &std::path::Path, header_text: Option<String>) {
        let text = header_text.unwrap_or_else(|| serde_json::to_string(&self.header).unwrap());
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&self.data);
        std::fs::write(path, out).expect("write safetensors");
    }

    /// The byte range of tensor `name` in the data section.
    pub fn range(&self, name: &str) -> std::ops::Range<usize> {
        let o = &self.header[name]["data_offsets"];
        o[0].as_u64().unwrap() as usize..o[1].as_u64().unwrap() as usize
    }
}

/// The request a reference case describes (prompt, negative prompt, seeds as a batch, steps,
/// guidance, sampler, size; torch CPU noise, as the reference script draws it).
pub fn case_request(case: &serde_json::Value) -> sd_studio::engine::pipeline::GenerateRequest {
    let seeds: Vec<u64> = case["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    sd_studio::engine::pipeline::GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        seed: seeds[0],
        batch: seeds.len(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        scheduler: sd_studio::engine::schedulers::SchedulerKind::parse(
            case["scheduler"].as_str().unwrap(),
        )
        .unwrap(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        rng: sd_studio::engine::rng::RngKind::TorchCpu,
        ..Default::default()
    }
}
