//! LoRAs and textual-inversion embeddings against diffusers (refs/lora_cases.json, made by
//! `make_fixtures.py --only lora`: diffusers' load_lora_weights + set_adapters, checked there
//! against a hand merge of A1111's formula): kohya LoCon, PEFT, text-encoder only, two
//! LoRAs, SDXL kohya (original layout names), A1111/diffusers/SDXL embeddings, LoRA plus
//! embedding; all within 2/255. One loaded model runs every case in turn, so switching
//! LoRAs without reloading is what is tested, and taking them off restores the weights
//! exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;

use sd_studio::engine::apply::{LoraUse, Networks};
use sd_studio::engine::pipeline::{GenerateRequest, StableDiffusion};
use sd_studio::engine::rng::RngKind;
use sd_studio::engine::schedulers::SchedulerKind;

const MAX_DIFF: u8 = 2;

fn request(case: &serde_json::Value) -> GenerateRequest {
    let seeds: Vec<u64> = case["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    let loras = case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let w = l["weight"].as_f64().unwrap();
            LoraUse {
                path: common::fixtures().join(l["file"].as_str().unwrap()),
                te: w,
                unet: w,
            }
        })
        .collect();
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
        networks: Networks {
            loras,
            lora_dirs: vec![],
            embedding_dirs: case["embeddings_dir"]
                .as_str()
                .map(|d| vec![common::fixtures().join(d)])
                .unwrap_or_default(),
        },
        ..Default::default()
    }
}

fn compare(
    name: &str,
    sd: &mut StableDiffusion,
    req: &GenerateRequest,
    case: &serde_json::Value,
) -> Vec<String> {
    let mut failures = Vec::new();
    let images = match sd.generate(req, &mut |_| Ok(())) {
        Ok(i) => i,
        Err(e) => return vec![format!("{name}: {e}")],
    };
    for (img, path) in images.iter().zip(case["images"].as_array().unwrap()) {
        let (_, _, want) = common::read_png_rgb(&common::fixtures().join(path.as_str().unwrap()));
        let d = common::max_pixel_diff(&img.rgb, &want);
        eprintln!("{name} seed {}: max |Δpixel| = {d}", img.seed);
        if d > MAX_DIFF {
            failures.push(format!("{name} seed {}: max |Δpixel| {d}", img.seed));
        }
    }
    failures
}

fn cases() -> Vec<serde_json::Value> {
    common::refs_json("lora_cases.json")
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn loras_and_embeddings_match_diffusers_switching_without_reload() {
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut plain: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let mut failures = Vec::new();
    let all = cases();
    assert!(all.len() >= 15, "{} cases", all.len());
    for case in &all {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap().to_string();
        let sd = models
            .entry(model.clone())
            .or_insert_with(|| common::load_model(&model));
        let req = request(case);
        // The model's own images before any LoRA touched it.
        if !plain.contains_key(&model) {
            let mut bare = req.clone();
            bare.networks = Networks::default();
            bare.prompt = "a photo of an astronaut riding a horse".into();
            bare.negative_prompt = "blurry, low quality".into();
            let imgs = sd.generate(&bare, &mut |_| Ok(())).unwrap();
            plain.insert(model.clone(), imgs.into_iter().map(|i| i.rgb).collect());
        }
        failures.extend(compare(name, sd, &req, case));
    }
    // Everything off again: bit-identical to the untouched model.
    for (model, want) in &plain {
        let sd = models.get_mut(model).unwrap();
        let req = GenerateRequest {
            networks: Networks::default(),
            prompt: "a photo of an astronaut riding a horse".into(),
            negative_prompt: "blurry, low quality".into(),
            ..request(&all[0])
        };
        let got = sd.generate(&req, &mut |_| Ok(())).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert_eq!(
                &g.rgb, w,
                "{model}: weights not restored exactly after the LoRAs"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_prompt_tag_with_a_lora_folder_is_the_same_as_the_file() {
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "lora_kohya_locon_0.6")
        .unwrap();
    let mut sd = common::load_model("tiny-sd15");
    let mut req = request(&case);
    req.networks.loras.clear();
    req.networks.lora_dirs = vec![common::fixtures().join("lora")];
    // A1111 cuts the tag and leaves the text around it: the tag's place becomes "".
    req.prompt = format!("<lora:kohya_locon:0.6>{}", req.prompt);
    let failures = compare("tag <lora:kohya_locon:0.6>", &mut sd, &req, &case);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The run reports the hash A1111 writes ("Lora hashes": sha256 of the data after the
    // header, 12 digits) and merges nothing more the second time.
    let run = sd.begin(&req).unwrap();
    assert_eq!(
        run.adapters.rewritten, 0,
        "same LoRA set: nothing to re-merge"
    );
    let (name, hash) = &run.adapters.lora_hashes[0];
    assert_eq!(name, "kohya_locon");
    assert_eq!(hash.len(), 12);
    // A different weight re-merges only the touched tensors; off restores them.
    req.prompt = req.prompt.replace(":0.6>", ":0.3>");
    let run = sd.begin(&req).unwrap();
    assert!(run.adapters.rewritten > 0);
    req.prompt = req.prompt.replace("<lora:kohya_locon:0.3>", "");
    let run = sd.begin(&req).unwrap();
    assert!(run.adapters.rewritten > 0 && run.adapters.lora_hashes.is_empty());
}

#[test]
fn embeddings_report_ti_hashes_and_negative_prompt_tags_are_not_applied() {
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "ti_negative")
        .unwrap();
    let sd = common::load_model("tiny-sd15");
    let mut req = request(&case);
    req.negative_prompt = format!("{} <lora:kohya_locon:1>", req.negative_prompt);
    req.networks.lora_dirs = vec![common::fixtures().join("lora")];
    let run = sd.begin(&req).unwrap();
    assert_eq!(run.adapters.ti_hashes.len(), 1);
    assert_eq!(run.adapters.ti_hashes[0].0, "tinyemb");
    assert!(run.adapters.lora_hashes.is_empty());
    assert!(
        run.adapters
            .warnings
            .iter()
            .any(|w| w.contains("negative prompt's <lora:…> tags are not applied")),
        "{:?}",
        run.adapters.warnings
    );
}

fn err(sd: &StableDiffusion, req: &GenerateRequest) -> String {
    match sd.begin(req) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_loras_and_embeddings_are_refused_with_one_clear_line() {
    let mut sd = common::load_model("tiny-sd15");
    let fx = common::fixtures();
    let base = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let with = |loras: Vec<LoraUse>, prompt: &str| GenerateRequest {
        prompt: prompt.into(),
        networks: Networks {
            loras,
            lora_dirs: vec![fx.join("lora")],
            embedding_dirs: vec![fx.join("embeddings")],
        },
        ..base.clone()
    };
    let file = |p: &std::path::Path| LoraUse {
        path: p.to_path_buf(),
        te: 1.0,
        unet: 1.0,
    };
    // Missing file.
    let e = err(
        &sd,
        &with(vec![file(&fx.join("lora/nope.safetensors"))], "a cat"),
    );
    assert!(
        e.contains("LoRA file not found") && e.contains("nope.safetensors"),
        "{e}"
    );
    // Unknown tag name: says where it looked.
    let e = err(&sd, &with(vec![], "a cat <lora:missing_one:1>"));
    assert!(e.contains("\"missing_one\"") && e.contains("lora"), "{e}");
    // A weight that is not a number.
    let e = err(&sd, &with(vec![], "a cat <lora:kohya_locon:strong>"));
    assert!(e.contains("\"strong\" is not a number"), "{e}");
    // Another family: an SDXL LoRA on SD 1.5.
    let e = err(&sd, &with(vec![], "a cat <lora:sdxl_kohya>"));
    assert!(
        e.contains("is a LoRA for SDXL") && e.contains("SD 1.x"),
        "{e}"
    );
    // Truncated file.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fx.join("lora/kohya_locon.safetensors")).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&sd, &with(vec![file(&cut)], "a cat"));
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A pickle, as a file and as an embedding the prompt uses.
    let pt = dir.path().join("x.pt");
    std::fs::write(&pt, b"not really").unwrap();
    let e = err(&sd, &with(vec![file(&pt)], "a cat"));
    assert!(e.contains("refusing to load pickle"), "{e}");
    let e = err(&sd, &with(vec![], "a cat, pickled"));
    assert!(
        e.contains("refusing to load pickle") && e.contains("pickled.pt"),
        "{e}"
    );
    // An SDXL embedding on SD 1.5.
    let e = err(&sd, &with(vec![], "a tinyxl cat"));
    assert!(e.contains("tinyxl") && e.contains("is for SDXL"), "{e}");
    // After all of that the model still works, with nothing merged.
    let imgs = sd.generate(&base, &mut |_| Ok(())).unwrap();
    assert_eq!(imgs.len(), 1);
}

#[test]
fn single_file_checkpoints_take_loras_as_their_folders_do() {
    use candle_core::{DType, Device};
    use sd_studio::engine::model::ModelFiles;
    for (file, config, case) in [
        (
            "single/tiny-sd15.safetensors",
            "tiny-sd15",
            "lora_kohya_locon_1",
        ),
        (
            "single/tiny-sdxl.safetensors",
            "tiny-sdxl",
            "lora_sdxl_kohya_1",
        ),
    ] {
        let case = cases().into_iter().find(|c| c["name"] == case).unwrap();
        let files = ModelFiles::from_single_file(
            &common::fixtures().join(file),
            None,
            Some(&common::model_dir(config)),
        )
        .unwrap();
        let mut sd = StableDiffusion::load(files, Device::Cpu, DType::F32).unwrap();
        let failures = compare(file, &mut sd, &request(&case), &case);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn loras_reach_staged_and_streamed_weights() {
    use candle_core::{DType, Device};
    use sd_studio::engine::memory::Offload;
    use sd_studio::engine::model::ModelFiles;
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "lora_kohya_locon_-0.5")
        .unwrap();
    for offload in [Offload::Medvram, Offload::Lowvram] {
        let files = ModelFiles::from_dir(&common::model_dir("tiny-sd15"), false).unwrap();
        let mut sd =
            StableDiffusion::load_offloaded(files, Device::Cpu, DType::F32, offload).unwrap();
        let failures = compare(&format!("{offload:?}"), &mut sd, &request(&case), &case);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn lycoris_types_are_named_and_unmatched_modules_are_a_warning() {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let sd = common::load_model("tiny-sd15");
    let base = GenerateRequest {
        prompt: "a cat".into(),
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let with = |path: &std::path::Path| GenerateRequest {
        networks: Networks {
            loras: vec![LoraUse {
                path: path.to_path_buf(),
                te: 1.0,
                unet: 1.0,
            }],
            ..Default::default()
        },
        ..base.clone()
    };
    // A LoHa (LyCORIS) file: refused with its type.
    let loha = dir.path().join("loha.safetensors");
    let t = Tensor::zeros((4, 16), DType::F32, &dev).unwrap();
    let mut m = HashMap::new();
    for k in ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] {
        m.insert(
            format!("lora_unet_mid_block_attentions_0_proj_in.{k}"),
            t.clone(),
        );
    }
    candle_core::safetensors::save(&m, &loha).unwrap();
    let e = match sd.begin(&with(&loha)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a LoHa was accepted"),
    };
    assert!(
        e.contains("LyCORIS LoHa") && e.contains("loha.safetensors"),
        "{e}"
    );
    // A kohya file with one module the model does not have: it applies, and says so.
    let mut m = candle_core::safetensors::load(
        common::fixtures().join("lora/kohya_locon.safetensors"),
        &dev,
    )
    .unwrap();
    let down = Tensor::zeros((4, 16), DType::F16, &dev).unwrap();
    let up = Tensor::zeros((16, 4), DType::F16, &dev).unwrap();
    m.insert("lora_unet_no_such_block_proj.lora_down.weight".into(), down);
    m.insert("lora_unet_no_such_block_proj.lora_up.weight".into(), up);
    let extra = dir.path().join("extra.safetensors");
    candle_core::safetensors::save(&m, &extra).unwrap();
    let run = sd.begin(&with(&extra)).unwrap();
    assert!(
        run.adapters
            .warnings
            .iter()
            .any(|w| w.contains("LoRA extra: 1 of its modules match nothing")),
        "{:?}",
        run.adapters.warnings
    );
}
