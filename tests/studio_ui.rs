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
use sd_studio::protocol::{link, Command, Event, JobRequest, RgbImage, WorkerLink};
use sd_studio::ui::app::CellStatus;
use sd_studio::ui::{StudioApp, StudioOptions};

fn studio() -> (Harness<'static, StudioApp>, WorkerLink) {
    let (engine, fake) = link(Arc::new(|| {}));
    let app = StudioApp::new(
        engine,
        StudioOptions {
            no_persist: true,
            ..Default::default()
        },
    );
    let harness = Harness::builder()
        .with_size(egui::vec2(1280.0, 900.0))
        .build_ui_state(|ui, app: &mut StudioApp| app.frame(ui), app);
    fake.send(Event::ModelReady {
        name: "tiny-sd15".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        previewer: "TAESD".into(),
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
    for (&cell, &seed) in j.cells.iter().zip(&j.seeds) {
        fake.send(Event::CellDone {
            job: j.id,
            cell,
            seed,
            model: "fake".into(),
            image: image(200),
            path: None,
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
fn a_dropped_png_restores_its_parameters() {
    let (mut h, _fake) = studio();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a1111.png");
    let text = "a knight, (detailed armor:1.2)\nNegative prompt: blurry\nSteps: 33, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 4242, Size: 640x384, Model: sd15";
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
    // A PNG without parameters: a clear message, nothing changed.
    let plain = dir.path().join("plain.png");
    image::RgbImage::new(4, 4).save(&plain).unwrap();
    h.input_mut().dropped_files.push(Arc::new(Dropped(plain)));
    h.run_steps(2);
    h.get_by_label_contains("has no generation parameters");
    assert_eq!(h.state().state.params, p);
}
