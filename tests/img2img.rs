//! img2img against diffusers' StableDiffusionImg2ImgPipeline on the tiny fixtures (same
//! weights, picture, strength, torch CPU generators): every pixel within 2 of 255.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;

use sd_studio::engine::pipeline::{GenerateRequest, InitImage, StableDiffusion};
use sd_studio::engine::rng::RngKind;
use sd_studio::engine::schedulers::SchedulerKind;

#[test]
fn img2img_matches_diffusers() {
    check("img2img_cases.json");
}

/// SDXL's img2img (StableDiffusionXLImg2ImgPipeline, base model).
#[test]
fn sdxl_img2img_matches_diffusers() {
    check("sdxl_img2img_cases.json");
}

fn check(cases_file: &str) {
    let cases = common::refs_json(cases_file);
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let sd = models
            .entry(model.clone())
            .or_insert_with(|| common::load_model(&model));
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
                mask: None,
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
    assert!(
        failures.is_empty(),
        "img2img differs from diffusers:\n{}",
        failures.join("\n")
    );
}

#[test]
fn strength_controls_how_much_of_the_schedule_runs() {
    let mut sd = common::load_model("tiny-sd15");
    let (_, _, rgb) = common::read_png_rgb(&common::fixtures().join("refs/init_64x64.png"));
    let mut steps_seen = 0;
    let req = GenerateRequest {
        prompt: "x".into(),
        steps: 10,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::Ddim,
        init_image: Some(InitImage {
            rgb: rgb.clone(),
            strength: 0.3,
            mask: None,
        }),
        ..Default::default()
    };
    sd.generate(&req, &mut |s| {
        steps_seen = s.total;
        Ok(())
    })
    .unwrap();
    assert_eq!(steps_seen, 3);
    let bad = GenerateRequest {
        init_image: Some(InitImage {
            rgb,
            strength: 1.5,
            mask: None,
        }),
        ..req
    };
    assert!(sd
        .generate(&bad, &mut |_| Ok(()))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
        .contains("strength"));
}
