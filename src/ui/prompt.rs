//! The prompt and negative prompt editors with a token counter.

use super::commands::UiCommand;
use super::state::Params;
use crate::protocol::TokenCounter;

/// "12/75 tokens", as A1111 shows it: the count over the room in the chunks used so far
/// (long prompts run on in further 75-token chunks; `BREAK` starts one).
pub fn token_label(tokens: Option<&TokenCounter>, text: &str) -> (String, bool) {
    let Some(t) = tokens else {
        return ("tokens: load a model to count".into(), false);
    };
    let Some((n, chunks)) = t.count(text) else {
        return ("tokens: cannot tokenize".into(), true);
    };
    let chunk = t.chunk().max(1);
    if chunks > 1 {
        (
            format!("{n}/{} tokens ({chunks} chunks of {chunk})", chunks * chunk),
            false,
        )
    } else {
        (format!("{n}/{chunk} tokens"), false)
    }
}

/// Where a long prompt breaks into 75-token chunks, one line per chunk:
/// "chunk 2 · 12 tokens · starts 'golden hour lighting…'"; empty for one chunk or none.
pub fn chunk_lines(tokens: Option<&TokenCounter>, text: &str) -> Vec<String> {
    let Some(t) = tokens else { return Vec::new() };
    let chunks = t.chunks(text);
    if chunks.len() < 2 {
        return Vec::new();
    }
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let text = c.text.trim();
            let mut start: String = text.chars().take(28).collect();
            if start.chars().count() < text.chars().count() {
                start = start.trim_end().to_string();
                start.push('…');
            }
            format!("chunk {} · {} tokens · starts '{start}'", i + 1, c.tokens)
        })
        .collect()
}

fn counter_ui(ui: &mut egui::Ui, tokens: Option<&TokenCounter>, text: &str) {
    let (label, warn) = token_label(tokens, text);
    let mut rt = egui::RichText::new(label).small();
    if warn {
        rt = rt.color(ui.visuals().warn_fg_color);
    }
    ui.label(rt);
    for line in chunk_lines(tokens, text) {
        ui.label(egui::RichText::new(line).small().weak());
    }
}

/// Prompt (Ctrl+Enter generates, handled by the app) and negative prompt. `cursor` gets
/// the prompt cursor's byte offset while the prompt has it.
pub fn prompt_ui(
    ui: &mut egui::Ui,
    p: &mut Params,
    tokens: Option<&TokenCounter>,
    cursor: &mut Option<usize>,
    live: (&mut bool, &mut bool),
) -> Vec<UiCommand> {
    let mut out = Vec::new();
    let label = ui.strong("Prompt");
    let output = egui::TextEdit::multiline(&mut p.prompt)
        .id_salt("prompt")
        .hint_text("what to draw — Ctrl+Enter generates")
        .desired_rows(4)
        .desired_width(f32::INFINITY)
        .show(ui);
    let response: egui::Response = (*output.response).clone();
    let _ = response.labelled_by(label.id);
    if let Some(range) = output.cursor_range {
        let chars = range.primary.index.0;
        *cursor = Some(
            p.prompt
                .char_indices()
                .nth(chars)
                .map_or(p.prompt.len(), |(b, _)| b),
        );
    }
    counter_ui(ui, tokens, &p.prompt);
    let label = ui.strong("Negative prompt");
    ui.add(
        egui::TextEdit::multiline(&mut p.negative_prompt)
            .id_salt("negative")
            .hint_text("what to avoid")
            .desired_rows(2)
            .desired_width(f32::INFINITY),
    )
    .labelled_by(label.id);
    counter_ui(ui, tokens, &p.negative_prompt);
    ui.horizontal(|ui| {
        if ui
            .add(egui::Button::new(egui::RichText::new("Generate").strong()))
            .on_hover_text("Ctrl+Enter")
            .clicked()
        {
            out.push(UiCommand::Generate);
        }
        if ui.button("Stop").on_hover_text("Esc").clicked() {
            out.push(UiCommand::Stop);
        }
        ui.separator();
        ui.checkbox(live.0, "Live").on_hover_text(
            "Regenerate the grid after every edit (a pause of 150 ms in typing); the newest edit wins. For 1–4-step models (SD-Turbo, LCM).",
        );
        if *live.0 {
            ui.checkbox(live.1, "save live images")
                .on_hover_text("Off: live grids are not saved; Keep a cell (its menu) to save it");
        }
    });
    out
}
