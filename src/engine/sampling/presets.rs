//! Sensible defaults per model: a small table of well-known hub models (few-step models
//! need very different settings), then what the model's own files say.

use crate::engine::model::ModelFiles;
use crate::engine::schedulers::{SchedulerKind, TimestepSpacing};

/// Settings used when the user gives none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    pub width: usize,
    pub height: usize,
    /// Overrides the scheduler config's spacing (few-step models need "trailing").
    pub spacing: Option<TimestepSpacing>,
}

struct Known {
    id: &'static str,
    steps: usize,
    guidance: f64,
    scheduler: SchedulerKind,
    size: usize,
    spacing: Option<TimestepSpacing>,
}

/// Well-known models, keyed by hub id (a local folder with the same last name matches too).
const KNOWN: &[Known] = &[
    // SD-Turbo: adversarial diffusion distillation; 1-4 steps, no guidance, trailing spacing.
    Known {
        id: "stabilityai/sd-turbo",
        steps: 1,
        guidance: 0.0,
        scheduler: SchedulerKind::EulerAncestral,
        size: 512,
        spacing: Some(TimestepSpacing::Trailing),
    },
    // SDXL-Turbo: SD-Turbo's recipe at 512² on SDXL.
    Known {
        id: "stabilityai/sdxl-turbo",
        steps: 1,
        guidance: 0.0,
        scheduler: SchedulerKind::EulerAncestral,
        size: 512,
        spacing: Some(TimestepSpacing::Trailing),
    },
    // SDXL base: what A1111 and the diffusers docs use (25-30 steps, CFG 5-7).
    Known {
        id: "stabilityai/stable-diffusion-xl-base-1.0",
        steps: 25,
        guidance: 6.0,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 1024,
        spacing: None,
    },
    Known {
        id: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        steps: 20,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 512,
        spacing: None,
    },
    Known {
        id: "runwayml/stable-diffusion-v1-5",
        steps: 20,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 512,
        spacing: None,
    },
    Known {
        id: "CompVis/stable-diffusion-v1-4",
        steps: 20,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 512,
        spacing: None,
    },
    Known {
        id: "stabilityai/stable-diffusion-2-1",
        steps: 20,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 768,
        spacing: None,
    },
    Known {
        id: "stabilityai/stable-diffusion-2-1-base",
        steps: 20,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 512,
        spacing: None,
    },
    Known {
        id: "stabilityai/stable-diffusion-2-base",
        steps: 20,
        guidance: 7.5,
        scheduler: SchedulerKind::DpmPp2MKarras,
        size: 512,
        spacing: None,
    },
];

fn known(spec: &str) -> Option<&'static Known> {
    let spec = spec.trim_end_matches('/');
    let last = spec
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(spec)
        .to_ascii_lowercase();
    KNOWN
        .iter()
        .find(|k| k.id.eq_ignore_ascii_case(spec))
        .or_else(|| {
            KNOWN.iter().find(|k| {
                k.id.rsplit('/')
                    .next()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&last))
            })
        })
}

/// The sampler named by `scheduler_config.json`'s `_class_name`, as diffusers would run it.
fn from_scheduler_class(files: &ModelFiles) -> SchedulerKind {
    let raw = &files.scheduler_config.raw;
    let karras = raw.bool_or("use_karras_sigmas", false).unwrap_or(false);
    let sde = raw.str_or("algorithm_type", "").unwrap_or("") == "sde-dpmsolver++";
    match raw.str_or("_class_name", "").unwrap_or("") {
        "EulerDiscreteScheduler" => SchedulerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
        "HeunDiscreteScheduler" => SchedulerKind::Heun,
        "LMSDiscreteScheduler" if karras => SchedulerKind::LmsKarras,
        "LMSDiscreteScheduler" => SchedulerKind::Lms,
        "KDPM2DiscreteScheduler" => SchedulerKind::Dpm2,
        "KDPM2AncestralDiscreteScheduler" => SchedulerKind::Dpm2Ancestral,
        "DPMSolverMultistepScheduler" => match (sde, karras) {
            (true, true) => SchedulerKind::DpmPp2MSdeKarras,
            (true, false) => SchedulerKind::DpmPp2MSde,
            (false, true) => SchedulerKind::DpmPp2MKarras,
            (false, false) => SchedulerKind::DpmPp2M,
        },
        "DDIMScheduler" => SchedulerKind::Ddim,
        "UniPCMultistepScheduler" => SchedulerKind::UniPc,
        "DDPMScheduler" => SchedulerKind::Ddpm,
        "LCMScheduler" => SchedulerKind::Lcm,
        _ => SchedulerKind::Pndm,
    }
}

/// Defaults for `spec` (the `--model` value) whose files are `files`.
pub fn defaults_for(spec: &str, files: &ModelFiles) -> Defaults {
    if let Some(k) = known(spec) {
        return Defaults {
            steps: k.steps,
            guidance: k.guidance,
            scheduler: k.scheduler,
            width: k.size,
            height: k.size,
            spacing: k.spacing,
        };
    }
    let scheduler = from_scheduler_class(files);
    let size = files.unet_config.sample_size * files.vae_config.scale_factor();
    let steps = if scheduler == SchedulerKind::Lcm {
        4
    } else {
        20
    };
    let guidance = if scheduler == SchedulerKind::Lcm {
        1.5
    } else {
        7.5
    };
    Defaults {
        steps,
        guidance,
        scheduler,
        width: size,
        height: size,
        spacing: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_match_by_id_or_folder_name() {
        assert_eq!(known("stabilityai/sd-turbo").map(|k| k.steps), Some(1));
        assert_eq!(known("/models/sd-turbo/").map(|k| k.guidance), Some(0.0));
        assert_eq!(
            known("STABILITYAI/SD-TURBO").map(|k| k.spacing),
            Some(Some(TimestepSpacing::Trailing))
        );
        assert_eq!(
            known("stabilityai/stable-diffusion-2-1").map(|k| k.size),
            Some(768)
        );
        assert!(known("someone/unknown-model").is_none());
        let turbo = known("stabilityai/sdxl-turbo").unwrap();
        assert_eq!((turbo.steps, turbo.guidance, turbo.size), (1, 0.0, 512));
        assert_eq!(
            known("/ckpt/stable-diffusion-xl-base-1.0").map(|k| k.size),
            Some(1024)
        );
    }
}
