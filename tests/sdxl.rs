//! SDXL's parts against diffusers/transformers on tiny-sdxl (refs/components_tiny-sdxl):
//! both text encoders' penultimate hidden states, the pooled projection, and the UNet with
//! its added conditions; relative error ≤ 1e-4 in f32.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use candle_core::Tensor;
use sd_studio::engine::family::Family;
use sd_studio::engine::pipeline::{GenerateRequest, SizeConditions};
use sd_studio::engine::unet::Forward;

const TOL: f32 = 1e-4;
const PROMPT: &str = "a photo of an astronaut riding a horse";

#[test]
fn sdxl_is_detected_and_its_components_match_diffusers() {
    let sd = common::load_model("tiny-sdxl");
    assert_eq!(sd.files.family, Family::Sdxl);
    assert_eq!(common::load_model("tiny-sd15").files.family, Family::Sd1);
    assert_eq!(common::load_model("tiny-sd2v").files.family, Family::Sd2);
    assert!(sd.files.force_zeros_for_empty_prompt);
    let refs = common::load_safetensors("components_tiny-sdxl.safetensors");
    let req = GenerateRequest {
        width: 96,
        height: 64,
        ..Default::default()
    };
    for (row, text) in [(0, PROMPT), (1, "")] {
        let e = sd.encode(text, &req).unwrap();
        let want = Tensor::cat(
            &[
                refs["hidden1"].get(row).unwrap(),
                refs["hidden2"].get(row).unwrap(),
            ],
            1,
        )
        .unwrap();
        let err = common::rel_err(&e.context.get(0).unwrap(), &want);
        assert!(err <= TOL, "{text:?}: context relative error {err}");
        let added = e.added.unwrap();
        let p = refs["pooled"].dim(1).unwrap();
        let err = common::rel_err(
            &added.narrow(1, 0, p).unwrap().get(0).unwrap(),
            &refs["pooled"].get(row).unwrap(),
        );
        assert!(err <= TOL, "{text:?}: pooled relative error {err}");
        // Size conditions default to the image's: (h, w), (0, 0), (h, w).
        let sizes = added.narrow(1, p, 6).unwrap().flatten_all().unwrap();
        assert_eq!(
            sizes.to_vec1::<f32>().unwrap(),
            [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]
        );
    }
    let ctx = Tensor::cat(&[&refs["hidden1"], &refs["hidden2"]], 2).unwrap();
    let out = sd
        .unet()
        .unwrap()
        .forward_with(
            &refs["unet_sample"],
            781.0,
            &ctx,
            Forward {
                added: Some((&refs["pooled"], &refs["unet_time_ids"])),
                ..Default::default()
            },
        )
        .unwrap();
    let err = common::rel_err(&out, &refs["unet_out"]);
    assert!(err <= TOL, "unet relative error {err}");
    // Without its added conditions the SDXL UNet refuses to run.
    let e = sd
        .unet()
        .unwrap()
        .forward(&refs["unet_sample"], 781.0, &ctx)
        .unwrap_err();
    assert!(e.to_string().contains("pooled text embedding"), "{e}");
}

#[test]
fn sdxl_size_conditions_are_diffusers_time_ids() {
    let s = SizeConditions {
        original: Some((2048, 1536)),
        crop: (16, 8),
        target: None,
    };
    assert_eq!(
        s.time_ids(1024, 768),
        [1536.0, 2048.0, 8.0, 16.0, 768.0, 1024.0]
    );
    assert!(SizeConditions::default().is_default());
}
