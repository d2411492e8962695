//! The generation engine: models, samplers, noise and the txt2img pipeline. Never imports
//! egui; talks to the outside through plain data. Grouped by layer: `models/` (networks),
//! `loading/` (files to weights), `adapters/` (LoRAs and embeddings on loaded weights), `text/` (prompts to tokens), `sampling/` (the pipeline and
//! samplers), `output/` (PNGs and grids).

pub mod adapters;
pub mod control;
pub mod error;
pub mod family;
pub mod loading;
pub mod models;
pub mod output;
pub mod sampling;
pub mod text;

// Every module also answers at `engine::NAME`, the path the rest of the crate uses.
pub use adapters::{apply, embedding, lora, patch};
pub use loading::{cache, config, controlnet_files, hash, model, scan, single_file, weights};
pub use models::{attention, clip, controlnet, conv, fused, taesd, unet, vae_decoder, vae_encoder};
pub use output::{grid, image_ops, metadata};
pub use sampling::{memory, pipeline, presets, profile, rng, schedulers};
pub use text::{extra_networks, prompt, tokenizer};

pub use error::{Error, Result};

use candle_core::{DType, Device};

/// `--device auto|cpu|cuda` → a candle device, with a clear error when CUDA is not built
/// in. `auto`: the first CUDA GPU when the build has CUDA and one answers, else the CPU.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::invalid(
                    "device",
                    "cuda: this build has no CUDA support (rebuild with --features cuda)",
                ));
            }
            Device::new_cuda(0).map_err(|e| Error::invalid("device", format!("cuda: {e}")))
        }
        other => Err(Error::invalid(
            "device",
            format!("{other:?} is not auto, cpu or cuda"),
        )),
    }
}

/// The device's name as the status bar and `generate` report it.
pub fn device_name(d: &Device) -> &'static str {
    if d.is_cuda() {
        "cuda"
    } else if d.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}

/// `--dtype auto|f32|f16|bf16` for `device`: `auto` is f16 on a GPU, f32 on the CPU (where
/// half precision is slower and only emulated: candle widens bf16 to f32 for its matrix
/// products, f16 has a native kernel).
pub fn dtype_for(name: &str, device: &Device) -> Result<DType> {
    match name {
        "auto" if device.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::F16),
        other => dtype(other),
    }
}

/// `--dtype f32|f16|bf16`.
pub fn dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "fp32" => Ok(DType::F32),
        "f16" | "fp16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::invalid(
            "dtype",
            format!("{other:?} is not auto, f32, f16 or bf16"),
        )),
    }
}
