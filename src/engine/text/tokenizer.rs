//! CLIP's BPE tokenizer from `tokenizer/vocab.json` + `merges.txt`, giving the ids that
//! transformers' `CLIPTokenizer` gives (the tokenizer diffusers' pipelines use).
//!
//! As transformers 5's `CLIPTokenizer` (backed by the tokenizers library): NFC, whitespace
//! runs collapsed, lower case; split on the special tokens (BOS, EOS and the pad token), then
//! by CLIP's regex; byte-level encoded and merged with `</w>` marking word ends.
//! (transformers 4's pure-Python tokenizer also put spaces around CJK ideographs; its ids
//! differ for such text.)

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, Strip, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::engine::config::JsonConfig;
use crate::engine::error::{Error, Result};

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A prompt turned into ids, with how many tokens did not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `max_length` ids: BOS, the prompt, EOS, padding.
    pub ids: Vec<u32>,
    /// Prompt tokens dropped because the prompt was too long.
    pub truncated: usize,
}

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    pub max_length: usize,
}

fn token_id(t: &Tokenizer, token: &str, file: &Path) -> Result<u32> {
    t.token_to_id(token)
        .ok_or_else(|| Error::read(file, format!("vocabulary has no token {token:?}")))
}

impl ClipTokenizer {
    /// Loads `dir/vocab.json` and `dir/merges.txt`; the pad token and length come from
    /// `special_tokens_map.json` / `tokenizer_config.json` when present (SD 2.x pads with "!").
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(Error::NotFound {
                    what: "tokenizer file".into(),
                    path: f.clone(),
                });
            }
        }
        let mut pad_token = EOS.to_string();
        let mut max_length = 77;
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let c = JsonConfig::load(&p)?;
                if let Some(v) = c.get("pad_token") {
                    if let Some(s) = v
                        .as_str()
                        .or_else(|| v.get("content").and_then(|x| x.as_str()))
                    {
                        pad_token = s.to_string();
                    }
                }
                if let Some(n) = c.get("model_max_length").and_then(|v| v.as_u64()) {
                    if n <= 77 {
                        max_length = n as usize;
                    }
                }
            }
        }
        Self::from_files(&vocab, &merges, &pad_token, max_length)
    }

    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        pad_token: &str,
        max_length: usize,
    ) -> Result<Self> {
        let vocab_text = std::fs::read_to_string(vocab).map_err(|e| Error::read(vocab, e))?;
        let merges_text = std::fs::read_to_string(merges).map_err(|e| Error::read(merges, e))?;
        Self::from_strings(&vocab_text, &merges_text, pad_token, max_length, vocab)
    }

    /// The CLIP tokenizer shipped in assets/ (OpenAI CLIP's BPE), for checkpoints that carry
    /// none. `pad_token`: "<|endoftext|>" for SD 1.x, "!" for SD 2.x.
    pub fn builtin(pad_token: &str) -> Result<Self> {
        const VOCAB: &str = include_str!("../../../assets/clip-tokenizer/vocab.json");
        const MERGES: &str = include_str!("../../../assets/clip-tokenizer/merges.txt");
        Self::from_strings(
            VOCAB,
            MERGES,
            pad_token,
            77,
            Path::new("assets/clip-tokenizer/vocab.json"),
        )
    }

    /// From the contents of vocab.json and merges.txt; `origin` names them in errors.
    pub fn from_strings(
        vocab_text: &str,
        merges_text: &str,
        pad_token: &str,
        max_length: usize,
        origin: &Path,
    ) -> Result<Self> {
        let vocab = origin;
        let map: std::collections::HashMap<String, u32> = serde_json::from_str(vocab_text)
            .map_err(|e| Error::read(origin, format!("invalid vocabulary JSON: {e}")))?;
        let merges_list: Vec<(String, String)> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                Error::read(
                    origin.with_file_name("merges.txt"),
                    "a merge line is not two tokens",
                )
            })?;
        let bpe = BPE::builder()
            .vocab_and_merges(
                map.into_iter().collect::<tokenizers::models::bpe::Vocab>(),
                merges_list,
            )
            .unk_token(EOS.to_string())
            .end_of_word_suffix("</w>".to_string())
            .build()
            .map_err(|e| Error::read(origin, format!("invalid BPE vocabulary/merges: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let bad = |e: tokenizers::Error| Error::read(PathBuf::from(vocab), e);
        let normalizer = NormSeq::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Lowercase(Lowercase),
            NormalizerWrapper::Replace(
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                    " ",
                )
                .map_err(bad)?,
            ),
            NormalizerWrapper::StripNormalizer(Strip::new(true, true)),
        ]);
        inner.with_normalizer(Some(normalizer));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(bad)?;
        let pre = PreSeq::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ]);
        inner.with_pre_tokenizer(Some(pre));
        // transformers splits the text on every special token, the pad token included: with
        // SD 2's pad token "!", "wow!!" becomes "wow", "!", "!" rather than "wow", "!!".
        let mut special = vec![AddedToken::from(BOS, true), AddedToken::from(EOS, true)];
        if pad_token != BOS && pad_token != EOS {
            special.push(AddedToken::from(pad_token, true));
        }
        inner.add_special_tokens(&special);
        let bos = token_id(&inner, BOS, vocab)?;
        let eos = token_id(&inner, EOS, vocab)?;
        let pad = token_id(&inner, pad_token, vocab)?;
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_length,
        })
    }

    /// The prompt's token ids without BOS/EOS or padding.
    pub fn tokenize_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::invalid("prompt", format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// BOS + prompt + EOS, truncated and padded to `max_length` as diffusers tokenizes.
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let raw = self.tokenize_raw(text)?;
        let room = self.max_length - 2;
        let truncated = raw.len().saturating_sub(room);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&raw[..raw.len().min(room)]);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(Tokens { ids, truncated })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Token ids back to text: CLIP's `</w>` word ends become spaces.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        for &id in ids {
            if let Some(t) = self.inner.id_to_token(id) {
                match t.strip_suffix("</w>") {
                    Some(word) => {
                        out.push_str(word);
                        out.push(' ');
                    }
                    None => out.push_str(&t),
                }
            }
        }
        out.trim_end().to_string()
    }

    /// The id of a vocabulary entry (e.g. ",</w>"), if present.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
