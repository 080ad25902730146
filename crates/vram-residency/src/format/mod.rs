//! Hardened readers for model container headers: GGUF (v2, v3), safetensors, and raw bytes.
//!
//! [`read_tensor_table`] detects the container format from the first bytes of a file and parses
//! **only its header** into a [`TensorTable`]: every tensor's name, dtype, shape and absolute byte
//! range in the file. The table is what names the tensors hit when a verification finds corrupted
//! ranges, and its [`TensorTable::digest`] can be bound into a seal.
//!
//! # Guarantees
//!
//! - **Fails closed.** A file that starts like GGUF or safetensors and does not parse is an error,
//!   never silently treated as raw bytes. Every error is a [`ModelFormatError`] that names the
//!   offending field and its byte offset in the file.
//! - **Bounded allocation.** Every count and length read from the file is checked against the bytes
//!   the file (and the header cap) still holds *before* anything is allocated for it. Header caps:
//!   GGUF 256 MiB ([`GGUF_HEADER_CAP`]), safetensors 100 MiB ([`SAFETENSORS_HEADER_CAP`]); at most
//!   [`MAX_TENSOR_COUNT`] tensors and [`MAX_METADATA_COUNT`] metadata entries per file.
//! - **Header only.** The reader is read incrementally with exact-length reads and never past the
//!   end of the header (the GGUF alignment padding and all tensor data are left unread; of a raw
//!   file only the 9 bytes needed for detection are read). Pass a
//!   [`std::io::BufReader`] when the source is an unbuffered file: GGUF headers are read field by
//!   field.
//! - **No panics**, no `unsafe`, checked arithmetic throughout.
//!
//! # Detection (fails closed)
//!
//! The caller may say what the file is ([`FormatChoice`]: `gguf`, `safetensors`, or `raw` to seal
//! any bytes as one tensor); then the file must parse as that. With [`FormatChoice::Auto`] (the
//! default) a file **claims** a format by its name or its first bytes, and must then parse as that
//! format or be refused:
//!
//! - **GGUF** is claimed by the extension `.gguf`, or by first four bytes within one byte of the
//!   magic `GGUF` (`GGUX`, `gGUF`, …).
//! - **safetensors** is claimed by the extension `.safetensors`, by `{` at byte 8, or by a plausible
//!   header length: the little-endian `u64` `N` in bytes 0..8 with `2 <= N <= file_len - 8`. The
//!   100 MiB header cap ([`SAFETENSORS_HEADER_CAP`]) is a cap the parser enforces, not a detection
//!   rule: a file with `{` at byte 8 and a header length of 2^60 is a malformed safetensors file.
//! - A name and bytes that claim different formats are refused.
//! - **Raw** — one tensor named `raw`, dtype `u8`, shape `[file_len]`, covering the whole file — is
//!   chosen automatically only for a file that claims nothing.
//!
//! # Shape order
//!
//! `TensorInfo::shape` is the order **stored in the file**. For GGUF that is ggml order, `ne[0]`
//! (the fastest-varying, contiguous dimension) first, the reverse of the numpy/PyTorch order; the
//! upstream `gguf.GGUFReader` reports the same order in `ReaderTensor.shape`. For safetensors it is
//! the row-major (C) order of the JSON header, as numpy and PyTorch report it.

mod gguf;
mod safetensors;

use std::io::Read;

use crate::ids::bytes;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Largest GGUF header (magic to the end of the last tensor info) the reader accepts: 256 MiB.
pub const GGUF_HEADER_CAP: u64 = 256 * 1024 * 1024;

/// Largest safetensors JSON header length `N` the reader accepts: 100 MiB.
pub const SAFETENSORS_HEADER_CAP: u64 = 100 * 1024 * 1024;

/// Largest number of tensors in one file (either format): 2^20. Real models have a few thousand
/// per file; the cap bounds the memory the table itself can take.
pub const MAX_TENSOR_COUNT: u64 = 1 << 20;

/// Largest number of metadata entries in one file (GGUF key/values, safetensors `__metadata__`
/// entries): 2^20. Real files have tens.
pub const MAX_METADATA_COUNT: u64 = 1 << 20;

/// Domain-separation prefix of [`TensorTable::canonical_bytes`].
pub const TENSOR_TABLE_DOMAIN: &str = "vram-residency/tensor-table/v2";
/// Version of the tensor-table encoding.
pub const TENSOR_TABLE_VERSION: u16 = 2;

/// Longest metadata string summary, in characters (an ellipsis marks a truncated one).
const SUMMARY_MAX_CHARS: usize = 80;

/// Number of leading bytes needed to detect the format (`GGUF` magic, or safetensors `N` + `{`).
const DETECT_LEN: usize = 9;

/// Which container format a model file is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum ModelFormat {
    /// GGUF (llama.cpp), little-endian, version 2 or 3.
    Gguf {
        /// The GGUF version field (2 or 3).
        version: u32,
    },
    /// Hugging Face safetensors.
    Safetensors,
    /// Not a recognised container: the whole file is one opaque byte tensor.
    Raw,
}

/// One tensor of a model file: its name, element type, shape and byte range in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    /// Tensor name as stored in the file.
    pub name: String,
    /// Element type as named by the format: ggml type name for GGUF (`"F32"`, `"Q8_0"`),
    /// safetensors dtype (`"F32"`, `"BF16"`), `"u8"` for raw.
    pub dtype: String,
    /// Dimensions in the order stored in the file (GGUF: `ne[0]` first; see the module docs).
    pub shape: Vec<u64>,
    /// Absolute byte offset of the tensor's first byte in the **file**.
    pub offset: u64,
    /// Length of the tensor's data in bytes.
    pub bytes: u64,
}

/// One metadata entry of a model file, summarised for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetadataEntry {
    /// The metadata key as stored in the file.
    pub key: String,
    /// A short rendering of the value: scalars in full, strings truncated to 80 characters with
    /// control characters escaped, arrays as `array<TYPE>[COUNT]` without their elements.
    pub summary: String,
}

/// The tensors of a model file, as read from its header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorTable {
    /// The container format (and GGUF version).
    pub format: ModelFormat,
    /// The tensors, sorted by `(offset, name)`.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section: GGUF header end rounded up to the alignment,
    /// safetensors `8 + N`, raw 0.
    pub data_offset: u64,
    /// Metadata summary in file order (GGUF key/values, safetensors `__metadata__`).
    pub metadata: Vec<MetadataEntry>,
}

impl TensorTable {
    /// Canonical binary encoding of the table, the input of [`TensorTable::digest`]: the crate's one
    /// canonical encoding ([`crate::encoding`]: big-endian fixed-width integers, `u32`-length-prefixed
    /// strings, a length-prefixed domain tag and a version first):
    ///
    /// ```text
    /// u32+n   domain        "vram-residency/tensor-table/v2"
    /// u16     version       2
    /// u8      format        0 = raw, 1 = gguf, 2 = safetensors
    /// u32     version       GGUF version; 0 for raw and safetensors
    /// u64     data_offset
    /// u64     count         number of tensors
    /// count times, in the order of `tensors` (the readers sort by offset, then name):
    ///   u32+n name          UTF-8
    ///   u32+n dtype         UTF-8
    ///   u32   ndims
    ///   u64   dims          one per dimension, in `shape` order
    ///   u64   offset        absolute file offset
    ///   u64   bytes
    /// ```
    ///
    /// Metadata is **not** encoded (it is a display summary; the file digest covers it). Every length
    /// has a prefix wide enough for anything a reader accepts; a hand-built table with a name of 4 GiB or
    /// more, or 2^32 dimensions, is refused rather than encoded ambiguously.
    ///
    /// Worked example (checked by a unit test, its SHA-256 recomputed with Python's `hashlib`): a GGUF
    /// v3 table with `data_offset` 96 and one tensor `"w"`, dtype `"F32"`, shape `[2]`, offset 96, 8
    /// bytes encodes as
    ///
    /// ```text
    /// 0000001e 7672616d2d7265736964656e63792f74656e736f722d7461626c652f7632   domain
    /// 0002 01 00000003 0000000000000060 0000000000000001              v2, gguf, v3, 96, 1 tensor
    /// 00000001 77   00000003 463332   00000001 0000000000000002        "w", "F32", [2]
    /// 0000000000000060 0000000000000008                               offset 96, 8 bytes
    /// ```
    ///
    /// # Errors
    /// [`EncodingError::TooLong`](crate::encoding::EncodingError) for such a hand-built table.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, crate::encoding::EncodingError> {
        let (tag, version) = match self.format {
            ModelFormat::Raw => (0u8, 0u32),
            ModelFormat::Gguf { version } => (1, version),
            ModelFormat::Safetensors => (2, 0),
        };
        let mut e = crate::encoding::Encoder::new(TENSOR_TABLE_DOMAIN, TENSOR_TABLE_VERSION);
        e.u8(tag)
            .u32(version)
            .u64(self.data_offset)
            .u64(len_u64(self.tensors.len()));
        for tensor in &self.tensors {
            e.str(&tensor.name, "tensor name")?;
            e.str(&tensor.dtype, "tensor dtype")?;
            let ndims = u32::try_from(tensor.shape.len()).map_err(|_| {
                crate::encoding::EncodingError::TooLong {
                    field: "tensor shape",
                }
            })?;
            e.u32(ndims);
            for dim in &tensor.shape {
                e.u64(*dim);
            }
            e.u64(tensor.offset).u64(tensor.bytes);
        }
        Ok(e.finish())
    }

    /// SHA-256 of [`TensorTable::canonical_bytes`].
    ///
    /// # Errors
    /// As [`canonical_bytes`](Self::canonical_bytes).
    pub fn digest(&self) -> Result<[u8; 32], crate::encoding::EncodingError> {
        Ok(Sha256::digest(self.canonical_bytes()?).into())
    }

    /// The tensors whose data overlaps the file byte range `[start, end)`, in table order.
    ///
    /// Zero-length tensors never overlap anything; an empty or inverted range yields nothing.
    #[must_use]
    pub fn tensors_in_range(&self, start: u64, end: u64) -> Vec<&TensorInfo> {
        self.tensors
            .iter()
            .filter(|t| {
                let t_end = t.offset.saturating_add(t.bytes);
                t.bytes > 0 && t.offset < end && start < t_end
            })
            .collect()
    }
}

/// A model file header that is malformed, truncated, or exceeds a limit.
///
/// Names the format, the offending field (e.g. `tensor_info[3].dims`) and the byte offset in the
/// file where that field starts (or, for a value that cannot be located exactly, the nearest
/// enclosing structure). The message contains only values read from the file, never secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{format}: {field} at byte {offset}: {reason}")]
pub struct ModelFormatError {
    /// `"gguf"` or `"safetensors"`; `"model"` when the first bytes could not even be read.
    pub format: &'static str,
    /// The offending field, e.g. `tensor_info[3].dims` or `header["w"].data_offsets`.
    pub field: String,
    /// Byte offset in the file of the offending field.
    pub offset: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// What the caller says a model file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FormatChoice {
    /// Detect it; a file that claims a format must parse as that format (see the module docs).
    #[default]
    Auto,
    /// Seal the bytes as one raw tensor, whatever they look like.
    Raw,
    /// It must parse as GGUF.
    Gguf,
    /// It must parse as safetensors.
    Safetensors,
}

impl std::str::FromStr for FormatChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "raw" => Ok(Self::Raw),
            "gguf" => Ok(Self::Gguf),
            "safetensors" => Ok(Self::Safetensors),
            other => Err(format!(
                "unknown format {other:?}: expected auto, raw, gguf or safetensors"
            )),
        }
    }
}

/// Detects the format of a model file and reads its tensor table from the header
/// ([`FormatChoice::Auto`], no file name).
///
/// `reader` must be positioned at byte 0 of the file and `file_len` must be the file's size; the
/// tensor bounds are checked against `file_len`. Only the header is read (see the module docs).
///
/// # Errors
///
/// [`ModelFormatError`] when the file claims GGUF or safetensors but its header is malformed,
/// truncated, exceeds a cap, or describes tensors that do not fit the file; also when the reader
/// fails or ends before `file_len` promised.
pub fn read_tensor_table(
    reader: &mut dyn Read,
    file_len: u64,
) -> Result<TensorTable, ModelFormatError> {
    read_tensor_table_as(reader, file_len, FormatChoice::Auto, None)
}

/// [`read_tensor_table`] with the caller's [`FormatChoice`] and the file's name (its extension can
/// claim a format).
///
/// # Errors
///
/// As [`read_tensor_table`]; also when the name and the first bytes claim different formats.
pub fn read_tensor_table_as(
    reader: &mut dyn Read,
    file_len: u64,
    choice: FormatChoice,
    name: Option<&str>,
) -> Result<TensorTable, ModelFormatError> {
    if choice == FormatChoice::Raw {
        return Ok(raw_table(file_len));
    }
    let mut prefix = [0u8; DETECT_LEN];
    let want = usize::try_from(file_len).map_or(DETECT_LEN, |len| len.min(DETECT_LEN));
    let head = prefix.get_mut(..want).unwrap_or_default();
    reader.read_exact(head).map_err(|e| ModelFormatError {
        format: "model",
        field: "magic".to_owned(),
        offset: 0,
        reason: io_reason(&e),
    })?;
    let head: &[u8] = head;
    let detected = match choice {
        FormatChoice::Gguf => Detected::Gguf,
        FormatChoice::Safetensors => Detected::Safetensors,
        FormatChoice::Auto | FormatChoice::Raw => detect(head, file_len, name)?,
    };
    match detected {
        Detected::Gguf => gguf::read(&mut head.chain(reader), file_len),
        Detected::Safetensors => safetensors::read(&mut head.chain(reader), file_len),
        Detected::Raw => Ok(raw_table(file_len)),
    }
}

/// [`read_tensor_table`] over an in-memory file.
///
/// # Errors
///
/// As [`read_tensor_table`].
pub fn read_tensor_table_from_bytes(bytes: &[u8]) -> Result<TensorTable, ModelFormatError> {
    let mut reader = bytes;
    read_tensor_table(&mut reader, len_u64(bytes.len()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detected {
    Gguf,
    Safetensors,
    Raw,
}

impl Detected {
    const fn name(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Safetensors => "safetensors",
            Self::Raw => "raw",
        }
    }
}

/// The format a file claims (see the module docs); raw only when it claims nothing.
fn detect(head: &[u8], file_len: u64, name: Option<&str>) -> Result<Detected, ModelFormatError> {
    let by_name = name.and_then(|name| {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".gguf") {
            Some(Detected::Gguf)
        } else if lower.ends_with(".safetensors") {
            Some(Detected::Safetensors)
        } else {
            None
        }
    });
    let gguf_magic = head.first_chunk::<4>().is_some_and(|magic| {
        magic
            .iter()
            .zip(gguf::MAGIC)
            .filter(|(a, b)| a == b)
            .count()
            >= 3
    });
    let safetensors_start = head.get(8) == Some(&b'{')
        || head.first_chunk::<8>().is_some_and(|len_bytes| {
            let n = u64::from_le_bytes(*len_bytes);
            (2..=file_len.saturating_sub(8)).contains(&n)
        });
    let by_bytes = if gguf_magic {
        Some(Detected::Gguf)
    } else if safetensors_start {
        Some(Detected::Safetensors)
    } else {
        None
    };
    match (by_name, by_bytes) {
        (Some(named), Some(seen)) if named != seen => Err(ModelFormatError {
            format: named.name(),
            field: "magic".to_owned(),
            offset: 0,
            reason: format!(
                "the file name says {} but its first bytes look like {}; name the format \
                 explicitly (--format) if this is intended",
                named.name(),
                seen.name()
            ),
        }),
        (Some(claimed), _) | (None, Some(claimed)) => Ok(claimed),
        (None, None) => Ok(Detected::Raw),
    }
}

fn raw_table(file_len: u64) -> TensorTable {
    TensorTable {
        format: ModelFormat::Raw,
        tensors: vec![TensorInfo {
            name: "raw".to_owned(),
            dtype: "u8".to_owned(),
            shape: vec![file_len],
            offset: 0,
            bytes: file_len,
        }],
        data_offset: 0,
        metadata: Vec::new(),
    }
}

/// Sorts tensors into table order: by offset, then name (names are unique in both formats).
fn sort_tensors(tensors: &mut [TensorInfo]) {
    tensors.sort_by(|a, b| a.offset.cmp(&b.offset).then_with(|| a.name.cmp(&b.name)));
}

/// `usize` → `u64`; lossless on every platform Rust supports (saturates otherwise).
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Renders a string for a metadata summary: at most 80 characters, control characters escaped,
/// `…` appended when truncated.
fn summarize_string(s: &str) -> String {
    truncate_escaped(s, SUMMARY_MAX_CHARS)
}

/// `s` with control characters escaped, cut to `max_chars` characters of input, `…` appended
/// when cut. Keeps attacker-chosen text from flooding or forging log lines.
fn truncate_escaped(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    for c in s.chars().take(max_chars) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if s.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

/// A name quoted for use inside an error's field path (`metadata["general.name"]`): escaped and
/// truncated to 64 characters so a hostile name cannot flood or forge a log line.
fn quoted(name: &str) -> String {
    let short: String = name.chars().take(64).collect();
    if name.chars().nth(64).is_some() {
        format!("{short:?}…")
    } else {
        format!("{short:?}")
    }
}

fn io_reason(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the reader ended before the length given as file_len".to_owned()
    } else {
        format!("read failed: {e}")
    }
}

/// Incremental, bounded reader of a header: tracks the file offset, refuses any read that would
/// pass the end of the file or the header cap *before* reading or allocating, and turns every
/// failure into a [`ModelFormatError`] naming the field.
struct HeaderReader<'r> {
    inner: &'r mut dyn Read,
    format: &'static str,
    pos: u64,
    file_len: u64,
    cap: u64,
    cap_name: &'static str,
}

/// A lazily built field name: only formatted when an error is reported.
type FieldName<'a> = &'a dyn Fn() -> String;

impl<'r> HeaderReader<'r> {
    fn new(
        inner: &'r mut dyn Read,
        format: &'static str,
        file_len: u64,
        cap: u64,
        cap_name: &'static str,
    ) -> Self {
        Self {
            inner,
            format,
            pos: 0,
            file_len,
            cap,
            cap_name,
        }
    }

    /// File offset of the next byte to be read.
    fn pos(&self) -> u64 {
        self.pos
    }

    /// Bytes that may still be read: up to the end of the file or the header cap.
    fn remaining(&self) -> u64 {
        self.file_len.min(self.cap).saturating_sub(self.pos)
    }

    fn error(&self, field: String, offset: u64, reason: String) -> ModelFormatError {
        ModelFormatError {
            format: self.format,
            field,
            offset,
            reason,
        }
    }

    /// Checks that `len` more bytes exist in the file and within the header cap.
    fn ensure(&self, len: u64, field: FieldName<'_>) -> Result<(), ModelFormatError> {
        let end = self.pos.checked_add(len);
        match end {
            Some(end) if end <= self.file_len && end <= self.cap => Ok(()),
            Some(end) if end <= self.file_len => Err(self.error(
                field(),
                self.pos,
                format!(
                    "{} would take the header past the {} cap ({})",
                    bytes(len),
                    self.cap_name,
                    bytes(self.cap)
                ),
            )),
            _ => Err(self.error(
                field(),
                self.pos,
                format!(
                    "needs {} but only {} remain in the file",
                    bytes(len),
                    bytes(self.file_len.saturating_sub(self.pos))
                ),
            )),
        }
    }

    fn advance(&mut self, len: u64) {
        self.pos = self.pos.saturating_add(len);
    }

    fn array<const N: usize>(&mut self, field: FieldName<'_>) -> Result<[u8; N], ModelFormatError> {
        let len = len_u64(N);
        self.ensure(len, field)?;
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.error(field(), self.pos, io_reason(&e)))?;
        self.advance(len);
        Ok(buf)
    }

    fn u8(&mut self, field: FieldName<'_>) -> Result<u8, ModelFormatError> {
        self.array::<1>(field).map(u8::from_le_bytes)
    }

    fn u32(&mut self, field: FieldName<'_>) -> Result<u32, ModelFormatError> {
        self.array::<4>(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: FieldName<'_>) -> Result<u64, ModelFormatError> {
        self.array::<8>(field).map(u64::from_le_bytes)
    }

    /// Reads `len` bytes into `buf` (cleared first). The length is checked against the file and
    /// the cap before reading, and the buffer grows only as bytes actually arrive.
    fn bytes_into(
        &mut self,
        len: u64,
        buf: &mut Vec<u8>,
        field: FieldName<'_>,
    ) -> Result<(), ModelFormatError> {
        self.ensure(len, field)?;
        buf.clear();
        let got = (&mut *self.inner)
            .take(len)
            .read_to_end(buf)
            .map_err(|e| self.error(field(), self.pos, io_reason(&e)))?;
        if len_u64(got) != len {
            return Err(self.error(
                field(),
                self.pos,
                format!(
                    "the reader ended after {got} of {}, before file_len",
                    bytes(len)
                ),
            ));
        }
        self.advance(len);
        Ok(())
    }

    /// Reads and discards `len` bytes (checked against the file and the cap first).
    fn skip(&mut self, len: u64, field: FieldName<'_>) -> Result<(), ModelFormatError> {
        self.ensure(len, field)?;
        let got = std::io::copy(&mut (&mut *self.inner).take(len), &mut std::io::sink())
            .map_err(|e| self.error(field(), self.pos, io_reason(&e)))?;
        if got != len {
            return Err(self.error(
                field(),
                self.pos,
                format!(
                    "the reader ended after {got} of {}, before file_len",
                    bytes(len)
                ),
            ));
        }
        self.advance(len);
        Ok(())
    }
}

/// A file of this crate's `tests/fixtures/`, for the unit tests: under `$VRAM_RESIDENCY_REPO` when
/// set (test binaries copied to another machine, see `scripts/gpu-test`), else in the checkout the
/// tests were compiled from.
#[cfg(test)]
pub(crate) fn test_fixture(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("VRAM_RESIDENCY_REPO").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
        |repo| std::path::Path::new(&repo).join("crates/vram-residency/tests/fixtures"),
    );
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn fixture(name: &str) -> Vec<u8> {
        let path = test_fixture(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn expected(name: &str) -> Value {
        serde_json::from_slice(&fixture(&format!("{name}.expected.json"))).unwrap()
    }

    /// Reads a fixture through the `Read` path, as the manager will: a buffered file.
    fn read_fixture_file(name: &str) -> TensorTable {
        let file = std::fs::File::open(test_fixture(name)).unwrap();
        let len = file.metadata().unwrap().len();
        let mut reader = std::io::BufReader::new(file);
        read_tensor_table(&mut reader, len).unwrap()
    }

    fn check_gguf_fixture_matches_upstream_reader(name: &str) {
        let table = read_fixture_file(name);
        assert_eq!(table, read_tensor_table_from_bytes(&fixture(name)).unwrap());
        let want = expected(name);
        assert_eq!(want["format"], "gguf");
        let version = u32::try_from(want["version"].as_u64().unwrap()).unwrap();
        assert_eq!(table.format, ModelFormat::Gguf { version });
        assert_eq!(want["file_len"], fixture(name).len());
        assert_eq!(want["data_offset"], table.data_offset);
        assert_eq!(
            want["tensors"],
            serde_json::to_value(&table.tensors).unwrap()
        );
        let keys: Vec<&str> = table.metadata.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(want["metadata_keys"], serde_json::to_value(&keys).unwrap());
        for (key, summary) in want["array_summaries"].as_object().unwrap() {
            let ours = table.metadata.iter().find(|m| &m.key == key).unwrap();
            assert_eq!(summary, &ours.summary, "{key}");
        }
    }

    #[test]
    fn gguf_fixture_matches_upstream_gguf_reader() {
        check_gguf_fixture_matches_upstream_reader("tiny-v3.gguf");
    }

    #[test]
    fn gguf_fixture_with_custom_alignment_matches_upstream_gguf_reader() {
        check_gguf_fixture_matches_upstream_reader("tiny-v3-align64.gguf");
        let table = read_fixture_file("tiny-v3-align64.gguf");
        assert_eq!(table.data_offset % 64, 0);
    }

    #[test]
    fn gguf_fixture_metadata_summaries_are_short() {
        let table = read_fixture_file("tiny-v3.gguf");
        let summary = |key: &str| {
            table
                .metadata
                .iter()
                .find(|m| m.key == key)
                .unwrap()
                .summary
                .clone()
        };
        assert_eq!(summary("general.name"), "tiny fixture");
        assert_eq!(summary("tiny.context_length"), "128");
        assert_eq!(summary("tiny.negative"), "-7");
        assert_eq!(summary("tiny.use_parallel_residual"), "true");
        let long = summary("tiny.long_description");
        assert_eq!(long.chars().count(), SUMMARY_MAX_CHARS + 1);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn safetensors_fixture_matches_upstream_safetensors_reader() {
        let name = "tiny.safetensors";
        let table = read_fixture_file(name);
        assert_eq!(table, read_tensor_table_from_bytes(&fixture(name)).unwrap());
        let want = expected(name);
        assert_eq!(want["format"], "safetensors");
        assert_eq!(table.format, ModelFormat::Safetensors);
        assert_eq!(want["file_len"], fixture(name).len());
        assert_eq!(want["data_offset"], table.data_offset);
        assert_eq!(
            want["tensors"],
            serde_json::to_value(&table.tensors).unwrap()
        );
        let metadata: serde_json::Map<String, Value> = table
            .metadata
            .iter()
            .map(|m| (m.key.clone(), Value::from(m.summary.clone())))
            .collect();
        assert_eq!(want["metadata"], Value::Object(metadata));
    }

    #[test]
    fn files_that_claim_nothing_are_one_raw_tensor() {
        let inputs: [&[u8]; 6] = [
            b"",
            b"G",
            b"GGU",
            b"ggufGGUF",
            b"hello, I am not a model file",
            &[1, 0, 0, 0, 0, 0, 0, 0, b'[', b']'], // N = 1 < 2 and no '{'
        ];
        for bytes in inputs {
            let table = read_tensor_table_from_bytes(bytes).unwrap();
            let len = bytes.len() as u64;
            assert_eq!(table.format, ModelFormat::Raw);
            assert_eq!(table.data_offset, 0);
            assert_eq!(
                table.tensors,
                vec![TensorInfo {
                    name: "raw".into(),
                    dtype: "u8".into(),
                    shape: vec![len],
                    offset: 0,
                    bytes: len,
                }]
            );
        }
    }

    fn read_as(
        bytes: &[u8],
        choice: FormatChoice,
        name: Option<&str>,
    ) -> Result<TensorTable, ModelFormatError> {
        let mut reader = bytes;
        read_tensor_table_as(&mut reader, bytes.len() as u64, choice, name)
    }

    #[test]
    fn files_that_start_like_gguf_fail_closed_instead_of_becoming_raw() {
        let mut near_magic = fixture("tiny-v3.gguf");
        near_magic[3] = b'X'; // GGUX, written by the upstream writer, then one byte changed
        for bytes in [
            &b"GGUF"[..],
            b"GGUF\x03\x00\x00\x00garbage",
            b"GGUF not really",
            b"GGUX\x03\x00\x00\x00",
            b"gGUF\x03\x00\x00\x00",
            &near_magic,
        ] {
            let e = read_tensor_table_from_bytes(bytes).unwrap_err();
            assert_eq!(e.format, "gguf", "{e}");
            if !bytes.starts_with(b"GGUF") {
                assert_eq!((e.field.as_str(), e.offset), ("magic", 0), "{e}");
            }
        }
    }

    #[test]
    fn files_that_start_like_safetensors_fail_closed_whatever_their_header_length() {
        let with_len = |n: u64, rest: &[u8]| {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(rest);
            bytes
        };
        for bytes in [
            with_len(1, b"{}"),                          // '{' at byte 8, N too small
            with_len(1 << 60, b"{\"a\":1}"),             // '{' at byte 8, N of 2^60
            with_len(SAFETENSORS_HEADER_CAP + 1, b"{}"), // just over the 100 MiB cap
            with_len(2, b"[]"),                          // a plausible length, no '{'
        ] {
            let e = read_tensor_table_from_bytes(&bytes).unwrap_err();
            assert_eq!(e.format, "safetensors", "{e}");
        }
        // The cap is still enforced on a file large enough for the header.
        let huge = with_len(SAFETENSORS_HEADER_CAP + 1, b"{");
        let mut reader = &huge[..];
        let e = read_tensor_table(&mut reader, SAFETENSORS_HEADER_CAP + 100).unwrap_err();
        assert_eq!(e.format, "safetensors", "{e}");
        assert!(e.reason.contains("cap"), "{e}");
    }

    #[test]
    fn a_file_name_claims_its_format_and_must_agree_with_the_bytes() {
        // An empty model.gguf is not an empty raw file.
        let e = read_as(b"", FormatChoice::Auto, Some("model.gguf")).unwrap_err();
        assert_eq!(e.format, "gguf", "{e}");
        let e = read_as(b"not a header", FormatChoice::Auto, Some("w.SafeTensors")).unwrap_err();
        assert_eq!(e.format, "safetensors", "{e}");
        // Name and bytes disagree: refused, naming both.
        let gguf = fixture("tiny-v3.gguf");
        let e = read_as(&gguf, FormatChoice::Auto, Some("model.safetensors")).unwrap_err();
        assert!(
            e.reason.contains("says safetensors") && e.reason.contains("look like gguf"),
            "{e}"
        );
        // Agreeing name and bytes, and a name that claims nothing, parse as usual.
        assert!(read_as(&gguf, FormatChoice::Auto, Some("model.gguf")).is_ok());
        assert!(read_as(&gguf, FormatChoice::Auto, Some("model.bin")).is_ok());
    }

    #[test]
    fn an_explicit_choice_is_obeyed() {
        let gguf = fixture("tiny-v3.gguf");
        let raw = read_as(b"GGUF not really", FormatChoice::Raw, Some("x.gguf")).unwrap();
        assert_eq!(raw.format, ModelFormat::Raw);
        let e = read_as(&gguf, FormatChoice::Safetensors, None).unwrap_err();
        assert_eq!(e.format, "safetensors", "{e}");
        let e = read_as(b"hello, I am not a model file", FormatChoice::Gguf, None).unwrap_err();
        assert_eq!(e.format, "gguf", "{e}");
        assert_eq!(
            read_as(&gguf, FormatChoice::Gguf, None).unwrap(),
            read_tensor_table_from_bytes(&gguf).unwrap()
        );
        assert_eq!("raw".parse::<FormatChoice>(), Ok(FormatChoice::Raw));
        assert!("GGUF".parse::<FormatChoice>().is_err());
    }

    #[test]
    fn reader_shorter_than_file_len_is_an_error() {
        let mut reader: &[u8] = b"abc";
        let e = read_tensor_table(&mut reader, 100).unwrap_err();
        assert_eq!(
            (e.format, e.field.as_str(), e.offset),
            ("model", "magic", 0)
        );
    }

    #[test]
    fn error_display_names_format_field_offset_and_reason() {
        let e = ModelFormatError {
            format: "gguf",
            field: "tensor_info[3].dims".into(),
            offset: 1234,
            reason: "dimension count 7 is not in 1..=4".into(),
        };
        assert_eq!(
            e.to_string(),
            "gguf: tensor_info[3].dims at byte 1234: dimension count 7 is not in 1..=4"
        );
    }

    /// The table of the worked example in the `canonical_bytes` doc comment.
    fn worked_example() -> TensorTable {
        TensorTable {
            format: ModelFormat::Gguf { version: 3 },
            tensors: vec![TensorInfo {
                name: "w".into(),
                dtype: "F32".into(),
                shape: vec![2],
                offset: 96,
                bytes: 8,
            }],
            data_offset: 96,
            metadata: vec![MetadataEntry {
                key: "general.name".into(),
                summary: "not encoded".into(),
            }],
        }
    }

    #[test]
    fn canonical_bytes_match_the_documented_worked_example() {
        let documented = "
            0000001e 7672616d2d7265736964656e63792f74656e736f722d7461626c652f7632
            0002 01 00000003 0000000000000060 0000000000000001
            00000001 77   00000003 463332   00000001 0000000000000002
            0000000000000060 0000000000000008";
        let hex_digits: String = documented.split_whitespace().collect();
        let table = worked_example();
        assert_eq!(hex::encode(table.canonical_bytes().unwrap()), hex_digits);
        // SHA-256 of those bytes, computed independently with Python's hashlib.
        assert_eq!(
            hex::encode(table.digest().unwrap()),
            "5aafc86d01e6c99bd661216b8a942be0ee37faf77377287480cdc313577200d1"
        );
    }

    #[test]
    fn every_encoded_field_changes_the_digest_and_metadata_does_not() {
        let base = worked_example();
        let mut variants = vec![base.clone()];
        let mut push = |f: &dyn Fn(&mut TensorTable)| {
            let mut t = base.clone();
            f(&mut t);
            variants.push(t);
        };
        push(&|t| t.format = ModelFormat::Gguf { version: 2 });
        push(&|t| t.format = ModelFormat::Safetensors);
        push(&|t| t.format = ModelFormat::Raw);
        push(&|t| t.data_offset = 97);
        push(&|t| t.tensors[0].name = "v".into());
        push(&|t| t.tensors[0].dtype = "F16".into());
        push(&|t| t.tensors[0].shape = vec![2, 1]);
        push(&|t| t.tensors[0].shape = vec![3]);
        push(&|t| t.tensors[0].offset = 128);
        push(&|t| t.tensors[0].bytes = 4);
        push(&|t| t.tensors.clear());
        // Moving bytes between a name and a dtype must not collide (length prefixes).
        push(&|t| {
            t.tensors[0].name = "wF".into();
            t.tensors[0].dtype = "32".into();
        });
        let digests: std::collections::HashSet<[u8; 32]> =
            variants.iter().map(|t| t.digest().unwrap()).collect();
        assert_eq!(digests.len(), variants.len());

        let mut other_metadata = base.clone();
        other_metadata.metadata.clear();
        assert_eq!(other_metadata.digest(), base.digest());
    }

    #[test]
    fn long_names_dtypes_and_shapes_keep_their_u32_prefixes() {
        let mut table = worked_example();
        table.tensors[0].name = "n".repeat(70_000);
        table.tensors[0].dtype = "d".repeat(300);
        table.tensors[0].shape = vec![1; 255];
        let bytes = table.canonical_bytes().unwrap();
        let at = 4 + TENSOR_TABLE_DOMAIN.len() + 2 + 1 + 4 + 8 + 8;
        assert_eq!(bytes[at..at + 4], 70_000u32.to_be_bytes());
        let at = at + 4 + 70_000;
        assert_eq!(bytes[at..at + 4], 300u32.to_be_bytes());
        let at = at + 4 + 300;
        assert_eq!(bytes[at..at + 4], 255u32.to_be_bytes());
        assert_eq!(bytes.len(), at + 4 + 255 * 8 + 16);
    }

    #[test]
    fn tensors_in_range_uses_half_open_ranges_and_skips_empty_tensors() {
        let t = |name: &str, offset: u64, bytes: u64| TensorInfo {
            name: name.into(),
            dtype: "u8".into(),
            shape: vec![bytes],
            offset,
            bytes,
        };
        let table = TensorTable {
            format: ModelFormat::Safetensors,
            tensors: vec![
                t("a", 0, 10),
                t("b", 10, 10),
                t("empty", 20, 0),
                t("c", 20, 10),
            ],
            data_offset: 0,
            metadata: Vec::new(),
        };
        let names = |start, end| -> Vec<String> {
            table
                .tensors_in_range(start, end)
                .into_iter()
                .map(|t| t.name.clone())
                .collect()
        };
        assert_eq!(names(0, 1), ["a"]);
        assert_eq!(names(9, 11), ["a", "b"]);
        assert_eq!(names(10, 20), ["b"]);
        assert_eq!(names(20, 21), ["c"]);
        assert_eq!(names(0, u64::MAX), ["a", "b", "c"]);
        assert!(names(10, 10).is_empty());
        assert!(names(30, 40).is_empty());
        assert!(names(15, 5).is_empty());
    }

    #[test]
    fn corrupted_range_in_a_real_fixture_names_its_tensor() {
        let table = read_fixture_file("tiny-v3.gguf");
        let q8 = table.tensors.iter().find(|t| t.dtype == "Q8_0").unwrap();
        let hit = table.tensors_in_range(q8.offset + 5, q8.offset + 6);
        assert_eq!(hit, [q8]);
    }

    /// Parses arbitrary bytes: must not panic, and a table it returns must be self-consistent.
    fn check_parse(bytes: &[u8]) {
        let len = bytes.len() as u64;
        match read_tensor_table_from_bytes(bytes) {
            Ok(table) => {
                for t in &table.tensors {
                    let end = t.offset.checked_add(t.bytes).expect("tensor end overflows");
                    assert!(end <= len, "tensor {} ends at {end} past {len}", t.name);
                }
                assert!(
                    table
                        .tensors
                        .windows(2)
                        .all(|w| (w[0].offset, &w[0].name) < (w[1].offset, &w[1].name)),
                    "tensors not sorted by (offset, name) or names not unique"
                );
                let mut end = 0;
                for t in table.tensors.iter().filter(|t| t.bytes > 0) {
                    assert!(t.offset >= end, "tensor {} overlaps", t.name);
                    end = t.offset + t.bytes;
                }
                let _ = table.digest();
            }
            Err(e) => {
                assert!(e.offset <= len, "error offset {} past {len}: {e}", e.offset);
                assert!(e.to_string().len() < 1024, "error message too long: {e}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Xor(prop::sample::Index, u8),
        SetU64(prop::sample::Index, u64),
        Truncate(prop::sample::Index),
        Insert(prop::sample::Index, Vec<u8>),
        Delete(prop::sample::Index, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let interesting = prop_oneof![
            Just(0u64),
            Just(1),
            Just(2),
            Just(31),
            Just(32),
            Just(u64::from(u32::MAX)),
            Just(1 << 62),
            Just(i64::MAX as u64),
            Just(u64::MAX),
            any::<u64>(),
        ];
        prop_oneof![
            4 => (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Xor(i, x)),
            2 => (any::<prop::sample::Index>(), interesting).prop_map(|(i, v)| Mutation::SetU64(i, v)),
            1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
            1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16))
                .prop_map(|(i, b)| Mutation::Insert(i, b)),
            1 => (any::<prop::sample::Index>(), 1..64usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
        if bytes.is_empty() {
            return;
        }
        match m {
            Mutation::Xor(i, x) => {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            Mutation::SetU64(i, v) => {
                let i = i.index(bytes.len());
                let end = (i + 8).min(bytes.len());
                bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Insert(i, b) => {
                let i = i.index(bytes.len());
                bytes.splice(i..i, b.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = i.index(bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic_and_results_stay_in_bounds(
            bytes in prop::collection::vec(any::<u8>(), 0..1024),
        ) {
            check_parse(&bytes);
        }

        #[test]
        fn random_bodies_behind_format_prefixes_never_panic(
            prefix in prop_oneof![
                Just(b"GGUF\x03\x00\x00\x00".to_vec()),
                Just(b"GGUF\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00".to_vec()),
                (2u64..512).prop_map(|n| { let mut p = n.to_le_bytes().to_vec(); p.push(b'{'); p }),
            ],
            body in prop::collection::vec(any::<u8>(), 0..1024),
        ) {
            let mut bytes = prefix;
            bytes.extend(body);
            check_parse(&bytes);
        }

        #[test]
        fn mutated_upstream_fixtures_never_panic_and_results_stay_in_bounds(
            which in 0..3usize,
            mutations in prop::collection::vec(mutation(), 1..6),
        ) {
            let name = ["tiny-v3.gguf", "tiny-v3-align64.gguf", "tiny.safetensors"][which];
            let mut bytes = fixture(name);
            for m in &mutations {
                apply(&mut bytes, m);
            }
            check_parse(&bytes);
        }
    }
}
