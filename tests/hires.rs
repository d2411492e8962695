//! A1111's Hires. fix against diffusers (refs/hires_cases.json, made by `make_fixtures.py
//! --only hires`): txt2img at 64², the latents upscaled (bilinear without antialiasing,
//! nearest) or the decoded picture Lanczos-resized, then StableDiffusionImg2ImgPipeline at
//! 128² from freshly seeded generators. The first pass's picture must not leak through a
//! full-strength second pass either.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use sd_studio::engine::pipeline::{GenerateRequest, Hires, HiresUpscaler};

fn request(case: &serde_json::Value) -> GenerateRequest {
    let h = &case["hires"];
    GenerateRequest {
        hires: Some(Hires {
            width: h["width"].as_u64().unwrap() as usize,
            height: h["height"].as_u64().unwrap() as usize,
            steps: h["steps"].as_u64().map(|s| s as usize),
            strength: h["strength"].as_f64().unwrap(),
            upscaler: HiresUpscaler::parse(h["upscaler"].as_str().unwrap()).unwrap(),
            scale: h["scale"].as_f64(),
        }),
        ..common::case_request(case)
    }
}

#[test]
fn hires_fix_matches_diffusers_img2img_on_the_upscaled_first_pass() {
    let cases = common::refs_json("hires_cases.json");
    let mut sd = common::load_model("tiny-sd15");
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let req = request(case);
        let mut seen = Vec::new();
        let images = sd
            .generate(&req, &mut |s| {
                seen.push((s.step, s.total, s.pred_original.map(|p| p.dims().to_vec())));
                Ok(())
            })
            .unwrap();
        // Steps are numbered over both passes; previews switch to the large size.
        let h = req.hires.unwrap();
        let second = ((h.steps.unwrap_or(req.steps) as f64 * h.strength).floor()) as usize;
        let total = req.steps + second;
        assert_eq!(seen.len(), total, "{name}");
        assert!(
            seen.iter()
                .enumerate()
                .all(|(i, s)| s.0 == i + 1 && s.1 == total),
            "{name}: {seen:?}"
        );
        assert_eq!(seen[0].2.as_deref(), Some(&[2, 4, 8, 8][..]), "{name}");
        assert_eq!(
            seen[total - 1].2.as_deref(),
            Some(&[2, 4, 16, 16][..]),
            "{name}"
        );
        for (img, path) in images.iter().zip(case["images"].as_array().unwrap()) {
            assert_eq!((img.width, img.height), (128, 128));
            let (_, _, want) =
                common::read_png_rgb(&common::fixtures().join(path.as_str().unwrap()));
            let d = common::max_pixel_diff(&img.rgb, &want);
            eprintln!("{name} seed {}: max |Δpixel| = {d}", img.seed);
            if d > 2 {
                failures.push(format!("{name} seed {}: max |Δpixel| {d}", img.seed));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn bad_hires_requests_are_refused_before_any_work() {
    let sd = common::load_model("tiny-sd15");
    let base = GenerateRequest {
        prompt: "a cat".into(),
        steps: 4,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let with = |h: Hires| GenerateRequest {
        hires: Some(h),
        ..base.clone()
    };
    let ok = Hires {
        width: 128,
        height: 128,
        steps: None,
        strength: 0.5,
        upscaler: HiresUpscaler::Latent,
        scale: Some(2.0),
    };
    for (req, needle) in [
        (
            with(Hires {
                strength: 1.5,
                ..ok
            }),
            "hires strength: 1.5 is outside 0..1",
        ),
        (
            with(Hires {
                strength: 0.1,
                ..ok
            }),
            "runs no step",
        ),
        (
            with(Hires { width: 60, ..ok }),
            "smaller than the base size",
        ),
        (
            with(Hires { width: 132, ..ok }),
            "width: 132 is not a positive multiple of 8",
        ),
        (
            with(Hires {
                steps: Some(0),
                ..ok
            }),
            "hires steps: must be at least 1",
        ),
        (
            GenerateRequest {
                init_image: Some(sd_studio::engine::pipeline::InitImage {
                    rgb: vec![0; 64 * 64 * 3],
                    strength: 0.5,
                    mask: None,
                }),
                ..with(ok)
            },
            "Hires. fix is for txt2img",
        ),
    ] {
        let e = sd
            .begin(&req)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    }
}
