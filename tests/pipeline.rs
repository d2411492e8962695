//! Whole txt2img runs against diffusers' StableDiffusionPipeline on the tiny fixtures, for
//! every sampler: with `latents=` (init latents) and with per-image torch CPU generators.
//! Every pixel within 2 of 255.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use sd_studio::engine::pipeline::{GenerateRequest, StableDiffusion};
use sd_studio::engine::rng::RngKind;
use sd_studio::engine::schedulers::{SchedulerConfig, SchedulerKind, TimestepSpacing};

const MAX_DIFF: u8 = 2;

fn request(case: &serde_json::Value) -> GenerateRequest {
    let seeds: Vec<u64> = case["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let init_latents = case["init_latents"].as_str().map(|p| {
        let t = candle_core::safetensors::load(common::fixtures().join(p), &Device::Cpu).unwrap();
        t["latents"].clone()
    });
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        seed: seeds[0],
        batch: seeds.len(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
        scheduler: SchedulerKind::parse(case["scheduler"].as_str().unwrap()).unwrap(),
        width: case["width"].as_u64().unwrap() as usize,
        height: case["height"].as_u64().unwrap() as usize,
        rng: RngKind::TorchCpu,
        init_latents,
        variation: None,
        clip_skip: 1,
        init_image: None,
        spacing: None,
        size_conditions: Default::default(),
        networks: Default::default(),
        controls: Vec::new(),
        hires: None,
    }
}

/// Runs every case of a reference file and compares each image with diffusers'. The
/// scheduler config is the case's `scheduler_config` file, else the model's own. With
/// `every_sampler`, the file must cover all of them.
fn check_cases(cases_file: &str, every_sampler: bool) {
    let cases = common::refs_json(cases_file);
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut seen_schedulers = std::collections::HashSet::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let sd = models
            .entry(model.clone())
            .or_insert_with(|| common::load_model(&model));
        let config = match case["scheduler_config"].as_str() {
            Some(p) => common::fixtures().join(p),
            None => sd
                .files
                .root
                .join("scheduler")
                .join("scheduler_config.json"),
        };
        let base = sd_studio::engine::config::JsonConfig::load(&config).unwrap();
        let spacing = case["timestep_spacing"]
            .as_str()
            .map(|s| TimestepSpacing::parse(s).unwrap());
        sd.files.scheduler_config = SchedulerConfig::from_json(base)
            .unwrap()
            .with_spacing(spacing);
        let req = request(case);
        seen_schedulers.insert(req.scheduler.cli_name());
        let images = match sd.generate(&req, &mut |_| Ok(())) {
            Ok(images) => images,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        for (img, path) in images.iter().zip(case["images"].as_array().unwrap()) {
            let (w, h, want) =
                common::read_png_rgb(&common::fixtures().join(path.as_str().unwrap()));
            assert_eq!((w, h), (img.width, img.height), "{name}: size");
            let d = common::max_pixel_diff(&img.rgb, &want);
            eprintln!("{name} seed {}: max |Δpixel| = {d}", img.seed);
            if d > MAX_DIFF {
                failures.push(format!("{name} seed {}: max |Δpixel| {d}", img.seed));
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} images differ from diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for k in SchedulerKind::ALL.into_iter().filter(|_| every_sampler) {
        assert!(
            seen_schedulers.contains(k.cli_name()),
            "no reference case for {}",
            k.cli_name()
        );
    }
}

#[test]
fn every_case_matches_diffusers() {
    check_cases("cases.json", true);
}

/// A scheduler_config.json with only the class and the training betas, as diffusers runs
/// it: the sampler the file names as StableDiffusionPipeline rewrites it (steps_offset 1,
/// no x0 clipping), every other from `from_config` with its own defaults (DDIM and DDPM
/// clip x0, PNDM warms up with Runge-Kutta steps, the spacings differ); at 13 steps (not a
/// divisor of 1000) and 8.
#[test]
fn minimal_scheduler_config_takes_diffusers_defaults() {
    check_cases("minimal_scheduler_cases.json", true);
}

/// SDXL (tiny-sdxl: two text encoders, pooled embedding and size conditions) against
/// diffusers' StableDiffusionXLPipeline: Euler, Euler a, DPM++ 2M Karras and DDIM at 8 steps
/// with a batch of 2, a non-square size, an empty negative prompt (zeros, as
/// `force_zeros_for_empty_prompt` says), SDXL-Turbo's 1 step without guidance, init latents.
#[test]
fn sdxl_cases_match_diffusers() {
    check_cases("sdxl_cases.json", false);
}

#[test]
fn batch_size_never_changes_an_image() {
    let mut sd = common::load_model("tiny-sd15");
    let base = GenerateRequest {
        prompt: "a red bicycle".into(),
        negative_prompt: String::new(),
        seed: 1000,
        batch: 3,
        steps: 4,
        guidance: 5.0,
        scheduler: SchedulerKind::EulerAncestral,
        width: 64,
        height: 64,
        rng: RngKind::TorchCpu,
        init_latents: None,
        variation: None,
        clip_skip: 1,
        init_image: None,
        spacing: None,
        size_conditions: Default::default(),
        networks: Default::default(),
        controls: Vec::new(),
        hires: None,
    };
    let batch = sd.generate(&base, &mut |_| Ok(())).unwrap();
    let single = sd
        .generate(
            &GenerateRequest {
                seed: 1002,
                batch: 1,
                ..base.clone()
            },
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_eq!(batch[2].seed, 1002);
    assert!(
        common::max_pixel_diff(&batch[2].rgb, &single[0].rgb) <= 1,
        "image 3 of a batch differs from the same seed alone"
    );
    assert!(
        common::max_pixel_diff(&batch[0].rgb, &batch[1].rgb) > 10,
        "different seeds gave the same image"
    );
}

#[test]
fn steps_are_reported_and_cancel_stops_the_job() {
    let mut sd = common::load_model("tiny-sd15");
    let req = GenerateRequest {
        prompt: "a lighthouse".into(),
        negative_prompt: String::new(),
        seed: 1,
        batch: 1,
        steps: 6,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        width: 64,
        height: 64,
        rng: RngKind::TorchCpu,
        init_latents: None,
        variation: None,
        clip_skip: 1,
        init_image: None,
        spacing: None,
        size_conditions: Default::default(),
        networks: Default::default(),
        controls: Vec::new(),
        hires: None,
    };
    let mut seen = Vec::new();
    sd.generate(&req, &mut |s| {
        assert!(s.pred_original.is_some());
        seen.push((s.step, s.total));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, (1..=6).map(|i| (i, 6)).collect::<Vec<_>>());
    let mut calls = 0;
    let r = sd.generate(&req, &mut |s| {
        calls += 1;
        if s.step == 2 {
            Err(sd_studio::engine::Error::Cancelled)
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(sd_studio::engine::Error::Cancelled)));
    assert_eq!(calls, 2);
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
}
