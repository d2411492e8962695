//! Each model component against diffusers/transformers on the same tiny random weights
//! (refs/components_*.safetensors): relative error ≤ 1e-4 in f32.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use candle_core::DType;

const TOL: f32 = 1e-4;

fn check_model(name: &str) {
    let sd = common::load_model(name);
    let refs = common::load_safetensors(&format!("components_{name}.safetensors"));

    let ids = refs["text_ids"].to_dtype(DType::U32).unwrap();
    let text = sd.encode_ids(&ids).unwrap();
    let e = common::rel_err(&text, &refs["text_out"]);
    assert!(e <= TOL, "{name}: text encoder relative error {e}");

    let t = refs["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let out = sd
        .unet()
        .unwrap()
        .forward(&refs["unet_sample"], t, &refs["text_out"])
        .unwrap();
    let e = common::rel_err(&out, &refs["unet_out"]);
    assert!(e <= TOL, "{name}: unet relative error {e}");

    let img = sd.vae().unwrap().decode(&refs["vae_latents"]).unwrap();
    let e = common::rel_err(&img, &refs["vae_out"]);
    assert!(e <= TOL, "{name}: vae decode relative error {e}");
}

#[test]
fn sd15_components_match_diffusers() {
    check_model("tiny-sd15");
}

#[test]
fn sd2v_components_match_diffusers() {
    check_model("tiny-sd2v");
}
