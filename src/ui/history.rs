//! Past generations (persisted): newest first, each restorable into the editor. Tick two
//! (or one, against the editor) to see them side by side with the parameters that differ —
//! prompt words added and removed, seed, sampler, steps, CFG, size, model, LoRAs, hires,
//! ControlNet — and restore any subset of those fields.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::commands::UiCommand;
use super::state::{HistoryEntry, Params};

/// Entries shown (the file keeps more).
const SHOWN: usize = 20;

/// A parameter two generations can differ in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    Prompt,
    NegativePrompt,
    Seed,
    Sampler,
    Steps,
    Cfg,
    Size,
    Model,
    ClipSkip,
    Variation,
    Hires,
    ControlNet,
    /// LoRA tags: part of the prompt (restored with it).
    Loras,
}

impl Field {
    pub fn label(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::NegativePrompt => "negative prompt",
            Self::Seed => "seed",
            Self::Sampler => "sampler",
            Self::Steps => "steps",
            Self::Cfg => "CFG",
            Self::Size => "size",
            Self::Model => "model",
            Self::ClipSkip => "clip skip",
            Self::Variation => "variation seed",
            Self::Hires => "hires fix",
            Self::ControlNet => "ControlNet",
            Self::Loras => "LoRAs",
        }
    }

    /// Whether "Restore" can take this field on its own.
    pub fn restorable(self) -> bool {
        self != Self::Loras
    }
}

/// One side of a comparison: a history entry or the editor.
#[derive(Debug, Clone)]
pub struct Side {
    pub params: Params,
    pub model: String,
    pub seed: u64,
}

impl Side {
    pub fn of_entry(h: &HistoryEntry) -> Self {
        Side {
            params: h.params.clone(),
            model: h.model.clone(),
            seed: h.seeds.first().copied().unwrap_or(h.params.seed),
        }
    }
}

/// How a field differs: `from` (the older side) and `to`, as text; for prompts also the
/// words added and removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub field: Field,
    pub from: String,
    pub to: String,
    pub change: Option<String>,
}

/// The words of a prompt (LoRA tags cut, split at spaces and commas).
fn words(prompt: &str) -> Vec<String> {
    let (text, _) = crate::engine::extra_networks::strip_tags(prompt);
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// `b`'s words not in `a` (as a multiset).
fn minus(a: &[String], b: &[String]) -> Vec<String> {
    let mut left: HashMap<&str, usize> = HashMap::new();
    for w in a {
        *left.entry(w.as_str()).or_default() += 1;
    }
    b.iter()
        .filter(|w| match left.get_mut(w.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

/// "added red dusk; removed blue": the words `to` adds to `from` and removes from it.
fn word_change(from: &str, to: &str) -> String {
    let (a, b) = (words(from), words(to));
    let (added, removed) = (minus(&a, &b), minus(&b, &a));
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("added {}", added.join(" ")));
    }
    if !removed.is_empty() {
        parts.push(format!("removed {}", removed.join(" ")));
    }
    if parts.is_empty() {
        "same words, other order or weights".into()
    } else {
        parts.join("; ")
    }
}

fn loras(prompt: &str) -> String {
    let mut v: Vec<String> = crate::engine::extra_networks::tag_spans(prompt)
        .into_iter()
        .filter(|(_, t)| t.kind == "lora" || t.kind == "lyco")
        .map(|(_, t)| match t.positional.first() {
            Some(w) => format!("{}:{w}", t.name),
            None => t.name,
        })
        .collect();
    v.sort();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn hires_text(p: &Params) -> String {
    let h = &p.hires;
    if !h.enabled {
        return "off".into();
    }
    let steps = if h.steps == 0 {
        "same steps".to_string()
    } else {
        format!("{} steps", h.steps)
    };
    format!(
        "×{} {}, {steps}, strength {:.2}",
        h.scale, h.upscaler, h.strength
    )
}

fn control_text(p: &Params) -> String {
    let c = &p.control;
    if !c.enabled {
        return "off".into();
    }
    let name = std::path::Path::new(&c.model)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| c.model.clone());
    format!(
        "{name} ({}, weight {}, steps {} to {})",
        c.preprocess, c.scale, c.start, c.end
    )
}

/// Every field in which `b` differs from `a`.
pub fn differences(a: &Side, b: &Side) -> Vec<Difference> {
    let (p, q) = (&a.params, &b.params);
    let mut out = Vec::new();
    for (field, from, to) in [
        (Field::Prompt, &p.prompt, &q.prompt),
        (
            Field::NegativePrompt,
            &p.negative_prompt,
            &q.negative_prompt,
        ),
    ] {
        if words(from) != words(to) {
            out.push(Difference {
                field,
                from: from.clone(),
                to: to.clone(),
                change: Some(word_change(from, to)),
            });
        }
    }
    let mut add = |field: Field, from: String, to: String| {
        if from != to {
            out.push(Difference {
                field,
                from,
                to,
                change: None,
            });
        }
    };
    add(Field::Loras, loras(&p.prompt), loras(&q.prompt));
    add(Field::Seed, a.seed.to_string(), b.seed.to_string());
    add(Field::Sampler, p.sampler.clone(), q.sampler.clone());
    add(Field::Steps, p.steps.to_string(), q.steps.to_string());
    add(Field::Cfg, p.cfg.to_string(), q.cfg.to_string());
    add(
        Field::Size,
        format!("{}×{}", p.width, p.height),
        format!("{}×{}", q.width, q.height),
    );
    add(Field::Model, a.model.clone(), b.model.clone());
    add(
        Field::ClipSkip,
        p.clip_skip.to_string(),
        q.clip_skip.to_string(),
    );
    let var = |p: &Params| {
        if p.variation_strength > 0.0 {
            format!("{} at {}", p.variation_seed, p.variation_strength)
        } else {
            "off".into()
        }
    };
    add(Field::Variation, var(p), var(q));
    add(Field::Hires, hires_text(p), hires_text(q));
    add(Field::ControlNet, control_text(p), control_text(q));
    out
}

/// Copies `fields` of `from` into the editor's parameters and model.
pub fn restore_fields(params: &mut Params, model: &mut String, from: &Side, fields: &[Field]) {
    let f = &from.params;
    for field in fields {
        match field {
            Field::Prompt | Field::Loras => params.prompt = f.prompt.clone(),
            Field::NegativePrompt => params.negative_prompt = f.negative_prompt.clone(),
            Field::Seed => {
                params.seed = from.seed;
                params.seed_locked = true;
            }
            Field::Sampler => params.sampler = f.sampler.clone(),
            Field::Steps => params.steps = f.steps,
            Field::Cfg => params.cfg = f.cfg,
            Field::Size => {
                params.width = f.width;
                params.height = f.height;
            }
            Field::Model => *model = from.model.clone(),
            Field::ClipSkip => params.clip_skip = f.clip_skip,
            Field::Variation => {
                params.variation_seed = f.variation_seed;
                params.variation_strength = f.variation_strength;
            }
            Field::Hires => params.hires = f.hires.clone(),
            Field::ControlNet => params.control = f.control.clone(),
        }
    }
}

/// The panel's selection and the pictures it has loaded.
#[derive(Default)]
pub struct HistoryView {
    /// Ticked entries (indices into the history), at most two, in ticking order.
    pub selected: Vec<usize>,
    /// Fields ticked for Restore.
    pub chosen: Vec<Field>,
    textures: HashMap<PathBuf, Option<egui::TextureHandle>>,
}

impl HistoryView {
    pub fn toggle(&mut self, i: usize) {
        if let Some(at) = self.selected.iter().position(|&s| s == i) {
            self.selected.remove(at);
        } else {
            self.selected.push(i);
            if self.selected.len() > 2 {
                self.selected.remove(0);
            }
        }
        self.chosen.clear();
    }

    /// The two sides compared: (older, newer); with one entry ticked, it against the editor.
    pub fn sides(
        &self,
        history: &[HistoryEntry],
        editor: &Side,
    ) -> Option<(Side, Side, String, String)> {
        let mut sel: Vec<usize> = self
            .selected
            .iter()
            .copied()
            .filter(|&i| i < history.len())
            .collect();
        sel.sort_unstable();
        match sel.as_slice() {
            [a, b] => Some((
                Side::of_entry(&history[*a]),
                Side::of_entry(&history[*b]),
                format!("#{}", a + 1),
                format!("#{}", b + 1),
            )),
            [a] => Some((
                Side::of_entry(&history[*a]),
                editor.clone(),
                format!("#{}", a + 1),
                "the editor".into(),
            )),
            _ => None,
        }
    }

    fn texture(&mut self, ctx: &egui::Context, path: &Path) -> Option<egui::TextureHandle> {
        self.textures
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                let img = super::img2img::load_image_file(path).ok()?;
                let color = egui::ColorImage::from_rgb([img.width, img.height], &img.rgb);
                Some(ctx.load_texture(
                    format!("history {}", path.display()),
                    color,
                    egui::TextureOptions::LINEAR,
                ))
            })
            .clone()
    }
}

pub fn history_ui(
    ui: &mut egui::Ui,
    history: &[HistoryEntry],
    view: &mut HistoryView,
    editor: &Side,
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::CollapsingHeader::new(format!("History ({})", history.len()))
        .id_salt("history")
        .show(ui, |ui| {
            if history.is_empty() {
                ui.label(egui::RichText::new("no generations yet").weak());
            }
            for (i, h) in history.iter().enumerate().rev().take(SHOWN) {
                let prompt: String = h.params.prompt.chars().take(36).collect();
                let seed = h.seeds.first().copied().unwrap_or(h.params.seed);
                ui.horizontal(|ui| {
                    let mut on = view.selected.contains(&i);
                    if ui
                        .checkbox(&mut on, format!("Compare {}", i + 1))
                        .on_hover_text("tick two to compare them (one: against the editor)")
                        .changed()
                    {
                        out.push(UiCommand::SelectHistory(i));
                    }
                    if ui
                        .small_button(format!("Restore {}", i + 1))
                        .on_hover_text(format!(
                            "{} image(s) in {:?}",
                            h.images.len(),
                            h.images.first()
                        ))
                        .clicked()
                    {
                        out.push(UiCommand::RestoreHistory(i));
                    }
                    ui.label(format!(
                        "seed {seed} · {} steps · \"{prompt}\"",
                        h.params.steps
                    ));
                });
            }
            if let Some((a, b, an, bn)) = view.sides(history, editor) {
                ui.separator();
                diff_ui(ui, history, view, &a, &b, &an, &bn, &mut out);
            }
        });
    out
}

#[allow(clippy::too_many_arguments)]
fn diff_ui(
    ui: &mut egui::Ui,
    history: &[HistoryEntry],
    view: &mut HistoryView,
    a: &Side,
    b: &Side,
    an: &str,
    bn: &str,
    out: &mut Vec<UiCommand>,
) {
    // Side by side: each entry's first image.
    let ctx = ui.ctx().clone();
    let mut sel = view.selected.clone();
    sel.sort_unstable();
    let pics: Vec<Option<egui::TextureHandle>> = sel
        .iter()
        .map(|&i| {
            history
                .get(i)
                .and_then(|h| h.images.first())
                .and_then(|p| view.texture(&ctx, p))
        })
        .collect();
    ui.horizontal(|ui| {
        for (tex, name) in pics.iter().zip([an, bn]) {
            ui.vertical(|ui| {
                ui.label(name);
                match tex {
                    Some(t) => {
                        let s = t.size_vec2();
                        let k = 120.0 / s.x.max(s.y).max(1.0);
                        ui.image((t.id(), s * k));
                    }
                    None => {
                        ui.weak("(no image)");
                    }
                }
            });
        }
    });
    let diffs = differences(a, b);
    ui.label(if diffs.is_empty() {
        format!("{an} and {bn}: the same parameters")
    } else {
        format!("{an} vs {bn}: {} difference(s)", diffs.len())
    });
    for d in &diffs {
        ui.horizontal(|ui| {
            if d.field.restorable() {
                let mut on = view.chosen.contains(&d.field);
                if ui
                    .checkbox(&mut on, format!("Take {}", d.field.label()))
                    .on_hover_text("tick, then Restore: the editor takes this field")
                    .changed()
                {
                    if on {
                        view.chosen.push(d.field);
                    } else {
                        view.chosen.retain(|f| *f != d.field);
                    }
                }
            } else {
                ui.add_space(ui.spacing().interact_size.y);
            }
            let text = match &d.change {
                Some(c) => format!("{}: {c}", d.field.label()),
                None => format!("{}: {}, then {}", d.field.label(), d.from, d.to),
            };
            let r = ui.label(text);
            if d.change.is_some() {
                r.on_hover_text(format!("{an}: {}\n{bn}: {}", d.from, d.to));
            } else if !d.field.restorable() {
                r.on_hover_text("restored with the prompt");
            }
        });
    }
    if diffs.is_empty() {
        return;
    }
    ui.horizontal(|ui| {
        for (&entry, name) in sel.iter().zip([an, bn]) {
            if ui
                .add_enabled(
                    !view.chosen.is_empty(),
                    egui::Button::new(format!("Restore ticked from {name}")),
                )
                .clicked()
            {
                out.push(UiCommand::RestoreHistoryFields {
                    entry,
                    fields: view.chosen.clone(),
                });
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(prompt: &str, seed: u64) -> Side {
        Side {
            params: Params {
                prompt: prompt.into(),
                ..Default::default()
            },
            model: "m".into(),
            seed,
        }
    }

    #[test]
    fn prompt_words_added_and_removed_and_loras_apart() {
        let a = side("a red fox, forest, red", 1);
        let mut b = side("a blue fox, forest <lora:ink:0.6>", 1);
        b.params.steps = 30;
        let d = differences(&a, &b);
        let fields: Vec<Field> = d.iter().map(|d| d.field).collect();
        assert_eq!(fields, [Field::Prompt, Field::Loras, Field::Steps]);
        assert_eq!(d[0].change.as_deref(), Some("added blue; removed red red"));
        assert_eq!((d[1].from.as_str(), d[1].to.as_str()), ("none", "ink:0.6"));
        assert!(differences(&a, &a).is_empty());
        // Only the tags changed: the prompt's words are the same.
        let c = side("a red fox, forest, red <lora:ink:1>", 1);
        let fields: Vec<Field> = differences(&a, &c).iter().map(|d| d.field).collect();
        assert_eq!(fields, [Field::Loras]);
    }

    #[test]
    fn restore_takes_only_the_ticked_fields() {
        let mut from = side("old words", 7);
        from.params.steps = 12;
        from.params.hires.enabled = true;
        let mut editor = side("new words", 99).params;
        let mut model = "current".to_string();
        restore_fields(&mut editor, &mut model, &from, &[Field::Seed, Field::Hires]);
        assert_eq!(
            (editor.seed, editor.prompt.as_str(), editor.steps),
            (7, "new words", 20)
        );
        assert!(editor.seed_locked && editor.hires.enabled);
        assert_eq!(model, "current");
        restore_fields(
            &mut editor,
            &mut model,
            &from,
            &[Field::Model, Field::Loras],
        );
        assert_eq!((model.as_str(), editor.prompt.as_str()), ("m", "old words"));
    }
}
