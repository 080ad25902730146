//! Page-locked host buffers for the staging ring: zeroised after every upload (and kept for the next
//! one in the device's ring pool), zeroised again and freed on drop.

use std::sync::Arc;

use cudarc::driver::{CudaContext, result};
use zeroize::Zeroize as _;

use crate::error::{CudaError, Result};

/// One `cuMemHostAlloc` buffer. Zeroised, then freed, on drop: weights pass through it but never
/// stay in host memory.
///
/// `Send`: the memory is plain host memory owned by this value; the context is `Send + Sync`.
/// Not shared between threads (no `Sync` needed): each staging reader owns its buffers.
pub struct PinnedBuffer {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is uniquely owned (no aliasing copies of `ptr` escape except as borrows tied to
// `&self`/`&mut self`), cuMemFreeHost may be called from any thread once the context is current
// (Drop binds it), and the bytes are plain data.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// Allocates `len > 0` bytes of page-locked host memory (not mapped into the device's address
    /// space: flags 0, so no `DEVICEMAP`).
    ///
    /// # Errors
    /// [`CudaError::OutOfBounds`] for zero bytes; [`CudaError::Driver`] when the driver refuses.
    pub fn alloc(ctx: &Arc<CudaContext>, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(CudaError::OutOfBounds {
                what: "zero-byte pinned buffer",
            });
        }
        ctx.bind_to_thread()
            .map_err(CudaError::driver("cuCtxSetCurrent"))?;
        // SAFETY: the context is current; the returned memory is uninitialised and is zeroed below
        // before any read; it is freed exactly once, in Drop.
        let ptr = unsafe { result::malloc_host(len, 0) }
            .map_err(CudaError::driver("cuMemHostAlloc"))?
            .cast::<u8>();
        if ptr.is_null() {
            return Err(CudaError::OutOfBounds {
                what: "cuMemHostAlloc returned null",
            });
        }
        // SAFETY: `ptr` points to `len` writable bytes just allocated and owned by us.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(Self {
            ctx: Arc::clone(ctx),
            ptr,
            len,
        })
    }

    /// Size in bytes.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Never true.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes (zeroed at allocation) owned by self; the
        // shared borrow of self prevents concurrent mutation through `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably. The caller must not call this while an asynchronous copy from the
    /// buffer is still queued (wait for its event first).
    #[must_use]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned by self; `&mut self` makes the
        // borrow unique on the host side.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // Zeroise before the pages go back: weights must not linger in host memory.
        self.as_mut_slice().zeroize();
        let freed = self
            .ctx
            .bind_to_thread()
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed only here, once; owners
            // synchronise every copy from it before dropping it.
            .and_then(|()| unsafe { result::free_host(self.ptr.cast()) });
        if let Err(error) = freed {
            tracing::error!(%error, bytes = self.len, "cuMemFreeHost failed");
        }
    }
}
