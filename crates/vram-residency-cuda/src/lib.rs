//! # vram-residency-cuda
//!
//! The CUDA backend of `vram-residency`: the only crate of the project with `unsafe` code and the
//! only user of cudarc (driver API and NVRTC, loaded dynamically, so it builds without CUDA and runs
//! against CUDA 12 and 13 drivers). Three layers, as in cudarc itself:
//!
//! | layer | here |
//! | --- | --- |
//! | raw calls returning `Result` (cudarc `result`/`sys`) | inside the types below, each `unsafe {}` with its `// SAFETY:` |
//! | safe RAII types | [`Device`](device::Device), [`VramBuffer`](vram::VramBuffer), [`PinnedBuffer`](pinned::PinnedBuffer), the staging ring ([`staging`]) |
//! | the backend the core uses | [`CudaBackend`] |
//!
//! A shard's path: [`staging`] streams the file through pinned buffers into a [`vram::VramBuffer`]
//! (`cuMemAlloc`), [`policy`] checks with `cuPointerGetAttribute` that it is plain device memory,
//! [`tree`] measures its fs-verity digest on the GPU with the kernel in `kernels/fsverity.cu`
//! ([`kernels`], compiled by NVRTC on first use) where the device's [`hasher`] says (the whole GPU,
//! or a confined [`lane`] of a few SMs for background verification), and [`bench`] measures all of
//! it against the seed's method and the hardware's ceilings.
//!
//! The driver library is looked for before the first driver call (cudarc panics without it);
//! without a driver or NVRTC every entry point returns a clear error.
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

pub mod backend;
pub mod bench;
pub mod device;
pub mod error;
#[cfg(feature = "fault-injection")]
mod fault;
pub mod hasher;
pub mod interference;
pub mod kernels;
pub mod lane;
pub mod pinned;
pub mod policy;
pub mod staging;
pub mod tree;
pub mod vram;

pub use backend::{CudaBackend, CudaConfig};
pub use error::CudaError;
pub use staging::StagingConfig;

/// Whether a CUDA driver library can be loaded on this host (no driver call is made).
#[must_use]
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
