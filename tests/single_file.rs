//! Single-file checkpoints in the original SD key layout (tests/fixtures/single, written from
//! tiny-sd15 by our reference script and checked there with diffusers' converters).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use sd_studio::engine::model::ModelFiles;
use sd_studio::engine::pipeline::{GenerateRequest, StableDiffusion};
use sd_studio::engine::schedulers::SchedulerKind;

fn file() -> PathBuf {
    common::fixtures()
        .join("single")
        .join("tiny-sd15.safetensors")
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a (red:1.2) bicycle".into(),
        negative_prompt: "blurry".into(),
        seed: 77,
        steps: 4,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::EulerAncestral,
        ..Default::default()
    }
}

#[test]
fn single_file_gives_the_same_image_as_the_folder() {
    let files =
        ModelFiles::from_single_file(&file(), None, Some(&common::model_dir("tiny-sd15"))).unwrap();
    let mut single = StableDiffusion::load(files, Device::Cpu, DType::F32).unwrap();
    let mut folder = common::load_model("tiny-sd15");
    let a = single.generate(&request(), &mut |_| Ok(())).unwrap();
    let b = folder.generate(&request(), &mut |_| Ok(())).unwrap();
    assert_eq!(common::max_pixel_diff(&a[0].rgb, &b[0].rgb), 0);
}

#[test]
fn architecture_is_inferred_from_tensor_shapes() {
    let inferred = ModelFiles::from_single_file(&file(), None, None).unwrap();
    let folder = ModelFiles::from_dir(&common::model_dir("tiny-sd15"), false).unwrap();
    let (u, f) = (&inferred.unet_config, &folder.unet_config);
    assert_eq!(u.block_out_channels, f.block_out_channels);
    assert_eq!(u.layers_per_block, f.layers_per_block);
    assert_eq!(u.cross_attn, f.cross_attn);
    assert_eq!(u.cross_attention_dim, f.cross_attention_dim);
    assert_eq!(u.use_linear_projection, f.use_linear_projection);
    assert_eq!(
        (u.in_channels, u.out_channels),
        (f.in_channels, f.out_channels)
    );
    // Head counts are not in the shapes: SD 1.x convention (8 per block) applies.
    assert!(u.num_heads.iter().all(|&h| h == 8));
    let (v, fv) = (&inferred.vae_config, &folder.vae_config);
    assert_eq!(
        (&v.block_out_channels, v.layers_per_block, v.latent_channels),
        (
            &fv.block_out_channels,
            fv.layers_per_block,
            fv.latent_channels
        )
    );
    let (c, fc) = (&inferred.clip_config, &folder.clip_config);
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.intermediate_size,
            c.vocab_size
        ),
        (
            fc.hidden_size,
            fc.num_hidden_layers,
            fc.intermediate_size,
            fc.vocab_size
        )
    );
    // The built-in tokenizer stands in for the missing one.
    let tok = inferred.load_tokenizer().unwrap();
    assert_eq!(
        tok.encode("a photo of a cat").unwrap().ids[..7],
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
}

#[test]
fn a_missing_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(file(), &Device::Cpu).unwrap();
    tensors.remove("model.diffusion_model.out.2.weight");
    tensors.remove("first_stage_model.decoder.conv_out.bias");
    let broken = dir.path().join("broken.safetensors");
    candle_core::safetensors::save(&tensors, &broken).unwrap();
    let e = ModelFiles::from_single_file(&broken, None, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("model.diffusion_model.out.2.weight"), "{e}");
    // A weight missing where shapes are not needed: loading names it.
    let mut tensors: HashMap<String, candle_core::Tensor> =
        candle_core::safetensors::load(file(), &Device::Cpu).unwrap();
    tensors.remove("first_stage_model.decoder.conv_out.bias");
    let broken = dir.path().join("broken-vae.safetensors");
    candle_core::safetensors::save(&tensors, &broken).unwrap();
    let files =
        ModelFiles::from_single_file(&broken, None, Some(&common::model_dir("tiny-sd15"))).unwrap();
    let e = StableDiffusion::load(files, Device::Cpu, DType::F32)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("decoder.conv_out.bias") && e.contains("broken-vae.safetensors"),
        "{e}"
    );
}

#[test]
fn cli_loads_a_single_file_and_refuses_unrelated_files() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sd-studio"))
        .args([
            "generate", "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64",
            "--seed", "1", "--model",
        ])
        .arg(file())
        .arg("--config")
        .arg(common::model_dir("tiny-sd15"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let not_sd = dir.path().join("other.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("weight".to_string(), t)]), &not_sd).unwrap();
    let e = ModelFiles::from_single_file(&not_sd, None, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("missing tensor model.diffusion_model.input_blocks.0.0.weight"),
        "{e}"
    );
}

#[test]
fn sd2_single_file_with_open_clip_text_encoder_gives_the_folders_image() {
    // tiny-sd2v in the original SD 2.x layout: OpenCLIP with packed q/k/v and one extra
    // (unused) last layer, checked against diffusers' converters by the reference script.
    let path = common::fixtures()
        .join("single")
        .join("tiny-sd2v.safetensors");
    let files =
        ModelFiles::from_single_file(&path, None, Some(&common::model_dir("tiny-sd2v"))).unwrap();
    assert_eq!(
        files.clip_config.num_hidden_layers, 2,
        "last OpenCLIP layer dropped"
    );
    let mut single = StableDiffusion::load(files, Device::Cpu, DType::F32).unwrap();
    let mut folder = common::load_model("tiny-sd2v");
    let req = GenerateRequest {
        scheduler: SchedulerKind::Ddim,
        ..request()
    };
    let a = single.generate(&req, &mut |_| Ok(())).unwrap();
    let b = folder.generate(&req, &mut |_| Ok(())).unwrap();
    assert_eq!(common::max_pixel_diff(&a[0].rgb, &b[0].rgb), 0);
    // Without --config the architecture still comes from the shapes (OpenCLIP found).
    let inferred = ModelFiles::from_single_file(&path, None, None).unwrap();
    assert_eq!(inferred.clip_config.num_hidden_layers, 2);
    assert_eq!(inferred.clip_config.vocab_size, 49408);
}

/// SDXL in the original SGM layout (checked in the reference script by loading it back with
/// diffusers' `from_single_file`): the folder's images, its UNet architecture (head width
/// 64, 32 groups, per-level transformer depth, added conditions) inferred from the shapes.
#[test]
fn sdxl_single_file_gives_the_folders_images_and_its_unet_is_inferred() {
    let path = common::fixtures()
        .join("single")
        .join("tiny-sdxl.safetensors");
    let files =
        ModelFiles::from_single_file(&path, None, Some(&common::model_dir("tiny-sdxl"))).unwrap();
    assert_eq!(files.family, sd_studio::engine::family::Family::Sdxl);
    let mut single = StableDiffusion::load(files, Device::Cpu, DType::F32).unwrap();
    let mut folder = common::load_model("tiny-sdxl");
    for req in [
        request(),
        GenerateRequest {
            negative_prompt: String::new(), // zeros for SDXL
            guidance: 5.0,
            width: 96,
            scheduler: SchedulerKind::DpmPp2MKarras,
            ..request()
        },
    ] {
        let a = single.generate(&req, &mut |_| Ok(())).unwrap();
        let b = folder.generate(&req, &mut |_| Ok(())).unwrap();
        assert_eq!(common::max_pixel_diff(&a[0].rgb, &b[0].rgb), 0);
    }

    let inferred = ModelFiles::from_single_file(&path, None, None).unwrap();
    let folder = ModelFiles::from_dir(&common::model_dir("tiny-sdxl"), false).unwrap();
    let (u, f) = (&inferred.unet_config, &folder.unet_config);
    assert_eq!(u.block_out_channels, f.block_out_channels);
    assert_eq!(u.layers_per_block, f.layers_per_block);
    assert_eq!(u.cross_attn, f.cross_attn);
    assert_eq!(u.num_heads, f.num_heads);
    assert_eq!(u.transformer_layers, f.transformer_layers);
    assert_eq!(u.cross_attention_dim, f.cross_attention_dim);
    assert!(u.use_linear_projection);
    assert_eq!(u.added, f.added);
    assert_eq!(inferred.family, sd_studio::engine::family::Family::Sdxl);
    assert!(inferred.force_zeros_for_empty_prompt);
    // OpenCLIP bigG: every layer kept (the pooled output needs the last), heads 64 wide.
    let t2 = inferred.text_encoder_2.as_ref().unwrap();
    let f2 = folder.text_encoder_2.as_ref().unwrap();
    assert_eq!(t2.config.num_hidden_layers, f2.config.num_hidden_layers);
    assert_eq!(t2.config.hidden_size, f2.config.hidden_size);
    // The scheduler is SDXL base's: Euler, leading spacing, steps_offset 1.
    assert_eq!(
        inferred
            .scheduler_config
            .raw
            .str_or("_class_name", "")
            .unwrap(),
        "EulerDiscreteScheduler"
    );
}
