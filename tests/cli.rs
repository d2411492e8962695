//! The `sd-studio` binary as a user runs it: outputs, metadata, and one clear line for
//! every bad input (non-zero exit, no panic, no output file).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sd-studio"));
    c.env("HF_HUB_OFFLINE", "1").env("RUST_BACKTRACE", "0");
    c
}

fn tiny() -> String {
    common::model_dir("tiny-sd15").display().to_string()
}

/// A fast, valid generate command on the tiny model writing into `out`.
/// The settings of the diffusers reference case the ControlNet and Hires. fix CLI tests
/// compare against (tests/make_fixtures.py).
const REFERENCE_CASE: &[&str] = &[
    "--prompt",
    "a photo of an astronaut riding a horse",
    "--negative-prompt",
    "blurry, low quality",
    "--scheduler",
    "euler",
    "--steps",
    "8",
    "--guidance",
    "7.5",
    "--rng",
    "torch-cpu",
    "--seed",
    "42",
    "--batch",
    "2",
];

fn generate(out: &Path, extra: &[&str]) -> Output {
    let model = tiny();
    let defaults = [
        ("--model", model.as_str()),
        ("--prompt", "a cat, sitting: on a mat"),
        ("--steps", "3"),
        ("--width", "64"),
        ("--height", "64"),
        ("--seed", "7"),
    ];
    let mut c = bin();
    c.arg("generate");
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c.arg("--out").arg(out).args(extra);
    c.output().expect("run sd-studio")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Runs a failing command and checks the one-line error and that nothing was written.
fn assert_fails(out: &Path, o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure for {needle:?}, stderr: {err}"
    );
    assert_ne!(o.status.code(), Some(101), "panicked: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err:?}"));
    assert!(
        line.contains(needle),
        "error line {line:?} does not mention {needle:?}"
    );
    assert!(
        pngs(out)
            .iter()
            .all(|p| p.extension().map(|e| e != "png").unwrap_or(true)),
        "output written despite the error"
    );
}

#[test]
fn generate_writes_pngs_with_a1111_metadata_and_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let o = generate(
        dir.path(),
        &[
            "--batch",
            "2",
            "--negative-prompt",
            "blurry",
            "--scheduler",
            "dpm++2m-karras",
            "--guidance",
            "7",
            "--rng",
            "torch-cpu",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8(o.stdout.clone()).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["seed"], 7);
    assert_eq!(lines[1]["seed"], 8);
    assert_eq!(lines[0]["scheduler"], "dpm++2m-karras");
    assert!(lines[0]["elapsed"].as_f64().unwrap() > 0.0);
    let path = PathBuf::from(lines[1]["path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), "8.png");
    let params = sd_studio::engine::metadata::read_png_parameters(&path)
        .unwrap()
        .expect("parameters chunk");
    let expected_tail = "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 8, Size: 64x64, Model: tiny-sd15, RNG: CPU";
    assert_eq!(params.lines().next(), Some("a cat, sitting: on a mat"));
    assert_eq!(params.lines().nth(1), Some("Negative prompt: blurry"));
    assert!(
        params.lines().nth(2).unwrap().starts_with(expected_tail),
        "{params}"
    );
    assert!(stderr(&o).contains("step 3/3"));
    // No temporary files left behind.
    assert_eq!(pngs(dir.path()).len(), 2);
    let (w, h, _) = common::read_png_rgb(&path);
    assert_eq!((w, h), (64, 64));
}

#[test]
fn random_seed_is_printed_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = bin();
    c.args([
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
    ])
    .arg(dir.path());
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let seed: u64 = stderr(&o)
        .lines()
        .find_map(|l| l.strip_prefix("seed: "))
        .expect("seed line")
        .trim()
        .parse()
        .unwrap();
    assert!(dir.path().join(format!("{seed}.png")).is_file());
}

#[test]
fn bad_inputs_give_one_clear_line_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--width".into(), "65".into()],
            "width: 65 is not a positive multiple of 8",
        ),
        (vec!["--height".into(), "0".into()], "height"),
        (vec!["--steps".into(), "0".into()], "steps"),
        (
            vec!["--steps".into(), "5000".into()],
            "exceeds the model's 1000 training timesteps",
        ),
        (vec!["--guidance".into(), "NaN".into()], "guidance"),
        (vec!["--guidance".into(), "-1".into()], "guidance"),
        (
            vec!["--scheduler".into(), "bogus".into()],
            "unknown scheduler \"bogus\"",
        ),
        (
            vec!["--timestep-spacing".into(), "sideways".into()],
            "timestep spacing",
        ),
        (vec!["--rng".into(), "dice".into()], "rng"),
        (vec!["--dtype".into(), "f8".into()], "dtype"),
        (vec!["--device".into(), "tpu".into()], "device"),
        (vec!["--batch".into(), "0".into()], "batch"),
        (
            vec!["--memory".into(), "tiny".into()],
            "memory mode: \"tiny\" is not auto, full, medvram or lowvram",
        ),
        (
            vec!["--attention-slicing".into(), "0".into()],
            "attention slicing",
        ),
        (vec!["--vae-tiling".into(), "maybe".into()], "VAE tiling"),
        (
            vec!["--cache-gib".into(), "0".into()],
            "cache-gib: 0 is not a positive number of GiB",
        ),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let o = generate(&out, &args);
        assert_fails(&out, &o, needle);
    }
}

#[test]
fn bad_model_paths_and_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |model: &Path| {
        let mut c = bin();
        c.args([
            "generate", "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64",
            "--model",
        ])
        .arg(model)
        .arg("--out")
        .arg(&out);
        c.output().unwrap()
    };
    // Missing folder.
    let missing = dir.path().join("no-such-model");
    assert_fails(&out, &run(&missing), "no-such-model");
    // A pickle checkpoint.
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"not really a pickle").unwrap();
    assert_fails(&out, &run(&ckpt), "refusing to load pickle weights");

    // Copies of the tiny model with one thing broken each.
    let copy = |name: &str| -> PathBuf {
        let dst = dir.path().join(name);
        common::copy_dir(&common::model_dir("tiny-sd15"), &dst);
        dst
    };
    let m = copy("truncated");
    let w = m.join("unet").join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&out, &run(&m), "diffusion_pytorch_model.safetensors");

    let m = copy("garbage");
    std::fs::write(
        m.join("vae").join("diffusion_pytorch_model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    assert_fails(&out, &run(&m), "vae");

    let m = copy("pickle-only");
    std::fs::remove_file(m.join("text_encoder").join("model.safetensors")).unwrap();
    std::fs::write(m.join("text_encoder").join("pytorch_model.bin"), b"pickle").unwrap();
    assert_fails(
        &out,
        &run(&m),
        "pytorch_model.bin: refusing to load pickle weights",
    );

    let m = copy("wrong-shape");
    let cfg = m.join("unet").join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"layers_per_block\": 2", "\"layers_per_block\": 3");
    std::fs::write(&cfg, text).unwrap();
    assert_fails(&out, &run(&m), "unet weights in");

    let m = copy("bad-config");
    let cfg = m.join("unet").join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"");
    std::fs::write(&cfg, text).unwrap();
    assert_fails(&out, &run(&m), "down_block_types");

    let m = copy("bad-json");
    std::fs::write(
        m.join("scheduler").join("scheduler_config.json"),
        b"{ not json",
    )
    .unwrap();
    assert_fails(&out, &run(&m), "scheduler_config.json");

    let m = copy("missing-tokenizer");
    std::fs::remove_file(m.join("tokenizer").join("merges.txt")).unwrap();
    assert_fails(&out, &run(&m), "merges.txt");
}

#[test]
fn init_latents_errors_and_unwritable_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let missing = dir.path().join("nope.safetensors");
    assert_fails(
        &out,
        &generate(&out, &["--init-latents", missing.to_str().unwrap()]),
        "nope.safetensors",
    );

    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"junk").unwrap();
    assert_fails(
        &out,
        &generate(&out, &["--init-latents", junk.to_str().unwrap()]),
        "junk.safetensors",
    );

    // Right file, wrong shape for 64x64 batch 1 (the fixture is [1,4,8,8]; ask for 96x64).
    let good = common::fixtures()
        .join("refs")
        .join("latents_64x64.safetensors");
    let o = generate(
        &out,
        &["--init-latents", good.to_str().unwrap(), "--width", "96"],
    );
    assert_fails(&out, &o, "init latents");

    let named_wrong = dir.path().join("other.safetensors");
    let t = candle_core::Tensor::zeros(
        (1, 4, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("noise".to_string(), t)]),
        &named_wrong,
    )
    .unwrap();
    assert_fails(
        &out,
        &generate(&out, &["--init-latents", named_wrong.to_str().unwrap()]),
        "no tensor named `latents`",
    );

    // An --out that is a file, not a folder.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = generate(&file, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot write"), "{}", stderr(&o));
}

#[test]
fn help_documents_every_flag() {
    let o = bin().args(["generate", "--help"]).output().unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    for flag in [
        "--model",
        "--prompt",
        "--negative-prompt",
        "--seed",
        "--batch",
        "--steps",
        "--guidance",
        "--scheduler",
        "--width",
        "--height",
        "--device",
        "--dtype",
        "--rng",
        "--init-latents",
        "--out",
        "--memory",
        "--attention-slicing",
        "--vae-tiling",
        "--lora",
        "--lora-dir",
        "--embeddings-dir",
        "--models-dir",
    ] {
        assert!(help.contains(flag), "generate --help lacks {flag}");
    }
    let o = bin().arg("--help").output().unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    for cmd in ["generate", "bench", "schedulers"] {
        assert!(help.contains(cmd));
    }
}

#[test]
fn unset_settings_come_from_the_model_and_variation_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = bin();
    c.args([
        "generate",
        "--model",
        &tiny(),
        "--prompt",
        "x",
        "--seed",
        "3",
        "--variation-seed",
        "40",
        "--variation-strength",
        "0.5",
        "--batch",
        "2",
        "--out",
    ])
    .arg(dir.path());
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // tiny-sd15's scheduler_config names PNDMScheduler; its UNet sample size 8 × VAE factor 8.
    assert_eq!(lines[0]["scheduler"], "pndm");
    assert_eq!(lines[0]["steps"], 20);
    assert_eq!(
        (lines[0]["width"].as_u64(), lines[0]["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert_eq!(
        (
            lines[1]["seed"].as_u64(),
            lines[1]["variation_seed"].as_u64()
        ),
        (Some(3), Some(41))
    );
    let path = PathBuf::from(lines[1]["path"].as_str().unwrap());
    assert_eq!(path.file_name().unwrap(), "3-41.png");
    let params = sd_studio::engine::metadata::read_png_parameters(&path)
        .unwrap()
        .unwrap();
    assert!(params.contains("Sampler: PLMS, CFG scale: 7.5, Seed: 3, Size: 64x64, Model: tiny-sd15, Variation seed: 41, Variation seed strength: 0.5, Version"), "{params}");
    assert!(
        !params.contains("RNG:"),
        "torch-cuda is A1111's default GPU noise: no RNG key"
    );

    let out = dir.path().join("bad");
    let o = generate(
        &out,
        &["--variation-seed", "1", "--variation-strength", "1.5"],
    );
    assert_fails(&out, &o, "variation strength");
}

#[test]
fn img2img_and_inpainting_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let init = common::fixtures().join("refs").join("init_64x64.png");
    let init = init.to_str().unwrap();
    // Works, and records the denoising strength.
    let o = generate(
        &out,
        &["--init-image", init, "--strength", "0.5", "--steps", "4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().lines().next().unwrap()).unwrap();
    let params =
        sd_studio::engine::metadata::read_png_parameters(Path::new(line["path"].as_str().unwrap()))
            .unwrap()
            .unwrap();
    assert!(params.contains("Denoising strength: 0.5"), "{params}");

    let out2 = dir.path().join("out2");
    let not_image = dir.path().join("notes.png");
    std::fs::write(&not_image, b"this is text").unwrap();
    assert_fails(
        &out2,
        &generate(&out2, &["--init-image", not_image.to_str().unwrap()]),
        "not a readable image",
    );
    assert_fails(
        &out2,
        &generate(&out2, &["--init-image", init, "--strength", "1.5"]),
        "strength",
    );
    assert_fails(
        &out2,
        &generate(&out2, &["--strength", "0.5"]),
        "needs --init-image",
    );
    assert_fails(
        &out2,
        &generate(&out2, &["--mask", init]),
        "needs --init-image",
    );
    // A colour picture is not a mask.
    assert_fails(
        &out2,
        &generate(&out2, &["--init-image", init, "--mask", init]),
        "grayscale",
    );
    // A mask of another size is resized, and we say so; the legacy method is named.
    let small = dir.path().join("mask.png");
    image::GrayImage::from_fn(16, 16, |x, _| image::Luma([if x < 8 { 255 } else { 0 }]))
        .save(&small)
        .unwrap();
    let o = generate(
        &out2,
        &[
            "--init-image",
            init,
            "--mask",
            small.to_str().unwrap(),
            "--steps",
            "2",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("mask 16x16 fitted to 64x64"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("ordinary model"), "{}", stderr(&o));
}

#[test]
fn hub_ids_resolve_from_the_python_hub_cache_offline() {
    // The layout huggingface_hub (and so diffusers) writes: models--owner--name/refs/main
    // holds the snapshot hash, snapshots/<hash>/ the files.
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--someone--tiny-sd15");
    common::copy_dir(
        &common::model_dir("tiny-sd15"),
        &repo.join("snapshots").join("0123abcd"),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    let out = home.path().join("out");
    for (var, value) in [
        ("HF_HOME", home.path().to_path_buf()),
        ("HF_HUB_CACHE", home.path().join("hub")),
    ] {
        let mut c = bin();
        c.env_remove("HF_HOME")
            .env_remove("HF_HUB_CACHE")
            .env(var, &value);
        c.args([
            "generate",
            "--model",
            "someone/tiny-sd15",
            "--prompt",
            "x",
            "--steps",
            "1",
            "--seed",
            "1",
            "--out",
        ])
        .arg(&out);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{var}: {}", stderr(&o));
    }
    // Not in the cache, offline: a clear message naming the cache.
    let mut c = bin();
    c.env_remove("HF_HUB_CACHE").env("HF_HOME", home.path());
    c.args([
        "generate",
        "--model",
        "someone/other-model",
        "--prompt",
        "x",
        "--out",
    ])
    .arg(&out);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not in the cache") && stderr(&o).contains("HF_HUB_OFFLINE"),
        "{}",
        stderr(&o)
    );

    // A ControlNet repo (config.json + weights at its top) by hub id, named by the repo.
    let cn = home.path().join("hub").join("models--someone--tiny-cn");
    common::copy_dir(
        &common::fixtures().join("controlnet/tiny-cn-sd15"),
        &cn.join("snapshots").join("89abcdef"),
    );
    std::fs::create_dir_all(cn.join("refs")).unwrap();
    std::fs::write(cn.join("refs").join("main"), "89abcdef").unwrap();
    let cn_out = home.path().join("cn-out");
    let mut c = bin();
    c.env_remove("HF_HUB_CACHE").env("HF_HOME", home.path());
    c.args(["generate", "--model", "someone/tiny-sd15", "--prompt", "x"])
        .args([
            "--steps", "1", "--seed", "3", "--width", "64", "--height", "64",
        ])
        .args(["--controlnet", "someone/tiny-cn", "--control-image"])
        .arg(common::fixtures().join("controlnet/control_squares_64.png"))
        .arg("--out")
        .arg(&cn_out);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let params = sd_studio::engine::metadata::read_png_parameters(&cn_out.join("3.png"))
        .unwrap()
        .unwrap();
    assert!(params.contains("Model: tiny-cn ["), "{params}");

    // An SDXL repo in the cache: complete only with text_encoder_2's weights.
    let xl = home.path().join("hub").join("models--someone--tiny-sdxl");
    let snap = xl.join("snapshots").join("4567cdef");
    common::copy_dir(&common::model_dir("tiny-sdxl"), &snap);
    std::fs::create_dir_all(xl.join("refs")).unwrap();
    std::fs::write(xl.join("refs").join("main"), "4567cdef").unwrap();
    let run = || {
        let mut c = bin();
        c.env_remove("HF_HUB_CACHE").env("HF_HOME", home.path());
        c.args([
            "generate",
            "--model",
            "someone/tiny-sdxl",
            "--prompt",
            "x",
            "--steps",
            "1",
        ])
        .arg("--out")
        .arg(&out);
        c.output().unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(snap.join("text_encoder_2")).unwrap();
    let o = run();
    assert!(
        !o.status.success() && stderr(&o).contains("not in the cache"),
        "an SDXL download without text_encoder_2 is incomplete: {}",
        stderr(&o)
    );
}

#[test]
fn lowvram_and_slicing_change_no_pixel_and_the_mode_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let plain = generate(&a, &[]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let low = generate(&b, &["--memory", "lowvram", "--attention-slicing", "5"]);
    assert!(low.status.success(), "{}", stderr(&low));
    assert!(stderr(&low).contains("memory: lowvram"), "{}", stderr(&low));
    let (pa, pb) = (pngs(&a), pngs(&b));
    assert_eq!(pa.len(), 1);
    let (_, _, ra) = common::read_png_rgb(&pa[0]);
    let (_, _, rb) = common::read_png_rgb(&pb[0]);
    assert!(common::max_pixel_diff(&ra, &rb) <= 1);
}

#[test]
fn bench_reports_every_batch_and_the_grid_as_json() {
    let taesd = common::model_dir("tiny-taesd").display().to_string();
    let o = bin()
        .args([
            "bench",
            "--model",
            &tiny(),
            "--batches",
            "1,2",
            "--grid",
            "--taesd",
            &taesd,
        ])
        .args([
            "--steps",
            "2",
            "--runs",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--profile",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    let cases = summary["cases"].as_array().unwrap();
    let kinds: Vec<(String, u64)> = cases
        .iter()
        .map(|c| {
            (
                c["case"].as_str().unwrap().to_string(),
                c["batch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("steps".into(), 1),
            ("steps".into(), 2),
            ("grid".into(), 8),
            ("profile".into(), 1)
        ]
    );
    for c in cases {
        assert!(c["step_s"].as_f64().unwrap() > 0.0, "{c}");
    }
    // The profile names the UNet's parts; their shares cover the whole step.
    let parts = cases[3]["parts"].as_array().unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p["part"].as_str().unwrap()).collect();
    for part in [
        "conv 3x3",
        "groupnorm+silu",
        "self-attention core (QK^T, softmax, PV)",
    ] {
        assert!(names.contains(&part), "{names:?}");
    }
    let shares: f64 = parts.iter().map(|p| p["share"].as_f64().unwrap()).sum();
    assert!((shares - 1.0).abs() < 0.05, "shares add up to {shares}");
    // The VAE decode has its own table, its shares covering the decode.
    let dparts = cases[3]["decode_parts"].as_array().unwrap();
    assert!(
        dparts.iter().any(|p| p["part"] == "vae conv 3x3"),
        "{dparts:?}"
    );
    let shares: f64 = dparts.iter().map(|p| p["share"].as_f64().unwrap()).sum();
    assert!(
        (shares - 1.0).abs() < 0.05,
        "decode shares add up to {shares}"
    );
    assert!(cases[2]["preview_per_step_s"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["memory"], "full");
    // Bad batch lists are named.
    let o = bin()
        .args(["bench", "--model", &tiny(), "--batches", "1,x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("\"x\" in \"1,x\" is not a positive batch size"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn requests_that_cannot_fit_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Over the documented bounds: refused outright, before the model loads.
    assert_fails(
        &out,
        &generate(&out, &["--width", "65536", "--height", "65536"]),
        "larger than 16384",
    );
    assert_fails(
        &out,
        &generate(&out, &["--height", "262144"]),
        "larger than 16384",
    );
    assert_fails(
        &out,
        &generate(&out, &["--batch", "100000"]),
        "more than 64",
    );
    // Within the bounds but far beyond this machine's memory: the estimate refuses it
    // (what it needs, what is free, what to try) instead of the OS killing the process.
    for args in [
        &["--width", "16384", "--height", "16384", "--batch", "4"][..],
        &["--width", "4096", "--height", "4096", "--batch", "64"][..],
    ] {
        let o = generate(&out, args);
        assert_fails(&out, &o, "of RAM but");
        let err = stderr(&o);
        assert!(
            err.contains("needs about") && err.contains("try a smaller"),
            "{err}"
        );
    }
    // Attention slicing off at a size whose unsliced scores do not fit: slicing is suggested.
    // That is the plain attention path (a GPU's, forced here); the CPU's blocked attention
    // builds no score matrix, and the same request then fits.
    let mut c = bin();
    c.env("SD_STUDIO_PLAIN_ATTENTION", "1").arg("generate");
    let model = tiny();
    c.args([
        "--model",
        model.as_str(),
        "--prompt",
        "a cat",
        "--steps",
        "1",
    ]);
    c.args([
        "--width",
        "8192",
        "--height",
        "8192",
        "--attention-slicing",
        "off",
    ]);
    let o = c.arg("--out").arg(&out).output().unwrap();
    assert_fails(&out, &o, "attention slicing on");
}

/// A copy of tiny-sd15 whose UNet file is rewritten by `edit`.
fn with_broken_unet(
    dir: &Path,
    edit: impl FnOnce(&mut common::RawSafetensors) -> Option<String>,
) -> PathBuf {
    let model = dir.join("broken");
    common::copy_dir(&common::model_dir("tiny-sd15"), &model);
    let file = model
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let mut st = common::RawSafetensors::read(&file);
    let text = edit(&mut st);
    st.write(&file, text);
    model
}

#[test]
fn corrupt_weights_are_refused_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |model: &Path| generate(&out, &["--model", model.to_str().unwrap()]);

    // An integer dtype where a float weight belongs (same byte size, so the header is
    // otherwise consistent).
    let m = with_broken_unet(&dir.path().join("a"), |st| {
        st.header["conv_in.weight"]["dtype"] = "I16".into();
        None
    });
    let o = run(&m);
    assert_fails(&out, &o, "conv_in.weight is stored as I16");
    assert!(
        stderr(&o).contains("diffusion_pytorch_model.safetensors"),
        "{}",
        stderr(&o)
    );

    // A shape whose byte size does not match its offsets.
    let m = with_broken_unet(&dir.path().join("b"), |st| {
        st.header["conv_out.bias"]["shape"] = serde_json::json!([5]);
        None
    });
    assert_fails(
        &out,
        &run(&m),
        "tensor conv_out.bias: F16 [5] takes 10 bytes",
    );

    // The same name twice (a JSON map would silently keep one).
    let m = with_broken_unet(&dir.path().join("c"), |st| {
        let text = serde_json::to_string(&st.header).unwrap();
        let entry = serde_json::to_string(&st.header["conv_in.bias"]).unwrap();
        Some(format!("{{\"conv_in.bias\":{entry},{}", &text[1..]))
    });
    assert_fails(&out, &run(&m), "conv_in.bias is listed twice");

    // A file cut short.
    let m = with_broken_unet(&dir.path().join("d"), |st| {
        st.data.truncate(st.data.len() / 2);
        None
    });
    assert_fails(&out, &run(&m), "truncated");

    // NaN weights: named at the first output they poison.
    let m = with_broken_unet(&dir.path().join("e"), |st| {
        let r = st.range("conv_out.weight");
        for pair in st.data[r].chunks_mut(2) {
            pair.copy_from_slice(&0x7e00u16.to_le_bytes()); // f16 NaN
        }
        None
    });
    let o = run(&m);
    assert_fails(&out, &o, "not finite");
    assert!(
        stderr(&o).contains("unet weights in") && stderr(&o).contains("step 1"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn compared_models_with_the_same_name_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let json_lines = |o: &Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Two diffusers folders both called `foo` (different models: SD 1.5 and SD 2.x).
    let (a, b) = (dir.path().join("a/foo"), dir.path().join("b/foo"));
    common::copy_dir(&common::model_dir("tiny-sd15"), &a);
    common::copy_dir(&common::model_dir("tiny-sd2v"), &b);
    let out = dir.path().join("out");
    let grid = dir.path().join("grid.png");
    let o = generate(
        &out,
        &[
            "--model",
            a.to_str().unwrap(),
            "--model",
            b.to_str().unwrap(),
            "--batch",
            "2",
            "--grid",
            grid.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    let models: Vec<&str> = lines[..4]
        .iter()
        .map(|l| l["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["a/foo", "a/foo", "b/foo", "b/foo"]);
    assert_eq!(lines[4]["rows"], serde_json::json!(["a/foo", "b/foo"]));
    assert_eq!(pngs(&out).len(), 4, "every image under its own name");

    // Two single files both called `model.safetensors`, in folders x/ and y/.
    let single = common::fixtures()
        .join("single")
        .join("tiny-sd15.safetensors");
    for d in ["x", "y"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
        std::fs::copy(&single, dir.path().join(d).join("model.safetensors")).unwrap();
    }
    let (x, y) = (
        dir.path().join("x/model.safetensors"),
        dir.path().join("y/model.safetensors"),
    );
    let out2 = dir.path().join("out2");
    let config = common::model_dir("tiny-sd15");
    let o = generate(
        &out2,
        &[
            "--model",
            x.to_str().unwrap(),
            "--model",
            y.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let models: Vec<String> = json_lines(&o)
        .iter()
        .map(|l| l["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(models, ["x/model.safetensors", "y/model.safetensors"]);
    assert_eq!(pngs(&out2).len(), 2);
}

/// Every PNG under its final name decodes completely.
fn assert_all_pngs_whole(dir: &Path) -> usize {
    let mut n = 0;
    for p in pngs(dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        let bytes = std::fs::read(p).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader
            .next_frame(&mut buf)
            .unwrap_or_else(|e| panic!("{} is partial: {e}", p.display()));
        n += 1;
    }
    n
}

#[test]
fn kill_9_while_writing_never_leaves_a_partial_png_and_temps_are_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = tiny();
    let mut killed = 0;
    // 8 images of 256² each: the writes take long enough for kills to land among them.
    for (i, delay_ms) in [300u64, 450, 600, 750, 900, 1100, 1300, 1600]
        .into_iter()
        .enumerate()
    {
        let mut child = bin()
            .args([
                "generate", "--model", &model, "--prompt", "a cat", "--steps", "1",
            ])
            .args([
                "--width",
                "256",
                "--height",
                "256",
                "--batch",
                "8",
                "--guidance",
                "1",
            ])
            .args([
                "--seed",
                &(100 * i).to_string(),
                "--out",
                out.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        assert_all_pngs_whole(&out);
    }
    eprintln!(
        "killed {killed} of 8 runs; {} whole PNGs",
        assert_all_pngs_whole(&out)
    );
    // The next run removes what killed runs left behind: here also a half-written
    // temporary file of a process that is gone (pids never reach 2^22 + 99 on Linux).
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join(".1234.png.4194403.tmp"), b"\x89PNG half").unwrap();
    let temps_before = std::fs::read_dir(&out)
        .map(|r| {
            r.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                .count()
        })
        .unwrap_or(0);
    let o = generate(&out, &["--seed", "9999"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(temps_before >= 1);
    let temps: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    eprintln!(
        "temporary files before the next run: {temps_before} (one planted), after it: {}",
        temps.len()
    );
    assert!(temps.is_empty(), "left over: {temps:?}");
}

/// A small tmpfs mounted for the test (root in a sandbox can mount one; elsewhere None),
/// unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?
            .success();
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_and_read_only_outputs_fail_with_the_reason_and_keep_earlier_images() {
    let dir = tempfile::tempdir().unwrap();
    // Disk full: a 24 KiB filesystem holds a few 64² PNGs (~12 KB each) of a batch of 8.
    let full = dir.path().join("full");
    match Tmpfs::mount(&full, "size=24k") {
        Some(_fs) => {
            let o = generate(&full, &["--batch", "8"]);
            assert!(!o.status.success());
            let err = stderr(&o);
            assert!(err.contains("cannot write") && err.contains("No space left"), "{err}");
            let kept = assert_all_pngs_whole(&full);
            assert!((1..8).contains(&kept), "{kept} images kept");
            let left: Vec<_> = std::fs::read_dir(&full).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
            assert!(left.is_empty(), "a failed write left its temporary file");
        }
        None => eprintln!("cannot mount a tmpfs here: disk-full case skipped (the read-only case simulates the write error)"),
    }
    // Read-only: a read-only mount, or (without mount) a path under a file.
    let ro = dir.path().join("ro");
    let (_fs, target) = match Tmpfs::mount(&ro, "ro,size=64k") {
        Some(fs) => (Some(fs), ro.clone()),
        None => {
            std::fs::write(&ro, b"x").unwrap();
            (None, ro.join("sub"))
        }
    };
    let o = generate(&target, &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.starts_with("error: cannot write"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn sdxl_generates_with_its_size_conditions_and_sits_beside_sd15_in_compare() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sdxl = common::model_dir("tiny-sdxl").display().to_string();
    let o = generate(
        &out,
        &[
            "--model",
            &sdxl,
            "--original-size",
            "2048x1536",
            "--crops-coords-top-left",
            "16,8",
            "--prompt",
            "a (red:1.2) fox BREAK snow",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let png = pngs(&out).pop().unwrap();
    let text = sd_studio::engine::metadata::read_png_parameters(&png)
        .unwrap()
        .unwrap();
    assert!(
        text.contains("Model: tiny-sdxl")
            && text.contains("Original size: 2048x1536")
            && text.contains("Crop coords top left: \"16,8\"")
            && !text.contains("Target size"),
        "{text}"
    );
    // The size conditions reach the UNet: another original size, another image.
    let out2 = dir.path().join("out2");
    let o = generate(
        &out2,
        &["--model", &sdxl, "--prompt", "a (red:1.2) fox BREAK snow"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b) = (
        common::read_png_rgb(&png).2,
        common::read_png_rgb(&pngs(&out2)[0]).2,
    );
    assert_ne!(a, b, "--original-size changed nothing");
    // Bad values are named.
    let o = generate(&out2, &["--model", &sdxl, "--target-size", "1024x"]);
    assert!(
        !o.status.success() && stderr(&o).contains("--target-size"),
        "{}",
        stderr(&o)
    );
    let o = generate(
        &out2,
        &["--model", &sdxl, "--crops-coords-top-left", "-1,2"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("X,Y with whole numbers"),
        "{}",
        stderr(&o)
    );

    // Compare across families: each row's model with its own encoders, same seeds.
    let out3 = dir.path().join("out3");
    let grid = dir.path().join("grid.png");
    let o = generate(
        &out3,
        &[
            "--model",
            &tiny(),
            "--model",
            &sdxl,
            "--batch",
            "2",
            "--grid",
            grid.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["rows"], serde_json::json!(["tiny-sd15", "tiny-sdxl"]));
    assert_eq!(pngs(&out3).len(), 4);
}

#[test]
fn lora_tags_and_embeddings_from_the_cli_match_diffusers_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let (loras, embs) = (fx.join("lora"), fx.join("embeddings"));
    let o = generate(
        dir.path(),
        &[
            "--prompt",
            "<lora:kohya_locon:1>a photo of tinyemb riding a horse",
            "--negative-prompt",
            "blurry, low quality",
            "--scheduler",
            "euler",
            "--steps",
            "8",
            "--guidance",
            "7.5",
            "--rng",
            "torch-cpu",
            "--seed",
            "42",
            "--batch",
            "2",
            "--lora-dir",
            loras.to_str().unwrap(),
            "--embeddings-dir",
            embs.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("LoRAs: kohya_locon"), "{}", stderr(&o));
    let cases = common::refs_json("lora_cases.json");
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ti_with_lora")
        .unwrap();
    for (seed, want) in [42, 43].iter().zip(case["images"].as_array().unwrap()) {
        let path = dir.path().join(format!("{seed}.png"));
        let (_, _, got) = common::read_png_rgb(&path);
        let (_, _, want) = common::read_png_rgb(&fx.join(want.as_str().unwrap()));
        let d = common::max_pixel_diff(&got, &want);
        assert!(d <= 2, "seed {seed}: max |Δpixel| {d}");
        let params = sd_studio::engine::metadata::read_png_parameters(&path)
            .unwrap()
            .unwrap();
        assert!(
            params.starts_with("<lora:kohya_locon:1>a photo of tinyemb"),
            "{params}"
        );
        let parsed = sd_studio::engine::metadata::parse_a1111(&params).unwrap();
        let loras = parsed.lora_hashes();
        assert_eq!(loras.len(), 1, "{params}");
        assert_eq!(loras[0].0, "kohya_locon");
        let tis = parsed.ti_hashes();
        assert_eq!(tis.len(), 1, "{params}");
        assert_eq!(tis[0].0, "tinyemb");
    }
}

#[test]
fn bad_loras_give_one_clear_line_and_no_png() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let loras = fx.join("lora");
    let loras = loras.to_str().unwrap();
    let cut = dir.path().join("cut.safetensors");
    let bytes = std::fs::read(fx.join("lora/kohya_locon.safetensors")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let sdxl = fx.join("lora/sdxl/sdxl_kohya.safetensors");
    let out = dir.path().join("out");
    for (extra, needle) in [
        (
            vec!["--lora", "missing.safetensors"],
            "LoRA file not found: missing.safetensors",
        ),
        (vec!["--lora", cut.to_str().unwrap()], "truncated"),
        (
            vec!["--lora", &format!("{}:heavy", sdxl.display())],
            "the weight \"heavy\" is not a number",
        ),
        (
            vec!["--prompt", "a cat <lora:nobody:1>", "--lora-dir", loras],
            "LoRA \"nobody\"",
        ),
        (
            vec![
                "--prompt",
                "a cat <lora:kohya_locon:x>",
                "--lora-dir",
                loras,
            ],
            "\"x\" is not a number",
        ),
        (
            vec!["--lora", sdxl.to_str().unwrap()],
            "is a LoRA for SDXL, but the model is SD 1.x",
        ),
        (
            vec!["--lora-dir", "no/such/dir"],
            "folder not found: no/such/dir",
        ),
    ] {
        let o = generate(&out, &extra);
        assert_fails(&out, &o, needle);
    }
}

#[test]
fn controlnet_from_the_cli_matches_diffusers_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let cn = fx.join("controlnet/tiny-cn-sd15");
    let squares = fx.join("controlnet/control_squares_64.png");
    let o = generate(
        dir.path(),
        &[
            REFERENCE_CASE,
            &[
                "--controlnet",
                cn.to_str().unwrap(),
                "--control-image",
                squares.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cases = common::refs_json("controlnet_cases.json");
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "scale1")
        .unwrap();
    for (seed, want) in [42, 43].iter().zip(case["images"].as_array().unwrap()) {
        let path = dir.path().join(format!("{seed}.png"));
        let (_, _, got) = common::read_png_rgb(&path);
        let (_, _, want) = common::read_png_rgb(&fx.join(want.as_str().unwrap()));
        let d = common::max_pixel_diff(&got, &want);
        assert!(d <= 2, "seed {seed}: max |Δpixel| {d}");
        let params = sd_studio::engine::metadata::read_png_parameters(&path)
            .unwrap()
            .unwrap();
        let parsed = sd_studio::engine::metadata::parse_a1111(&params).unwrap();
        let units = parsed.controlnets();
        assert_eq!(units.len(), 1, "{params}");
        assert_eq!(units[0].module, "none");
        assert_eq!(units[0].model_name(), "tiny-cn-sd15");
        assert!(
            params.contains("ControlNet 0: \"Module: none, Model: tiny-cn-sd15 ["),
            "{params}"
        );
        assert!(
            params.contains("Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0\""),
            "{params}"
        );
    }

    // A photograph through the built-in Canny steers every image of the batch: each differs
    // from the same seed without it, and the recorded module is canny.
    let photo = fx.join("refs/canny/astronaut.png");
    let with = dir.path().join("canny");
    let without = dir.path().join("plain");
    let common_args = ["--batch", "2", "--seed", "5", "--steps", "4"];
    let mut args: Vec<&str> = common_args.to_vec();
    args.extend([
        "--controlnet",
        cn.to_str().unwrap(),
        "--control-image",
        photo.to_str().unwrap(),
        "--control-preprocess",
        "canny",
        "--control-scale",
        "0.8",
        "--control-end",
        "0.75",
    ]);
    let o = generate(&with, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = generate(&without, &common_args);
    assert!(o.status.success(), "{}", stderr(&o));
    for seed in [5, 6] {
        let a = common::read_png_rgb(&with.join(format!("{seed}.png"))).2;
        let b = common::read_png_rgb(&without.join(format!("{seed}.png"))).2;
        assert!(
            common::max_pixel_diff(&a, &b) > 10,
            "seed {seed}: the edge map did not steer the image"
        );
        let params =
            sd_studio::engine::metadata::read_png_parameters(&with.join(format!("{seed}.png")))
                .unwrap()
                .unwrap();
        assert!(
            params.contains("Module: canny, Model: tiny-cn-sd15 [")
                && params.contains("Weight: 0.8, Guidance Start: 0.0, Guidance End: 0.75"),
            "{params}"
        );
    }
}

#[test]
fn bad_controlnet_inputs_give_one_clear_line_and_no_png() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let cn = fx.join("controlnet/tiny-cn-sd15");
    let cn = cn.to_str().unwrap();
    let xl = fx.join("controlnet/tiny-cn-sdxl");
    let squares = fx.join("controlnet/control_squares_64.png");
    let squares = squares.to_str().unwrap();
    let pickle = dir.path().join("control_sd15_canny.pth");
    std::fs::write(&pickle, b"PK\x03\x04 not really").unwrap();
    let checkpoint = fx.join("single/tiny-sd15.safetensors");
    let out = dir.path().join("out");
    for (extra, needle) in [
        (
            vec!["--controlnet", cn, "--control-image", "missing.png"],
            "image not found: missing.png",
        ),
        (
            vec!["--controlnet", cn],
            "0 --control-image for 1 --controlnet",
        ),
        (
            vec!["--control-image", squares],
            "control image: needs --controlnet",
        ),
        (
            vec![
                "--controlnet",
                xl.to_str().unwrap(),
                "--control-image",
                squares,
            ],
            "is a ControlNet for SDXL and the model is SD 1.x/2.x",
        ),
        (
            vec![
                "--controlnet",
                cn,
                "--control-image",
                squares,
                "--control-scale",
                "NaN",
            ],
            "control scale NaN is not a finite number",
        ),
        (
            vec![
                "--controlnet",
                cn,
                "--control-image",
                squares,
                "--control-start",
                "0.8",
                "--control-end",
                "0.3",
            ],
            "control start 0.8 must be smaller than control end 0.3",
        ),
        (
            vec![
                "--controlnet",
                cn,
                "--control-image",
                squares,
                "--control-preprocess",
                "depth",
            ],
            "\"depth\" is not one of: none, canny",
        ),
        (
            vec![
                "--controlnet",
                pickle.to_str().unwrap(),
                "--control-image",
                squares,
            ],
            "pickle",
        ),
        (
            vec![
                "--controlnet",
                checkpoint.to_str().unwrap(),
                "--control-image",
                squares,
            ],
            "a Stable Diffusion checkpoint, not a ControlNet",
        ),
        (
            vec![
                "--controlnet",
                "no/such/controlnet",
                "--control-image",
                squares,
            ],
            "no/such/controlnet",
        ),
    ] {
        let o = generate(&out, &extra);
        assert_fails(&out, &o, needle);
    }
}

#[test]
fn bench_runs_its_cases_with_a_controlnet() {
    let cn = common::fixtures().join("controlnet/tiny-cn-sd15");
    let o = bin()
        .args([
            "bench",
            "--model",
            &tiny(),
            "--width",
            "64",
            "--height",
            "64",
        ])
        .args(["--steps", "2", "--runs", "1", "--controlnet"])
        .arg(&cn)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let summary: serde_json::Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("cases").is_some())
        .expect("a summary line");
    assert_eq!(summary["controlnets"][0], cn.display().to_string());
    assert!(summary["step_s"].as_f64().unwrap() > 0.0, "{summary}");
    // A ControlNet for another architecture is refused before the bench loads anything.
    let xl = common::fixtures().join("controlnet/tiny-cn-sdxl");
    let o = bin()
        .args(["bench", "--model", &tiny(), "--controlnet"])
        .arg(&xl)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is a ControlNet for SDXL"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn hires_fix_from_the_cli_matches_diffusers_and_writes_a1111s_fields() {
    let dir = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let o = generate(
        dir.path(),
        &[
            REFERENCE_CASE,
            &[
                "--hires-scale",
                "2",
                "--hires-strength",
                "0.55",
                "--hires-steps",
                "10",
            ],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("step 13/13"), "{}", stderr(&o));
    let cases = common::refs_json("hires_cases.json");
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hires_latent")
        .unwrap();
    for (seed, want) in [42, 43].iter().zip(case["images"].as_array().unwrap()) {
        let path = dir.path().join(format!("{seed}.png"));
        let (w, h, got) = common::read_png_rgb(&path);
        assert_eq!((w, h), (128, 128));
        let (_, _, want) = common::read_png_rgb(&fx.join(want.as_str().unwrap()));
        let d = common::max_pixel_diff(&got, &want);
        assert!(d <= 2, "seed {seed}: max |Δpixel| {d}");
        let params = sd_studio::engine::metadata::read_png_parameters(&path)
            .unwrap()
            .unwrap();
        assert!(
            params.contains("Size: 64x64")
                && params.contains(
                    "Denoising strength: 0.55, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent"
                ),
            "{params}"
        );
    }
    // A size instead of a scale is "Hires resize"; Lanczos is A1111's name.
    let o = generate(
        &dir.path().join("resize"),
        &["--hires-width", "96", "--hires-upscaler", "lanczos"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let p = dir.path().join("resize/7.png");
    assert_eq!(common::read_png_rgb(&p).0, 96);
    let params = sd_studio::engine::metadata::read_png_parameters(&p)
        .unwrap()
        .unwrap();
    assert!(
        params.contains("Denoising strength: 0.7, Hires resize: 96x96, Hires upscaler: Lanczos"),
        "{params}"
    );
}

#[test]
fn bad_hires_flags_give_one_clear_line_and_no_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (extra, needle) in [
        (
            vec!["--hires-strength", "0.5"],
            "hires strength: needs --hires-scale",
        ),
        (
            vec!["--hires-scale", "2", "--hires-upscaler", "ESRGAN_4x"],
            "\"esrgan_4x\" is not one of: latent, latent-nearest, lanczos",
        ),
        (
            vec!["--hires-scale", "0.5"],
            "hires scale: 0.5 is not a number ≥ 1",
        ),
        (
            vec!["--hires-scale", "2", "--hires-strength", "NaN"],
            "hires strength: NaN is outside 0..1",
        ),
        (
            vec![
                "--hires-scale",
                "2",
                "--hires-strength",
                "0.1",
                "--scheduler",
                "euler",
            ],
            "runs no step",
        ),
    ] {
        let o = generate(&out, &extra);
        assert_fails(&out, &o, needle);
    }
}
