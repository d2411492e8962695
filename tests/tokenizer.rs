//! Token ids against transformers' CLIPTokenizer (what diffusers uses), for SD 1.5's
//! tokenizer (pads with <|endoftext|>) and SD 2's (pads with "!").

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use sd_studio::engine::tokenizer::ClipTokenizer;

#[test]
fn token_ids_match_transformers_on_tricky_prompts() {
    let sd15 = ClipTokenizer::from_dir(&common::model_dir("tiny-sd15").join("tokenizer")).unwrap();
    let sd2 = ClipTokenizer::from_dir(&common::model_dir("tiny-sd2v").join("tokenizer")).unwrap();
    let cases = common::refs_json("tokens.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        for (tok, key) in [(&sd15, "ids_sd15"), (&sd2, "ids_sd2")] {
            let want: Vec<u32> = case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(prompt).unwrap().ids;
            assert_eq!(got, want, "{key} for prompt {prompt:?}");
        }
    }
}

#[test]
fn long_prompts_report_truncation() {
    let tok = ClipTokenizer::from_dir(&common::model_dir("tiny-sd15").join("tokenizer")).unwrap();
    let long = "cat ".repeat(100);
    let t = tok.encode(&long).unwrap();
    assert_eq!(t.ids.len(), 77);
    assert_eq!(t.truncated, 25);
    assert_eq!(tok.encode("a cat").unwrap().truncated, 0);
}
