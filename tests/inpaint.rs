//! Inpainting against diffusers' StableDiffusionInpaintPipeline on the tiny fixtures: a
//! 9-channel inpainting model, and an ordinary model (diffusers' legacy blending). Every
//! pixel within 2 of 255.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;

use sd_studio::engine::pipeline::{GenerateRequest, InitImage, StableDiffusion};
use sd_studio::engine::rng::RngKind;
use sd_studio::engine::schedulers::SchedulerKind;

fn gray(path: &str) -> Vec<u8> {
    image::open(common::fixtures().join(path))
        .unwrap()
        .to_luma8()
        .into_raw()
}

#[test]
fn inpainting_matches_diffusers() {
    check("inpaint_cases.json", 2);
}

/// SDXL with its ordinary UNet (StableDiffusionXLInpaintPipeline's blending).
#[test]
fn sdxl_inpainting_matches_diffusers() {
    check("sdxl_inpaint_cases.json", 1);
}

/// `kinds_expected`: how many kinds of model (inpainting / ordinary) the file covers.
fn check(cases_file: &str, kinds_expected: usize) {
    let cases = common::refs_json(cases_file);
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    let mut kinds = std::collections::HashSet::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let sd = models
            .entry(model.clone())
            .or_insert_with(|| common::load_model(&model));
        kinds.insert(sd.is_inpainting_model());
        let (w, h, rgb) =
            common::read_png_rgb(&common::fixtures().join(case["init_image"].as_str().unwrap()));
        let seeds: Vec<u64> = case["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        let req = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            seed: seeds[0],
            batch: seeds.len(),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
            scheduler: SchedulerKind::parse(case["scheduler"].as_str().unwrap()).unwrap(),
            width: w,
            height: h,
            rng: RngKind::TorchCpu,
            init_image: Some(InitImage {
                rgb,
                strength: case["strength"].as_f64().unwrap(),
                mask: Some(gray(case["mask"].as_str().unwrap())),
            }),
            ..Default::default()
        };
        let images = sd
            .generate(&req, &mut |_| Ok(()))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (img, path) in images.iter().zip(case["images"].as_array().unwrap()) {
            let (_, _, want) =
                common::read_png_rgb(&common::fixtures().join(path.as_str().unwrap()));
            let d = common::max_pixel_diff(&img.rgb, &want);
            eprintln!("{name} seed {}: max |Δpixel| = {d}", img.seed);
            if d > 2 {
                failures.push(format!("{name} seed {}: {d}", img.seed));
            }
        }
    }
    assert_eq!(
        kinds.len(),
        kinds_expected,
        "inpainting and ordinary models tested"
    );
    assert!(
        failures.is_empty(),
        "inpainting differs from diffusers:\n{}",
        failures.join("\n")
    );
}

#[test]
fn inpainting_model_needs_a_mask() {
    let mut sd = common::load_model("tiny-sd15-inpaint");
    let req = GenerateRequest {
        prompt: "x".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let e = sd
        .generate(&req, &mut |_| Ok(()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("inpainting model"), "{e}");
}
