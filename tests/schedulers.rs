//! Sampler set-up against diffusers (refs/schedulers.json): timesteps, sigmas and the initial
//! noise scale for every sampler, 8 and 20 steps, on both fixtures' scheduler configs — each
//! built the way diffusers' `from_config` builds it from that file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use sd_studio::engine::config::JsonConfig;
use sd_studio::engine::schedulers::{SchedulerConfig, SchedulerKind, TimestepSpacing};

fn config(model: &str) -> SchedulerConfig {
    let path = common::model_dir(model)
        .join("scheduler")
        .join("scheduler_config.json");
    SchedulerConfig::from_json(JsonConfig::load(&path).unwrap()).unwrap()
}

#[test]
fn timesteps_and_sigmas_match_diffusers() {
    let refs = common::refs_json("schedulers.json");
    let entries = refs.as_array().unwrap();
    assert!(entries.len() >= 24);
    for e in entries {
        let model = e["model"].as_str().unwrap();
        let kind = SchedulerKind::parse(e["scheduler"].as_str().unwrap()).unwrap();
        let steps = e["steps"].as_u64().unwrap() as usize;
        let s = kind.build(&config(model), steps).unwrap();
        let what = format!("{model} {} {steps} steps", kind.cli_name());
        let want: Vec<f64> = e["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(s.timesteps().len(), want.len(), "{what}: timestep count");
        for (a, b) in s.timesteps().iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "{what}: timesteps {:?} vs {want:?}",
                s.timesteps()
            );
        }
        if let Some(want) = e["sigmas"].as_array() {
            let got = s.sigmas().unwrap_or_else(|| panic!("{what}: no sigmas"));
            assert_eq!(got.len(), want.len(), "{what}: sigma count");
            for (a, b) in got.iter().zip(want) {
                let b = b.as_f64().unwrap() as f32;
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "{what}: sigmas {got:?} vs {want:?}"
                );
            }
        }
        let ins = e["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (s.init_noise_sigma() - ins).abs() <= 1e-5 * ins,
            "{what}: init_noise_sigma {} vs {ins}",
            s.init_noise_sigma()
        );
    }
}

#[test]
fn spacing_override_and_step_limits() {
    let cfg = config("tiny-sd15").with_spacing(Some(TimestepSpacing::Trailing));
    let s = SchedulerKind::Euler.build(&cfg, 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    let s = SchedulerKind::Ddim.build(&cfg, 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
    for k in SchedulerKind::ALL {
        assert!(k.build(&cfg, 0).is_err());
        assert!(k
            .build(&cfg, 1001)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("training timesteps"));
        assert!(k.build(&cfg, 1).is_ok(), "{} with 1 step", k.cli_name());
    }
}

#[test]
fn names_parse_in_cli_and_a1111_forms() {
    assert_eq!(
        SchedulerKind::parse("DPM++ 2M Karras").unwrap(),
        SchedulerKind::DpmPp2MKarras
    );
    assert_eq!(
        SchedulerKind::parse("Euler a").unwrap(),
        SchedulerKind::EulerAncestral
    );
    assert_eq!(
        SchedulerKind::parse("dpm++2m").unwrap(),
        SchedulerKind::DpmPp2M
    );
    assert!(SchedulerKind::parse("heun-ish")
        .unwrap_err()
        .to_string()
        .contains("unknown scheduler"));
}
