//! Memory modes on the tiny fixtures: attention slicing and tiled VAE decode against
//! diffusers, and medvram / lowvram (weights staged in RAM, built on the device while in
//! use) giving exactly the images of the full mode.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use candle_core::{DType, Device};
use sd_studio::engine::cache::{LoadOptions, ModelCache};
use sd_studio::engine::memory::{MemoryMode, MemoryOptions, Offload, Slicing, Tiling};
use sd_studio::engine::model::ModelFiles;
use sd_studio::engine::pipeline::{decode_with, GenerateRequest, StableDiffusion};
use sd_studio::engine::schedulers::SchedulerKind;
use sd_studio::engine::unet::Forward;

fn load(offload: Offload) -> StableDiffusion {
    load_model("tiny-sd15", offload)
}

fn load_model(name: &str, offload: Offload) -> StableDiffusion {
    let files = ModelFiles::from_dir(&common::model_path(name), false).unwrap();
    StableDiffusion::load_offloaded(files, Device::Cpu, DType::F32, offload).unwrap()
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: "blurry".into(),
        seed: 11,
        batch: 2,
        steps: 3,
        guidance: 7.0,
        scheduler: SchedulerKind::DpmPp2MKarras,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

fn pixels(sd: &mut StableDiffusion) -> Vec<Vec<u8>> {
    sd.generate(&request(), &mut |_| Ok(()))
        .unwrap()
        .into_iter()
        .map(|i| i.rgb)
        .collect()
}

#[test]
fn sliced_attention_matches_diffusers_unet() {
    let sd = common::load_model("tiny-sd15");
    let refs = common::load_safetensors("components_tiny-sd15.safetensors");
    let t = refs["unet_timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let unet = sd.unet().unwrap();
    let whole = unet
        .forward(&refs["unet_sample"], t, &refs["text_out"])
        .unwrap();
    // 8×8 latents: 64 queries at the top level; slices of 7 leave a remainder of 1.
    for q in [1, 7, 16] {
        let sliced = unet
            .forward_with(
                &refs["unet_sample"],
                t,
                &refs["text_out"],
                Forward {
                    attention_slice: Some(q),
                    ..Default::default()
                },
            )
            .unwrap();
        let e = common::rel_err(&sliced, &refs["unet_out"]);
        assert!(e <= 1e-4, "slice {q}: relative error {e} against diffusers");
        let e = common::rel_err(&sliced, &whole);
        assert!(e <= 1e-6, "slice {q}: relative error {e} against unsliced");
    }
}

#[test]
fn sliced_generation_gives_the_same_images() {
    let mut sd = common::load_model("tiny-sd15");
    let whole = pixels(&mut sd);
    sd.set_memory_options(MemoryOptions {
        attention: Slicing::Queries(5),
        ..Default::default()
    });
    let sliced = pixels(&mut sd);
    for (a, b) in whole.iter().zip(&sliced) {
        assert!(
            common::max_pixel_diff(a, b) <= 1,
            "slicing changed an image"
        );
    }
}

#[test]
fn tiled_decode_matches_diffusers() {
    let sd = common::load_model("tiny-sd15");
    let refs = common::load_safetensors("vae_tiling_tiny-sd15.safetensors");
    let vae = sd.vae().unwrap();
    let tile = sd.files.vae_config.tile();
    assert_eq!(tile, (8, 64), "the tiny VAE's sample_size is 64");
    let tiled = decode_with(&vae, &refs["latents"], Some(tile)).unwrap();
    assert_eq!(tiled.dims(), &[1, 3, 160, 224]);
    let e = common::rel_err(&tiled, &refs["tiled"]);
    assert!(
        e <= 1e-4,
        "tiled decode: relative error {e} against diffusers"
    );
    // The tiles really are blended (a whole decode differs), and untiled still matches.
    let whole = decode_with(&vae, &refs["latents"], None).unwrap();
    assert!(common::rel_err(&whole, &refs["full"]) <= 1e-4);
    assert!(common::rel_err(&tiled, &refs["full"]) > 1e-3);
}

#[test]
fn tiling_setting_reaches_the_decoder() {
    let mut sd = common::load_model("tiny-sd15");
    let mut req = request();
    (req.width, req.height, req.batch) = (160, 96, 1);
    let whole = sd.generate(&req, &mut |_| Ok(())).unwrap().remove(0).rgb;
    sd.set_memory_options(MemoryOptions {
        vae_tiling: Tiling::On,
        ..Default::default()
    });
    let tiled = sd.generate(&req, &mut |_| Ok(())).unwrap().remove(0).rgb;
    assert_eq!(tiled.len(), whole.len());
    let d = common::max_pixel_diff(&whole, &tiled);
    assert!(d > 0, "tiling on changed nothing");
    // Seams are blended: close to the whole decode on average.
    let mean = whole
        .iter()
        .zip(&tiled)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / whole.len() as f64;
    assert!(
        mean < 8.0,
        "tiled image far from the whole one (mean diff {mean})"
    );
}

#[test]
fn medvram_keeps_one_component_on_the_device_and_changes_no_pixel() {
    let mut full = load(Offload::Full);
    let expected = pixels(&mut full);

    let mut med = load(Offload::Medvram);
    let (t, u, v) = med.parts();
    assert!(t.is_staged() && u.is_staged() && v.is_staged());
    assert!(!t.on_device() && !u.on_device() && !v.on_device());
    assert_eq!(pixels(&mut med), expected);
    let (t, u, v) = med.parts();
    // After decoding only the VAE is on the device; each was built once at load (to check
    // the weights) and once for the job.
    assert!(!t.on_device() && !u.on_device() && v.on_device());
    assert_eq!((t.builds(), u.builds(), v.builds()), (2, 2, 2));
    // A second job builds each again (the UNet stays while its steps run).
    assert_eq!(pixels(&mut med), expected);
    let (t, u, v) = med.parts();
    assert_eq!((t.builds(), u.builds(), v.builds()), (3, 3, 3));
}

#[test]
fn lowvram_streams_the_unet_and_changes_no_pixel() {
    let mut full = load(Offload::Full);
    let expected = pixels(&mut full);
    let mut low = load(Offload::Lowvram);
    assert!(low.unet().unwrap().is_streamed());
    assert!(low.parts().0.is_staged() && low.parts().2.is_staged());
    assert_eq!(pixels(&mut low), expected);
}

/// SDXL's second text encoder and added conditions through medvram and lowvram.
#[test]
fn sdxl_medvram_and_lowvram_change_no_pixel() {
    let expected = pixels(&mut load_model("tiny-sdxl", Offload::Full));
    let mut med = load_model("tiny-sdxl", Offload::Medvram);
    assert_eq!(pixels(&mut med), expected);
    assert!(!med.parts().0.on_device() && med.parts().2.on_device());
    assert_eq!(
        pixels(&mut load_model("tiny-sdxl", Offload::Lowvram)),
        expected
    );
}

#[test]
fn cache_loads_the_mode_asked_for() {
    let mut cache = ModelCache::new(u64::MAX);
    let model = common::model_path("tiny-sd15").display().to_string();
    let mut opts = LoadOptions::new(&model, "cpu", "f32");
    let auto = cache.get(&opts, &mut |_, _| {}).unwrap();
    // Auto on the CPU keeps everything resident.
    assert_eq!(
        (auto.sd.offload, auto.placement.as_str()),
        (Offload::Full, "full")
    );
    opts.memory = MemoryMode::Medvram;
    let med = cache.get(&opts, &mut |_, _| {}).unwrap();
    assert_eq!(med.sd.offload, Offload::Medvram);
    assert!(med.sd.parts().1.is_staged());
    // A staged UNet is a different component from the resident one: loaded, not shared.
    assert_eq!(cache.stats.loaded, [2, 2, 2]);
}

#[test]
fn bad_memory_names_are_refused_by_name() {
    for (e, what) in [
        (MemoryMode::parse("huge").unwrap_err(), "memory mode"),
        (Slicing::parse("-3").unwrap_err(), "attention slicing"),
        (Tiling::parse("maybe").unwrap_err(), "VAE tiling"),
    ] {
        let msg = e.to_string();
        assert!(msg.contains(what), "{msg}");
    }
}

/// The half-precision code paths (what the CUDA build runs in f16 or bf16) on the CPU: the
/// tiny models in f16 and bf16 against f32. A wrong upcast, an overflow or a NaN shows as a
/// large difference or an error; rounding alone stays small (bf16 keeps 8 bits of mantissa
/// against f16's 11, so its bound is wider). PyTorch on the same tiny SD 1.5 job (diffusers
/// 0.42.1, CPU): f16 max 2, mean 0.12; bf16 max 10, mean 1.11. Ours: f16 1 / 0.14, bf16
/// 10 / 1.29; a bf16 softmax (candle's, summing in bf16) had made it 15 / 2.00.
#[test]
fn half_precision_on_the_cpu_stays_close_to_f32() {
    for name in ["tiny-sd15", "tiny-sdxl"] {
        let load = |dtype| {
            let files =
                ModelFiles::from_dir(&common::model_path(name), dtype != DType::F32).unwrap();
            StableDiffusion::load(files, Device::Cpu, dtype).unwrap()
        };
        let want = pixels(&mut load(DType::F32));
        for (dtype, bound, mean_bound) in [(DType::F16, 4, 0.3), (DType::BF16, 14, 1.8)] {
            let got = pixels(&mut load(dtype));
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| common::max_pixel_diff(a, b))
                .max()
                .unwrap();
            let mean = got
                .iter()
                .zip(&want)
                .map(|(a, b)| common::mean_pixel_diff(a, b))
                .fold(0f64, f64::max);
            eprintln!("{name} {dtype:?} vs f32: max |Δpixel| = {d}, mean {mean:.3}");
            assert!(d <= bound, "{name} {dtype:?}: max |Δpixel| {d} > {bound}");
            assert!(
                mean < mean_bound,
                "{name} {dtype:?}: mean |Δpixel| {mean:.3} >= {mean_bound}"
            );
        }
    }
}

#[test]
fn dtype_names_and_the_cpu_default() {
    for (name, want) in [
        ("f16", DType::F16),
        ("bf16", DType::BF16),
        ("auto", DType::F32),
    ] {
        assert_eq!(
            sd_studio::engine::dtype_for(name, &Device::Cpu).unwrap(),
            want
        );
    }
    let e = sd_studio::engine::dtype_for("f8", &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dtype") && e.contains("\"f8\""), "{e}");
}
