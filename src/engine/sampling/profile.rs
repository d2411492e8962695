//! Where a UNet step's time goes: `sd-studio bench --profile` turns this on, and every
//! instrumented part of the model (group norms, convolutions, attention, …) is timed
//! between two device synchronisations. The synchronisations cost time of their own (more
//! on a GPU, where they stop the CPU from queueing ahead), so the table gives shares, not
//! the speed: it/s comes from the unprofiled runs. Off, a scope is one atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{Device, Result};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (u64, f64)>> = Mutex::new(BTreeMap::new());

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, adding its time (device-synchronised) to `name` when profiling is on. Scopes
/// must not nest, or time is counted twice.
#[inline]
pub fn scope<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let e = table.entry(name).or_insert((0, 0.0));
    e.0 += 1;
    e.1 += secs;
    Ok(out)
}

/// The timings so far, (name, calls, seconds), and clears them.
pub fn take() -> Vec<(&'static str, u64, f64)> {
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let out = table.iter().map(|(k, (n, s))| (*k, *n, *s)).collect();
    table.clear();
    out
}
