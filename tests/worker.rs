//! The generation thread on the tiny SD 1.5 fixture: event order, previews for every cell
//! and step, cancel within one step, queueing, bad jobs and bad models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sd_studio::engine::metadata::{parse_a1111, read_png_parameters};
use sd_studio::engine::pipeline::{GenerateRequest, InitImage};
use sd_studio::engine::schedulers::SchedulerKind;
use sd_studio::protocol::{
    link, Command, EngineLink, Event, InitInput, JobRequest, ModelSpec, PreviewMode, PreviewSlots,
    RgbImage,
};

const WAIT: Duration = Duration::from_secs(120);

/// A worker whose every preview is collected the moment it is made (the waker takes them
/// from the slots on the worker thread), so the test sees all of them.
struct Rig {
    engine: EngineLink,
    previews: Arc<Mutex<Vec<Event>>>,
    out: tempfile::TempDir,
}

fn start(taesd: bool) -> Rig {
    start_with(taesd, Default::default())
}

fn start_with(taesd: bool, faults: sd_studio::worker::Faults) -> Rig {
    start_model("tiny-sd15", taesd, faults)
}

fn start_model(name: &str, taesd: bool, faults: sd_studio::worker::Faults) -> Rig {
    let slots: Arc<OnceLock<Arc<PreviewSlots>>> = Arc::new(OnceLock::new());
    let previews = Arc::new(Mutex::new(Vec::new()));
    let (s, p) = (slots.clone(), previews.clone());
    let (engine, worker) = link(Arc::new(move || {
        if let Some(slots) = s.get() {
            p.lock().unwrap().extend(slots.take_all());
        }
    }));
    let _ = slots.set(engine.previews.clone());
    sd_studio::worker::spawn_with(worker, faults).unwrap();
    engine.send(Command::LoadModel(ModelSpec {
        model: common::model_dir(name).display().to_string(),
        device: "cpu".into(),
        dtype: "f32".into(),
        taesd: taesd.then(|| common::model_dir("tiny-taesd").display().to_string()),
        vae: None,
        memory: Default::default(),
        cache_bytes: None,
    }));
    let ready = next(&engine, |e| {
        matches!(e, Event::ModelReady { .. } | Event::ModelFailed { .. })
    });
    match ready {
        Event::ModelReady {
            previewer, tokens, ..
        } => {
            assert_eq!(previewer, if taesd { "TAESD" } else { "linear" });
            assert_eq!(tokens.unwrap().count("a red fox"), Some((3, 1)));
        }
        other => panic!("model did not load: {other:?}"),
    }
    Rig {
        engine,
        previews,
        out: tempfile::tempdir().unwrap(),
    }
}

fn next(engine: &EngineLink, pred: impl FnMut(&Event) -> bool) -> Event {
    sd_studio::worker::wait_for(&engine.events, WAIT, pred).expect("event did not arrive")
}

fn job(rig: &Rig, id: u64, seeds: Vec<u64>, steps: usize) -> JobRequest {
    JobRequest {
        id,
        prompt: "a lighthouse".into(),
        negative_prompt: "fog".into(),
        cells: (0..seeds.len()).collect(),
        seeds,
        steps,
        guidance: 7.5,
        scheduler: SchedulerKind::EulerAncestral,
        width: 64,
        height: 64,
        preview: PreviewMode::Taesd,
        preview_every: 1,
        output_dir: rig.out.path().to_path_buf(),
        models: Vec::new(),
        model_of: Vec::new(),
        clip_skip: 0,
        attention_slicing: Default::default(),
        vae_tiling: Default::default(),
        init: None,
        variation: None,
        lora_dirs: Vec::new(),
        embedding_dirs: Vec::new(),
        control: None,
        hires: None,
        save: true,
    }
}

/// Every event of a job, through its last one.
fn collect(engine: &EngineLink, id: u64) -> Vec<Event> {
    let mut all = Vec::new();
    loop {
        let e = engine
            .events
            .recv_timeout(WAIT)
            .expect("job did not finish");
        let last = matches!(&e,
            Event::JobDone { job, .. } | Event::Cancelled { job } if *job == id)
            || matches!(&e, Event::Failed { job: Some(j), .. } if *j == id);
        all.push(e);
        if last {
            return all;
        }
    }
}

#[test]
fn a_job_reports_in_order_with_previews_for_every_cell_and_step_and_saves() {
    let rig = start(true);
    rig.engine
        .send(Command::Generate(job(&rig, 1, vec![100, 101, 102], 4)));
    let events = collect(&rig.engine, 1);
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Queued { .. } => "queued".into(),
            Event::Started { .. } => "started".into(),
            Event::Step { step, total, .. } => format!("step {step}/{total}"),
            Event::CellDone { cell, .. } => format!("cell {cell}"),
            Event::JobDone { .. } => "done".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "queued", "started", "step 1/4", "step 2/4", "step 3/4", "step 4/4", "cell 0",
            "cell 1", "cell 2", "done"
        ]
    );
    // Previews at steps 1–3 (the last step's image is the final decode), for each cell.
    let previews = rig.previews.lock().unwrap();
    let mut seen: Vec<(usize, usize)> = previews
        .iter()
        .filter_map(|e| match e {
            Event::Preview {
                cell, step, image, ..
            } => {
                assert_eq!(
                    (image.width, image.height),
                    (64, 64),
                    "TAESD decodes to full size"
                );
                Some((*cell, *step))
            }
            _ => None,
        })
        .collect();
    seen.sort();
    let want: Vec<_> = (0..3).flat_map(|c| (1..=3).map(move |s| (c, s))).collect();
    assert_eq!(seen, want);
    // Saved PNGs carry their parameters.
    for e in &events {
        if let Event::CellDone {
            seed, path, image, ..
        } = e
        {
            assert_eq!(image.rgb.len(), 64 * 64 * 3);
            let path = path.as_ref().expect("saved");
            let text = read_png_parameters(path).unwrap().unwrap();
            let p = parse_a1111(&text).unwrap();
            assert_eq!(p.seed, Some(*seed));
            assert_eq!(p.prompt, "a lighthouse");
            assert_eq!(p.negative_prompt, "fog");
            assert_eq!(p.scheduler(), Some(SchedulerKind::EulerAncestral));
        }
    }
    rig.engine.send(Command::Shutdown);
}

#[test]
fn cancel_stops_within_one_step_and_a_second_job_queues() {
    let rig = start(false);
    rig.engine
        .send(Command::Generate(job(&rig, 7, vec![1, 2], 200)));
    rig.engine.send(Command::Generate(job(&rig, 8, vec![5], 3)));
    match next(&rig.engine, |e| matches!(e, Event::Queued { job: 8, .. })) {
        Event::Queued { ahead, .. } => assert_eq!(ahead, 1),
        _ => unreachable!(),
    }
    let at = match next(&rig.engine, |e| {
        matches!(
            e,
            Event::Step {
                job: 7,
                step: 3,
                ..
            }
        )
    }) {
        Event::Step { step, .. } => step,
        _ => unreachable!(),
    };
    rig.engine.send(Command::Cancel(7));
    let mut last = at;
    loop {
        match rig.engine.events.recv_timeout(WAIT).unwrap() {
            Event::Step { job: 7, step, .. } => last = step,
            Event::Cancelled { job: 7 } => break,
            Event::CellDone { job: 7, .. } | Event::JobDone { job: 7, .. } => {
                panic!("job 7 finished instead of stopping")
            }
            Event::Started { job: 8 } => panic!("job 8 started before job 7 stopped"),
            _ => {}
        }
    }
    assert!(
        last <= at + 1,
        "cancel sent after step {at}, ran to step {last}"
    );
    // The queued job runs next, to the end.
    let events = collect(&rig.engine, 8);
    assert!(matches!(events[0], Event::Started { job: 8 }));
    assert!(matches!(events.last(), Some(Event::JobDone { job: 8, .. })));
    rig.engine.send(Command::Shutdown);
}

#[test]
fn queued_jobs_can_be_removed_bad_jobs_fail_clearly_and_the_worker_carries_on() {
    let rig = start(false);
    rig.engine
        .send(Command::Generate(job(&rig, 1, vec![1], 30)));
    rig.engine.send(Command::Generate(job(&rig, 2, vec![2], 3)));
    rig.engine.send(Command::Cancel(2));
    let mut bad = job(&rig, 3, vec![3], 3);
    bad.width = 60;
    rig.engine.send(Command::Generate(bad));
    next(&rig.engine, |e| matches!(e, Event::Cancelled { job: 2 }));
    match next(&rig.engine, |e| {
        matches!(e, Event::Failed { job: Some(3), .. })
    }) {
        Event::Failed { message, .. } => assert!(message.contains("width"), "{message}"),
        _ => unreachable!(),
    }
    next(&rig.engine, |e| matches!(e, Event::JobDone { job: 1, .. }));
    rig.engine.send(Command::Generate(job(&rig, 4, vec![4], 2)));
    next(&rig.engine, |e| matches!(e, Event::JobDone { job: 4, .. }));
    // An unwritable output folder: the image still arrives in its cell, and the job fails
    // with the reason; the next job runs.
    let mut j = job(&rig, 5, vec![9], 2);
    let blocker = rig.out.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    j.output_dir = blocker.join("sub");
    rig.engine.send(Command::Generate(j));
    let events = collect(&rig.engine, 5);
    assert!(events.iter().any(|e| matches!(e,
        Event::Failed { job: Some(5), message } if message.contains("cannot write"))));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::CellDone { path: None, .. })));
    rig.engine.send(Command::Generate(job(&rig, 6, vec![6], 1)));
    next(&rig.engine, |e| matches!(e, Event::JobDone { job: 6, .. }));
    // A model that is not there.
    rig.engine.send(Command::LoadModel(ModelSpec {
        model: "/no/such/model".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        taesd: None,
        vae: None,
        memory: Default::default(),
        cache_bytes: None,
    }));
    match next(&rig.engine, |e| matches!(e, Event::ModelFailed { .. })) {
        Event::ModelFailed { message } => assert!(message.contains("not found"), "{message}"),
        _ => unreachable!(),
    }
    rig.engine.send(Command::Shutdown);
}

fn cell_images(events: &[Event]) -> Vec<(usize, String, Vec<u8>, Option<std::path::PathBuf>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::CellDone {
                cell,
                model,
                image,
                path,
                ..
            } => Some((*cell, model.clone(), image.rgb.clone(), path.clone())),
            _ => None,
        })
        .collect()
}

fn pipeline_image(model: &str, req: &GenerateRequest) -> Vec<Vec<u8>> {
    let mut sd = common::load_model(model);
    sd.generate(req, &mut |_| Ok(()))
        .unwrap()
        .into_iter()
        .map(|i| i.rgb)
        .collect()
}

#[test]
fn compare_jobs_step_the_models_in_turn_and_label_every_cell() {
    let rig = start(false);
    let mut j = job(&rig, 30, vec![5, 6, 5, 6], 3);
    j.cells = vec![0, 1, 4, 5];
    j.models = vec![
        common::model_dir("tiny-sd15").display().to_string(),
        common::model_dir("tiny-sd2v").display().to_string(),
    ];
    j.model_of = vec![0, 0, 1, 1];
    j.preview = PreviewMode::Linear;
    rig.engine.send(Command::Generate(j.clone()));
    let events = collect(&rig.engine, 30);
    assert!(
        matches!(events.last(), Some(Event::JobDone { .. })),
        "{events:?}"
    );
    // Two lanes of 3 steps, stepped in turn: 6 steps before the first cell is decoded (run
    // one after the other, the first row would finish after step 3).
    let order: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, total, .. } => Some(format!("step {step}/{total}")),
            Event::CellDone { cell, .. } => Some(format!("cell {cell}")),
            _ => None,
        })
        .collect();
    let first_done = order.iter().position(|s| s.starts_with("cell")).unwrap();
    assert_eq!(
        &order[..first_done],
        ["step 1/6", "step 2/6", "step 3/6", "step 4/6", "step 5/6", "step 6/6"]
    );
    // Each step names the row it advanced and that row's own progress (3 steps each).
    let lanes: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step {
                cells,
                cell_step,
                cell_total: 3,
                ..
            } => Some((cells[0], *cell_step)),
            _ => None,
        })
        .take(6)
        .collect();
    let rows: Vec<usize> = lanes.iter().map(|l| l.0).collect();
    assert_eq!(
        lanes.iter().map(|l| l.1).collect::<Vec<_>>(),
        [1, 1, 2, 2, 3, 3]
    );
    assert_ne!(rows[0], rows[1], "rows alternate: {lanes:?}");
    assert_eq!((rows[0], rows[1]), (rows[2], rows[3]));
    let cells = cell_images(&events);
    let labels: Vec<(usize, &str)> = cells.iter().map(|c| (c.0, c.1.as_str())).collect();
    assert_eq!(
        labels,
        vec![
            (0, "tiny-sd15"),
            (1, "tiny-sd15"),
            (4, "tiny-sd2v"),
            (5, "tiny-sd2v")
        ]
    );
    // Each row is exactly what its model makes alone at those seeds.
    let req = GenerateRequest {
        prompt: j.prompt.clone(),
        negative_prompt: j.negative_prompt.clone(),
        seed: 5,
        batch: 2,
        steps: 3,
        guidance: j.guidance,
        scheduler: j.scheduler,
        width: 64,
        height: 64,
        ..Default::default()
    };
    for (model, row) in [("tiny-sd15", &cells[..2]), ("tiny-sd2v", &cells[2..])] {
        let want = pipeline_image(model, &req);
        assert_eq!(row[0].2, want[0], "{model} seed 5");
        assert_eq!(row[1].2, want[1], "{model} seed 6");
        let text = read_png_parameters(row[0].3.as_ref().unwrap())
            .unwrap()
            .unwrap();
        assert!(text.contains(&format!("Model: {model}")), "{text}");
        let name = row[0].3.as_ref().unwrap().file_name().unwrap();
        assert_eq!(name.to_str().unwrap(), format!("{model}-5.png"));
    }
    // Previews came for both rows.
    let previewed: std::collections::BTreeSet<usize> = rig
        .previews
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Preview { job: 30, cell, .. } => Some(*cell),
            _ => None,
        })
        .collect();
    assert_eq!(previewed.into_iter().collect::<Vec<_>>(), vec![0, 1, 4, 5]);
    // A compare model that is not there fails the job with its name; the worker carries on.
    let mut bad = job(&rig, 31, vec![1], 1);
    bad.models = vec!["/no/such/model-b".into()];
    bad.model_of = vec![0];
    rig.engine.send(Command::Generate(bad));
    let events = collect(&rig.engine, 31);
    assert!(
        matches!(events.last(), Some(Event::Failed { message, .. }) if message.contains("/no/such/model-b")),
        "{events:?}"
    );
}

#[test]
fn init_image_jobs_fit_the_picture_to_the_size_and_record_the_strength() {
    let rig = start(false);
    // 48x32 picture for a 64x64 job: scaled to cover, centre cropped.
    let (w, h) = (48usize, 32usize);
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [(x * 5) as u8, (y * 7) as u8, 128]
        })
        .collect();
    let mut j = job(&rig, 40, vec![9], 4);
    j.init = Some(InitInput {
        image: RgbImage {
            width: w,
            height: h,
            rgb: rgb.clone(),
        },
        strength: 0.5,
        mask: None,
    });
    rig.engine.send(Command::Generate(j.clone()));
    let events = collect(&rig.engine, 40);
    let cells = cell_images(&events);
    assert_eq!(cells.len(), 1, "{events:?}");
    let picture = image::RgbImage::from_raw(w as u32, h as u32, rgb).unwrap();
    let req = GenerateRequest {
        prompt: j.prompt.clone(),
        negative_prompt: j.negative_prompt.clone(),
        seed: 9,
        steps: 4,
        guidance: j.guidance,
        scheduler: j.scheduler,
        width: 64,
        height: 64,
        init_image: Some(InitImage {
            rgb: sd_studio::engine::image_ops::cover_crop(picture, 64, 64),
            strength: 0.5,
            mask: None,
        }),
        ..Default::default()
    };
    assert_eq!(cells[0].2, pipeline_image("tiny-sd15", &req)[0]);
    let text = read_png_parameters(cells[0].3.as_ref().unwrap())
        .unwrap()
        .unwrap();
    assert!(text.contains("Denoising strength: 0.5"), "{text}");
    // Strength outside 0..1 is refused before anything runs.
    let mut bad = j.clone();
    bad.id = 41;
    bad.init.as_mut().unwrap().strength = 1.5;
    rig.engine.send(Command::Generate(bad));
    let e = next(&rig.engine, |e| {
        matches!(e, Event::Failed { job: Some(41), .. })
    });
    assert!(matches!(e, Event::Failed { message, .. } if message.contains("strength")));
}

#[test]
fn memory_mode_reloads_the_model_and_job_options_reach_the_decoder() {
    let rig = start(false);
    rig.engine.send(Command::LoadModel(ModelSpec {
        model: common::model_dir("tiny-sd15").display().to_string(),
        device: "cpu".into(),
        dtype: "f32".into(),
        taesd: None,
        vae: None,
        memory: sd_studio::engine::memory::MemoryMode::Lowvram,
        cache_bytes: Some(2 << 30),
    }));
    match next(&rig.engine, |e| {
        matches!(e, Event::ModelReady { .. } | Event::ModelFailed { .. })
    }) {
        Event::ModelReady { memory, .. } => assert_eq!(memory, "lowvram"),
        other => panic!("model did not load: {other:?}"),
    }
    // 96x64: 12x8 latents, wider than one 8-latent tile of the tiny VAE.
    let mut j = job(&rig, 50, vec![3], 3);
    (j.width, j.vae_tiling) = (96, sd_studio::engine::memory::Tiling::On);
    rig.engine.send(Command::Generate(j.clone()));
    let cells = cell_images(&collect(&rig.engine, 50));
    assert_eq!(cells.len(), 1);
    let req = GenerateRequest {
        prompt: j.prompt.clone(),
        negative_prompt: j.negative_prompt.clone(),
        seed: 3,
        steps: 3,
        guidance: j.guidance,
        scheduler: j.scheduler,
        width: 96,
        height: 64,
        ..Default::default()
    };
    let mut sd = common::load_model("tiny-sd15");
    let whole = sd.generate(&req, &mut |_| Ok(())).unwrap().remove(0).rgb;
    sd.set_memory_options(sd_studio::engine::memory::MemoryOptions {
        vae_tiling: sd_studio::engine::memory::Tiling::On,
        ..Default::default()
    });
    let tiled = sd.generate(&req, &mut |_| Ok(())).unwrap().remove(0).rgb;
    assert_ne!(whole, tiled);
    assert_eq!(cells[0].2, tiled, "the job's image is the tiled decode");
}

#[test]
fn a_job_that_cannot_fit_fails_alone_and_the_queue_goes_on() {
    // A machine with 512 MiB free: the studio's largest size needs more, even for the tiny
    // model (on the CPU attention builds no score matrix, so it is the activations).
    let rig = start_with(
        false,
        sd_studio::worker::Faults {
            free_memory: Some(512 << 20),
            ..Default::default()
        },
    );
    let mut huge = job(&rig, 1, vec![1], 2);
    (huge.width, huge.height) = (4096, 4096);
    huge.attention_slicing = sd_studio::engine::memory::Slicing::Off;
    let mut wide = job(&rig, 2, vec![2], 2);
    wide.width = 65536;
    rig.engine.send(Command::Generate(huge));
    rig.engine.send(Command::Generate(wide));
    rig.engine.send(Command::Generate(job(&rig, 3, vec![3], 2)));
    match next(&rig.engine, |e| {
        matches!(e, Event::Failed { job: Some(1), .. })
    }) {
        Event::Failed { message, .. } => {
            assert!(
                message.contains("needs about") && message.contains("is free"),
                "{message}"
            )
        }
        _ => unreachable!(),
    }
    match next(&rig.engine, |e| {
        matches!(e, Event::Failed { job: Some(2), .. })
    }) {
        Event::Failed { message, .. } => {
            assert!(
                message.contains("width") && message.contains("65536"),
                "{message}"
            )
        }
        _ => unreachable!(),
    }
    next(&rig.engine, |e| matches!(e, Event::JobDone { job: 3, .. }));
    rig.engine.send(Command::Shutdown);
}

#[test]
fn a_panic_inside_a_job_is_reported_and_the_next_job_succeeds() {
    let rig = start_with(
        false,
        sd_studio::worker::Faults {
            panic_in_job: Some(1),
            ..Default::default()
        },
    );
    rig.engine.send(Command::Generate(job(&rig, 1, vec![1], 3)));
    rig.engine.send(Command::Generate(job(&rig, 2, vec![2], 2)));
    match next(&rig.engine, |e| {
        matches!(e, Event::Failed { job: Some(1), .. })
    }) {
        Event::Failed { message, .. } => {
            assert!(
                message.contains("crashed") && message.contains("injected fault"),
                "{message}"
            )
        }
        _ => unreachable!(),
    }
    let events = collect(&rig.engine, 2);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::JobDone { job: 2, .. })),
        "{events:?}"
    );
    assert_eq!(
        cell_images(&events).len(),
        1,
        "the job after the crash made its image"
    );
    rig.engine.send(Command::Shutdown);
}

/// Resident set size of this process, from /proc (Linux).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[test]
fn soak_500_jobs_keep_memory_flat_and_a_cancel_storm_ends_idle() {
    let rig = start(true);
    let mut rss = Vec::new();
    let total = 500u64;
    let small = |id: u64| {
        let mut j = job(&rig, id, vec![id], 1);
        j.guidance = 1.0;
        j
    };
    for id in 1..=total {
        rig.engine.send(Command::Generate(small(id)));
    }
    rss.push(rss_bytes());
    let mut done = 0;
    while done < total {
        match next(&rig.engine, |e| {
            matches!(e, Event::JobDone { .. } | Event::Failed { .. })
        }) {
            Event::JobDone { .. } => done += 1,
            other => panic!("a soak job failed: {other:?}"),
        }
        if done == 100 {
            rss.push(rss_bytes());
        }
        rig.previews.lock().unwrap().clear();
    }
    rss.push(rss_bytes());
    let mb = |b: Option<u64>| b.map(|b| b as f64 / 1e6);
    eprintln!(
        "soak RSS MB: start {:?}, after 100 jobs {:?}, after {total} {:?}",
        mb(rss[0]),
        mb(rss[1]),
        mb(rss[2])
    );
    if let (Some(a), Some(b)) = (rss[1], rss[2]) {
        assert!(
            b < a + 16_000_000,
            "RSS grew {} MB over 400 jobs",
            (b as f64 - a as f64) / 1e6
        );
    }
    // Cancel storm: generate and cancel at once, 200 times; then the worker answers a job.
    for k in 0..200u64 {
        let id = 10_000 + k;
        rig.engine.send(Command::Generate(small(id)));
        rig.engine.send(Command::Cancel(id));
    }
    let last = 20_000;
    rig.engine.send(Command::Generate(small(last)));
    let t = std::time::Instant::now();
    let events = collect(&rig.engine, last);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::JobDone { job, .. } if *job == last)));
    eprintln!(
        "cancel storm: the job after 200 generate/cancel pairs finished {:.2} s later",
        t.elapsed().as_secs_f64()
    );
    rig.engine.send(Command::Shutdown);
}

#[test]
fn compare_sd15_beside_sdxl_says_when_the_size_is_far_from_a_rows_native_one() {
    let rig = start(false);
    let mut j = job(&rig, 1, vec![1, 2], 2);
    // tiny-sd15 is made for 64², tiny-sdxl for 128²: 64² is far from SDXL's size.
    j.models = vec![
        common::model_dir("tiny-sd15").display().to_string(),
        common::model_dir("tiny-sdxl").display().to_string(),
    ];
    j.model_of = vec![0, 1];
    rig.engine.send(Command::Generate(j));
    let events = collect(&rig.engine, 1);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::JobDone { job: 1, .. })),
        "{events:?}"
    );
    let warnings: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { message } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("tiny-sdxl (SDXL) is made for 128x128")
            && warnings[0].contains("64x64"),
        "{warnings:?}"
    );
    let cells = cell_images(&events);
    assert_eq!(
        cells.iter().map(|c| c.1.as_str()).collect::<Vec<_>>(),
        ["tiny-sd15", "tiny-sdxl"]
    );
    rig.engine.send(Command::Shutdown);
}

#[test]
fn an_sdxl_model_runs_in_the_studio_worker_with_previews() {
    let rig = start_model("tiny-sdxl", false, Default::default());
    let mut j = job(&rig, 1, vec![5, 6], 3);
    j.negative_prompt = String::new(); // SDXL: zeros, not the encoded empty string
    rig.engine.send(Command::Generate(j));
    let events = collect(&rig.engine, 1);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::JobDone { job: 1, .. })),
        "{events:?}"
    );
    let cells = cell_images(&events);
    assert_eq!(cells.len(), 2);
    assert!(cells.iter().all(|c| c.1 == "tiny-sdxl" && c.3.is_some()));
    assert!(!rig.previews.lock().unwrap().is_empty(), "no previews");
    rig.engine.send(Command::Shutdown);
}

#[test]
fn variation_seeds_blend_per_cell_and_the_own_seed_keeps_the_image() {
    let rig = start(false);
    let plain = job(&rig, 1, vec![40], 3);
    rig.engine.send(Command::Generate(plain));
    let base = cell_images(&collect(&rig.engine, 1));
    let mut j = job(&rig, 2, vec![40, 40, 40], 3);
    j.variation = Some(sd_studio::protocol::JobVariation {
        seeds: vec![40, 41, 42],
        strength: 0.3,
    });
    rig.engine.send(Command::Generate(j));
    let cells = cell_images(&collect(&rig.engine, 2));
    assert_eq!(cells.len(), 3);
    assert_eq!(
        cells[0].2, base[0].2,
        "variation seed = own seed: the same image"
    );
    assert_ne!(cells[1].2, base[0].2);
    assert_ne!(cells[1].2, cells[2].2);
    // Each saved under seed-variation seed, with A1111's fields.
    let path = cells[1].3.clone().unwrap();
    assert!(
        path.to_string_lossy().ends_with("40-41.png"),
        "{}",
        path.display()
    );
    let text = read_png_parameters(&path).unwrap().unwrap();
    assert!(
        text.contains("Variation seed: 41, Variation seed strength: 0.3"),
        "{text}"
    );
    // A bad strength or a missing seed fails the job alone.
    let mut bad = job(&rig, 3, vec![1, 2], 2);
    bad.variation = Some(sd_studio::protocol::JobVariation {
        seeds: vec![1],
        strength: 0.3,
    });
    rig.engine.send(Command::Generate(bad));
    match next(&rig.engine, |e| {
        matches!(e, Event::Failed { job: Some(3), .. })
    }) {
        Event::Failed { message, .. } => assert!(message.contains("variation seed"), "{message}"),
        _ => unreachable!(),
    }
    rig.engine.send(Command::Shutdown);
}

#[test]
fn lora_tags_in_a_studio_job_match_the_pipeline_and_reach_the_png() {
    let rig = start(false);
    let loras = common::fixtures().join("lora");
    let embs = common::fixtures().join("embeddings");
    // The scan says what each LoRA is and whether it fits the loaded SD 1.5 model.
    rig.engine.send(Command::ScanLoras(vec![loras.clone()]));
    let found = match next(&rig.engine, |e| matches!(e, Event::LorasFound { .. })) {
        Event::LorasFound { loras } => loras,
        _ => unreachable!(),
    };
    let by = |n: &str| found.iter().find(|l| l.name == n).unwrap().clone();
    assert_eq!(found.len(), 4, "{found:?}");
    assert_eq!(by("sdxl_kohya").family, "SDXL");
    assert_eq!(by("sdxl_kohya").fits, Some(false));
    assert_eq!(by("kohya_locon").parts, "UNet + text encoder");
    assert_eq!(by("te_only").parts, "text encoder");
    assert_ne!(by("kohya_locon").fits, Some(false));
    let mut j = job(&rig, 1, vec![5, 6], 3);
    j.prompt = "a lighthouse <lora:kohya_locon:0.7>, tinyemb".into();
    j.lora_dirs = vec![loras.clone()];
    j.embedding_dirs = vec![embs.clone()];
    rig.engine.send(Command::Generate(j.clone()));
    let events = collect(&rig.engine, 1);
    let cells = cell_images(&events);
    assert_eq!(cells.len(), 2, "{events:?}");
    let req = GenerateRequest {
        prompt: j.prompt.clone(),
        negative_prompt: j.negative_prompt.clone(),
        seed: 5,
        batch: 2,
        steps: 3,
        guidance: 7.5,
        scheduler: SchedulerKind::EulerAncestral,
        width: 64,
        height: 64,
        networks: sd_studio::engine::apply::Networks {
            loras: vec![],
            lora_dirs: vec![loras],
            embedding_dirs: vec![embs],
        },
        ..Default::default()
    };
    let want = pipeline_image("tiny-sd15", &req);
    let mut plain = req.clone();
    plain.networks = Default::default();
    plain.prompt = "a lighthouse , tinyemb".into();
    let without = pipeline_image("tiny-sd15", &plain);
    for ((_, _, rgb, path), want) in cells.iter().zip(&want) {
        assert_eq!(rgb, want, "the studio's image is the pipeline's");
        let text = read_png_parameters(path.as_ref().unwrap())
            .unwrap()
            .unwrap();
        let p = parse_a1111(&text).unwrap();
        assert_eq!(p.prompt, j.prompt);
        assert_eq!(p.lora_hashes()[0].0, "kohya_locon");
        assert_eq!(p.ti_hashes()[0].0, "tinyemb");
    }
    assert_ne!(cells[0].2, without[0], "the LoRA changed the image");
}

#[test]
fn a_controlnet_job_steers_every_cell_and_compare_row_as_the_pipeline_does() {
    use sd_studio::engine::control::ControlUse;
    use sd_studio::protocol::ControlInput;
    let rig = start(false);
    let cn = common::fixtures().join("controlnet/tiny-cn-sd15");
    // A 32×32 map: the worker fits it to the job's 64×64 as the pipeline's caller would.
    let (_, _, squares) =
        common::read_png_rgb(&common::fixtures().join("controlnet/control_squares_64.png"));
    let small = image::imageops::resize(
        &image::RgbImage::from_raw(64, 64, squares).unwrap(),
        32,
        32,
        image::imageops::FilterType::Nearest,
    );
    let control = ControlInput {
        model: cn.display().to_string(),
        map: RgbImage {
            width: 32,
            height: 32,
            rgb: small.as_raw().clone(),
        },
        module: "none".into(),
        scale: 0.9,
        start: 0.0,
        end: 0.8,
    };
    let mut j = job(&rig, 1, vec![5, 6], 3);
    j.control = Some(control.clone());
    rig.engine.send(Command::Generate(j.clone()));
    let events = collect(&rig.engine, 1);
    let cells = cell_images(&events);
    assert_eq!(cells.len(), 2, "{events:?}");
    let map = sd_studio::engine::control::fit(small.as_raw(), 32, 32, 64, 64).unwrap();
    let req = GenerateRequest {
        prompt: j.prompt.clone(),
        negative_prompt: j.negative_prompt.clone(),
        seed: 5,
        batch: 2,
        steps: 3,
        guidance: 7.5,
        scheduler: SchedulerKind::EulerAncestral,
        width: 64,
        height: 64,
        controls: vec![ControlUse {
            model: control.model.clone(),
            image: map,
            module: "none".into(),
            scale: 0.9,
            start: 0.0,
            end: 0.8,
        }],
        ..Default::default()
    };
    let want = pipeline_image("tiny-sd15", &req);
    let without = pipeline_image(
        "tiny-sd15",
        &GenerateRequest {
            controls: vec![],
            ..req.clone()
        },
    );
    for ((_, _, rgb, path), want) in cells.iter().zip(&want) {
        assert_eq!(rgb, want, "the studio's image is the pipeline's");
        let text = read_png_parameters(path.as_ref().unwrap())
            .unwrap()
            .unwrap();
        let units = parse_a1111(&text).unwrap().controlnets();
        assert_eq!(units.len(), 1, "{text}");
        assert_eq!(units[0].model_name(), "tiny-cn-sd15");
        assert_eq!((units[0].weight, units[0].guidance_end), (0.9, 0.8));
    }
    assert_ne!(cells[0].2, without[0], "the ControlNet changed the image");

    // Compare mode: both rows (the model and a copy of it) use the same map.
    let mut j = job(&rig, 2, vec![5, 5], 3);
    let copy = tempfile::tempdir().unwrap();
    common::copy_dir(
        &common::model_dir("tiny-sd15"),
        &copy.path().join("tiny-copy"),
    );
    j.models = vec![
        common::model_dir("tiny-sd15").display().to_string(),
        copy.path().join("tiny-copy").display().to_string(),
    ];
    j.model_of = vec![0, 1];
    j.control = Some(control);
    rig.engine.send(Command::Generate(j));
    let events = collect(&rig.engine, 2);
    let cells = cell_images(&events);
    assert_eq!(cells.len(), 2, "{events:?}");
    assert_eq!(cells[0].2, want[0], "row 1 is the pipeline's image");
    assert_eq!(cells[1].2, want[0], "row 2 is steered the same way");
}

#[test]
fn a_hires_job_previews_both_passes_and_saves_a1111s_fields() {
    let rig = start(true);
    let mut j = job(&rig, 1, vec![5, 6], 4);
    j.hires = Some(sd_studio::protocol::JobHires {
        width: 128,
        height: 128,
        steps: Some(4),
        strength: 0.5,
        upscaler: "latent".into(),
        scale: Some(2.0),
    });
    rig.engine.send(Command::Generate(j));
    let events = collect(&rig.engine, 1);
    let cells = cell_images(&events);
    assert_eq!(cells.len(), 2, "{events:?}");
    // Steps over both passes (4 + 2), previews at both sizes.
    let totals: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step { total, .. } => Some(*total),
            _ => None,
        })
        .collect();
    assert_eq!(totals, vec![6; 6], "{events:?}");
    let sizes: std::collections::BTreeSet<usize> = rig
        .previews
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Preview { image, .. } => Some(image.width),
            _ => None,
        })
        .collect();
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        vec![64, 128],
        "previews of both passes"
    );
    for (_, _, rgb, path) in &cells {
        assert_eq!(rgb.len(), 128 * 128 * 3);
        let text = read_png_parameters(path.as_ref().unwrap())
            .unwrap()
            .unwrap();
        assert!(
            text.contains("Size: 64x64")
                && text.contains(
                    "Denoising strength: 0.5, Hires upscale: 2, Hires steps: 4, Hires upscaler: Latent"
                ),
            "{text}"
        );
    }
}

#[test]
fn live_edits_in_a_burst_end_with_one_finished_job_for_the_last_edit() {
    let rig = start(true);
    // As the window's live mode sends them: each edit cancels the job before it.
    for id in 1..=3 {
        if id > 1 {
            rig.engine.send(Command::Cancel(id - 1));
        }
        let mut j = job(&rig, id, vec![1, 2, 3, 4], 3);
        j.prompt = format!("a lighthouse {id}");
        j.save = false;
        rig.engine.send(Command::Generate(j));
    }
    let events = collect(&rig.engine, 3);
    let done: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::JobDone { job, .. } => Some(*job),
            _ => None,
        })
        .collect();
    assert_eq!(done, vec![3], "{events:?}");
    for id in [1, 2] {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Cancelled { job } if *job == id)),
            "job {id} cancelled: {events:?}"
        );
    }
    // Not saved, but every cell carries its parameters (for Keep).
    let cells: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::CellDone { job: 3, .. }))
        .collect();
    assert_eq!(cells.len(), 4);
    for e in cells {
        let Event::CellDone {
            path, parameters, ..
        } = e
        else {
            unreachable!()
        };
        assert!(path.is_none());
        assert!(parameters.starts_with("a lighthouse 3"), "{parameters}");
    }
    assert!(
        std::fs::read_dir(rig.out.path()).unwrap().next().is_none(),
        "nothing written"
    );
}

/// Live mode's latency on the tiny model (CPU): a job sent (what live mode does 150 ms
/// after the last keystroke) → the first preview event, and → every cell final. A
/// measurement for BENCHMARKS.md, not a check: run with `--ignored --nocapture`.
#[test]
#[ignore]
fn live_latency_on_the_tiny_model() {
    let rig = start(true);
    for (size, steps) in [(256, 2), (512, 2), (512, 4)] {
        for round in 0..4 {
            let id = (size * 10 + steps * 100 + round) as u64;
            let mut j = job(&rig, id, (0..8).collect(), steps);
            j.width = size;
            j.height = size;
            j.guidance = 1.0;
            j.save = false;
            let t0 = std::time::Instant::now();
            rig.engine.send(Command::Generate(j));
            let mut first_preview = None;
            loop {
                let e = rig.engine.events.recv_timeout(WAIT).expect("job");
                if first_preview.is_none() && !rig.previews.lock().unwrap().is_empty() {
                    first_preview = Some(t0.elapsed());
                }
                if matches!(e, Event::JobDone { .. }) {
                    break;
                }
            }
            rig.previews.lock().unwrap().clear();
            if round > 0 {
                eprintln!(
                    "live {size}x{size}, 8 images, {steps} steps, CFG 1: first preview {:?}, all final {:?}",
                    first_preview,
                    t0.elapsed()
                );
            }
        }
    }
}
