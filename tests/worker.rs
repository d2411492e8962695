//! The generation thread on the tiny SD 1.5 fixture: event order, previews for every cell
//! and step, cancel within one step, queueing, bad jobs and bad models.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sd_studio::engine::metadata::{parse_a1111, read_png_parameters};
use sd_studio::engine::schedulers::SchedulerKind;
use sd_studio::protocol::{
    link, Command, EngineLink, Event, JobRequest, ModelSpec, PreviewMode, PreviewSlots,
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
    let slots: Arc<OnceLock<Arc<PreviewSlots>>> = Arc::new(OnceLock::new());
    let previews = Arc::new(Mutex::new(Vec::new()));
    let (s, p) = (slots.clone(), previews.clone());
    let (engine, worker) = link(Arc::new(move || {
        if let Some(slots) = s.get() {
            p.lock().unwrap().extend(slots.take_all());
        }
    }));
    let _ = slots.set(engine.previews.clone());
    sd_studio::worker::spawn(worker).unwrap();
    engine.send(Command::LoadModel(ModelSpec {
        model: common::model_dir("tiny-sd15").display().to_string(),
        device: "cpu".into(),
        dtype: "f32".into(),
        taesd: taesd.then(|| common::model_dir("tiny-taesd").display().to_string()),
        vae: None,
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
        init: None,
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
    // An unwritable output folder: the image still arrives, with a warning.
    let mut j = job(&rig, 5, vec![9], 2);
    let blocker = rig.out.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    j.output_dir = blocker.join("sub");
    rig.engine.send(Command::Generate(j));
    let events = collect(&rig.engine, 5);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Warning { message } if message.contains("not saved"))));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::CellDone { path: None, .. })));
    // A model that is not there.
    rig.engine.send(Command::LoadModel(ModelSpec {
        model: "/no/such/model".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        taesd: None,
        vae: None,
    }));
    match next(&rig.engine, |e| matches!(e, Event::ModelFailed { .. })) {
        Event::ModelFailed { message } => assert!(message.contains("not found"), "{message}"),
        _ => unreachable!(),
    }
    rig.engine.send(Command::Shutdown);
}
