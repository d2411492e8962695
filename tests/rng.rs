//! Noise from `--rng torch-cpu` against values drawn by `torch.randn` with
//! `torch.Generator("cpu").manual_seed(seed)` (refs/randn.*, made by make_fixtures.py).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use sd_studio::engine::rng::TorchCpuRng;

/// Values must agree to float rounding: PyTorch on AVX2-only CPUs uses a vectorised
/// log/sin/cos that may differ from libm by an ulp or two.
fn assert_close(name: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{name}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let tol = 4.0 * f32::EPSILON * b.abs().max(1.0);
        assert!((a - b).abs() <= tol, "{name}[{i}]: ours {a} vs torch {b}");
    }
}

#[test]
fn randn_matches_torch_for_every_shape_and_seed() {
    let meta = common::refs_json("randn.json");
    let tensors = common::load_safetensors("randn.safetensors");
    let entries = meta["tensors"].as_array().expect("tensors list");
    let mut singles = 0;
    for e in entries.iter().filter(|e| e["position"].is_null()) {
        let name = e["name"].as_str().unwrap();
        let seed = e["seed"].as_u64().unwrap();
        let numel: usize = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .product();
        let theirs = tensors[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ours = TorchCpuRng::new(seed).randn(numel);
        assert_close(name, &ours, &theirs);
        singles += 1;
    }
    assert!(singles >= 30, "expected many single draws, found {singles}");
}

#[test]
fn consecutive_draws_on_one_generator_match_torch() {
    let meta = common::refs_json("randn.json");
    let tensors = common::load_safetensors("randn.safetensors");
    let mut seqs: std::collections::BTreeMap<u64, Vec<&serde_json::Value>> = Default::default();
    for e in meta["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| !e["position"].is_null())
    {
        seqs.entry(e["seed"].as_u64().unwrap()).or_default().push(e);
    }
    assert!(seqs.len() >= 2, "expected at least two draw sequences");
    for (seed, mut draws) in seqs {
        draws.sort_by_key(|e| e["position"].as_u64().unwrap());
        let mut rng = TorchCpuRng::new(seed);
        for e in draws {
            let name = e["name"].as_str().unwrap();
            let numel: usize = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .product();
            let theirs = tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_close(name, &rng.randn(numel), &theirs);
        }
    }
}
