//! Test-only fault injection: a raw device write into an allocation, from outside the manager
//! (feature `fault-injection`, enabled only for test builds).

use cudarc::driver::result;

use crate::error::{CudaError, Result};
use crate::vram::VramBuffer;

/// Overwrites one byte of `buffer` at `offset` with a synchronous host→device copy.
///
/// # Errors
/// [`CudaError::OutOfBounds`], [`CudaError::Driver`].
pub(crate) fn write_byte(buffer: &VramBuffer, offset: u64, value: u8) -> Result<()> {
    let dst = buffer.checked_range(offset, 1)?;
    buffer
        .context()
        .bind_to_thread()
        .map_err(CudaError::driver("cuCtxSetCurrent"))?;
    // SAFETY: `dst` is one byte inside the live allocation (checked_range); the context is current;
    // the copy is synchronous. Writing through a shared reference is the point: this simulates
    // memory corruption behind the owner's back, and the manager only ever reads shard memory
    // after its upload (no concurrent writer to race with).
    unsafe { result::memcpy_htod_sync(dst, &[value]) }.map_err(CudaError::driver("cuMemcpyHtoD"))
}
