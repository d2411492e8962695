//! A1111 prompt syntax against a second implementation of its semantics in our reference
//! script (tests/make_fixtures.py, with transformers' CLIP): chunk token ids, per-token
//! weights, and the final conditioning tensor (weights, BREAK, >75 tokens, clip skip).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use std::collections::HashMap;

use sd_studio::engine::pipeline::StableDiffusion;
use sd_studio::engine::prompt;

#[test]
fn conditioning_matches_the_reference() {
    let meta = common::refs_json("prompts.json");
    let refs = common::load_safetensors("prompts.safetensors");
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let entries = meta.as_array().unwrap();
    assert!(entries.len() >= 14);
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let model = e["model"].as_str().unwrap().to_string();
        let p = e["prompt"].as_str().unwrap();
        let clip_skip = e["clip_skip"].as_u64().unwrap() as usize;
        let sd = models
            .entry(model.clone())
            .or_insert_with(|| common::load_model(&model));
        let t = prompt::tokenize(sd.tokenizer(), p).unwrap();
        let want_ids: Vec<Vec<i64>> = refs[&format!("{name}_ids")].to_vec2().unwrap();
        let want_w: Vec<Vec<f32>> = refs[&format!("{name}_weights")].to_vec2().unwrap();
        assert_eq!(
            t.chunks.len(),
            want_ids.len(),
            "{name}: chunk count for {p:?}"
        );
        for (c, (ids, ws)) in t.chunks.iter().zip(want_ids.iter().zip(&want_w)) {
            let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            assert_eq!(c.ids, ids, "{name}: ids for {p:?}");
            for (a, b) in c.weights.iter().zip(ws) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{name}: weights {:?} vs {ws:?}",
                    c.weights
                );
            }
        }
        let cond = sd.encode_prompt(p, clip_skip).unwrap();
        let e = common::rel_err(&cond, &refs[&format!("{name}_cond")]);
        assert!(
            e <= 1e-4,
            "{name}: conditioning relative error {e} for {p:?}"
        );
    }
}

#[test]
fn token_count_and_huge_prompts() {
    let sd = common::load_model("tiny-sd15");
    let t = prompt::tokenize(sd.tokenizer(), "a cat").unwrap();
    assert_eq!((t.token_count, t.chunks.len()), (2, 1));
    // 10,000 tokens: works (slowly in a real model), one chunk per 75 tokens.
    let huge = "cat ".repeat(10_000);
    let t = prompt::tokenize(sd.tokenizer(), &huge).unwrap();
    assert_eq!(t.chunks.len(), 134);
    assert_eq!(t.token_count, 10_000);
    let cond = sd.encode_prompt(&huge, 1).unwrap();
    assert_eq!(cond.dims(), &[1, 134 * 77, 16]);
}

/// SDXL: the same syntax on both encoders (each weighted on its own, then side by side), the
/// pooled embedding from the first chunk, against the reference script's implementation.
#[test]
fn sdxl_conditioning_matches_the_reference() {
    let meta = common::refs_json("prompts_sdxl.json");
    let refs = common::load_safetensors("prompts_sdxl.safetensors");
    let sd = common::load_model("tiny-sdxl");
    let entries = meta.as_array().unwrap();
    assert!(entries.len() >= 6);
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let p = e["prompt"].as_str().unwrap();
        let req = sd_studio::engine::pipeline::GenerateRequest {
            width: 64,
            height: 64,
            ..Default::default()
        };
        let got = sd.encode(p, &req).unwrap();
        let err = common::rel_err(&got.context, &refs[&format!("{name}_cond")]);
        assert!(
            err <= 1e-4,
            "{name}: context relative error {err} for {p:?}"
        );
        let pooled = &refs[&format!("{name}_pooled")];
        let added = got.added.unwrap();
        let err = common::rel_err(&added.narrow(1, 0, pooled.dim(1).unwrap()).unwrap(), pooled);
        assert!(err <= 1e-4, "{name}: pooled relative error {err} for {p:?}");
    }
}
