//! Seeds as A1111 users expect them: variation seeds (spherical blend of two seeds' noise,
//! main seed fixed across a batch) and the torch-cuda noise source.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly

mod common;

use sd_studio::engine::pipeline::{GenerateRequest, Variation};
use sd_studio::engine::rng::RngKind;
use sd_studio::engine::schedulers::SchedulerKind;

fn req(seed: u64, variation: Option<Variation>) -> GenerateRequest {
    GenerateRequest {
        prompt: "a castle".into(),
        negative_prompt: String::new(),
        seed,
        batch: 1,
        steps: 4,
        guidance: 5.0,
        scheduler: SchedulerKind::Ddim,
        width: 64,
        height: 64,
        rng: RngKind::TorchCuda,
        init_latents: None,
        variation,
        clip_skip: 1,
        init_image: None,
        spacing: None,
        size_conditions: Default::default(),
        networks: Default::default(),
        controls: Vec::new(),
        hires: None,
    }
}

#[test]
fn variation_strength_zero_and_one_give_the_two_seeds_images() {
    let mut sd = common::load_model("tiny-sd15");
    let mut run = |r: GenerateRequest| sd.generate(&r, &mut |_| Ok(())).unwrap().remove(0);
    let five = run(req(5, None));
    let nine = run(req(9, None));
    let at0 = run(req(
        5,
        Some(Variation {
            seed: 9,
            strength: 0.0,
        }),
    ));
    let at1 = run(req(
        5,
        Some(Variation {
            seed: 9,
            strength: 1.0,
        }),
    ));
    let half = run(req(
        5,
        Some(Variation {
            seed: 9,
            strength: 0.5,
        }),
    ));
    assert_eq!(
        at0.variation_seed, None,
        "strength 0 is no variation, as in A1111"
    );
    assert_eq!(common::max_pixel_diff(&at0.rgb, &five.rgb), 0);
    assert!(
        common::max_pixel_diff(&at1.rgb, &nine.rgb) <= 1,
        "strength 1 should give the variation seed's image"
    );
    assert_eq!((half.seed, half.variation_seed), (5, Some(9)));
    assert!(common::max_pixel_diff(&half.rgb, &five.rgb) > 5);
    assert!(common::max_pixel_diff(&half.rgb, &nine.rgb) > 5);
}

#[test]
fn in_a_batch_the_variation_seed_increments_and_the_seed_stays() {
    let mut sd = common::load_model("tiny-sd15");
    let mut r = req(
        5,
        Some(Variation {
            seed: 100,
            strength: 0.3,
        }),
    );
    r.batch = 3;
    let images = sd.generate(&r, &mut |_| Ok(())).unwrap();
    let seeds: Vec<_> = images.iter().map(|i| (i.seed, i.variation_seed)).collect();
    assert_eq!(seeds, vec![(5, Some(100)), (5, Some(101)), (5, Some(102))]);
    assert!(common::max_pixel_diff(&images[0].rgb, &images[1].rgb) > 0);
}

#[test]
fn variation_strength_outside_0_1_is_refused() {
    let mut sd = common::load_model("tiny-sd15");
    for bad in [-0.1, 1.5, f64::NAN] {
        let e = sd
            .generate(
                &req(
                    5,
                    Some(Variation {
                        seed: 9,
                        strength: bad,
                    }),
                ),
                &mut |_| Ok(()),
            )
            .err();
        assert!(
            e.map(|e| e.to_string())
                .unwrap_or_default()
                .contains("variation strength"),
            "{bad}"
        );
    }
}

#[test]
fn the_two_noise_sources_differ_and_each_is_reproducible() {
    let mut sd = common::load_model("tiny-sd15");
    let cuda = sd
        .generate(&req(7, None), &mut |_| Ok(()))
        .unwrap()
        .remove(0);
    let again = sd
        .generate(&req(7, None), &mut |_| Ok(()))
        .unwrap()
        .remove(0);
    let cpu = sd
        .generate(
            &GenerateRequest {
                rng: RngKind::TorchCpu,
                ..req(7, None)
            },
            &mut |_| Ok(()),
        )
        .unwrap()
        .remove(0);
    assert_eq!(cuda.rgb, again.rgb);
    assert!(common::max_pixel_diff(&cuda.rgb, &cpu.rgb) > 5);
}
