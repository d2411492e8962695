//! ControlNet against diffusers (refs/controlnet_cases.json, made by `make_fixtures.py
//! --only controlnet`: StableDiffusionControlNetPipeline, its img2img twin and the SDXL one
//! on tiny random ControlNets whose zero convolutions are randomised): scale 1 and 0.5, a
//! start/end window, two ControlNets, CFG 1, img2img, SDXL, and the A1111 single file giving
//! the folder's image; all within 2/255. The built-in Canny against OpenCV's `cv2.Canny`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use sha2::{Digest, Sha256};

use sd_studio::engine::control::{canny::canny, ControlUse};
use sd_studio::engine::pipeline::{GenerateRequest, InitImage, StableDiffusion};

const MAX_DIFF: u8 = 2;

fn unit(u: &serde_json::Value) -> ControlUse {
    let (w, h, rgb) = common::read_png_rgb(&common::fixtures().join(u["image"].as_str().unwrap()));
    assert_eq!((w, h), (64, 64));
    ControlUse {
        model: common::fixtures()
            .join(u["model"].as_str().unwrap())
            .display()
            .to_string(),
        image: rgb,
        module: "none".into(),
        scale: u["scale"].as_f64().unwrap(),
        start: u["start"].as_f64().unwrap(),
        end: u["end"].as_f64().unwrap(),
    }
}

fn request(case: &serde_json::Value) -> GenerateRequest {
    let init_image = case["init_image"].as_str().map(|p| {
        let (_, _, rgb) = common::read_png_rgb(&common::fixtures().join(p));
        InitImage {
            rgb,
            strength: case["strength"].as_f64().unwrap(),
            mask: None,
        }
    });
    GenerateRequest {
        init_image,
        controls: case["controlnets"]
            .as_array()
            .unwrap()
            .iter()
            .map(unit)
            .collect(),
        ..common::case_request(case)
    }
}

/// Runs `req` and compares with the case's images; returns the images and any failures.
fn compare(
    name: &str,
    sd: &mut StableDiffusion,
    req: &GenerateRequest,
    case: &serde_json::Value,
) -> (Vec<Vec<u8>>, Vec<String>) {
    let images = match sd.generate(req, &mut |_| Ok(())) {
        Ok(i) => i,
        Err(e) => return (vec![], vec![format!("{name}: {e}")]),
    };
    let mut failures = Vec::new();
    for (img, path) in images.iter().zip(case["images"].as_array().unwrap()) {
        let (_, _, want) = common::read_png_rgb(&common::fixtures().join(path.as_str().unwrap()));
        let d = common::max_pixel_diff(&img.rgb, &want);
        eprintln!("{name} seed {}: max |Δpixel| = {d}", img.seed);
        if d > MAX_DIFF {
            failures.push(format!("{name} seed {}: max |Δpixel| {d}", img.seed));
        }
    }
    (images.into_iter().map(|i| i.rgb).collect(), failures)
}

/// A1111's `sd_models.model_hash`: sha256 of the 64 KiB at 1 MiB, 8 hex digits.
fn a1111_short_hash(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let part = &bytes[bytes.len().min(0x100000)..bytes.len().min(0x110000)];
    Sha256::digest(part)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn controlnet_images_match_diffusers() {
    let cases = common::refs_json("controlnet_cases.json");
    let mut sd15 = common::load_model("tiny-sd15");
    let mut sdxl = common::load_model("tiny-sdxl");
    let mut failures = Vec::new();
    let mut scale1 = None;
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let sd = if case["model"] == "tiny-sdxl" {
            &mut sdxl
        } else {
            &mut sd15
        };
        let req = request(case);
        let (images, f) = compare(name, sd, &req, case);
        failures.extend(f);
        if name == "scale1" {
            scale1 = Some((req, images, case.clone()));
        }
    }
    // The same weights as one A1111-layout file: the folder's image, bit for bit.
    let (mut req, folder_images, case) = scale1.expect("scale1 case");
    let file = common::fixtures().join("controlnet/tiny_cn_sd15_a1111.safetensors");
    req.controls[0].model = file.display().to_string();
    let images = sd15.generate(&req, &mut |_| Ok(())).unwrap();
    for (img, want) in images.iter().zip(&folder_images) {
        assert_eq!(&img.rgb, want, "single file differs from the folder");
    }
    // Its metadata names the file and A1111's short hash.
    let u = &images[0].controlnets[0];
    assert_eq!(
        u.model,
        format!("tiny_cn_sd15_a1111 [{}]", a1111_short_hash(&file))
    );
    assert_eq!(
        (u.weight, u.guidance_start, u.guidance_end),
        (1.0, 0.0, 1.0)
    );
    // Without ControlNets the model's own image comes back (nothing left applied).
    req.controls.clear();
    let plain = sd15.generate(&req, &mut |_| Ok(())).unwrap();
    assert!(plain[0].controlnets.is_empty());
    let d = common::max_pixel_diff(&plain[0].rgb, &folder_images[0]);
    assert!(d > 20, "the control map changed the image by only {d}");
    let _ = case;
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn canny_matches_opencv() {
    let cases = common::refs_json("canny_cases.json");
    let mut worst = 1.0f64;
    for case in cases.as_array().unwrap() {
        let img = common::fixtures().join(case["image"].as_str().unwrap());
        let (w, h, rgb) = common::read_png_rgb(&img);
        let (low, high) = (
            case["low"].as_f64().unwrap(),
            case["high"].as_f64().unwrap(),
        );
        let ours = canny(&rgb, w, h, 3, low, high);
        let want = image::open(common::fixtures().join(case["edges"].as_str().unwrap()))
            .unwrap()
            .to_luma8()
            .into_raw();
        let same = ours.iter().zip(&want).filter(|(a, b)| a == b).count();
        let agree = same as f64 / want.len() as f64;
        let edges = want.iter().filter(|&&v| v > 0).count();
        eprintln!(
            "canny {} {low}/{high}: {:.3}% of pixels equal ({edges} OpenCV edge pixels)",
            case["image"],
            100.0 * agree
        );
        worst = worst.min(agree);
    }
    assert!(worst >= 0.99, "worst agreement {:.3}%", 100.0 * worst);
}

#[test]
fn medvram_and_lowvram_give_the_same_pixels_and_the_controlnet_leaves_with_the_unet() {
    use candle_core::{DType, Device};
    use sd_studio::engine::memory::Offload;
    use sd_studio::engine::model::ModelFiles;
    let cases = common::refs_json("controlnet_cases.json");
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "two")
        .unwrap();
    let req = request(case);
    let run = |offload| {
        let files = ModelFiles::from_dir(&common::model_path("tiny-sd15"), false).unwrap();
        let mut sd =
            StableDiffusion::load_offloaded(files, Device::Cpu, DType::F32, offload).unwrap();
        let images = sd.generate(&req, &mut |_| Ok(())).unwrap();
        (images, sd.loaded_controlnets())
    };
    let (full, loaded) = run(Offload::Full);
    assert_eq!(loaded.len(), 2);
    assert!(loaded.iter().all(|(_, staged, on)| !staged && *on));
    for offload in [Offload::Medvram, Offload::Lowvram] {
        let (images, loaded) = run(offload);
        for (a, b) in images.iter().zip(&full) {
            assert_eq!(a.rgb, b.rgb, "{offload:?} changed the pixels");
        }
        assert!(
            loaded.iter().all(|(_, staged, on)| *staged && !on),
            "{offload:?}: {loaded:?}"
        );
    }
}
