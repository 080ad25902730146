//! The device-memory backend interface the manager is written against.
//!
//! Two implementations: `cuda` (real VRAM, in the `vram-residency-cuda` crate, the only crate with
//! `unsafe`) and [`sim`](crate::sim) (host memory, for machines without a GPU). A backend allocates
//! buffers on a device, uploads a byte stream into them, and measures their fs-verity digest *where
//! the bytes are* (on the GPU for `cuda`). Every record made on `sim` says `backend: sim`.

use std::fmt;
use std::io::Read;

use crate::digest::{Digest, TreeDigest};
use crate::error::{Result, VramError};
pub use crate::weights::Weights;

/// Which kind of memory holds the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// NVIDIA device memory through the CUDA driver. The only backend for production.
    Cuda,
    /// Simulated device memory in host RAM. For development, CI and demos; never real residency.
    Sim,
}

impl BackendKind {
    /// Code used in canonical encodings.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Cuda => 1,
            Self::Sim => 2,
        }
    }

    /// Inverse of [`code`](Self::code).
    #[must_use]
    pub const fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Cuda),
            2 => Some(Self::Sim),
            _ => None,
        }
    }

    /// `"cuda"` or `"sim"`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cuda => "cuda",
            Self::Sim => "sim",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = VramError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cuda" => Ok(Self::Cuda),
            "sim" => Ok(Self::Sim),
            other => Err(VramError::InvalidInput {
                field: "backend",
                reason: format!(
                    "unknown backend {:?}; expected \"cuda\" or \"sim\"",
                    other.chars().take(40).collect::<String>()
                ),
            }),
        }
    }
}

/// What a backend reports about one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// Device index (the `gpu` argument of the manager's operations).
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3" (or "sim device 0").
    pub name: String,
    /// Device UUID.
    #[serde(serialize_with = "serialize_uuid")]
    pub uuid: [u8; 16],
    /// Total device memory in bytes.
    pub total_bytes: u64,
    /// Free device memory in bytes, as of the query.
    pub free_bytes: u64,
    /// Compute capability as `major.minor` (e.g. `9.0`); `None` on `sim`.
    pub compute_capability: Option<String>,
    /// Whether ECC is enabled on the device memory; `None` when unknown (`sim`).
    pub ecc_enabled: Option<bool>,
    /// Whether the GPU is integrated (shares host RAM, so "VRAM" is host memory); `None` on `sim`.
    pub integrated: Option<bool>,
    /// What the driver says about unified memory on this device (VP-002); `None` on `sim`.
    pub unified_memory: Option<UnifiedMemoryFacts>,
}

/// What the driver reports about unified memory on a device (`cuDeviceGetAttribute`). Shards never
/// use managed memory (they are `cuMemAlloc` allocations, checked at every verification), but these
/// facts say what *else* the GPU could read: with pageable memory access (HMM or ATS) a kernel can
/// dereference ordinary host pointers, so weights an engine kept in host RAM would work without ever
/// being copied to VRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnifiedMemoryFacts {
    /// The device supports managed allocations (`cuMemAllocManaged`).
    pub managed_memory: bool,
    /// The device and the host can access managed memory concurrently.
    pub concurrent_managed_access: bool,
    /// The device can access pageable host memory (`malloc`ed, not registered) directly: HMM or ATS.
    pub pageable_memory_access: bool,
    /// ... through the host's page tables (ATS, e.g. Grace Hopper), not driver-managed migration.
    pub pageable_memory_access_uses_host_page_tables: bool,
}

/// The device part of the VRAM-only policy (VP-001, WORKER-4163), checked when a manager starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DevicePolicy {
    /// Refuse devices whose ECC is off or unknown.
    pub require_ecc: bool,
    /// Refuse devices that can read pageable host memory directly (HMM/ATS), or for which the
    /// driver does not say (VP-002).
    pub require_no_pageable_access: bool,
}

/// The policy verdict on one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "reason")]
pub enum DeviceVerdict {
    /// A discrete GPU whose memory is its own: weights may live there.
    Accepted,
    /// Simulated device (host memory, labelled): accepted for development, never residency.
    Simulated,
    /// Weights must not be placed here; the manager refuses to start with such a device.
    Refused(String),
}

impl DevicePolicy {
    /// Judges one device: integrated GPUs are refused (their "device memory" is host RAM), and so
    /// is ECC that is off or unknown when [`require_ecc`](Self::require_ecc) is set.
    #[must_use]
    pub fn verdict(&self, backend: BackendKind, device: &DeviceInfo) -> DeviceVerdict {
        if backend == BackendKind::Sim {
            return DeviceVerdict::Simulated;
        }
        match device.integrated {
            Some(false) => {}
            Some(true) => {
                return DeviceVerdict::Refused(format!(
                    "GPU {} is integrated: its memory is host RAM, not VRAM (VP-001)",
                    device.index
                ));
            }
            None => {
                return DeviceVerdict::Refused(format!(
                    "GPU {}: the driver did not say whether it is integrated",
                    device.index
                ));
            }
        }
        if self.require_ecc && device.ecc_enabled != Some(true) {
            return DeviceVerdict::Refused(format!(
                "GPU {}: ECC is {} and the policy requires it",
                device.index,
                match device.ecc_enabled {
                    Some(false) => "off",
                    _ => "unknown",
                }
            ));
        }
        if self.require_no_pageable_access {
            let can = device
                .unified_memory
                .map(|facts| facts.pageable_memory_access);
            if can != Some(false) {
                return DeviceVerdict::Refused(format!(
                    "GPU {}: {} and the policy requires a GPU that cannot (VP-002)",
                    device.index,
                    match can {
                        Some(_) => "it can read pageable host memory directly (HMM/ATS)",
                        None => "the driver did not say whether it can read pageable host memory",
                    }
                ));
            }
        }
        DeviceVerdict::Accepted
    }
}

fn serialize_uuid<S: serde::Serializer>(
    uuid: &[u8; 16],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(&crate::ids::format_uuid(uuid))
}

/// Opaque identifier of one allocation: a counter within its backend, never an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

/// Where a buffer's bytes were found to live, from the backend's own check (VP-001, VP-003, VP-005).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "detail")]
pub enum Residency {
    /// The driver confirms plain device memory (CUDA: memory type DEVICE, not managed).
    DeviceMemory,
    /// Simulated backend: host memory, labelled as such. Not residency.
    Simulated,
    /// The bytes are not in plain device memory (managed, host, mapped...). A policy violation.
    Violation(String),
}

/// A device buffer holding one shard. Implementations free the memory on drop without panicking
/// (MS-004, MS-005) and never expose an address through `Debug` or errors (MS-001).
pub trait DeviceBuffer: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;

    /// True when the buffer has no bytes (never, for a shard).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device index.
    fn gpu(&self) -> u32;

    /// Opaque allocation identifier.
    fn allocation_id(&self) -> AllocationId;

    /// Fills the whole buffer from `source`, which must deliver exactly [`len`](Self::len) bytes and
    /// then end. `progress` receives the running byte count.
    ///
    /// # Errors
    /// [`VramError::SourceChanged`] when the source ends early or has more bytes; [`VramError::Io`] on
    /// a read error; backend errors on a failed copy.
    fn upload(&mut self, source: &mut dyn Read, progress: &mut dyn FnMut(u64)) -> Result<()>;

    /// Fills the whole buffer from `file`, which must hold exactly [`len`](Self::len) bytes. A
    /// backend may read it in parallel (positioned reads) and drop its pages from the page cache
    /// afterwards; the default reads it sequentially through [`upload`](Self::upload).
    /// `progress` receives the running byte count, possibly from several threads.
    ///
    /// # Errors
    /// As [`upload`](Self::upload).
    fn upload_file(&mut self, file: &std::fs::File, progress: &(dyn Fn(u64) + Sync)) -> Result<()> {
        let mut reader = file;
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0)).map_err(|source| {
            VramError::Io {
                path: "model file".into(),
                source,
            }
        })?;
        self.upload(&mut reader, &mut |n| progress(n))
    }

    /// Measures the fs-verity digest of the bytes where they live (on the GPU for `cuda`).
    ///
    /// # Errors
    /// Backend errors.
    fn tree_digest(&self) -> Result<TreeDigest>;

    /// The fs-verity digest alone: what a verification needs while the shard is intact. A backend
    /// may compute it faster than [`tree_digest`](Self::tree_digest) (the CUDA backend hashes a
    /// level more on the GPU and copies back 32 bytes per 64 MiB instead of per 512 KiB); the
    /// manager asks for the whole tree only after a mismatch, to localise the damage. The default
    /// is the digest of [`tree_digest`](Self::tree_digest).
    ///
    /// # Errors
    /// Backend errors.
    fn digest(&self) -> Result<Digest> {
        Ok(self.tree_digest()?.digest())
    }

    /// [`tree_digest`](Self::tree_digest) confined to `budget` (for background verification
    /// beside a running model), and how it was confined. The default (a backend with no GPU to
    /// share) measures unconfined for [`LaneMechanism::Auto`] and refuses a mechanism asked for by
    /// name, which it cannot provide.
    ///
    /// # Errors
    /// [`VramError::Backend`] for a named mechanism; backend errors.
    fn tree_digest_within(&self, budget: SmBudget) -> Result<(TreeDigest, Confinement)> {
        if budget.mechanism != LaneMechanism::Auto {
            return Err(VramError::Backend {
                reason: format!(
                    "this backend has no GPU to confine a digest to: the {} mechanism cannot be \
                     had (use auto)",
                    budget.mechanism
                ),
            });
        }
        Ok((self.tree_digest()?, Confinement::Unconfined))
    }

    /// Checks where the bytes live (VP-001/003/005).
    ///
    /// # Errors
    /// Backend errors when the check itself fails.
    fn residency(&self) -> Result<Residency>;

    /// Lends the weights for the duration of the borrow.
    ///
    /// # Errors
    /// Backend errors.
    fn weights(&self) -> Result<Weights<'_>>;

    /// Copies the first `len` bytes back to the host: the model's **header** (never the weights
    /// after it), so that the tensor table sealed with a shard can be parsed from the bytes that
    /// actually reached device memory.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when `len` is larger than the buffer; backend errors.
    fn read_prefix(&self, len: u64) -> Result<Vec<u8>>;
}

/// A limit on the GPU a background verification may use: `sms` streaming multiprocessors, and
/// how to hold the kernel to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SmBudget {
    /// Streaming multiprocessors (at least 1; the CUDA backend may round up to the device's
    /// partition granularity, e.g. 8 on Hopper).
    pub sms: u32,
    /// How the CUDA backend confines the kernel ([`LaneMechanism::Auto`]: the first that works).
    pub mechanism: LaneMechanism,
}

impl SmBudget {
    /// `sms` SMs, confined by the first mechanism that works ([`LaneMechanism::Auto`]).
    #[must_use]
    pub const fn sms(sms: u32) -> Self {
        Self {
            sms,
            mechanism: LaneMechanism::Auto,
        }
    }

    /// `sms` SMs, confined by `mechanism` only (the digest fails when it is not available).
    #[must_use]
    pub const fn with(sms: u32, mechanism: LaneMechanism) -> Self {
        Self { sms, mechanism }
    }
}

/// Which mechanism confines a budgeted digest to its SMs (CUDA backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneMechanism {
    /// The first that works: a green context, else (where the MPS daemon runs) an MPS context with
    /// an SM-count execution affinity, else a bounded grid.
    #[default]
    Auto,
    /// A green context only (driver ≥ CUDA 12.4).
    GreenContext,
    /// A context with an SM-count execution affinity only: needs the process to be a client of a
    /// running MPS daemon (`nvidia-cuda-mps-control -d`) and a driver ≥ CUDA 12.5.
    Mps,
    /// A capped grid on a lowest-priority stream only (always available; the weakest).
    BoundedGrid,
}

impl LaneMechanism {
    /// The names [`FromStr`](std::str::FromStr) takes, for help texts.
    pub const NAMES: &'static str = "auto, green, mps, bounded";

    /// The short name (`auto`, `green`, `mps`, `bounded`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::GreenContext => "green",
            Self::Mps => "mps",
            Self::BoundedGrid => "bounded",
        }
    }
}

impl std::fmt::Display for LaneMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LaneMechanism {
    type Err = VramError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "green" | "green_context" => Ok(Self::GreenContext),
            "mps" | "mps_context" => Ok(Self::Mps),
            "bounded" | "bounded_grid" => Ok(Self::BoundedGrid),
            _ => Err(VramError::InvalidInput {
                field: "mechanism",
                reason: format!("expected one of {}", Self::NAMES),
            }),
        }
    }
}

/// How a budgeted digest was confined to its [`SmBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "mechanism")]
pub enum Confinement {
    /// A green context of `sms` SMs: the hardware keeps the kernel on them.
    GreenContext {
        /// SMs granted.
        sms: u32,
    },
    /// A context of the running MPS daemon with an execution affinity of `sms` SMs: MPS keeps the
    /// kernel on that many SMs, and runs it beside other processes' kernels instead of
    /// time-slicing with them.
    MpsContext {
        /// SMs granted.
        sms: u32,
    },
    /// The kernel's grid capped at what `sms` SMs hold, on a lowest-priority stream (where green
    /// contexts are missing).
    BoundedGrid {
        /// SMs' worth of blocks.
        sms: u32,
    },
    /// Not confined (the `sim` backend: no GPU to share).
    Unconfined,
}

impl Confinement {
    /// The mechanism's name as serialised (`green_context`, `mps_context`, `bounded_grid`,
    /// `unconfined`).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::GreenContext { .. } => "green_context",
            Self::MpsContext { .. } => "mps_context",
            Self::BoundedGrid { .. } => "bounded_grid",
            Self::Unconfined => "unconfined",
        }
    }

    /// The SMs granted (`None` when unconfined).
    #[must_use]
    pub const fn sms(self) -> Option<u32> {
        match self {
            Self::GreenContext { sms } | Self::MpsContext { sms } | Self::BoundedGrid { sms } => {
                Some(sms)
            }
            Self::Unconfined => None,
        }
    }
}

/// Where tensor data is placed in device memory: the data section of a file image starts on a
/// multiple of this many bytes, so that every tensor whose offset in the data section is a multiple
/// of 256 (as writers lay them out) starts where GEMM libraries pick their aligned kernels
/// (cuBLAS wants 16 bytes, its fastest kernels 128 to 256), exactly as a freshly allocated tensor
/// would.
pub const DATA_ALIGNMENT: u64 = 256;

/// The bytes a backend leaves free before a file image so that its data section, `data_offset`
/// bytes in, lands on a [`DATA_ALIGNMENT`] boundary of an allocation that is itself so aligned.
/// Only multiples of 8 are used, so the image itself always starts 8-byte aligned (what the hashing
/// kernel needs); a data section at an offset that is not a multiple of 8 gets no padding (its
/// tensors cannot all be aligned anyway, and lending them refuses those that are not).
#[must_use]
pub const fn image_padding(data_offset: u64) -> u64 {
    if !data_offset.is_multiple_of(8) {
        return 0;
    }
    // `data_offset % 256` is below 256, so neither step can overflow or divide by zero.
    DATA_ALIGNMENT.wrapping_sub(data_offset % DATA_ALIGNMENT) % DATA_ALIGNMENT
}

#[cfg(test)]
mod padding_tests {
    use super::*;

    #[test]
    fn padding_puts_the_data_section_on_a_256_byte_boundary_and_keeps_8_byte_alignment() {
        for data_offset in (0..2048_u64).step_by(8) {
            let pad = image_padding(data_offset);
            assert!(
                pad < DATA_ALIGNMENT && pad.is_multiple_of(8),
                "{data_offset}: {pad}"
            );
            assert_eq!((pad + data_offset) % DATA_ALIGNMENT, 0, "{data_offset}");
        }
        assert_eq!(image_padding(0), 0);
        assert_eq!(
            image_padding(256 + 3),
            0,
            "unaligned data sections get no padding"
        );
    }
}

/// A device-memory backend.
pub trait Backend: Send + Sync {
    /// Which kind this is.
    fn kind(&self) -> BackendKind;

    /// The devices present.
    ///
    /// # Errors
    /// Backend errors (driver missing, ...).
    fn devices(&self) -> Result<Vec<DeviceInfo>>;

    /// The driver version, as attestations report it. The simulated backend says `sim`; a backend
    /// that cannot tell says `unknown` (the default), never a guess.
    ///
    /// # Errors
    /// Backend errors when the query itself fails.
    fn driver_version(&self) -> Result<String> {
        Ok("unknown".to_owned())
    }

    /// Allocates room for a `bytes`-byte file image on device `gpu`. `data_offset` is where the
    /// image's data section (its tensors) starts: a backend that lends its memory to inference
    /// engines places the image so that this offset lands on a [`DATA_ALIGNMENT`] boundary (see
    /// [`image_padding`]); 0 for an image without a header.
    ///
    /// # Errors
    /// [`VramError::AllocationFailed`] or [`VramError::InvalidGpuIndex`].
    fn allocate(&self, gpu: u32, bytes: u64, data_offset: u64) -> Result<Box<dyn DeviceBuffer>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_mechanisms_parse_by_name_and_round_trip_and_unknown_is_refused() {
        for mechanism in [
            LaneMechanism::Auto,
            LaneMechanism::GreenContext,
            LaneMechanism::Mps,
            LaneMechanism::BoundedGrid,
        ] {
            assert_eq!(
                mechanism.name().parse::<LaneMechanism>().unwrap(),
                mechanism
            );
        }
        assert_eq!(
            " Bounded_Grid ".parse::<LaneMechanism>().unwrap(),
            LaneMechanism::BoundedGrid
        );
        let err = "mig".parse::<LaneMechanism>().unwrap_err();
        assert!(
            err.to_string().contains("auto, green, mps, bounded"),
            "{err}"
        );
        assert_eq!(SmBudget::sms(8).mechanism, LaneMechanism::Auto);
        // The names are those the confinement serialises with.
        for confinement in [
            Confinement::GreenContext { sms: 8 },
            Confinement::MpsContext { sms: 8 },
            Confinement::BoundedGrid { sms: 8 },
            Confinement::Unconfined,
        ] {
            let json = serde_json::to_value(confinement).unwrap();
            assert_eq!(json["mechanism"], confinement.name());
            assert_eq!(
                json.get("sms").and_then(|v| v.as_u64()),
                confinement.sms().map(u64::from)
            );
        }
    }

    #[test]
    fn backend_names_parse_and_unknown_is_refused() {
        assert_eq!("sim".parse::<BackendKind>().unwrap(), BackendKind::Sim);
        assert_eq!("cuda".parse::<BackendKind>().unwrap(), BackendKind::Cuda);
        assert!(matches!(
            "rocm".parse::<BackendKind>(),
            Err(VramError::InvalidInput {
                field: "backend",
                ..
            })
        ));
        for kind in [BackendKind::Sim, BackendKind::Cuda] {
            assert_eq!(BackendKind::from_code(kind.code()), Some(kind));
        }
    }

    fn gpu(integrated: Option<bool>, ecc: Option<bool>) -> DeviceInfo {
        DeviceInfo {
            index: 3,
            name: "test gpu".to_owned(),
            uuid: [7; 16],
            total_bytes: 1 << 30,
            free_bytes: 1 << 30,
            compute_capability: Some("9.0".to_owned()),
            ecc_enabled: ecc,
            integrated,
            unified_memory: Some(UnifiedMemoryFacts {
                managed_memory: true,
                concurrent_managed_access: true,
                pageable_memory_access: false,
                pageable_memory_access_uses_host_page_tables: false,
            }),
        }
    }

    #[test]
    fn device_policy_refuses_integrated_gpus_and_unknowns_and_ecc_off_when_required_vp_001() {
        let lax = DevicePolicy::default();
        let strict = DevicePolicy {
            require_ecc: true,
            ..DevicePolicy::default()
        };
        let cuda = BackendKind::Cuda;
        assert_eq!(
            lax.verdict(cuda, &gpu(Some(false), Some(false))),
            DeviceVerdict::Accepted
        );
        assert_eq!(
            strict.verdict(cuda, &gpu(Some(false), Some(true))),
            DeviceVerdict::Accepted
        );
        for (policy, device, needle) in [
            (lax, gpu(Some(true), Some(true)), "integrated"),
            (lax, gpu(None, Some(true)), "did not say"),
            (strict, gpu(Some(false), Some(false)), "ECC is off"),
            (strict, gpu(Some(false), None), "ECC is unknown"),
        ] {
            match policy.verdict(cuda, &device) {
                DeviceVerdict::Refused(reason) => {
                    assert!(
                        reason.contains(needle) && reason.contains("GPU 3"),
                        "{reason}"
                    );
                }
                other => panic!("{device:?}: {other:?}"),
            }
        }
        // sim devices know none of this and are labelled, never accepted as residency.
        assert_eq!(
            strict.verdict(BackendKind::Sim, &gpu(None, None)),
            DeviceVerdict::Simulated
        );
    }

    #[test]
    fn device_policy_can_require_a_gpu_that_cannot_read_pageable_host_memory_vp_002() {
        let policy = DevicePolicy {
            require_no_pageable_access: true,
            ..DevicePolicy::default()
        };
        let cuda = BackendKind::Cuda;
        let plain = gpu(Some(false), Some(true));
        assert_eq!(policy.verdict(cuda, &plain), DeviceVerdict::Accepted);
        let mut hmm = plain.clone();
        if let Some(facts) = hmm.unified_memory.as_mut() {
            facts.pageable_memory_access = true;
        }
        let mut unknown = plain.clone();
        unknown.unified_memory = None;
        for (device, needle) in [(hmm.clone(), "can read pageable"), (unknown, "did not say")] {
            match policy.verdict(cuda, &device) {
                DeviceVerdict::Refused(reason) => assert!(reason.contains(needle), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
        // Without the requirement such a device is accepted (and `devices` reports the fact).
        assert_eq!(
            DevicePolicy::default().verdict(cuda, &hmm),
            DeviceVerdict::Accepted
        );
    }
}
