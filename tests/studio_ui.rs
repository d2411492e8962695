//! The studio window against a fake engine (the test plays the generation thread through
//! the protocol's channel pair): widgets are found by their accessible labels, no GPU, no
//! display, no snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "gui")]

use std::sync::Arc;
use std::time::Duration;

use egui::accesskit::Role;
use egui::{Key, Modifiers};
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use sd_studio::engine::tokenizer::ClipTokenizer;
use sd_studio::protocol::{
    link, Command, Event, FoundLora, FoundModel, JobRequest, ModelSpec, RgbImage, TokenCounter,
    WorkerLink,
};
use sd_studio::ui::app::CellStatus;
use sd_studio::ui::{StudioApp, StudioOptions};

fn studio() -> (Harness<'static, StudioApp>, WorkerLink) {
    studio_sized(egui::vec2(1280.0, 1000.0))
}

/// A window tall enough for panels far down the side bar (clicks land on screen only).
fn studio_sized(size: egui::Vec2) -> (Harness<'static, StudioApp>, WorkerLink) {
    let (engine, fake) = link(Arc::new(|| {}));
    let app = StudioApp::new(
        engine,
        StudioOptions {
            no_persist: true,
            ..Default::default()
        },
    );
    let harness = Harness::builder()
        .with_size(size)
        .build_ui_state(|ui, app: &mut StudioApp| app.frame(ui), app);
    fake.send(Event::ModelReady {
        name: "tiny-sd15".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        previewer: "TAESD".into(),
        memory: "full".into(),
        tokens: None,
    });
    let mut h = harness;
    h.run_steps(3);
    (h, fake)
}

fn image(v: u8) -> RgbImage {
    RgbImage {
        width: 8,
        height: 8,
        rgb: vec![v; 8 * 8 * 3],
    }
}

/// The commands the window sent since the last call.
fn sent(fake: &WorkerLink) -> Vec<Command> {
    fake.commands.try_iter().collect()
}

fn generate_cmd(fake: &WorkerLink) -> JobRequest {
    let cmds = sent(fake);
    match cmds.as_slice() {
        [Command::Generate(j)] => j.clone(),
        other => panic!("expected one Generate, got {other:?}"),
    }
}

fn type_prompt(h: &mut Harness<'_, StudioApp>, text: &str) {
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .click();
    h.run_steps(2);
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .type_text(text);
    h.run_steps(2);
}

fn ctrl_enter(h: &mut Harness<'_, StudioApp>) {
    h.key_press_modifiers(Modifiers::COMMAND, Key::Enter);
    h.run_steps(2);
}

/// Plays a whole job for the cells of `j`: start, two steps with previews, final images.
fn play_job(h: &mut Harness<'_, StudioApp>, fake: &WorkerLink, j: &JobRequest) {
    fake.send(Event::Started { job: j.id });
    for step in 1..=2 {
        fake.send(Event::Step {
            job: j.id,
            step,
            total: 2,
            elapsed: Duration::from_millis(100 * step as u64),
            cells: j.cells.clone(),
            cell_step: step,
            cell_total: 2,
        });
    }
    for &cell in &j.cells {
        fake.send(Event::Preview {
            job: j.id,
            cell,
            step: 1,
            image: image(10),
            decode_time: Duration::from_millis(1),
        });
    }
    h.run_steps(2);
    for (k, (&cell, &seed)) in j.cells.iter().zip(&j.seeds).enumerate() {
        // In compare mode each model's row gets its own shade: 200, 150, 100, 50.
        let row = j.model_of.get(k).copied().unwrap_or(0);
        fake.send(Event::CellDone {
            job: j.id,
            cell,
            seed,
            model: j.models.get(row).cloned().unwrap_or_else(|| "fake".into()),
            image: image(200 - 50 * row as u8),
            path: None,
            parameters: format!(
                "a prompt\nSteps: 2, Sampler: Euler, CFG scale: 7.0, Seed: {seed}, Size: 8x8"
            ),
        });
    }
    fake.send(Event::JobDone {
        job: j.id,
        elapsed: Duration::from_millis(300),
    });
    h.run_steps(2);
}

#[test]
fn typing_a_prompt_and_ctrl_enter_sends_the_right_generate() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "a red fox in the snow");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    assert_eq!(j.prompt, "a red fox in the snow");
    assert_eq!(j.seeds.len(), 8);
    assert_eq!(j.cells, (0..8).collect::<Vec<_>>());
    for (i, s) in j.seeds.iter().enumerate() {
        assert_eq!(*s, j.seeds[0] + i as u64, "cell i uses seed + i");
    }
    let p = &h.state().state.params;
    assert_eq!((j.steps, j.guidance), (p.steps, p.cfg));
    assert_eq!(j.clip_skip, 1, "Clip skip defaults to 1 (last layer)");
    assert!(j.models.is_empty() && j.model_of.is_empty() && j.init.is_none());
    assert_eq!((j.width, j.height), (p.width, p.height));
    // The Generate button does the same.
    h.get_by_label("Generate").click();
    h.run_steps(2);
    let j2 = generate_cmd(&fake);
    assert_eq!(j2.prompt, "a red fox in the snow");
    assert_ne!(j2.id, j.id);
}

#[test]
fn events_fill_the_cells_previews_then_finals() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "a lighthouse");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    fake.send(Event::Started { job: j.id });
    fake.send(Event::Step {
        job: j.id,
        step: 3,
        total: 10,
        elapsed: Duration::from_secs(1),
        cells: Vec::new(),
        cell_step: 0,
        cell_total: 0,
    });
    fake.send(Event::Preview {
        job: j.id,
        cell: 0,
        step: 3,
        image: image(50),
        decode_time: Duration::from_millis(2),
    });
    h.run_steps(2);
    let first = format!("Cell 1: seed {}, step 3/10", j.seeds[0]);
    h.get_by_role_and_label(Role::Button, &first);
    assert!(h.state().cells[0].texture.is_some(), "the preview is shown");
    h.get_by_label_contains("step 3/10 · 3.00 it/s");
    play_job(&mut h, &fake, &j);
    for (i, seed) in j.seeds.iter().enumerate() {
        h.get_by_role_and_label(Role::Button, &format!("Cell {}: seed {seed}, done", i + 1));
        assert!(h.state().cells[i].image.is_some());
    }
    // A late preview never replaces the final image.
    fake.send(Event::Preview {
        job: j.id,
        cell: 0,
        step: 9,
        image: image(1),
        decode_time: Duration::ZERO,
    });
    h.run_steps(2);
    assert_eq!(h.state().cells[0].image.as_ref().unwrap().rgb[0], 200);
    assert_eq!(
        h.state().state.history.len(),
        1,
        "the job is in the history"
    );
}

#[test]
fn stop_button_and_escape_cancel_the_running_job() {
    let (mut h, fake) = studio();
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    fake.send(Event::Started { job: j.id });
    h.run_steps(2);
    h.get_by_role_and_label(Role::Button, "Stop").click();
    h.run_steps(2);
    assert!(matches!(sent(&fake).as_slice(), [Command::Cancel(id)] if *id == j.id));
    h.key_press(Key::Escape);
    h.run_steps(2);
    assert!(matches!(sent(&fake).as_slice(), [Command::Cancel(id)] if *id == j.id));
    fake.send(Event::Cancelled { job: j.id });
    h.run_steps(2);
    assert_eq!(h.state().cells[0].status, CellStatus::Cancelled);
    h.get_by_role_and_label(
        Role::Button,
        &format!("Cell 1: seed {}, stopped", j.seeds[0]),
    );
    assert!(h.state().running().is_none());
}

#[test]
fn a_locked_seed_stays_and_an_unlocked_one_changes() {
    let (mut h, fake) = studio();
    ctrl_enter(&mut h);
    let a = generate_cmd(&fake);
    ctrl_enter(&mut h);
    let b = generate_cmd(&fake);
    assert_ne!(a.seeds[0], b.seeds[0], "unlocked: a new seed per Generate");
    h.get_by_label("Lock seed").click();
    h.run_steps(2);
    assert!(h.state().state.params.seed_locked);
    ctrl_enter(&mut h);
    let c = generate_cmd(&fake);
    ctrl_enter(&mut h);
    let d = generate_cmd(&fake);
    assert_eq!(c.seeds, d.seeds, "locked: the same seeds");
    assert_eq!(c.seeds[0], b.seeds[0], "locking keeps the last seed");
    // Same-seed mode: every cell the same seed.
    h.get_by_label("same seed").click();
    h.run_steps(2);
    ctrl_enter(&mut h);
    let e = generate_cmd(&fake);
    assert!(e.seeds.iter().all(|&s| s == c.seeds[0]));
}

#[test]
fn use_this_seed_and_regenerate_this_cell_from_the_large_view() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "a castle");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    play_job(&mut h, &fake, &j);
    let seed = j.seeds[2];
    h.get_by_role_and_label(Role::Button, &format!("Cell 3: seed {seed}, done"))
        .click();
    h.run_steps(4);
    assert_eq!(h.state().viewer.as_ref().map(|v| v.cell), Some(2));
    h.get_by_label("Use this seed").click();
    h.run_steps(2);
    assert_eq!(h.state().state.params.seed, seed);
    assert!(h.state().state.params.seed_locked);
    h.get_by_label("Regenerate this cell").click();
    h.run_steps(2);
    let r = generate_cmd(&fake);
    assert_eq!((r.seeds.clone(), r.cells.clone()), (vec![seed], vec![2]));
    assert_eq!(r.prompt, "a castle");
    h.key_press(Key::Escape);
    h.run_steps(2);
    assert!(h.state().viewer.is_none(), "Esc closes the large view");
    ctrl_enter(&mut h);
    let g = generate_cmd(&fake);
    assert_eq!(g.seeds[0], seed);
}

#[test]
fn the_queue_shows_waiting_jobs_and_removes_or_edits_them() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "first");
    ctrl_enter(&mut h);
    let a = generate_cmd(&fake);
    fake.send(Event::Started { job: a.id });
    h.run_steps(1);
    ctrl_enter(&mut h);
    let b = generate_cmd(&fake);
    ctrl_enter(&mut h);
    let c = generate_cmd(&fake);
    h.get_by_label("Queue (2 waiting)");
    h.get_by_label(&format!("Remove #{}", b.id)).click();
    h.run_steps(2);
    assert!(matches!(sent(&fake).as_slice(), [Command::Cancel(id)] if *id == b.id));
    fake.send(Event::Cancelled { job: b.id });
    h.run_steps(2);
    h.get_by_label("Queue (1 waiting)");
    assert!(h.query_by_label(&format!("Remove #{}", b.id)).is_none());
    // Edit: back into the editor, out of the queue.
    h.state_mut().state.params.prompt = "changed".into();
    h.get_by_label("Edit").click();
    h.run_steps(2);
    assert!(matches!(sent(&fake).as_slice(), [Command::Cancel(id)] if *id == c.id));
    assert_eq!(h.state().state.params.prompt, "first");
    assert_eq!(h.state().state.params.seed, c.seeds[0]);
}

#[test]
fn errors_are_shown_and_dismissible_and_the_window_carries_on() {
    let (mut h, fake) = studio();
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    fake.send(Event::Started { job: j.id });
    fake.send(Event::Failed {
        job: Some(j.id),
        message: "unet: out of memory".into(),
    });
    fake.send(Event::ModelFailed {
        message: "model folder not found: /x".into(),
    });
    h.run_steps(2);
    h.get_by_label("Error: unet: out of memory");
    h.get_by_label_contains("model folder not found");
    assert_eq!(h.state().cells[0].status, CellStatus::Failed);
    h.get_all_by_label("Dismiss").next().unwrap().click();
    h.run_steps(2);
    assert!(h.query_by_label("Error: unet: out of memory").is_none());
    h.get_by_label_contains("model folder not found");
    // Bad input in the editor is refused with a message, not sent.
    h.state_mut().state.params.sampler = "nonsense".into();
    ctrl_enter(&mut h);
    assert!(sent(&fake).is_empty());
    h.get_by_label_contains("unknown scheduler");
}

/// A file dropped on the window.
#[derive(Debug)]
struct Dropped(std::path::PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn vary_around_a_cell_keeps_it_first_and_fills_the_grid_with_variations() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "a castle");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    assert_eq!(j.variation, None, "no variation unless asked");
    play_job(&mut h, &fake, &j);
    let seed = j.seeds[5];
    h.get_by_role_and_label(Role::Button, &format!("Cell 6: seed {seed}, done"))
        .click();
    h.run_steps(4);
    h.get_by_label("Vary around this").click();
    h.run_steps(2);
    let v = generate_cmd(&fake);
    assert_eq!(v.seeds, vec![seed; 8], "the chosen seed in every cell");
    let var = v.variation.clone().unwrap();
    let want: Vec<u64> = (0..8).map(|i| seed + i).collect();
    assert_eq!(
        var.seeds, want,
        "cell 0's variation seed is its own seed: the same image"
    );
    assert_eq!(var.strength, 0.2);
    let p = &h.state().state.params;
    assert!(p.seed_locked && p.seed == seed && p.variation_seed == seed);
    // The seed panel's controls: a stronger variation around another seed.
    h.state_mut().state.params.variation_seed = 900;
    h.state_mut().state.params.variation_strength = 0.5;
    h.state_mut().state.params.seed_mode = sd_studio::ui::state::SeedMode::Increment;
    ctrl_enter(&mut h);
    let w = generate_cmd(&fake);
    let var = w.variation.unwrap();
    assert_eq!(var.seeds, (900..908).collect::<Vec<u64>>());
    assert_eq!(var.strength, 0.5);
    // Strength 0 turns it off.
    h.state_mut().state.params.variation_strength = 0.0;
    ctrl_enter(&mut h);
    assert_eq!(generate_cmd(&fake).variation, None);
}

#[test]
fn a_dropped_png_restores_its_parameters() {
    let (mut h, fake) = studio();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a1111.png");
    let text = "a knight, (detailed armor:1.2)\nNegative prompt: blurry\nSteps: 33, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 4242, Size: 640x384, Model: sd15, Clip skip: 2";
    let png = sd_studio::engine::metadata::encode_png(&[0; 8 * 8 * 3], 8, 8, text).unwrap();
    std::fs::write(&path, png).unwrap();
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(path.clone())));
    h.run_steps(2);
    let p = h.state().state.params.clone();
    assert_eq!(p.prompt, "a knight, (detailed armor:1.2)");
    assert_eq!(p.negative_prompt, "blurry");
    assert_eq!((p.steps, p.cfg, p.seed), (33, 5.5, 4242));
    assert_eq!((p.width, p.height), (640, 384));
    assert_eq!(p.sampler, "dpm++2m-karras");
    assert!(p.seed_locked);
    assert_eq!(p.clip_skip, 2, "Clip skip restored");
    assert_eq!(p.variation_strength, 0.0, "no variation in this PNG");
    ctrl_enter(&mut h);
    assert_eq!(generate_cmd(&fake).clip_skip, 2, "and sent with the job");
    // A PNG made with a variation seed restores it.
    let varied = dir.path().join("varied.png");
    let text = "a knight\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 10, Size: 512x512, Variation seed: 77, Variation seed strength: 0.35";
    let png = sd_studio::engine::metadata::encode_png(&[0; 8 * 8 * 3], 8, 8, text).unwrap();
    std::fs::write(&varied, png).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(varied)));
    h.run_steps(2);
    let q = h.state().state.params.clone();
    assert_eq!((q.variation_seed, q.variation_strength), (77, 0.35));
    // Back to the first PNG: its lack of a variation turns it off again.
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(path.clone())));
    h.run_steps(2);
    let p = h.state().state.params.clone();
    assert_eq!(p.variation_strength, 0.0);
    assert!(
        h.state().init.is_none(),
        "a PNG with parameters is not an init image"
    );
    // A PNG without parameters: said so, the editor unchanged, and it becomes the init image.
    let plain = dir.path().join("plain.png");
    image::RgbImage::new(4, 4).save(&plain).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(plain)));
    h.run_steps(2);
    h.get_by_label_contains("has no generation parameters; it is now the img2img init image");
    assert_eq!(h.state().state.params, p);
    assert_eq!(h.state().init.as_ref().map(|i| i.image.width), Some(4));
    // A file that is no image at all: a message naming it.
    let junk = dir.path().join("junk.webp");
    std::fs::write(&junk, b"junk").unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(junk)));
    h.run_steps(2);
    h.get_by_label_contains("junk.webp is not an image sd-studio can read");
}

/// Clicks a widget found by its label (collapsing headers, buttons, checkboxes).
fn click(h: &mut Harness<'_, StudioApp>, label: &str) {
    h.get_by_label(label).click();
    h.run_steps(2);
}

fn type_into(h: &mut Harness<'_, StudioApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::TextInput, label).click();
    h.run_steps(2);
    h.get_by_role_and_label(Role::TextInput, label)
        .type_text(text);
    h.run_steps(2);
}

#[test]
fn compare_mode_sends_one_job_with_a_row_per_model() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "a lighthouse at dusk");
    click(&mut h, "Compare models");
    click(&mut h, "Compare mode");
    type_into(&mut h, "Model 1", "runwayml/stable-diffusion-v1-5");
    // One model is not a comparison: a clear message, nothing sent.
    ctrl_enter(&mut h);
    assert!(sent(&fake).is_empty());
    h.get_by_label_contains("compare mode needs 2 to 4 models");
    type_into(&mut h, "Model 2", "/models/dreamshaper_8.safetensors");
    {
        let p = &mut h.state_mut().state.params;
        p.seed = 100;
        p.seed_locked = true;
    }
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    assert_eq!(
        j.models,
        vec![
            "runwayml/stable-diffusion-v1-5".to_string(),
            "/models/dreamshaper_8.safetensors".to_string()
        ]
    );
    assert_eq!(j.model_of, vec![0, 0, 0, 0, 1, 1, 1, 1]);
    assert_eq!(j.cells, (0..8).collect::<Vec<_>>());
    assert_eq!(j.seeds, vec![100, 101, 102, 103, 100, 101, 102, 103]);
    assert_eq!(j.prompt, "a lighthouse at dusk");
    play_job(&mut h, &fake, &j);
    h.get_by_label("Row 1: runwayml/stable-diffusion-v1-5");
    h.get_by_label("Row 2: dreamshaper_8.safetensors");
    h.get_by_role_and_label(Role::Button, "Cell 5: seed 100, done");
    h.get_by_role_and_label(Role::Button, "Cell 8: seed 103, done");
    assert_eq!(h.state().cells[4].image.as_ref().unwrap().rgb[0], 150);

    // Large view: the same seed from both models, and their difference.
    h.get_by_role_and_label(Role::Button, "Cell 2: seed 101, done")
        .click();
    h.run_steps(4);
    h.get_by_label_contains("Seed 101 · column 2");
    h.get_by_label_contains(
        "Side by side: Row 1: runwayml/stable-diffusion-v1-5 | Row 2: dreamshaper_8.safetensors",
    );
    click(&mut h, "Wipe");
    h.get_by_label_contains("Wipe: Row 1: runwayml/stable-diffusion-v1-5 | Row 2:");
    click(&mut h, "Flicker");
    h.get_by_label_contains("Flicker: Row 1:");
    click(&mut h, "Difference");
    h.get_by_label("difference: max 50 · mean 50.0");
    click(&mut h, "Swap");
    h.get_by_label_contains("Difference: Row 2: dreamshaper_8.safetensors | Row 1:");
    // Regenerate acts on the left image: row 2's cell, drawn by row 2's model.
    click(&mut h, "Regenerate this cell");
    let r = generate_cmd(&fake);
    assert_eq!(
        r.models,
        vec!["/models/dreamshaper_8.safetensors".to_string()]
    );
    assert_eq!(
        (r.model_of, r.cells, r.seeds),
        (vec![0], vec![5], vec![101])
    );
    h.key_press(Key::Escape);
    h.run_steps(2);

    // A third model: 3 rows × 2 seeds.
    click(&mut h, "Add model");
    type_into(&mut h, "Model 3", "/models/anything-v5");
    ctrl_enter(&mut h);
    let k = generate_cmd(&fake);
    assert_eq!(k.models.len(), 3);
    assert_eq!(k.model_of, vec![0, 0, 1, 1, 2, 2]);
    assert_eq!(k.cells, vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(k.seeds, vec![100, 101, 100, 101, 100, 101]);
    play_job(&mut h, &fake, &k);
    h.get_by_label("Row 3: anything-v5");
    assert_eq!(h.state().layout.cols, 2);
    // Compare mode off: back to the plain 2×4 grid.
    click(&mut h, "Compare mode");
    ctrl_enter(&mut h);
    let plain = generate_cmd(&fake);
    assert!(plain.models.is_empty() && plain.model_of.is_empty());
    play_job(&mut h, &fake, &plain);
    assert!(h
        .query_by_label("Row 1: runwayml/stable-diffusion-v1-5")
        .is_none());
    // Restoring the first compare job from the history brings its models back.
    // (Below the fold of the controls panel: clicked through accessibility.)
    h.get_by_label("History (3)").click_accesskit();
    h.run_steps(2);
    h.get_by_label("Restore 1").click_accesskit();
    h.run_steps(2);
    let c = &h.state().state.compare;
    assert!(c.enabled);
    assert_eq!(c.models, j.models);
}

fn found(name: &str, kind: &str, bytes: u64, loadable: bool) -> FoundModel {
    FoundModel {
        path: format!("/sd/models/{name}").into(),
        name: name.into(),
        kind: kind.into(),
        bytes,
        loadable,
    }
}

fn load_cmd(fake: &WorkerLink) -> ModelSpec {
    match sent(fake).as_slice() {
        [Command::LoadModel(s)] => s.clone(),
        other => panic!("expected one LoadModel, got {other:?}"),
    }
}

#[test]
fn a_first_run_offers_the_default_model_and_scanned_ones_and_defaults_to_auto_device() {
    let (mut h, fake) = studio();
    h.get_by_role_and_label(Role::ComboBox, "Models").click();
    h.run_steps(2);
    h.get_by_label_contains("Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5")
        .click();
    h.run_steps(2);
    let spec = load_cmd(&fake);
    assert_eq!(spec.model, "stable-diffusion-v1-5/stable-diffusion-v1-5");
    // Device and precision default to auto (CUDA + f16 when there is a GPU, else CPU + f32).
    assert_eq!(
        (spec.device.as_str(), spec.dtype.as_str()),
        ("auto", "auto")
    );
    // SDXL base and SDXL-Turbo are offered too.
    h.get_by_role_and_label(Role::ComboBox, "Models").click();
    h.run_steps(2);
    h.get_by_label_contains("SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0")
        .click();
    h.run_steps(2);
    assert_eq!(
        load_cmd(&fake).model,
        "stabilityai/stable-diffusion-xl-base-1.0"
    );
    // Scanned checkpoints join the list (not VAEs, not pickles).
    fake.send(Event::ModelsFound {
        dir: "/sd/models".into(),
        models: vec![
            found(
                "dreamshaper_8.safetensors",
                "single file",
                2_132_000_000,
                true,
            ),
            found("vae-ft-mse.safetensors", "VAE", 335_000_000, true),
            found("old.ckpt", "pickle (refused)", 4_200_000_000, false),
        ],
        error: None,
    });
    h.run_steps(2);
    h.get_by_role_and_label(Role::ComboBox, "Models").click();
    h.run_steps(2);
    assert!(h
        .query_by_label_contains("vae-ft-mse.safetensors (VAE)")
        .is_none());
    assert!(h.query_by_label_contains("old.ckpt").is_none());
    h.get_by_label("dreamshaper_8.safetensors (single file)")
        .click();
    h.run_steps(2);
    assert_eq!(
        load_cmd(&fake).model,
        "/sd/models/dreamshaper_8.safetensors"
    );
}

#[test]
fn the_models_folder_scan_lists_checkpoints_and_loads_or_compares_them() {
    let (mut h, fake) = studio();
    click(&mut h, "Models folder");
    // Scanning without a folder says what to do.
    click(&mut h, "Scan");
    assert!(sent(&fake).is_empty());
    h.get_by_label_contains("choose a models folder to scan");
    type_into(&mut h, "Folder", "/sd/models");
    click(&mut h, "Scan");
    match sent(&fake).as_slice() {
        [Command::ScanModels(d)] => assert_eq!(d, &std::path::PathBuf::from("/sd/models")),
        other => panic!("expected ScanModels, got {other:?}"),
    }
    fake.send(Event::ModelsFound {
        dir: "/sd/models".into(),
        models: vec![
            found("sd15.safetensors", "single file", 2_132_000_000, true),
            found("anything-v5", "diffusers folder", 2_500_000_000, true),
            found(
                "old.ckpt",
                "pickle (refused: convert to .safetensors)",
                4_200_000_000,
                false,
            ),
            found("vae-ft-mse.safetensors", "VAE", 335_000_000, true),
        ],
        error: None,
    });
    h.run_steps(2);
    h.get_by_label("sd15.safetensors · single file · 2.1 GB");
    h.get_by_label("old.ckpt · pickle (refused: convert to .safetensors) · 4.2 GB");
    assert!(
        h.query_by_label("Load old.ckpt").is_none(),
        "pickles cannot be loaded"
    );
    click(&mut h, "Load sd15.safetensors");
    let spec = load_cmd(&fake);
    assert_eq!(spec.model, "/sd/models/sd15.safetensors");
    assert_eq!(spec.vae, None);
    click(&mut h, "Compare anything-v5");
    let c = &h.state().state.compare;
    assert!(c.enabled);
    assert_eq!(c.models[0], "/sd/models/anything-v5");
    // The VAE found by the scan is offered in the VAE dropdown.
    h.get_by_role_and_label(Role::ComboBox, "VAE").click();
    h.run_steps(2);
    h.get_by_label("vae-ft-mse.safetensors").click();
    h.run_steps(2);
    let spec = load_cmd(&fake);
    assert_eq!(spec.model, "/sd/models/sd15.safetensors");
    assert_eq!(
        spec.vae.as_deref(),
        Some("/sd/models/vae-ft-mse.safetensors")
    );
    // A failed scan says why.
    fake.send(Event::ModelsFound {
        dir: "/nope".into(),
        models: vec![],
        error: Some("folder not found".into()),
    });
    h.run_steps(2);
    h.get_by_label_contains("cannot scan /nope: folder not found");
}

#[test]
fn choosing_a_vae_reloads_the_model_with_it_and_automatic_goes_back() {
    let (mut h, fake) = studio();
    type_into(&mut h, "Model", "runwayml/stable-diffusion-v1-5");
    click(&mut h, "Load");
    assert_eq!(load_cmd(&fake).vae, None);
    type_into(
        &mut h,
        "VAE hub id, folder or file",
        "stabilityai/sd-vae-ft-mse",
    );
    click(&mut h, "Use VAE");
    let spec = load_cmd(&fake);
    assert_eq!(spec.model, "runwayml/stable-diffusion-v1-5");
    assert_eq!(spec.vae.as_deref(), Some("stabilityai/sd-vae-ft-mse"));
    assert_eq!(h.state().state.settings.vae, "stabilityai/sd-vae-ft-mse");
    h.get_by_role_and_label(Role::ComboBox, "VAE").click();
    h.run_steps(2);
    h.get_by_label("Automatic").click();
    h.run_steps(2);
    assert_eq!(load_cmd(&fake).vae, None);
    assert_eq!(h.state().state.settings.vae, "");
}

#[test]
fn send_to_img2img_puts_the_cell_into_the_next_job() {
    let (mut h, fake) = studio();
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    play_job(&mut h, &fake, &j);
    h.get_by_role_and_label(Role::Button, &format!("Cell 3: seed {}, done", j.seeds[2]))
        .click_secondary();
    h.run_steps(2);
    click(&mut h, "Send to img2img");
    h.get_by_label_contains(&format!("cell 3 (seed {}) · 8×8", j.seeds[2]));
    assert_eq!(h.state().state.params.denoising_strength, 0.75);
    h.state_mut().state.params.denoising_strength = 0.4;
    ctrl_enter(&mut h);
    let g = generate_cmd(&fake);
    let init = g.init.expect("the next job is img2img");
    assert_eq!(init.image, image(200));
    assert_eq!(init.strength, 0.4);
    assert!(init.mask.is_none(), "no mask painted: plain img2img");
    // From the large view as well; Clear goes back to txt2img.
    h.get_by_role_and_label(Role::Button, &format!("Cell 1: seed {}, done", j.seeds[0]))
        .click();
    h.run_steps(3);
    click(&mut h, "Send to img2img");
    h.key_press(Key::Escape);
    h.run_steps(2);
    h.get_by_label_contains(&format!("cell 1 (seed {}) · 8×8", j.seeds[0]));
    click(&mut h, "Clear");
    ctrl_enter(&mut h);
    assert!(generate_cmd(&fake).init.is_none());
}

fn drag(h: &mut Harness<'_, StudioApp>, points: &[egui::Pos2]) {
    let button = |pos, pressed| egui::Event::PointerButton {
        pos,
        button: egui::PointerButton::Primary,
        pressed,
        modifiers: Modifiers::NONE,
    };
    h.event(egui::Event::PointerMoved(points[0]));
    h.event(button(points[0], true));
    h.run_steps(1);
    for &p in &points[1..] {
        h.event(egui::Event::PointerMoved(p));
        h.run_steps(1);
    }
    h.event(button(points[points.len() - 1], false));
    h.run_steps(2);
}

#[test]
fn an_image_dropped_on_image_input_is_painted_over_and_the_mask_goes_into_the_job() {
    let (mut h, fake) = studio();
    let dir = tempfile::tempdir().unwrap();
    // A bad file dropped on the panel: a message naming it, no init image.
    let bad = dir.path().join("notes.png");
    std::fs::write(&bad, b"not an image").unwrap();
    h.get_by_label("Image input (img2img)").hover();
    h.run_steps(1);
    h.input_mut().dropped_files.push(Arc::new(Dropped(bad)));
    h.run_steps(2);
    h.get_by_label_contains("notes.png is not an image sd-studio can read");
    assert!(h.state().init.is_none());
    // A 64×32 picture dropped on the panel becomes the init image.
    let path = dir.path().join("photo.png");
    image::RgbImage::from_fn(64, 32, |x, _| image::Rgb([x as u8 * 4, 0, 0]))
        .save(&path)
        .unwrap();
    h.get_by_label("Image input (img2img)").hover();
    h.run_steps(1);
    h.input_mut().dropped_files.push(Arc::new(Dropped(path)));
    h.run_steps(3);
    h.get_by_label_contains("photo.png · 64×32");
    // Paint a horizontal stroke across the middle, from x = 1/4 to x = 3/4 of the picture.
    let r = h.get_by_label("Mask canvas").rect();
    let at = |fx: f32, fy: f32| egui::pos2(r.left() + r.width() * fx, r.top() + r.height() * fy);
    drag(
        &mut h,
        &[at(0.25, 0.5), at(0.4, 0.5), at(0.6, 0.5), at(0.75, 0.5)],
    );
    h.get_by_label("Image input (inpainting)");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    let init = j.init.expect("img2img input");
    assert_eq!((init.image.width, init.image.height), (64, 32));
    assert_eq!(init.strength, 0.75);
    let mask = init.mask.expect("a painted mask");
    assert_eq!((mask.width, mask.height), (64, 32));
    let px = |x: usize, y: usize| mask.data[y * 64 + x];
    for x in 17..47 {
        assert_eq!(px(x, 16), 255, "painted at ({x}, 16)");
    }
    assert_eq!(px(2, 2), 0, "top-left corner untouched");
    assert_eq!(px(60, 30), 0, "bottom-right corner untouched");
    assert_eq!(px(32, 1), 0, "far above the stroke untouched");
    // Erase the middle of the stroke.
    click(&mut h, "Erase");
    drag(&mut h, &[at(0.45, 0.5), at(0.5, 0.5), at(0.55, 0.5)]);
    ctrl_enter(&mut h);
    let mask = generate_cmd(&fake).init.unwrap().mask.unwrap();
    assert_eq!(mask.data[16 * 64 + 32], 0, "erased");
    assert_eq!(mask.data[16 * 64 + 20], 255, "the rest stays");
    // Clear mask: back to plain img2img.
    click(&mut h, "Clear mask");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    assert!(j.init.unwrap().mask.is_none());
}

#[test]
fn a_long_prompt_shows_where_its_chunks_break() {
    let (mut h, _fake) = studio();
    let tok = ClipTokenizer::builtin("<|endoftext|>").unwrap();
    fake_ready_with_tokens(&mut h, &_fake, tok);
    type_prompt(&mut h, "a red fox in the snow");
    h.get_by_label("6/75 tokens");
    assert!(
        h.query_by_label_contains("chunk 1 ·").is_none(),
        "one chunk: no breaks shown"
    );
    h.get_by_role_and_label(Role::MultilineTextInput, "Prompt")
        .type_text(" BREAK golden hour lighting, soft shadows");
    h.run_steps(2);
    h.get_by_label("chunk 1 · 6 tokens · starts 'a red fox in the snow'");
    h.get_by_label_contains("chunk 2 · 6 tokens · starts 'golden hour lighting");
    // A prompt past 75 tokens breaks on its own.
    h.state_mut().state.params.prompt = "a cat, ".repeat(30);
    h.run_steps(2);
    h.get_by_label_contains("chunk 2 · ");
}

fn fake_ready_with_tokens(h: &mut Harness<'_, StudioApp>, fake: &WorkerLink, tok: ClipTokenizer) {
    fake.send(Event::ModelReady {
        name: "tiny-sd15".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        previewer: "TAESD".into(),
        memory: "full".into(),
        tokens: Some(TokenCounter(Arc::new(tok))),
    });
    h.run_steps(2);
}

#[test]
fn model_loading_progress_is_shown() {
    let (mut h, fake) = studio();
    fake.send(Event::ModelLoading {
        message: "reading unet weights".into(),
        progress: Some(0.4),
    });
    h.run_steps(2);
    h.get_by_label_contains("reading unet weights");
    h.get_by_label_contains("40%");
}

#[test]
fn memory_mode_reaches_the_load_and_slicing_and_tiling_reach_the_job() {
    let (mut h, fake) = studio();
    h.get_by_role_and_label(Role::ComboBox, "Memory mode")
        .click();
    h.run_steps(2);
    h.get_by_label("medvram").click();
    h.run_steps(2);
    type_into(&mut h, "Model", "runwayml/stable-diffusion-v1-5");
    click(&mut h, "Load");
    let spec = load_cmd(&fake);
    assert_eq!(spec.memory, sd_studio::engine::memory::MemoryMode::Medvram);
    assert_eq!(spec.cache_bytes, None, "0 GiB means automatic");
    h.state_mut().state.settings.cache_gib = 6.0;
    click(&mut h, "Load");
    assert_eq!(load_cmd(&fake).cache_bytes, Some(6 << 30));
    fake.send(Event::ModelReady {
        name: "stable-diffusion-v1-5".into(),
        device: "cuda".into(),
        dtype: "f16".into(),
        previewer: "TAESD".into(),
        memory: "medvram".into(),
        tokens: None,
    });
    h.run_steps(2);
    h.get_by_label_contains("memory: medvram");
    h.get_by_role_and_label(Role::ComboBox, "Attention slicing")
        .click();
    h.run_steps(2);
    h.get_by_label("slicing: 256").click();
    h.run_steps(2);
    h.get_by_role_and_label(Role::ComboBox, "Tiled VAE decode")
        .click();
    h.run_steps(2);
    h.get_by_label("tiled VAE: on").click();
    h.run_steps(2);
    type_prompt(&mut h, "a lighthouse at dusk");
    click(&mut h, "Generate");
    let job = generate_cmd(&fake);
    use sd_studio::engine::memory::{Slicing, Tiling};
    assert_eq!(job.attention_slicing, Slicing::Queries(256));
    assert_eq!(job.vae_tiling, Tiling::On);
}

#[test]
fn compare_cells_show_their_own_rows_progress() {
    let (mut h, fake) = studio();
    type_prompt(&mut h, "a lighthouse at dusk");
    click(&mut h, "Compare models");
    click(&mut h, "Compare mode");
    type_into(&mut h, "Model 1", "runwayml/stable-diffusion-v1-5");
    type_into(&mut h, "Model 2", "/models/dreamshaper_8.safetensors");
    {
        let p = &mut h.state_mut().state.params;
        (p.seed, p.seed_locked, p.steps) = (100, true, 8);
    }
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    fake.send(Event::Started { job: j.id });
    // The worker steps the rows in turn: job step 3 of 16 is row 1's second step.
    for (step, cells, own) in [(1, 0..4, 1), (2, 4..8, 1), (3, 0..4, 2)] {
        fake.send(Event::Step {
            job: j.id,
            step,
            total: 16,
            elapsed: Duration::from_millis(100 * step as u64),
            cells: cells.collect(),
            cell_step: own,
            cell_total: 8,
        });
    }
    h.run_steps(3);
    h.get_by_role_and_label(Role::Button, "Cell 1: seed 100, step 2/8");
    h.get_by_role_and_label(Role::Button, "Cell 5: seed 100, step 1/8");
    // The status bar keeps the whole job's count.
    h.get_by_label_contains("step 3/16");
}

fn lora(name: &str, family: &str, fits: Option<bool>) -> FoundLora {
    FoundLora {
        name: name.into(),
        path: format!("/loras/{name}.safetensors").into(),
        family: family.into(),
        parts: "UNet + text encoder".into(),
        fits,
        preview: None,
        error: None,
    }
}

#[test]
fn the_lora_panel_inserts_tags_sets_their_weight_and_jobs_get_the_folders() {
    let (mut h, fake) = studio();
    let dir = tempfile::tempdir().unwrap();
    let loras = dir.path().join("models").join("Lora");
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::create_dir_all(dir.path().join("embeddings")).unwrap();
    let ckpts = dir.path().join("models").join("Stable-diffusion");
    std::fs::create_dir_all(&ckpts).unwrap();
    h.state_mut().state.settings.models_dir = ckpts.clone();
    click(&mut h, "Scan LoRAs");
    let cmds = sent(&fake);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::ScanLoras(d) if d == &vec![loras.clone()])),
        "{cmds:?}"
    );
    fake.send(Event::LorasFound {
        loras: vec![
            lora("pixel_art", "SD 1.x", Some(true)),
            lora("xl_detail", "SDXL", Some(false)),
        ],
    });
    h.run_steps(2);
    h.get_by_label("LoRA (2)");
    h.get_by_label_contains("SDXL: not for the loaded model");
    type_prompt(&mut h, "a castle");
    click(&mut h, "pixel_art");
    assert_eq!(
        h.state().state.params.prompt,
        "a castle, <lora:pixel_art:1>"
    );
    // The tag is under the cursor: its slider sets the weight in the text.
    h.get_by_role_and_label(Role::Slider, "<lora:pixel_art> weight");
    h.state_mut().prompt_cursor = Some(12);
    h.run_steps(2);
    let slider = h.get_by_role_and_label(Role::Slider, "<lora:pixel_art> weight");
    slider.focus();
    h.run_steps(1);
    h.key_press(Key::ArrowLeft);
    h.run_steps(2);
    assert_eq!(
        h.state().state.params.prompt,
        "a castle, <lora:pixel_art:0.95>"
    );
    // A LoRA for another model cannot be clicked in.
    click(&mut h, "xl_detail");
    assert_eq!(
        h.state().state.params.prompt,
        "a castle, <lora:pixel_art:0.95>"
    );
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    assert_eq!(j.prompt, "a castle, <lora:pixel_art:0.95>");
    assert_eq!(j.lora_dirs, vec![loras]);
    assert_eq!(j.embedding_dirs, vec![dir.path().join("embeddings")]);
}

#[test]
fn the_token_counter_ignores_lora_tags() {
    let (mut h, fake) = studio();
    let tok = ClipTokenizer::builtin("<|endoftext|>").unwrap();
    fake_ready_with_tokens(&mut h, &fake, tok);
    type_prompt(&mut h, "a red fox <lora:some_style_lora:0.7> in the snow");
    h.get_by_label("6/75 tokens");
}

#[test]
fn a_dropped_png_with_loras_not_in_the_folder_says_which() {
    let (mut h, fake) = studio();
    fake.send(Event::LorasFound {
        loras: vec![lora("pixel_art", "SD 1.x", Some(true))],
    });
    h.run_steps(2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a1111.png");
    let text = "a knight <lora:pixel_art:0.8> <lora:gone_lora:1>\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 512x512, Lora hashes: \"pixel_art: 0123456789ab, gone_lora: ba9876543210\"";
    let png = sd_studio::engine::metadata::encode_png(&[0; 8 * 8 * 3], 8, 8, text).unwrap();
    std::fs::write(&path, png).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(path)));
    h.run_steps(2);
    assert_eq!(
        h.state().state.params.prompt,
        "a knight <lora:pixel_art:0.8> <lora:gone_lora:1>"
    );
    h.get_by_label_contains("LoRAs that are not in the LoRA folder: gone_lora");
}

#[test]
fn a_picture_dropped_on_the_controlnet_panel_becomes_the_map_every_cell_gets() {
    let (mut h, fake) = studio();
    let dir = tempfile::tempdir().unwrap();
    // Switched on without a model or picture: a message, no job.
    click(&mut h, "ControlNet");
    click(&mut h, "Use ControlNet");
    h.get_by_label("ControlNet (on)");
    ctrl_enter(&mut h);
    assert!(sent(&fake).is_empty());
    h.get_by_label_contains("no ControlNet model is chosen");
    h.state_mut().state.params.control.model = "lllyasviel/control_v11p_sd15_canny".into();
    ctrl_enter(&mut h);
    assert!(sent(&fake).is_empty());
    h.get_by_label_contains("no control picture");
    // A 64×32 picture with a bright square, dropped on the panel.
    let path = dir.path().join("pose.png");
    image::RgbImage::from_fn(64, 32, |x, y| {
        let on = (20..44).contains(&x) && (8..24).contains(&y);
        image::Rgb(if on { [230, 230, 230] } else { [10, 10, 10] })
    })
    .save(&path)
    .unwrap();
    h.get_by_label("ControlNet (on)").hover();
    h.run_steps(1);
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(path.clone())));
    h.run_steps(3);
    h.get_by_label_contains("pose.png (64×32)");
    h.get_by_label_contains("control map (canny, 512×512)");
    assert!(
        h.state().init.is_none(),
        "the picture went to ControlNet, not img2img"
    );
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    let c = j.control.expect("the job carries the ControlNet");
    assert_eq!(c.model, "lllyasviel/control_v11p_sd15_canny");
    assert_eq!((c.map.width, c.map.height), (512, 512));
    assert_eq!(
        (c.module.as_str(), c.scale, c.start, c.end),
        ("canny", 1.0, 0.0, 1.0)
    );
    // The map is the square's Canny outline, as the engine's preprocessor makes it.
    let rgb = image::open(&path).unwrap().to_rgb8();
    let fitted = sd_studio::engine::control::fit(rgb.as_raw(), 64, 32, 512, 512).unwrap();
    let want = sd_studio::engine::control::Preprocess::CANNY.apply(&fitted, 512, 512);
    assert_eq!(c.map.rgb, want);
    let edges = c.map.rgb.iter().filter(|&&v| v == 255).count();
    assert!(edges > 3 * 500, "an outline: {edges} edge bytes");
    assert!(c.map.rgb.iter().all(|&v| v == 0 || v == 255));
    // "none" sends the fitted picture itself; the size follows the editor.
    h.state_mut().state.params.control.preprocess = "none".into();
    h.state_mut().state.params.width = 256;
    h.state_mut().state.params.control.scale = 0.5;
    ctrl_enter(&mut h);
    let c = generate_cmd(&fake).control.unwrap();
    assert_eq!(
        (c.map.width, c.map.height, c.module.as_str(), c.scale),
        (256, 512, "none", 0.5)
    );
    assert_eq!(
        c.map.rgb,
        sd_studio::engine::control::fit(rgb.as_raw(), 64, 32, 256, 512).unwrap()
    );
    // Switched off: no ControlNet in the job.
    click(&mut h, "Use ControlNet");
    ctrl_enter(&mut h);
    assert!(generate_cmd(&fake).control.is_none());
}

#[test]
fn a_dropped_png_with_a_controlnet_restores_the_unit_and_finds_the_model() {
    let (mut h, _fake) = studio();
    let dir = tempfile::tempdir().unwrap();
    let cn_dir = dir.path().join("models/ControlNet");
    std::fs::create_dir_all(&cn_dir).unwrap();
    std::fs::write(cn_dir.join("control_v11p_sd15_canny.safetensors"), b"").unwrap();
    h.state_mut().state.settings.models_dir = dir.path().join("models/Stable-diffusion");
    std::fs::create_dir_all(dir.path().join("models/Stable-diffusion")).unwrap();
    let path = dir.path().join("a1111.png");
    let text = "a house\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 512x512, ControlNet 0: \"Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.6, Guidance Start: 0.1, Guidance End: 0.8\", ControlNet 1: \"Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0\"";
    let png = sd_studio::engine::metadata::encode_png(&[0; 8 * 8 * 3], 8, 8, text).unwrap();
    std::fs::write(&path, png).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(path)));
    h.run_steps(3);
    let c = h.state().state.params.control.clone();
    assert!(c.enabled);
    assert_eq!(
        (c.preprocess.as_str(), c.scale, c.start, c.end),
        ("canny", 0.6, 0.1, 0.8)
    );
    assert_eq!(
        std::path::PathBuf::from(&c.model),
        cn_dir.join("control_v11p_sd15_canny.safetensors")
    );
    h.get_by_label_contains("does not hold the ControlNet's picture");
    h.get_by_label_contains("this image used 2 ControlNets");
    h.get_by_label("ControlNet (on)");
}

#[test]
fn hires_fix_reaches_the_job_and_a_dropped_png_restores_it() {
    let (mut h, fake) = studio();
    click(&mut h, "Hires. fix");
    click(&mut h, "Upscale and denoise again");
    h.get_by_label("Hires. fix (on)");
    h.get_by_label_contains("512×512 upscaled to 1024×1024");
    ctrl_enter(&mut h);
    let j = generate_cmd(&fake);
    let hr = j.hires.expect("hires in the job");
    assert_eq!(
        (hr.width, hr.height, hr.steps, hr.strength),
        (1024, 1024, None, 0.7)
    );
    assert_eq!(hr.upscaler, "latent");
    assert_eq!(
        (j.width, j.height),
        (512, 512),
        "the job runs at the base size first"
    );
    // A1111's fields from a PNG: resize, steps, upscaler, strength.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a1111.png");
    let text = "a castle\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 512x768, Denoising strength: 0.45, Hires resize: 768x1152, Hires steps: 12, Hires upscaler: Lanczos";
    let png = sd_studio::engine::metadata::encode_png(&[0; 8 * 8 * 3], 8, 8, text).unwrap();
    std::fs::write(&path, png).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(path)));
    h.run_steps(3);
    let s = h.state().state.params.hires.clone();
    assert!(s.enabled);
    assert_eq!(
        (s.upscaler.as_str(), s.scale, s.steps, s.strength),
        ("lanczos", 1.5, 12, 0.45)
    );
    ctrl_enter(&mut h);
    let hr = generate_cmd(&fake).hires.unwrap();
    assert_eq!((hr.width, hr.height, hr.steps), (768, 1152, Some(12)));
    // A PNG without Hires fields turns it off.
    let plain = dir.path().join("plain.png");
    let png = sd_studio::engine::metadata::encode_png(
        &[0; 8 * 8 * 3],
        8,
        8,
        "a castle\nSteps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 1, Size: 512x512",
    )
    .unwrap();
    std::fs::write(&plain, png).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(plain)));
    h.run_steps(3);
    ctrl_enter(&mut h);
    assert!(generate_cmd(&fake).hires.is_none());
}

#[test]
fn two_history_entries_show_what_changed_and_restore_a_subset() {
    use sd_studio::ui::state::HistoryEntry;
    let (mut h, _fake) = studio_sized(egui::vec2(1280.0, 1800.0));
    let entry = |prompt: &str, seed: u64, steps: usize| {
        let mut params = h.state().state.params.clone();
        params.prompt = prompt.into();
        params.steps = steps;
        HistoryEntry {
            params,
            model: "tests/fixtures/tiny-sd15".into(),
            compare_models: vec![],
            seeds: vec![seed],
            images: vec![],
            time: 0,
        }
    };
    let a = entry("a red fox in a forest", 11, 20);
    let mut b = entry("a blue fox in a forest <lora:ink:0.6>", 12, 30);
    b.params.hires.enabled = true;
    h.state_mut().state.history = vec![a, b];
    h.state_mut().state.params.prompt = "what I am typing now".into();
    h.run_steps(2);
    click(&mut h, "History (2)");
    click(&mut h, "Compare 1");
    click(&mut h, "Compare 2");
    h.get_by_label("#1 vs #2: 5 difference(s)");
    h.get_by_label("prompt: added blue; removed red");
    h.get_by_label("LoRAs: none, then ink:0.6");
    h.get_by_label("seed: 11, then 12");
    h.get_by_label("steps: 20, then 30");
    h.get_by_label_contains("hires fix: off, then ×2 latent");
    // Take the seed and the steps of #1; the prompt being typed stays.
    click(&mut h, "Take seed");
    click(&mut h, "Take steps");
    click(&mut h, "Restore ticked from #1");
    let p = h.state().state.params.clone();
    assert_eq!(
        (p.seed, p.steps, p.prompt.as_str()),
        (11, 20, "what I am typing now")
    );
    assert!(p.seed_locked);
    // One entry ticked: it against the editor.
    click(&mut h, "Compare 1");
    h.get_by_label_contains("#2 vs the editor:");
    h.get_by_label("prompt: added what I am typing now; removed a blue fox in a forest");
}

/// Live mode's pause in typing has passed: frames after it queue the job.
fn after_debounce(h: &mut Harness<'_, StudioApp>) {
    std::thread::sleep(sd_studio::ui::app::LIVE_DEBOUNCE + Duration::from_millis(60));
    h.run_steps(2);
}

#[test]
fn live_mode_regenerates_after_a_pause_cancels_stale_jobs_and_keeps_on_request() {
    let (mut h, fake) = studio();
    let out = tempfile::tempdir().unwrap();
    h.state_mut().state.settings.output_dir = out.path().to_path_buf();
    h.state_mut().state.params.steps = 4;
    click(&mut h, "Live");
    after_debounce(&mut h);
    // Switching it on draws the grid as it is, with the seed kept.
    let seed = h.state().state.params.seed;
    let first = generate_cmd(&fake);
    assert!(!first.save, "live grids are not saved");
    assert_eq!(first.seeds[0], seed);
    fake.send(Event::Started { job: first.id });
    h.run_steps(1);
    // A burst of typing: one job, for the last text, after the pause; the stale one is
    // cancelled (the worker stops it at its next step).
    type_prompt(&mut h, "a red fox");
    after_debounce(&mut h);
    let cmds = sent(&fake);
    assert!(
        matches!(cmds.as_slice(), [Command::Cancel(a), Command::Generate(j)] if *a == first.id && j.prompt == "a red fox" && j.seeds[0] == seed),
        "{cmds:?}"
    );
    let Command::Generate(second) = cmds[1].clone() else {
        unreachable!()
    };
    fake.send(Event::Cancelled { job: first.id });
    // Nothing changes: nothing is queued.
    after_debounce(&mut h);
    assert!(sent(&fake).is_empty());
    // The live job finishes: not in the history; Keep saves a cell with its parameters.
    play_job(&mut h, &fake, &second);
    assert!(h.state().state.history.is_empty());
    h.get_by_role_and_label(
        Role::Button,
        &format!("Cell 2: seed {}, done", second.seeds[1]),
    )
    .click_secondary();
    h.run_steps(2);
    click(&mut h, "Keep");
    let kept = out.path().join(format!("{}.png", second.seeds[1]));
    let text = sd_studio::engine::metadata::read_png_parameters(&kept)
        .unwrap()
        .expect("parameters in the kept PNG");
    assert!(
        text.contains(&format!("Seed: {}", second.seeds[1])),
        "{text}"
    );
    assert_eq!(h.state().state.history.len(), 1);
    assert_eq!(h.state().state.history[0].images, vec![kept]);
    // Ctrl+Enter while live, even right after an edit: one job (not a second one from
    // live mode).
    type_prompt(&mut h, ", at dusk");
    ctrl_enter(&mut h);
    after_debounce(&mut h);
    let cmds = sent(&fake);
    assert!(
        matches!(cmds.as_slice(), [Command::Generate(j)] if j.save),
        "{cmds:?}"
    );
}

#[test]
fn live_mode_warns_once_for_a_many_step_model() {
    let (mut h, fake) = studio();
    h.state_mut().state.params.steps = 20;
    click(&mut h, "Live");
    after_debounce(&mut h);
    h.get_by_label_contains("Live: 20 steps per image");
    let _ = sent(&fake);
    h.state_mut().state.params.cfg = 5.0;
    h.run_steps(1); // the frame that sees the edit
    after_debounce(&mut h);
    assert_eq!(
        h.query_all_by_label_contains("Live: 20 steps per image")
            .count(),
        1,
        "warned once"
    );
    // The first live job never started: it is taken out of the queue, the new one queued.
    let cmds = sent(&fake);
    assert!(
        matches!(cmds.as_slice(), [Command::Cancel(_), Command::Generate(_)]),
        "{cmds:?}"
    );
}
