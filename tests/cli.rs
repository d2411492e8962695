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
