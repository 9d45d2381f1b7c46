use pyo3::prelude::*;

/// A full memory barrier (`fence(SeqCst)`: MFENCE on x86-64), for the Python data plane.
#[pyfunction]
fn full_fence() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(full_fence, m)?)?;
    Ok(())
}
