//! `BackgroundVerification`: the core's background verifier for Python (continuous re-verification
//! of sealed shards in VRAM on a few SMs while the model serves).

use std::sync::{Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use vram_residency::{BackgroundStats, BackgroundVerifier, Confinement};

/// A running background verification (from `Worker.verify_in_background`). Stops on `stop()`,
/// at the end of a `with` block, or when garbage collected.
#[pyclass(
    frozen,
    module = "vram_residency._native",
    name = "BackgroundVerification"
)]
pub struct BackgroundVerification {
    verifier: Mutex<Option<BackgroundVerifier>>,
    last: Mutex<Option<BackgroundStats>>,
}

impl BackgroundVerification {
    pub const fn new(verifier: BackgroundVerifier) -> Self {
        Self {
            verifier: Mutex::new(Some(verifier)),
            last: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<BackgroundStats> {
        let verifier = self.verifier.lock().unwrap_or_else(PoisonError::into_inner);
        match verifier.as_ref() {
            Some(v) => Some(v.stats()),
            None => self
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

fn stats_dict<'py>(
    py: Python<'py>,
    stats: Option<BackgroundStats>,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    let stats = stats.unwrap_or_default();
    dict.set_item("running", stats.running)?;
    dict.set_item("passes", stats.passes)?;
    dict.set_item("verifications", stats.verifications)?;
    dict.set_item("bytes", stats.bytes)?;
    dict.set_item("busy_seconds", stats.busy_seconds)?;
    dict.set_item("gb_per_s", stats.gb_per_s())?;
    dict.set_item("last_pass_seconds", stats.last_pass_seconds)?;
    dict.set_item("idle_seconds", stats.idle_seconds)?;
    dict.set_item("mechanism", stats.confinement.map(Confinement::name))?;
    dict.set_item("sms", stats.confinement.and_then(Confinement::sms))?;
    dict.set_item("incident", stats.incident)?;
    dict.set_item("last_error", stats.last_error)?;
    Ok(dict)
}

#[pymethods]
impl BackgroundVerification {
    /// What it has done: `running`, `passes`, `verifications`, `bytes`, `busy_seconds`,
    /// `idle_seconds` (pauses and waits for the rate cap), `gb_per_s` (per busy second),
    /// `last_pass_seconds`, `mechanism` (`green_context`, `mps_context`, `bounded_grid`,
    /// `unconfined` on sim), `sms`, `incident` (what stopped it and the worker), `last_error`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.current())
    }

    /// Stops it (after the verification in flight; the GIL is released meanwhile) and returns the
    /// final stats.
    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let verifier = self
            .verifier
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(verifier) = verifier {
            let stats = py.detach(move || verifier.stop());
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(stats);
        }
        stats_dict(py, self.current())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }
}
