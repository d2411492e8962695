//! TAESD's decoder against diffusers' `AutoencoderTiny.decode` on a tiny random-weight model
//! (tests/fixtures/tiny-taesd, made by make_fixtures.py --only taesd).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device};
use sd_studio::engine::taesd::{Previewer, TaesdDecoder};

#[test]
fn tiny_taesd_matches_diffusers() {
    let dec = TaesdDecoder::load(&common::model_dir("tiny-taesd"), DType::F32, &Device::Cpu)
        .expect("load tiny taesd");
    assert_eq!(dec.config.num_blocks, vec![2, 1, 1, 1]);
    let refs = common::load_safetensors("taesd_tiny.safetensors");
    let out = dec.decode(&refs["latents"]).expect("decode");
    let err = common::rel_err(&out, &refs["image"]);
    eprintln!("taesd relative error {err:e}");
    assert!(err <= 1e-4, "relative error {err} > 1e-4");

    // As previews: one RGB8 image per latent, at full resolution.
    let previews = Previewer::Taesd(dec).previews(&refs["latents"]).unwrap();
    assert_eq!(previews.len(), 2);
    assert_eq!((previews[0].width, previews[0].height), (96, 64));
    assert_eq!(previews[0].rgb.len(), 96 * 64 * 3);
}

#[test]
fn linear_previews_are_latent_sized() {
    let refs = common::load_safetensors("taesd_tiny.safetensors");
    let previews = Previewer::Linear.previews(&refs["latents"]).unwrap();
    assert_eq!(previews.len(), 2);
    assert_eq!((previews[1].width, previews[1].height), (12, 8));
    let distinct: std::collections::HashSet<_> = previews[0].rgb.iter().collect();
    assert!(distinct.len() > 10, "a flat preview from random latents");
}

#[test]
fn missing_or_broken_taesd_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = TaesdDecoder::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    // A config whose shape does not fit the weights.
    let src = common::model_dir("tiny-taesd");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"decoder_block_out_channels": [32, 32, 32, 32], "num_decoder_blocks": [2, 1, 1, 1]}"#,
    )
    .unwrap();
    let e = TaesdDecoder::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("taesd"), "{e}");
}
