//! A1111 prompt syntax: attention weights, BREAK, prompts longer than CLIP's window.
//!
//! - `(text)` ×1.1, `[text]` ÷1.1, `(text:1.5)` an explicit weight, nesting multiplies;
//!   `\(` `\)` `\[` `\]` `\\` are literal; unbalanced brackets close at the end of the prompt.
//! - Each weighted piece is tokenized on its own; tokens go into 75-token chunks, each
//!   encoded as BOS + 75 + EOS (padded) and the encodings concatenated. A chunk that fills up
//!   moves the words after a recent comma (within 20 tokens) to the next chunk, as A1111
//!   does by default; `BREAK` starts a new chunk.
//! - After encoding, each token's hidden state is multiplied by its weight and the tensor's
//!   mean restored (A1111's "Original" emphasis).
//!
//! These semantics follow AUTOMATIC1111's prompt_parser and sd_hijack_clip; the code is ours.

use crate::engine::error::Result;
use crate::engine::tokenizer::ClipTokenizer;

/// Tokens per chunk between BOS and EOS.
pub const CHUNK: usize = 75;
/// A1111's `comma_padding_backtrack` default.
const COMMA_BACKTRACK: usize = 20;

/// One piece of the prompt and its weight; `Break` starts a new chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String, f64),
    Break,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok<'a> {
    /// `\(` and friends: the character itself.
    Escaped(&'a str),
    Open,
    OpenSquare,
    /// `:1.5)` — an explicit weight closing a round bracket.
    WeightClose(f64, &'a str),
    Close,
    CloseSquare,
    Text(&'a str),
}

fn lex(text: &str) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        match b[i] {
            b'\\' => {
                // `\(` `\)` `\[` `\]` `\\` are escapes; a lone backslash vanishes.
                if let Some(&n) = b.get(i + 1) {
                    if matches!(n, b'(' | b')' | b'[' | b']' | b'\\') {
                        out.push(Tok::Escaped(&text[i + 1..i + 2]));
                        i += 2;
                        continue;
                    }
                }
                // A lone backslash escapes nothing and disappears (as in A1111).
                out.push(Tok::Escaped(""));
                i += 1;
            }
            b'(' => {
                out.push(Tok::Open);
                i += 1;
            }
            b'[' => {
                out.push(Tok::OpenSquare);
                i += 1;
            }
            b')' => {
                out.push(Tok::Close);
                i += 1;
            }
            b']' => {
                out.push(Tok::CloseSquare);
                i += 1;
            }
            b':' => {
                // `:\s*([+-]?[.\d]+)\s*\)` else a plain ':'.
                let after = &rest[1..];
                let t = after.trim_start();
                let ws1 = after.len() - t.len();
                let sign = t.starts_with(['+', '-']) as usize;
                let digits = t[sign..]
                    .bytes()
                    .take_while(|c| c.is_ascii_digit() || *c == b'.')
                    .count();
                let num = &t[..sign + digits];
                let t2 = t[sign + digits..].trim_start();
                let ws2 = t[sign + digits..].len() - t2.len();
                if digits > 0 && t2.starts_with(')') {
                    let len = 1 + ws1 + sign + digits + ws2 + 1;
                    // A1111 uses Python's float(); a malformed number (e.g. "1.2.3") is text.
                    match num.parse::<f64>() {
                        Ok(w) => out.push(Tok::WeightClose(w, &text[i..i + len])),
                        Err(_) => out.push(Tok::Text(&text[i..i + len])),
                    }
                    i += len;
                } else {
                    out.push(Tok::Text(":"));
                    i += 1;
                }
            }
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                out.push(Tok::Text(&rest[..len]));
                i += len;
            }
        }
    }
    out
}

/// Splits on `BREAK` as a whole word, eating the whitespace around it.
fn split_break(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find("BREAK") {
        let before = &rest[..pos];
        let after = &rest[pos + 5..];
        let word_start = before
            .chars()
            .last()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let word_end = after
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if word_start && word_end {
            cur.push_str(before.trim_end());
            parts.push(std::mem::take(&mut cur));
            rest = after.trim_start();
        } else {
            cur.push_str(&rest[..pos + 5]);
            rest = after;
        }
    }
    cur.push_str(rest);
    parts.push(cur);
    parts
}

/// Parses A1111 attention syntax into weighted pieces, merging neighbours of equal weight.
pub fn parse(text: &str) -> Vec<Piece> {
    let mut res: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Piece>, from: usize, m: f64| {
        for p in &mut res[from..] {
            if let Piece::Text(_, w) = p {
                *w *= m;
            }
        }
    };
    for tok in lex(text) {
        match tok {
            Tok::Escaped(s) => res.push(Piece::Text(s.to_string(), 1.0)),
            Tok::Open => round.push(res.len()),
            Tok::OpenSquare => square.push(res.len()),
            Tok::WeightClose(w, _) if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Tok::Close if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, 1.1);
            }
            Tok::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, 1.0 / 1.1);
            }
            Tok::WeightClose(_, s) | Tok::Text(s) => {
                for (i, part) in split_break(s).into_iter().enumerate() {
                    if i > 0 {
                        res.push(Piece::Break);
                    }
                    res.push(Piece::Text(part, 1.0));
                }
            }
            Tok::Close => res.push(Piece::Text(")".into(), 1.0)),
            Tok::CloseSquare => res.push(Piece::Text("]".into(), 1.0)),
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push(Piece::Text(String::new(), 1.0));
    }
    // Merge runs of equal weight.
    let mut merged: Vec<Piece> = Vec::with_capacity(res.len());
    for p in res {
        match (merged.last_mut(), p) {
            (Some(Piece::Text(a, wa)), Piece::Text(b, wb)) if *wa == wb => a.push_str(&b),
            (_, p) => merged.push(p),
        }
    }
    merged
}

/// One CLIP window: BOS + 75 tokens + EOS, with a weight per position.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Embeddings placed in this window: (first position, counting BOS as 0; index into
    /// the embeddings given to [`tokenize_with`]). Their positions hold token 0.
    pub fixes: Vec<(usize, usize)>,
}

/// A prompt ready for the text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokens {
    pub chunks: Vec<Chunk>,
    /// Prompt tokens, not counting BOS/EOS/padding (A1111's token counter).
    pub token_count: usize,
    /// Indices of the embeddings the prompt used, in order of first use.
    pub used: Vec<usize>,
}

impl PromptTokens {
    /// True when every weight is 1: the encoding needs no emphasis step.
    pub fn unweighted(&self) -> bool {
        self.chunks
            .iter()
            .all(|c| c.weights.iter().all(|&w| w == 1.0))
    }
}

/// An embedding as the tokenizer sees it: its name's tokens and how many positions its
/// vectors take.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingWord {
    pub ids: Vec<u32>,
    pub vectors: usize,
}

/// Tokenizes a prompt the way A1111 does (see the module docs).
pub fn tokenize(tok: &ClipTokenizer, text: &str) -> Result<PromptTokens> {
    tokenize_with(tok, text, &[])
}

/// The longest embedding whose name's tokens start at `ids[at..]` (A1111's
/// `find_embedding_at_position`).
fn embedding_at(ids: &[u32], at: usize, embeddings: &[EmbeddingWord]) -> Option<usize> {
    embeddings
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.ids.is_empty() && ids[at..].starts_with(&e.ids))
        .max_by_key(|(_, e)| e.ids.len())
        .map(|(i, _)| i)
}

/// [`tokenize`] with textual-inversion embeddings: where a name's tokens appear, its n
/// vectors take n positions (moved whole to the next window when they do not fit), as
/// A1111's `tokenize_line` places them.
pub fn tokenize_with(
    tok: &ClipTokenizer,
    text: &str,
    embeddings: &[EmbeddingWord],
) -> Result<PromptTokens> {
    let pieces = parse(text);
    let comma = tok.token_id(",</w>");
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let pad = tok.pad_id();
    let mut chunks = Vec::new();
    // Tokens, weights, fixes (positions counted without BOS).
    type Cur = (Vec<u32>, Vec<f32>, Vec<(usize, usize)>);
    let mut cur: Cur = Default::default();
    let mut last_comma: Option<usize> = None;
    let mut token_count = 0;
    let mut used = Vec::new();
    let mut finish = |cur: &mut Cur, chunks: &mut Vec<Chunk>, last: bool| {
        token_count += if last { cur.0.len() } else { CHUNK };
        let (mut ids, mut w, fixes) = std::mem::take(cur);
        // EOS right after the prompt, then the pad token (SD 1.x pads with EOS itself).
        let mut padded = vec![bos];
        let n = ids.len();
        padded.append(&mut ids);
        padded.push(eos);
        padded.resize(CHUNK + 2, pad);
        let mut weights = vec![1.0f32];
        weights.append(&mut w);
        weights.resize(CHUNK + 2, 1.0);
        debug_assert!(n <= CHUNK);
        chunks.push(Chunk {
            ids: padded,
            weights,
            fixes: fixes.into_iter().map(|(p, e)| (p + 1, e)).collect(),
        });
    };
    for piece in pieces {
        let (text, weight) = match piece {
            Piece::Break => {
                finish(&mut cur, &mut chunks, false);
                last_comma = None;
                continue;
            }
            Piece::Text(t, w) => (t, w),
        };
        let ids = tok.tokenize_raw(&text)?;
        let mut at = 0;
        while at < ids.len() {
            let id = ids[at];
            if Some(id) == comma {
                last_comma = Some(cur.0.len());
            } else if cur.0.len() == CHUNK {
                if let Some(lc) = last_comma.filter(|&lc| CHUNK - lc <= COMMA_BACKTRACK) {
                    // Move the words after the comma into the next chunk.
                    let ids = cur.0.split_off(lc + 1);
                    let ws = cur.1.split_off(lc + 1);
                    let moved: Vec<(usize, usize)> = cur
                        .2
                        .iter()
                        .filter(|(p, _)| *p > lc)
                        .map(|&(p, e)| (p - lc - 1, e))
                        .collect();
                    cur.2.retain(|(p, _)| *p <= lc);
                    finish(&mut cur, &mut chunks, false);
                    cur = (ids, ws, moved);
                    last_comma = None;
                }
            }
            if cur.0.len() == CHUNK {
                finish(&mut cur, &mut chunks, false);
                last_comma = None;
            }
            let Some(e) = embedding_at(&ids, at, embeddings) else {
                cur.0.push(id);
                cur.1.push(weight as f32);
                at += 1;
                continue;
            };
            let n = embeddings[e].vectors.min(CHUNK);
            if cur.0.len() + n > CHUNK {
                finish(&mut cur, &mut chunks, false);
                last_comma = None;
            }
            cur.2.push((cur.0.len(), e));
            cur.0.extend(std::iter::repeat_n(0, n));
            cur.1.extend(std::iter::repeat_n(weight as f32, n));
            if !used.contains(&e) {
                used.push(e);
            }
            at += embeddings[e].ids.len();
        }
    }
    if !cur.0.is_empty() || chunks.is_empty() {
        finish(&mut cur, &mut chunks, true);
    }
    Ok(PromptTokens {
        chunks,
        token_count,
        used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, w: f64) -> Piece {
        Piece::Text(s.into(), w)
    }

    fn close(a: &[Piece], b: &[Piece]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| match (x, y) {
                (Piece::Text(s1, w1), Piece::Text(s2, w2)) => s1 == s2 && (w1 - w2).abs() < 1e-9,
                (Piece::Break, Piece::Break) => true,
                _ => false,
            })
    }

    #[test]
    fn a1111_documented_examples() {
        // The examples in A1111's parse_prompt_attention documentation.
        let cases: Vec<(&str, Vec<Piece>)> = vec![
            ("normal text", vec![t("normal text", 1.0)]),
            (
                "an (important) word",
                vec![t("an ", 1.0), t("important", 1.1), t(" word", 1.0)],
            ),
            ("(unbalanced", vec![t("unbalanced", 1.1)]),
            ("\\(literal\\]", vec![t("(literal]", 1.0)]),
            ("(unnecessary)(parens)", vec![t("unnecessaryparens", 1.1)]),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    t("a ", 1.0),
                    t("house", 1.573),
                    t(" ", 1.1),
                    t("on", 1.0),
                    t(" a ", 1.1),
                    t("hill", 0.55),
                    t(", sun, ", 1.1),
                    t("sky", 1.4641),
                    t(".", 1.1),
                ],
            ),
        ];
        for (input, want) in cases {
            let got = parse(input);
            assert!(close(&got, &want), "{input:?}: {got:?}");
        }
    }

    #[test]
    fn tricky_prompts_do_not_crash() {
        let cases: Vec<(&str, Vec<Piece>)> = vec![
            ("", vec![t("", 1.0)]),
            ("(word:1.5)", vec![t("word", 1.5)]),
            ("((a))", vec![t("a", 1.21)]),
            ("[a]", vec![t("a", 1.0 / 1.1)]),
            ("a BREAK b", vec![t("a", 1.0), Piece::Break, t("b", 1.0)]),
            ("BREAKFAST", vec![t("BREAKFAST", 1.0)]),
            ("a)b]c", vec![t("a)b]c", 1.0)]),
            ("x:1.5)", vec![t("x:1.5)", 1.0)]),
            ("(:1.5)", vec![t("", 1.0)]),
            ("time: 5 o'clock", vec![t("time: 5 o'clock", 1.0)]),
            ("\\\\ back", vec![t("\\ back", 1.0)]),
            ("a \\b", vec![t("a b", 1.0)]),
            ("(a:-1)", vec![t("a", -1.0)]),
            ("(((((", vec![t("", 1.0)]),
        ];
        for (input, want) in cases {
            let got = parse(input);
            assert!(close(&got, &want), "{input:?}: {got:?}");
        }
    }

    #[test]
    fn embeddings_take_their_vectors_positions_and_move_whole_to_the_next_chunk() {
        let tok = ClipTokenizer::builtin("<|endoftext|>").unwrap();
        let name = tok.tokenize_raw("myemb").unwrap();
        let emb = [EmbeddingWord {
            ids: name.clone(),
            vectors: 3,
        }];
        // In a short prompt: three placeholder positions, weighted as the text around them.
        let t = tokenize_with(&tok, "a (myemb:1.2) cat", &emb).unwrap();
        let c = &t.chunks[0];
        assert_eq!(c.fixes, vec![(2, 0)]);
        assert_eq!(&c.ids[2..5], &[0, 0, 0]);
        assert!(c.weights[2..5].iter().all(|&w| (w - 1.2).abs() < 1e-6));
        assert_eq!(t.token_count, 5);
        assert_eq!(t.used, vec![0]);
        // 73 words, then the embedding: 73 + 3 > 75, so it starts the second chunk.
        let words = "cat ".repeat(73);
        let t = tokenize_with(&tok, &format!("{words}myemb dog"), &emb).unwrap();
        assert_eq!(t.chunks.len(), 2);
        assert!(t.chunks[0].fixes.is_empty());
        assert_eq!(t.chunks[1].fixes, vec![(1, 0)]);
        // Without the embedding the name is ordinary text.
        let plain = tokenize(&tok, "a myemb cat").unwrap();
        assert_eq!(plain.token_count, 2 + name.len());
        assert!(plain.used.is_empty());
    }
}
