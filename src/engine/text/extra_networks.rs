//! A1111's extra-network tags: `<lora:NAME>`, `<lora:NAME:WEIGHT>`,
//! `<lora:NAME:TE:UNET>`, `<lora:NAME:te=X:unet=Y>` (`modules/extra_networks.py`: the pattern
//! `<(\w+):([^>]+)>`, arguments split on `:`, `key=value` arguments named).
//!
//! Tags are cut out of the prompt and nothing else changes: "a cat, <lora:x:1>, red" is
//! encoded as "a cat, , red", exactly as A1111 leaves it. A1111 reads tags from the prompt
//! only: a tag in the negative prompt stays there as text and applies nothing.

use crate::engine::{Error, Result};

/// One tag of the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    /// `lora`, `hypernet`, … (A1111 also accepts `lyco` for LoRAs).
    pub kind: String,
    pub name: String,
    /// Positional arguments after the name.
    pub positional: Vec<String>,
    /// `key=value` arguments.
    pub named: Vec<(String, String)>,
}

/// A LoRA the prompt asks for, with A1111's two multipliers.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    /// Text-encoder multiplier (the tag's first number; 1 when absent).
    pub te: f64,
    /// UNet multiplier (the second number, else the first).
    pub unet: f64,
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The prompt without its tags, and the tags in order.
pub fn strip_tags(prompt: &str) -> (String, Vec<Tag>) {
    let (text, spans) = scan(prompt);
    (text, spans.into_iter().map(|(_, t)| t).collect())
}

/// Every tag with its byte range in `prompt`.
pub fn tag_spans(prompt: &str) -> Vec<(std::ops::Range<usize>, Tag)> {
    scan(prompt).1
}

fn scan(prompt: &str) -> (String, Vec<(std::ops::Range<usize>, Tag)>) {
    let mut out = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut at = 0; // byte offset of `rest` in `prompt`
    let mut rest = prompt;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let kind_len = after.find(|c: char| !is_word(c)).unwrap_or(after.len());
        let parsed = (kind_len > 0)
            .then(|| after[kind_len..].strip_prefix(':'))
            .flatten()
            .and_then(|args| {
                let end = args.find('>')?;
                (end > 0).then_some((&args[..end], &args[end + 1..]))
            });
        match parsed {
            Some((args, tail)) => {
                let mut items = args.split(':');
                let name = items.next().unwrap_or_default().to_string();
                let mut positional = Vec::new();
                let mut named = Vec::new();
                for it in items {
                    match it.split_once('=') {
                        Some((k, v)) if !v.contains('=') => named.push((k.into(), v.into())),
                        _ => positional.push(it.to_string()),
                    }
                }
                let start = at + open;
                let end = prompt.len() - tail.len();
                tags.push((
                    start..end,
                    Tag {
                        kind: after[..kind_len].to_string(),
                        name,
                        positional,
                        named,
                    },
                ));
                at = end;
                rest = tail;
            }
            None => {
                out.push('<');
                at += open + 1;
                rest = after;
            }
        }
    }
    out.push_str(rest);
    (out, tags)
}

/// The `lora` tag whose text holds byte `at` (or ends right at it), with its range.
pub fn lora_tag_at(prompt: &str, at: usize) -> Option<(std::ops::Range<usize>, LoraTag)> {
    tag_spans(prompt)
        .into_iter()
        .filter(|(r, t)| (t.kind == "lora" || t.kind == "lyco") && r.start <= at && at <= r.end)
        .find_map(|(r, t)| Some((r, LoraTag::from_tag(&t).ok()?)))
}

/// A tag as the studio writes it: `<lora:NAME:W>` with W as short as it reads (1, 0.8, -0.25).
pub fn format_lora_tag(name: &str, weight: f64) -> String {
    let w = (weight * 100.0).round() / 100.0;
    format!("<lora:{name}:{w}>")
}

fn number(tag: &Tag, what: &str, s: &str) -> Result<f64> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(Error::invalid(
            "prompt",
            format!(
                "<{}:{}…>: {what} weight {s:?} is not a number",
                tag.kind, tag.name
            ),
        )),
    }
}

impl LoraTag {
    /// A1111's reading of a `lora` tag's arguments.
    pub fn from_tag(tag: &Tag) -> Result<Self> {
        let mut te = match tag.positional.first() {
            Some(s) => number(tag, "the", s)?,
            None => 1.0,
        };
        if let Some((_, v)) = tag.named.iter().find(|(k, _)| k == "te") {
            te = number(tag, "te", v)?;
        }
        let mut unet = match tag.positional.get(1) {
            Some(s) => number(tag, "the UNet", s)?,
            None => te,
        };
        if let Some((_, v)) = tag.named.iter().find(|(k, _)| k == "unet") {
            unet = number(tag, "unet", v)?;
        }
        if tag.name.trim().is_empty() {
            return Err(Error::invalid("prompt", "<lora:…> without a name"));
        }
        Ok(Self {
            name: tag.name.clone(),
            te,
            unet,
        })
    }
}

/// The prompt's LoRA tags (also `lyco`), and the kinds of other tags it holds (A1111
/// removes those too: hypernetworks are not supported here).
pub fn lora_tags(tags: &[Tag]) -> Result<(Vec<LoraTag>, Vec<String>)> {
    let mut loras = Vec::new();
    let mut other = Vec::new();
    for t in tags {
        if t.kind == "lora" || t.kind == "lyco" {
            loras.push(LoraTag::from_tag(t)?);
        } else if !other.contains(&t.kind) {
            other.push(t.kind.clone());
        }
    }
    Ok((loras, other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_cut_and_the_text_stays() {
        let (text, tags) = strip_tags("a cat, <lora:pixel_art:0.8>, red <lora:x> (dog:1.2)");
        assert_eq!(text, "a cat, , red  (dog:1.2)");
        assert_eq!(tags.len(), 2);
        let (loras, other) = lora_tags(&tags).unwrap();
        assert_eq!(
            loras[0],
            LoraTag {
                name: "pixel_art".into(),
                te: 0.8,
                unet: 0.8
            }
        );
        assert_eq!(loras[1].te, 1.0);
        assert!(other.is_empty());
    }

    #[test]
    fn a1111_argument_forms() {
        let (_, tags) = strip_tags("<lora:a:0.5:1.5><lora:b:te=0.2:unet=-1><hypernet:h:1>");
        let (loras, other) = lora_tags(&tags).unwrap();
        assert_eq!((loras[0].te, loras[0].unet), (0.5, 1.5));
        assert_eq!((loras[1].te, loras[1].unet), (0.2, -1.0));
        assert_eq!(other, vec!["hypernet".to_string()]);
    }

    #[test]
    fn not_tags_stay_text() {
        for p in ["a < b", "<lora>", "<:x>", "<lora:>", "x <lora:a", "<a b:c>"] {
            let (text, tags) = strip_tags(p);
            assert_eq!(text, p, "{p}");
            assert!(tags.is_empty(), "{p}");
        }
    }

    #[test]
    fn spans_and_the_tag_under_the_cursor() {
        let p = "a cat, <lora:pixel:0.8>, <hypernet:h> red";
        let spans = tag_spans(p);
        assert_eq!(&p[spans[0].0.clone()], "<lora:pixel:0.8>");
        assert_eq!(&p[spans[1].0.clone()], "<hypernet:h>");
        let (r, t) = lora_tag_at(p, 10).unwrap();
        assert_eq!((r.start, t.name.as_str(), t.te), (7, "pixel", 0.8));
        assert!(lora_tag_at(p, 2).is_none());
        assert!(lora_tag_at(p, 27).is_none(), "a hypernet tag is not a LoRA");
        assert_eq!(format_lora_tag("pixel", 0.8000001), "<lora:pixel:0.8>");
        assert_eq!(format_lora_tag("x", 1.0), "<lora:x:1>");
        assert_eq!(format_lora_tag("x", -0.25), "<lora:x:-0.25>");
    }

    #[test]
    fn bad_weights_are_named() {
        let (_, tags) = strip_tags("<lora:a:lots>");
        let e = lora_tags(&tags).unwrap_err().to_string();
        assert!(e.contains("\"lots\" is not a number"), "{e}");
        let (_, tags) = strip_tags("<lora:a:nan>");
        assert!(lora_tags(&tags).is_err());
    }
}
