//! Lending a sealed shard's memory to an inference engine: for one call ([`Weights`], from
//! [`VramManager::execute`](crate::VramManager::execute)) or for as long as the engine holds it
//! ([`Lease`], from [`VramManager::lend`](crate::VramManager::lend)). Both verify the shard first
//! (CI-007) and both describe the memory as typed tensor views (name, element type, shape, offset),
//! so an engine never has to parse the file format itself.
//!
//! Addresses are lent, never printed: no `Debug`, `Display` or error of these types shows one
//! (MS-001).

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use crate::error::{Result, VramError};
use crate::format::{TensorInfo, TensorTable};
use crate::shard::SealedShard;

/// Where a shard's first byte is, as lent to an engine. Not `Debug`: an address is never printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Host memory (the `sim` backend): a process address.
    Host {
        /// Address of the shard's first byte.
        address: usize,
    },
    /// Device memory (the `cuda` backend).
    Device {
        /// CUDA device ordinal.
        gpu: u32,
        /// Device address of the shard's first byte (in the process's primary context).
        address: u64,
    },
}

impl Location {
    /// The address of byte `offset` of the shard, as a number.
    #[must_use]
    pub const fn address_at(self, offset: u64) -> u64 {
        match self {
            Self::Host { address } => (address as u64).wrapping_add(offset),
            Self::Device { address, .. } => address.wrapping_add(offset),
        }
    }

    /// True for device memory.
    #[must_use]
    pub const fn is_device(self) -> bool {
        matches!(self, Self::Device { .. })
    }
}

/// Element type of a tensor that can be lent as a typed array: what DLPack calls its code and bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element {
    /// The kind of number.
    pub kind: ElementKind,
    /// Bits per element (8, 16, 32 or 64).
    pub bits: u8,
}

/// Kinds of [`Element`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementKind {
    /// IEEE binary floating point.
    Float,
    /// bfloat16.
    BFloat,
    /// Signed integer.
    Int,
    /// Unsigned integer.
    UInt,
    /// Boolean, one byte each.
    Bool,
}

impl Element {
    /// The element type of a dense dtype as the formats name them (safetensors `F32`, `BF16`,
    /// `I8`...; GGUF `F32`, `F16`, `BF16`, `I8`...`I64`, `F64`; raw `u8`). `None` for quantised
    /// blocks (GGUF `Q4_K`...) and sub-byte or 8-bit float types, which are lent as bytes.
    #[must_use]
    pub fn of_dtype(dtype: &str) -> Option<Self> {
        let (kind, bits) = match dtype {
            "F64" => (ElementKind::Float, 64),
            "F32" => (ElementKind::Float, 32),
            "F16" => (ElementKind::Float, 16),
            "BF16" => (ElementKind::BFloat, 16),
            "I64" => (ElementKind::Int, 64),
            "I32" => (ElementKind::Int, 32),
            "I16" => (ElementKind::Int, 16),
            "I8" => (ElementKind::Int, 8),
            "U64" => (ElementKind::UInt, 64),
            "U32" => (ElementKind::UInt, 32),
            "U16" => (ElementKind::UInt, 16),
            "U8" | "u8" => (ElementKind::UInt, 8),
            "BOOL" => (ElementKind::Bool, 8),
            _ => return None,
        };
        Some(Self { kind, bits })
    }

    /// Size of one element in bytes.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        self.bits as u64 / 8
    }

    /// Plain bytes (`uint8`), for tensors lent without an element type.
    pub const BYTES: Self = Self {
        kind: ElementKind::UInt,
        bits: 8,
    };
}

/// How one tensor of a shard is lent: typed when its dtype is dense, as bytes otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// The element type handed out.
    pub element: Element,
    /// The shape handed out, outermost dimension first (row-major, contiguous). For a typed tensor
    /// this is the file's shape (GGUF stores `ne[0]` first, so its dimensions are reversed here);
    /// for bytes it is `[bytes]`.
    pub shape: Vec<u64>,
    /// True when the tensor is lent as bytes because its dtype has no dense element type.
    pub as_bytes: bool,
}

/// One tensor of a lent shard: its entry in the sealed tensor table and where it starts.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    info: &'a TensorInfo,
    gguf: bool,
}

impl<'a> TensorView<'a> {
    /// The table entry (name, dtype, shape as stored, offset and length in the file).
    #[must_use]
    pub const fn info(&self) -> &'a TensorInfo {
        self.info
    }

    /// Tensor name as stored in the file.
    #[must_use]
    pub fn name(&self) -> &'a str {
        &self.info.name
    }

    /// Offset of the tensor's first byte in the shard (= in the file).
    #[must_use]
    pub const fn offset(&self) -> u64 {
        self.info.offset
    }

    /// Length in bytes.
    #[must_use]
    pub const fn bytes(&self) -> u64 {
        self.info.bytes
    }

    /// How the tensor is lent: element type and row-major shape.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when the shape does not match the byte length (a table that
    /// passed the header checks always matches).
    pub fn layout(&self) -> Result<TensorLayout> {
        let Some(element) = Element::of_dtype(&self.info.dtype) else {
            return Ok(TensorLayout {
                element: Element::BYTES,
                shape: vec![self.info.bytes],
                as_bytes: true,
            });
        };
        let mut shape = self.info.shape.clone();
        if self.gguf {
            shape.reverse();
        }
        let count = shape
            .iter()
            .try_fold(1_u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(element.bytes()));
        if count != Some(self.info.bytes) {
            return Err(VramError::InvalidInput {
                field: "tensor table",
                reason: format!(
                    "tensor {:?}: shape {:?} of {} does not cover its {} bytes",
                    self.info.name, self.info.shape, self.info.dtype, self.info.bytes
                ),
            });
        }
        Ok(TensorLayout {
            element,
            shape,
            as_bytes: false,
        })
    }
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorView")
            .field("name", &self.info.name)
            .field("dtype", &self.info.dtype)
            .field("shape", &self.info.shape)
            .field("offset", &self.info.offset)
            .field("bytes", &self.info.bytes)
            .finish()
    }
}

fn views(table: Option<&TensorTable>) -> Vec<TensorView<'_>> {
    table.map_or_else(Vec::new, |table| {
        let gguf = matches!(table.format, crate::format::ModelFormat::Gguf { .. });
        table
            .tensors
            .iter()
            .map(|info| TensorView { info, gguf })
            .collect()
    })
}

/// A shard's weights, lent by [`VramManager::execute`](crate::VramManager::execute) for the
/// duration of one closure call: the memory and the sealed tensor table. Its `Debug` shows no
/// address.
pub struct Weights<'a> {
    len: u64,
    access: Access<'a>,
    table: Option<&'a TensorTable>,
}

enum Access<'a> {
    Host(Box<dyn Deref<Target = [u8]> + 'a>),
    Device { gpu: u32, address: u64 },
}

/// A device region lent for the borrow `'a`: the address cannot be reached once the borrow ends
/// without copying the number out, which the type does not invite (it is neither `Copy` nor
/// `Clone`).
pub struct DeviceRegion<'a> {
    gpu: u32,
    address: u64,
    len: u64,
    _lent: PhantomData<&'a ()>,
}

impl DeviceRegion<'_> {
    /// CUDA device ordinal.
    #[must_use]
    pub const fn gpu(&self) -> u32 {
        self.gpu
    }

    /// Device address of the shard's first byte, for launching kernels. Never log it (MS-001).
    #[must_use]
    pub const fn address(&self) -> u64 {
        self.address
    }

    /// Device address of `tensor`'s first byte.
    #[must_use]
    pub const fn tensor_address(&self, tensor: &TensorView<'_>) -> u64 {
        self.address.wrapping_add(tensor.offset())
    }

    /// Size in bytes.
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// True when there are no bytes.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for DeviceRegion<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceRegion")
            .field("gpu", &self.gpu)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<'a> Weights<'a> {
    /// Weights in host memory (the `sim` backend).
    #[must_use]
    pub fn host(bytes: Box<dyn Deref<Target = [u8]> + 'a>) -> Self {
        let len = bytes.len() as u64;
        Self {
            len,
            access: Access::Host(bytes),
            table: None,
        }
    }

    /// Weights in device memory at `address` of device `gpu` (the `cuda` backend).
    #[must_use]
    pub const fn device(gpu: u32, address: u64, len: u64) -> Self {
        Self {
            len,
            access: Access::Device { gpu, address },
            table: None,
        }
    }

    /// Attaches the shard's sealed tensor table.
    #[must_use]
    pub(crate) const fn with_table(mut self, table: Option<&'a TensorTable>) -> Self {
        self.table = table;
        self
    }

    /// Size in bytes.
    #[must_use]
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// True when there are no bytes.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, when they are in host memory (`sim` only).
    #[must_use]
    pub fn host_bytes(&self) -> Option<&[u8]> {
        match &self.access {
            Access::Host(bytes) => Some(bytes),
            Access::Device { .. } => None,
        }
    }

    /// The device region (`cuda` only), for launching inference kernels on it.
    #[must_use]
    pub const fn device_region(&self) -> Option<DeviceRegion<'_>> {
        match self.access {
            Access::Device { gpu, address } => Some(DeviceRegion {
                gpu,
                address,
                len: self.len,
                _lent: PhantomData,
            }),
            Access::Host(_) => None,
        }
    }

    /// The tensors of the sealed table, in table order (empty for a shard without one).
    #[must_use]
    pub fn tensors(&self) -> Vec<TensorView<'_>> {
        views(self.table)
    }

    /// Where the first byte is, as a raw [`Location`] (for [`Lease`]).
    pub(crate) fn location(&self) -> Location {
        match &self.access {
            Access::Host(bytes) => Location::Host {
                address: bytes.as_ptr() as usize,
            },
            Access::Device { gpu, address } => Location::Device {
                gpu: *gpu,
                address: *address,
            },
        }
    }
}

impl fmt::Debug for Weights<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = match self.access {
            Access::Host(_) => "host",
            Access::Device { .. } => "device",
        };
        f.debug_struct("Weights")
            .field("len", &self.len)
            .field("memory", &place)
            .field("tensors", &self.table.map_or(0, |t| t.tensors.len()))
            .finish_non_exhaustive()
    }
}

/// A shard lent to an engine for as long as the lease lives (from
/// [`VramManager::lend`](crate::VramManager::lend), which verifies the shard first). The lease
/// holds the shard (an `Arc`): its memory cannot be freed while any lease (or clone of one) exists,
/// since [`VramManager::deallocate`](crate::VramManager::deallocate) needs the shard itself.
/// Re-verify before each request with [`VramManager::verify_sealed`](crate::VramManager::verify_sealed)
/// (CI-007): a lease is not a promise that the bytes stay intact, only that they stay allocated.
#[derive(Clone)]
pub struct Lease {
    shard: Arc<SealedShard>,
    location: Location,
}

impl Lease {
    pub(crate) const fn new(shard: Arc<SealedShard>, location: Location) -> Self {
        Self { shard, location }
    }

    /// The lent shard.
    #[must_use]
    pub fn shard(&self) -> &SealedShard {
        &self.shard
    }

    /// Where its first byte is. Never log it (MS-001).
    #[must_use]
    pub const fn location(&self) -> Location {
        self.location
    }

    /// The tensors of the sealed table, in table order (empty for a shard without one).
    #[must_use]
    pub fn tensors(&self) -> Vec<TensorView<'_>> {
        views(self.shard.tensor_table())
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("shard_id", self.shard.shard_id())
            .field(
                "memory",
                &if self.location.is_device() {
                    "device"
                } else {
                    "host"
                },
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_debug_shows_no_address_ms_001() {
        let w = Weights::device(0, 0xdead_beef_0000, 4096);
        let region = w.device_region().unwrap();
        for shown in [format!("{w:?}"), format!("{region:?}")] {
            assert!(!shown.contains("dead"), "{shown}");
            assert!(!shown.to_lowercase().contains("0x"), "{shown}");
            assert!(
                !shown.contains(&0xdead_beef_0000_u64.to_string()),
                "{shown}"
            );
        }
    }

    #[test]
    fn dense_dtypes_have_elements_and_quantised_blocks_are_bytes() {
        assert_eq!(
            Element::of_dtype("BF16"),
            Some(Element {
                kind: ElementKind::BFloat,
                bits: 16
            })
        );
        assert_eq!(Element::of_dtype("I64").map(Element::bytes), Some(8));
        for quantised in ["Q4_K", "Q8_0", "F8_E4M3", "F4", "C64"] {
            assert_eq!(Element::of_dtype(quantised), None, "{quantised}");
        }
    }

    #[test]
    fn gguf_shapes_are_reversed_and_quantised_tensors_lent_as_bytes() {
        let f32_info = TensorInfo {
            name: "w".to_owned(),
            dtype: "F32".to_owned(),
            shape: vec![4, 2],
            offset: 64,
            bytes: 32,
        };
        let q = TensorInfo {
            name: "q".to_owned(),
            dtype: "Q8_0".to_owned(),
            shape: vec![32],
            offset: 96,
            bytes: 34,
        };
        let typed = TensorView {
            info: &f32_info,
            gguf: true,
        };
        assert_eq!(typed.layout().unwrap().shape, vec![2, 4]);
        let bytes = TensorView {
            info: &q,
            gguf: true,
        }
        .layout()
        .unwrap();
        assert!(bytes.as_bytes);
        assert_eq!(bytes.shape, vec![34]);
        let wrong = TensorInfo {
            bytes: 31,
            ..f32_info.clone()
        };
        let err = TensorView {
            info: &wrong,
            gguf: false,
        }
        .layout()
        .unwrap_err();
        assert!(err.to_string().contains("does not cover"), "{err}");
    }
}
