//! Fault injection for end-to-end tests of engine restarts, compiled into debug builds only
//! (the binaries `cargo test` runs); release builds ignore the variable.
//!
//! `LLMAPI_FAULT_PANIC_AT_STEP=N` makes the engine thread panic at the N-th step this process
//! runs (counted over every engine it starts), once: an engine restarted in the same process
//! then serves normally.

/// The fault-injection variable.
#[cfg(debug_assertions)]
const PANIC_AT_STEP: &str = "LLMAPI_FAULT_PANIC_AT_STEP";

/// Called by the engine loop before each step; panics at the step `LLMAPI_FAULT_PANIC_AT_STEP`
/// names.
#[cfg(debug_assertions)]
pub(crate) fn before_step() {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static STEPS: AtomicU64 = AtomicU64::new(0);
    let Some(at) = *AT.get_or_init(|| {
        std::env::var(PANIC_AT_STEP)
            .ok()
            .and_then(|v| v.trim().parse().ok())
    }) else {
        return;
    };
    if STEPS.fetch_add(1, Ordering::Relaxed) + 1 == at {
        panic!("{PANIC_AT_STEP}={at}: injected engine fault");
    }
}

/// Release builds inject no faults.
#[cfg(not(debug_assertions))]
pub(crate) fn before_step() {}
