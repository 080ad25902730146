//! vram-residency core library (work in progress).
#![forbid(unsafe_code)]

pub mod format;
