//! Models as users keep them: the model cache (shared components, least-recently-used
//! eviction), VAE swaps (folder and A1111-style single file), model hashes in the PNG
//! metadata, the models-folder scan, and the headless comparison grid.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use sd_studio::engine::cache::{LoadOptions, ModelCache};
use sd_studio::engine::metadata::read_png_parameters;
use sd_studio::engine::pipeline::GenerateRequest;
use sd_studio::engine::scan;
use sd_studio::engine::schedulers::SchedulerKind;
use sha2::{Digest, Sha256};

fn opts(model: &Path) -> LoadOptions {
    LoadOptions::new(&model.display().to_string(), "cpu", "f32")
}

fn single() -> PathBuf {
    common::fixtures()
        .join("single")
        .join("tiny-sd15.safetensors")
}

/// The tiny single file with `--config` (its group-norm size is not in the shapes).
fn single_opts() -> LoadOptions {
    LoadOptions {
        config: Some(common::model_dir("tiny-sd15").display().to_string()),
        ..opts(&single())
    }
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: "fog".into(),
        seed: 11,
        steps: 3,
        width: 64,
        height: 64,
        scheduler: SchedulerKind::DpmPp2M,
        ..Default::default()
    }
}

fn image(cache: &mut ModelCache, o: &LoadOptions) -> Vec<u8> {
    let m = cache.get(o, &mut |_, _| {}).unwrap();
    let mut run = m.sd.begin(&request()).unwrap();
    while !run.is_done() {
        m.sd.step(&mut run).unwrap();
    }
    m.sd.finish(run).unwrap().0.remove(0).rgb
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Hash cache in a temporary folder, so tests never touch the user's.
fn isolate_hash_cache() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::env::set_var("SD_STUDIO_CACHE_DIR", d.path());
    d
}

#[test]
fn identical_components_load_once_and_the_least_recently_used_model_goes_first() {
    let _h = isolate_hash_cache();
    let mut cache = ModelCache::new(u64::MAX);
    let sd15 = opts(&common::model_path("tiny-sd15"));
    // tiny-sd15 with a 9-channel UNet: same text encoder and VAE files.
    let inpaint = opts(&common::model_path("tiny-sd15-inpaint"));
    cache.get(&sd15, &mut |_, _| {}).unwrap();
    let mut messages = Vec::new();
    cache
        .get(&inpaint, &mut |m, p| messages.push((m.to_string(), p)))
        .unwrap();
    assert_eq!(
        cache.stats.loaded,
        [1, 2, 1],
        "text, unet, vae read from disk"
    );
    assert_eq!(cache.stats.shared, 2);
    assert!(messages.iter().any(|(m, _)| m.contains("UNet")));
    assert_eq!(messages.last().unwrap().1, Some(1.0));
    cache.get(&sd15, &mut |_, _| {}).unwrap();
    assert_eq!(cache.stats.hits, 1);

    // Three models that share nothing; room for any two.
    let sizes: Vec<u64> = [
        &sd15,
        &opts(&common::model_dir("tiny-sd2v")),
        &single_opts(),
    ]
    .iter()
    .map(|o| cache.get(o, &mut |_, _| {}).unwrap().bytes)
    .collect();
    let mut small = ModelCache::new(sizes.iter().sum::<u64>() - 1);
    let (a, b, c) = (
        sd15.clone(),
        opts(&common::model_dir("tiny-sd2v")),
        single_opts(),
    );
    for o in [&a, &b, &a, &c] {
        small.get(o, &mut |_, _| {}).unwrap();
    }
    assert_eq!(small.keys(), vec![&a, &c], "b was least recently used");
    assert_eq!(small.stats.evicted, 1);
    assert!(small.resident_bytes() < sizes.iter().sum::<u64>());
}

#[test]
fn a_vae_from_a_folder_or_an_a1111_file_replaces_the_models_own() {
    let _h = isolate_hash_cache();
    let tmp = tempfile::tempdir().unwrap();
    let mut cache = ModelCache::new(u64::MAX);
    let sd15 = common::model_dir("tiny-sd15");
    let own = image(&mut cache, &opts(&sd15));

    // The SD2 fixture's VAE (different weights, same shape) by folder...
    let other_vae = common::model_dir("tiny-sd2v").join("vae");
    let swapped = LoadOptions {
        vae: Some(other_vae.display().to_string()),
        ..opts(&sd15)
    };
    let with_swap = image(&mut cache, &swapped);
    // ... must equal a copy of tiny-sd15 whose vae/ is that VAE.
    let assembled = tmp.path().join("assembled");
    common::copy_dir(&sd15, &assembled);
    std::fs::remove_dir_all(assembled.join("vae")).unwrap();
    common::copy_dir(&other_vae, &assembled.join("vae"));
    assert_eq!(with_swap, image(&mut cache, &opts(&assembled)));
    assert!(common::max_pixel_diff(&with_swap, &own) > 0);
    let m = cache.get(&swapped, &mut |_, _| {}).unwrap();
    let (label, hash) = m.vae.clone().unwrap();
    assert!(label.ends_with("vae"), "{label}");
    assert_eq!(hash.len(), 10);

    // An A1111 VAE file (original key names, no prefix): tiny-sd15's own VAE taken out of
    // the single-file checkpoint gives tiny-sd15's own image.
    let all = candle_core::safetensors::load(single(), &Device::Cpu).unwrap();
    let vae: HashMap<String, Tensor> = all
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("first_stage_model.")?.to_string(), v)))
        .collect();
    let file = tmp.path().join("my-vae.safetensors");
    candle_core::safetensors::save(&vae, &file).unwrap();
    let from_file = LoadOptions {
        vae: Some(file.display().to_string()),
        ..opts(&sd15)
    };
    assert_eq!(image(&mut cache, &from_file), own);
    let m = cache.get(&from_file, &mut |_, _| {}).unwrap();
    assert_eq!(
        m.vae.clone().unwrap(),
        (
            "my-vae.safetensors".to_string(),
            sha256_hex(&file)[..10].to_string()
        )
    );

    // A whole checkpoint is not a VAE; a missing VAE is named.
    let e = cache
        .get(
            &LoadOptions {
                vae: Some(single().display().to_string()),
                ..opts(&sd15)
            },
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a VAE"), "{e}");
    let e = cache
        .get(
            &LoadOptions {
                vae: Some("/no/such/vae.safetensors".into()),
                ..opts(&sd15)
            },
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/vae.safetensors"), "{e}");
}

#[test]
fn a_models_folder_scan_lists_checkpoints_and_says_what_the_rest_is() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir_all(root.join("anime")).unwrap();
    std::fs::copy(single(), root.join("anime").join("Tiny-1.5.safetensors")).unwrap();
    std::fs::write(root.join("old.ckpt"), b"pickle").unwrap();
    std::fs::create_dir_all(root.join("diffusers-model")).unwrap();
    std::fs::write(root.join("diffusers-model").join("model_index.json"), b"{}").unwrap();
    let lora: HashMap<String, Tensor> = [(
        "lora_unet_down_blocks_0.alpha".to_string(),
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&lora, root.join("style-lora.safetensors")).unwrap();
    std::fs::write(root.join("notes.txt"), b"x").unwrap();
    let found = scan::scan(root).unwrap();
    let rows: Vec<(&str, &str, bool)> = found
        .iter()
        .map(|m| (m.name.as_str(), m.kind.as_str(), m.loadable))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("anime/Tiny-1.5.safetensors", "single file", true),
            ("diffusers-model", "diffusers folder", true),
            (
                "old.ckpt",
                "pickle (refused: convert to .safetensors)",
                false
            ),
            (
                "style-lora.safetensors",
                "not a checkpoint (LoRA or other)",
                false
            ),
        ]
    );
    let e = scan::scan(&root.join("missing")).unwrap_err().to_string();
    assert!(e.contains("models folder not found"), "{e}");
}

#[test]
fn headless_compare_writes_every_image_and_a_labelled_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let grid = tmp.path().join("grid.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sd-studio"))
        .env("HF_HUB_OFFLINE", "1")
        .env("SD_STUDIO_CACHE_DIR", tmp.path().join("cache"))
        .args(["generate", "--prompt", "a red barn", "--steps", "2"])
        .args([
            "--width", "64", "--height", "64", "--seed", "40", "--batch", "2",
        ])
        .arg("--model")
        .arg(common::model_dir("tiny-sd15"))
        .arg("--model")
        .arg(single())
        .arg("--config")
        .arg(common::model_dir("tiny-sd15"))
        .arg("--out")
        .arg(&out)
        .arg("--grid")
        .arg(&grid)
        .output()
        .unwrap();
    // --config applies to single files only: with a folder in the list it is refused.
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("single-file"));

    let other = tmp.path().join("other");
    common::copy_dir(&common::model_dir("tiny-sd2v"), &other);
    let o = Command::new(env!("CARGO_BIN_EXE_sd-studio"))
        .env("HF_HUB_OFFLINE", "1")
        .env("SD_STUDIO_CACHE_DIR", tmp.path().join("cache"))
        .args(["generate", "--prompt", "a red barn", "--steps", "2"])
        .args([
            "--width", "64", "--height", "64", "--seed", "40", "--batch", "2",
        ])
        .arg("--model")
        .arg(common::model_dir("tiny-sd15"))
        .arg("--model")
        .arg(&other)
        .arg("--out")
        .arg(&out)
        .arg("--grid")
        .arg(&grid)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "4 images and the grid");
    let models: Vec<(&str, u64)> = lines[..4]
        .iter()
        .map(|l| (l["model"].as_str().unwrap(), l["seed"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        models,
        vec![
            ("tiny-sd15", 40),
            ("tiny-sd15", 41),
            ("other", 40),
            ("other", 41)
        ]
    );
    let g = &lines[4];
    assert_eq!(g["rows"], serde_json::json!(["tiny-sd15", "other"]));
    assert_eq!(g["columns"], serde_json::json!(["Seed: 40", "Seed: 41"]));
    // Each image sits in the grid at its row and column.
    let grid_img = image::open(&grid).unwrap().to_rgb8();
    let (gw, gh) = (grid_img.width() as usize, grid_img.height() as usize);
    let (left, top) = (gw - 2 * 64, gh - 2 * 64);
    for (k, l) in lines[..4].iter().enumerate() {
        let img = image::open(l["path"].as_str().unwrap()).unwrap().to_rgb8();
        let (r, c) = (k / 2, k % 2);
        let cell = image::imageops::crop_imm(
            &grid_img,
            (left + c * 64) as u32,
            (top + r * 64) as u32,
            64,
            64,
        )
        .to_image();
        assert_eq!(cell.as_raw(), img.as_raw(), "cell {r},{c}");
    }
    // The rows differ (two models), and the labels put dark text left of and above the cells.
    let a = image::open(lines[0]["path"].as_str().unwrap()).unwrap();
    let b = image::open(lines[2]["path"].as_str().unwrap()).unwrap();
    assert_ne!(a.as_bytes(), b.as_bytes());
    let dark = |x0: usize, x1: usize, y0: usize, y1: usize| {
        (y0..y1).any(|y| (x0..x1).any(|x| grid_img.get_pixel(x as u32, y as u32)[0] < 100))
    };
    assert!(dark(0, left, top, top + 64) && dark(0, left, top + 64, gh));
    assert!(dark(left, left + 64, 0, top) && dark(left + 64, gw, 0, top));
    assert!(read_png_parameters(&grid)
        .unwrap()
        .unwrap()
        .contains("Seed: 40"));
}

#[test]
fn a_single_file_checkpoint_records_its_a1111_model_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sd-studio"))
        .env("HF_HUB_OFFLINE", "1")
        .env("SD_STUDIO_CACHE_DIR", tmp.path().join("cache"))
        .args(["generate", "--prompt", "a kite", "--steps", "1"])
        .args(["--width", "64", "--height", "64", "--seed", "3"])
        .arg("--model")
        .arg(single())
        .arg("--config")
        .arg(common::model_dir("tiny-sd15"))
        .arg("--out")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let text = read_png_parameters(Path::new(line["path"].as_str().unwrap()))
        .unwrap()
        .unwrap();
    let want = format!(
        "Model hash: {}, Model: tiny-sd15",
        &sha256_hex(&single())[..10]
    );
    assert!(text.contains(&want), "{text}");
    // Computed once: the hash cache now has the file.
    let cached = std::fs::read_to_string(tmp.path().join("cache").join("hashes.json")).unwrap();
    assert!(cached.contains(&sha256_hex(&single())));
}

/// Resident kilobytes of this process's mappings of files under `dir` (Linux smaps).
#[cfg(target_os = "linux")]
fn mapped_rss_kb(dir: &Path) -> (usize, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut maps, mut kb, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.contains(&*dir.to_string_lossy());
            maps += inside as usize;
        } else if inside && first == "Rss:" {
            kb += line
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
    }
    (maps, kb)
}

/// The weight files stay mapped after loading (a LoRA's originals are read back from them),
/// but their pages leave the resident set: only the widened copies count. A job afterwards
/// (and a LoRA merged and removed, which reads the originals again) still works.
#[cfg(target_os = "linux")]
#[test]
fn loaded_models_do_not_keep_the_weight_files_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-sd15");
    common::copy_dir(&common::model_path("tiny-sd15"), &dir);
    let files = sd_studio::engine::model::ModelFiles::from_dir(&dir, false).unwrap();
    let mut sd = sd_studio::engine::pipeline::StableDiffusion::load(
        files,
        Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let (maps, kb) = mapped_rss_kb(tmp.path());
    assert!(
        maps >= 3,
        "the text encoder, UNet and VAE files stay mapped ({maps} mappings)"
    );
    assert_eq!(
        kb, 0,
        "{kb} kB of the weight files still resident after loading"
    );
    let req = GenerateRequest {
        prompt: "a lighthouse".into(),
        seed: 3,
        steps: 2,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let first = sd.generate(&req, &mut |_| Ok(())).unwrap();
    assert_eq!(first.len(), 1);
    // Resident pages of the files are dropped again after each load, never kept for good.
    assert!(sd_studio::engine::weights::release_mapped_pages() > 0);
    assert_eq!(mapped_rss_kb(tmp.path()).1, 0);
    let again = sd.generate(&req, &mut |_| Ok(())).unwrap();
    assert_eq!(
        again[0].rgb, first[0].rgb,
        "reading the files again changed a pixel"
    );
}
