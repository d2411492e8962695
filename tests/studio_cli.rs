//! `sd-studio` without a subcommand is the studio: bad options and a missing display are
//! one clear error line and a non-zero exit, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "gui")]

use std::process::Command;

fn studio(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sd-studio"))
        .args(args)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("WAYLAND_SOCKET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn no_display_and_bad_renderer_are_clear_errors() {
    let (code, err) = studio(&["--no-persist"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("cannot open the window"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = studio(&["studio", "--no-persist", "--renderer", "vulkan"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("renderer \"vulkan\" is not wgpu or glow"),
        "{err}"
    );
}
