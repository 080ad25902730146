//! GGUF header reader (versions 2 and 3, little-endian).
//!
//! Layout: magic `GGUF`, version u32, tensor_count u64, metadata_kv_count u64, the key/values,
//! then the tensor infos (name, n_dims u32, dims u64 × n_dims, ggml type u32, offset u64 relative
//! to the data section). The data section starts at the end of the tensor infos rounded up to
//! `general.alignment` (u32, power of two; default 32).
//!
//! Beyond parsing, the reader rejects: unknown value or ggml types, invalid UTF-8, NUL bytes in
//! keys and tensor names (IV-005), duplicate keys, duplicate tensor names, 0 or more than 4 dimensions, a dimension above `i64::MAX`, a first
//! dimension that is not a multiple of the type's block size, offsets not a multiple of the
//! alignment, tensors that overlap or end past the file, bool values other than 0 and 1, and arrays
//! nested deeper than [`MAX_ARRAY_NESTING`]. Gaps between tensors and bytes after the last tensor are
//! allowed (llama.cpp's own loader additionally requires tensors to be packed in declaration
//! order; that is a loader concern, not a safety one).

use std::collections::HashSet;
use std::io::Read;

use super::{
    FieldName, GGUF_HEADER_CAP, HeaderReader, MAX_METADATA_COUNT, MAX_TENSOR_COUNT, MetadataEntry,
    ModelFormat, ModelFormatError, TensorInfo, TensorTable, quoted, sort_tensors, summarize_string,
};
use crate::ids::bytes;

/// The GGUF magic at byte 0.
pub(super) const MAGIC: &[u8] = b"GGUF";

/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u32 = 32;

/// Deepest nesting of arrays inside a metadata value (an array of arrays is depth 2).
pub(super) const MAX_ARRAY_NESTING: u32 = 4;

/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Smallest possible encoded tensor info: name length u64 + n_dims u32 + one dim u64 + type u32
/// + offset u64.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Smallest possible encoded key/value: key length u64 + value type u32 + a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;

/// A ggml tensor element type: id, name, elements per block, bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GgmlType {
    pub(super) id: u32,
    pub(super) name: &'static str,
    pub(super) block_size: u64,
    pub(super) type_size: u64,
}

const fn ggml(id: u32, name: &'static str, block_size: u64, type_size: u64) -> GgmlType {
    GgmlType {
        id,
        name,
        block_size,
        type_size,
    }
}

/// The ggml types, with (block size, type size) exactly as the upstream `gguf` Python package
/// (v0.19.0, `gguf.constants.GGML_QUANT_SIZES`) has them; a unit test checks this table against
/// `tests/fixtures/ggml-quant-sizes.json` written by `scripts/make-fixtures.py`. Ids missing here
/// (4, 5, 31-33, 36-38: removed or never-shipped types) are rejected as unknown.
pub(super) const GGML_TYPES: &[GgmlType] = &[
    ggml(0, "F32", 1, 4),
    ggml(1, "F16", 1, 2),
    ggml(2, "Q4_0", 32, 18),
    ggml(3, "Q4_1", 32, 20),
    ggml(6, "Q5_0", 32, 22),
    ggml(7, "Q5_1", 32, 24),
    ggml(8, "Q8_0", 32, 34),
    ggml(9, "Q8_1", 32, 40),
    ggml(10, "Q2_K", 256, 84),
    ggml(11, "Q3_K", 256, 110),
    ggml(12, "Q4_K", 256, 144),
    ggml(13, "Q5_K", 256, 176),
    ggml(14, "Q6_K", 256, 210),
    ggml(15, "Q8_K", 256, 292),
    ggml(16, "IQ2_XXS", 256, 66),
    ggml(17, "IQ2_XS", 256, 74),
    ggml(18, "IQ3_XXS", 256, 98),
    ggml(19, "IQ1_S", 256, 50),
    ggml(20, "IQ4_NL", 32, 18),
    ggml(21, "IQ3_S", 256, 110),
    ggml(22, "IQ2_S", 256, 82),
    ggml(23, "IQ4_XS", 256, 136),
    ggml(24, "I8", 1, 1),
    ggml(25, "I16", 1, 2),
    ggml(26, "I32", 1, 4),
    ggml(27, "I64", 1, 8),
    ggml(28, "F64", 1, 8),
    ggml(29, "IQ1_M", 256, 56),
    ggml(30, "BF16", 1, 2),
    ggml(34, "TQ1_0", 256, 54),
    ggml(35, "TQ2_0", 256, 66),
    ggml(39, "MXFP4", 32, 17),
    ggml(40, "NVFP4", 64, 36),
    ggml(41, "Q1_0", 128, 18),
];

fn ggml_type(id: u32) -> Option<GgmlType> {
    GGML_TYPES.iter().copied().find(|t| t.id == id)
}

/// GGUF metadata value types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }

    /// Encoded size of a value whose size does not depend on its content; `None` for bool (its
    /// byte must be checked), string and array.
    fn fixed_size(self) -> Option<u64> {
        match self {
            Self::U8 | Self::I8 => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::Bool | Self::String | Self::Array => None,
        }
    }

    /// Smallest encoded size of one value of this type.
    fn min_size(self) -> u64 {
        match self {
            Self::Bool => 1,
            Self::String => 8,
            Self::Array => 4 + 8,
            other => other.fixed_size().unwrap_or(1),
        }
    }
}

/// A tensor info as read, before the data section offset is known.
struct PendingTensor {
    index: u64,
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    relative_offset: u64,
    offset_field_at: u64,
    bytes: u64,
}

/// Reads a GGUF header from `reader` (positioned at byte 0) of a file of `file_len` bytes.
pub(super) fn read(reader: &mut dyn Read, file_len: u64) -> Result<TensorTable, ModelFormatError> {
    let mut r = HeaderReader::new(
        reader,
        "gguf",
        file_len,
        GGUF_HEADER_CAP,
        "256 MiB GGUF header",
    );

    let magic = r.array::<4>(&|| "magic".to_owned())?;
    if magic.as_slice() != MAGIC {
        return Err(r.error("magic".to_owned(), 0, "not GGUF".to_owned()));
    }
    let version_at = r.pos();
    let version = r.u32(&|| "version".to_owned())?;
    if version != 2 && version != 3 {
        let reason = if matches!(version.swap_bytes(), 2 | 3) {
            "big-endian GGUF is not supported".to_owned()
        } else {
            format!("version {version} is not supported (only 2 and 3)")
        };
        return Err(r.error("version".to_owned(), version_at, reason));
    }

    let tensor_count_at = r.pos();
    let tensor_count = r.u64(&|| "tensor_count".to_owned())?;
    let kv_count_at = r.pos();
    let kv_count = r.u64(&|| "metadata_kv_count".to_owned())?;
    if tensor_count > MAX_TENSOR_COUNT {
        return Err(r.error(
            "tensor_count".to_owned(),
            tensor_count_at,
            format!("{tensor_count} tensors exceeds the limit of {MAX_TENSOR_COUNT}"),
        ));
    }
    if kv_count > MAX_METADATA_COUNT {
        return Err(r.error(
            "metadata_kv_count".to_owned(),
            kv_count_at,
            format!("{kv_count} key/values exceeds the limit of {MAX_METADATA_COUNT}"),
        ));
    }
    // Both counts are now small enough that these products cannot overflow; checked anyway.
    let remaining = r.remaining();
    let min_kvs = kv_count.checked_mul(MIN_KV_BYTES);
    if min_kvs.is_none_or(|need| need > remaining) {
        return Err(r.error(
            "metadata_kv_count".to_owned(),
            kv_count_at,
            format!(
                "{kv_count} key/values need at least {kv_count}×{MIN_KV_BYTES} bytes, \
                 but only {remaining} header bytes remain"
            ),
        ));
    }
    let min_rest = tensor_count
        .checked_mul(MIN_TENSOR_INFO_BYTES)
        .zip(min_kvs)
        .and_then(|(infos, kvs)| infos.checked_add(kvs));
    if min_rest.is_none_or(|need| need > remaining) {
        return Err(r.error(
            "tensor_count".to_owned(),
            tensor_count_at,
            format!(
                "{tensor_count} tensor infos need at least {tensor_count}×{MIN_TENSOR_INFO_BYTES} \
                 bytes after the key/values, but only {remaining} header bytes remain"
            ),
        ));
    }

    let mut metadata = Vec::new();
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut scratch = Vec::new();
    for i in 0..kv_count {
        let key_at = r.pos();
        let key = read_name(&mut r, &mut scratch, &|| format!("metadata_kv[{i}].key"))?;
        if !keys.insert(key.clone()) {
            return Err(r.error(
                format!("metadata_kv[{i}].key"),
                key_at,
                format!("duplicate key {}", quoted(&key)),
            ));
        }
        let path = || format!("metadata[{}]", quoted(&key));
        let type_at = r.pos();
        let type_id = r.u32(&|| format!("{}.type", path()))?;
        let value_type = ValueType::from_id(type_id).ok_or_else(|| {
            r.error(
                format!("{}.type", path()),
                type_at,
                format!("unknown value type {type_id}"),
            )
        })?;
        let value_at = r.pos();
        let summary = if key == "general.alignment" {
            if value_type != ValueType::U32 {
                return Err(r.error(
                    format!("{}.type", path()),
                    type_at,
                    format!("general.alignment must be u32, not {}", value_type.name()),
                ));
            }
            let value = r.u32(&|| format!("{}.value", path()))?;
            if !value.is_power_of_two() {
                return Err(r.error(
                    format!("{}.value", path()),
                    value_at,
                    format!("alignment {value} is not a nonzero power of two"),
                ));
            }
            alignment = value;
            value.to_string()
        } else {
            read_value_summary(&mut r, &mut scratch, value_type, &|| {
                format!("{}.value", path())
            })?
        };
        metadata.push(MetadataEntry { key, summary });
    }

    let alignment = u64::from(alignment);
    let mut pending = Vec::new();
    let mut names = HashSet::new();
    for i in 0..tensor_count {
        pending.push(read_tensor_info(
            &mut r,
            &mut scratch,
            &mut names,
            i,
            alignment,
        )?);
    }

    let header_end = r.pos();
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| {
            r.error(
                "data_offset".to_owned(),
                header_end,
                "header end rounded up to the alignment overflows".to_owned(),
            )
        })?;

    let mut tensors = Vec::with_capacity(pending.len());
    for t in pending {
        let field = || format!("tensor_info[{}].offset", t.index);
        let offset = data_offset.checked_add(t.relative_offset);
        let end = offset.and_then(|o| o.checked_add(t.bytes));
        let (Some(offset), Some(end)) = (offset, end) else {
            return Err(r.error(
                field(),
                t.offset_field_at,
                format!("tensor {} offset overflows", quoted(&t.name)),
            ));
        };
        if end > file_len {
            return Err(r.error(
                field(),
                t.offset_field_at,
                format!(
                    "tensor {} occupies bytes [{offset}, {end}) but the file has {}",
                    quoted(&t.name),
                    bytes(file_len)
                ),
            ));
        }
        tensors.push((
            t.index,
            t.offset_field_at,
            TensorInfo {
                name: t.name,
                dtype: t.dtype.to_owned(),
                shape: t.shape,
                offset,
                bytes: t.bytes,
            },
        ));
    }

    // Overlap: in offset order, every non-empty tensor must start at or after the end of all
    // earlier non-empty ones.
    tensors.sort_by(|(_, _, a), (_, _, b)| a.offset.cmp(&b.offset).then(a.bytes.cmp(&b.bytes)));
    let mut previous: Option<(&str, u64)> = None;
    for (index, offset_field_at, t) in &tensors {
        if t.bytes == 0 {
            continue;
        }
        if let Some((prev_name, prev_end)) = previous
            && t.offset < prev_end
        {
            return Err(r.error(
                format!("tensor_info[{index}].offset"),
                *offset_field_at,
                format!(
                    "tensor {} at byte {} overlaps tensor {} which ends at byte {prev_end}",
                    quoted(&t.name),
                    t.offset,
                    quoted(prev_name)
                ),
            ));
        }
        let end = t.offset.saturating_add(t.bytes);
        previous = Some((&t.name, end));
    }

    let mut tensors: Vec<TensorInfo> = tensors.into_iter().map(|(_, _, t)| t).collect();
    sort_tensors(&mut tensors);
    Ok(TensorTable {
        format: ModelFormat::Gguf { version },
        tensors,
        data_offset,
        metadata,
    })
}

fn read_tensor_info(
    r: &mut HeaderReader<'_>,
    scratch: &mut Vec<u8>,
    names: &mut HashSet<String>,
    i: u64,
    alignment: u64,
) -> Result<PendingTensor, ModelFormatError> {
    let name_at = r.pos();
    let name = read_name(r, scratch, &|| format!("tensor_info[{i}].name"))?;
    if !names.insert(name.clone()) {
        return Err(r.error(
            format!("tensor_info[{i}].name"),
            name_at,
            format!("duplicate tensor name {}", quoted(&name)),
        ));
    }

    let dims_field = || format!("tensor_info[{i}].dims");
    let n_dims_at = r.pos();
    let n_dims = r.u32(&|| format!("tensor_info[{i}].n_dims"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(r.error(
            dims_field(),
            n_dims_at,
            format!("dimension count {n_dims} is not in 1..={MAX_DIMS}"),
        ));
    }
    let mut shape = Vec::with_capacity(4);
    let mut elements: u64 = 1;
    for d in 0..n_dims {
        let dim_at = r.pos();
        let dim = r.u64(&|| format!("tensor_info[{i}].dims[{d}]"))?;
        if i64::try_from(dim).is_err() {
            return Err(r.error(
                format!("tensor_info[{i}].dims[{d}]"),
                dim_at,
                format!("dimension {dim} exceeds i64::MAX"),
            ));
        }
        elements = elements
            .checked_mul(dim)
            .filter(|e| i64::try_from(*e).is_ok())
            .ok_or_else(|| {
                r.error(
                    dims_field(),
                    n_dims_at,
                    "element count exceeds i64::MAX".to_owned(),
                )
            })?;
        shape.push(dim);
    }

    let type_at = r.pos();
    let type_id = r.u32(&|| format!("tensor_info[{i}].type"))?;
    let ty = ggml_type(type_id).ok_or_else(|| {
        r.error(
            format!("tensor_info[{i}].type"),
            type_at,
            format!("unknown ggml type {type_id}"),
        )
    })?;
    let ne0 = shape.first().copied().unwrap_or(0);
    if ne0.checked_rem(ty.block_size) != Some(0) {
        return Err(r.error(
            dims_field(),
            n_dims_at,
            format!(
                "first dimension {ne0} is not a multiple of the {} block size {}",
                ty.name, ty.block_size
            ),
        ));
    }
    let bytes = elements
        .checked_div(ty.block_size)
        .and_then(|blocks| blocks.checked_mul(ty.type_size))
        .ok_or_else(|| {
            r.error(
                dims_field(),
                n_dims_at,
                "tensor byte size overflows".to_owned(),
            )
        })?;

    let offset_field_at = r.pos();
    let relative_offset = r.u64(&|| format!("tensor_info[{i}].offset"))?;
    if relative_offset.checked_rem(alignment) != Some(0) {
        return Err(r.error(
            format!("tensor_info[{i}].offset"),
            offset_field_at,
            format!("offset {relative_offset} is not a multiple of the alignment {alignment}"),
        ));
    }

    Ok(PendingTensor {
        index: i,
        name,
        dtype: ty.name,
        shape,
        relative_offset,
        offset_field_at,
        bytes,
    })
}

/// Reads a GGUF string (u64 length + UTF-8 bytes), length checked before allocation.
fn read_string(
    r: &mut HeaderReader<'_>,
    scratch: &mut Vec<u8>,
    field: FieldName<'_>,
) -> Result<String, ModelFormatError> {
    let len = r.u64(field)?;
    let bytes_at = r.pos();
    r.bytes_into(len, scratch, field)?;
    match std::str::from_utf8(scratch) {
        Ok(s) => Ok(s.to_owned()),
        Err(e) => Err(r.error(
            field(),
            bytes_at.saturating_add(super::len_u64(e.valid_up_to())),
            "invalid UTF-8".to_owned(),
        )),
    }
}

/// Reads a key or tensor name: a GGUF string without NUL bytes (IV-005). C loaders such as
/// llama.cpp would cut a name at its first NUL, so two names distinct here could collide there.
fn read_name(
    r: &mut HeaderReader<'_>,
    scratch: &mut Vec<u8>,
    field: FieldName<'_>,
) -> Result<String, ModelFormatError> {
    let name = read_string(r, scratch, field)?;
    if let Some(nul) = name.bytes().position(|b| b == 0) {
        let name_end = r.pos();
        let name_start = name_end.saturating_sub(super::len_u64(name.len()));
        return Err(r.error(
            field(),
            name_start.saturating_add(super::len_u64(nul)),
            "NUL byte in a name".to_owned(),
        ));
    }
    Ok(name)
}

/// Reads a GGUF string and checks it is UTF-8 without keeping it.
fn check_string(
    r: &mut HeaderReader<'_>,
    scratch: &mut Vec<u8>,
    field: FieldName<'_>,
) -> Result<(), ModelFormatError> {
    let len = r.u64(field)?;
    let bytes_at = r.pos();
    r.bytes_into(len, scratch, field)?;
    std::str::from_utf8(scratch).map(|_| ()).map_err(|e| {
        r.error(
            field(),
            bytes_at.saturating_add(super::len_u64(e.valid_up_to())),
            "invalid UTF-8".to_owned(),
        )
    })
}

fn read_bool(r: &mut HeaderReader<'_>, field: FieldName<'_>) -> Result<bool, ModelFormatError> {
    let at = r.pos();
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(r.error(field(), at, format!("bool value {other} is not 0 or 1"))),
    }
}

/// Reads one top-level metadata value and renders its summary.
fn read_value_summary(
    r: &mut HeaderReader<'_>,
    scratch: &mut Vec<u8>,
    value_type: ValueType,
    field: FieldName<'_>,
) -> Result<String, ModelFormatError> {
    Ok(match value_type {
        ValueType::U8 => r.u8(field)?.to_string(),
        ValueType::I8 => i8::from_le_bytes(r.array(field)?).to_string(),
        ValueType::U16 => u16::from_le_bytes(r.array(field)?).to_string(),
        ValueType::I16 => i16::from_le_bytes(r.array(field)?).to_string(),
        ValueType::U32 => r.u32(field)?.to_string(),
        ValueType::I32 => i32::from_le_bytes(r.array(field)?).to_string(),
        ValueType::F32 => f32::from_le_bytes(r.array(field)?).to_string(),
        ValueType::U64 => r.u64(field)?.to_string(),
        ValueType::I64 => i64::from_le_bytes(r.array(field)?).to_string(),
        ValueType::F64 => f64::from_le_bytes(r.array(field)?).to_string(),
        ValueType::Bool => read_bool(r, field)?.to_string(),
        ValueType::String => summarize_string(&read_string(r, scratch, field)?),
        ValueType::Array => {
            let (element_type, count) = read_array(r, scratch, 1, field)?;
            format!("array<{}>[{count}]", element_type.name())
        }
    })
}

/// Reads (and validates, without keeping) an array value: element type, count, elements.
/// `depth` is the nesting depth of this array (1 for a top-level array).
fn read_array(
    r: &mut HeaderReader<'_>,
    scratch: &mut Vec<u8>,
    depth: u32,
    field: FieldName<'_>,
) -> Result<(ValueType, u64), ModelFormatError> {
    let type_at = r.pos();
    if depth > MAX_ARRAY_NESTING {
        return Err(r.error(
            field(),
            type_at,
            format!("arrays nested deeper than {MAX_ARRAY_NESTING}"),
        ));
    }
    let type_id = r.u32(field)?;
    let element_type = ValueType::from_id(type_id).ok_or_else(|| {
        r.error(
            field(),
            type_at,
            format!("unknown array element type {type_id}"),
        )
    })?;
    let count_at = r.pos();
    let count = r.u64(field)?;
    let min_bytes = count.checked_mul(element_type.min_size());
    if min_bytes.is_none_or(|need| need > r.remaining()) {
        return Err(r.error(
            field(),
            count_at,
            format!(
                "{count} elements of {} cannot fit in the {} header bytes that remain",
                element_type.name(),
                r.remaining()
            ),
        ));
    }
    if let (Some(_), Some(total)) = (element_type.fixed_size(), min_bytes) {
        // Fixed-size elements: any bit pattern is valid, skip them in one go.
        r.skip(total, field)?;
        return Ok((element_type, count));
    }
    for j in 0..count {
        let element = || format!("{}[{j}]", field());
        match element_type {
            ValueType::Bool => {
                read_bool(r, &element)?;
            }
            ValueType::String => check_string(r, scratch, &element)?,
            ValueType::Array => {
                let next = depth.saturating_add(1);
                read_array(r, scratch, next, &element)?;
            }
            // Fixed-size types were skipped above.
            _ => r.skip(element_type.min_size(), &element)?,
        }
    }
    Ok((element_type, count))
}

#[cfg(test)]
mod tests {
    use super::super::{
        ModelFormat, ModelFormatError, read_tensor_table, read_tensor_table_from_bytes,
    };
    use super::*;

    const T_U8: u32 = 0;
    const T_U32: u32 = 4;
    const T_F32: u32 = 6;
    const T_BOOL: u32 = 7;
    const T_STRING: u32 = 8;
    const T_ARRAY: u32 = 9;
    const T_U64: u32 = 10;
    const GGML_F32: u32 = 0;
    const GGML_Q8_0: u32 = 8;

    /// GGUF string encoding: u64 length + bytes.
    fn gstr(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    fn array(element_type: u32, count: u64, elements: &[u8]) -> Vec<u8> {
        let mut out = element_type.to_le_bytes().to_vec();
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(elements);
        out
    }

    struct Tensor {
        name: Vec<u8>,
        dims: Vec<u64>,
        ty: u32,
        offset: u64,
    }

    /// Builds GGUF files byte by byte, including malformed ones.
    struct Gguf {
        version: u32,
        tensor_count: Option<u64>,
        kv_count: Option<u64>,
        kvs: Vec<(Vec<u8>, u32, Vec<u8>)>,
        tensors: Vec<Tensor>,
        alignment: u64,
        data_len: u64,
    }

    impl Gguf {
        fn empty() -> Self {
            Self {
                version: 3,
                tensor_count: None,
                kv_count: None,
                kvs: Vec::new(),
                tensors: Vec::new(),
                alignment: 32,
                data_len: 0,
            }
        }

        /// A valid file: one string key, an F32 [8, 2] tensor at 0 (64 bytes) and a Q8_0 [32]
        /// tensor at 64 (34 bytes).
        fn good() -> Self {
            Self::empty()
                .kv(b"general.architecture", T_STRING, gstr(b"tiny"))
                .tensor(b"a", &[8, 2], GGML_F32, 0)
                .tensor(b"b", &[32], GGML_Q8_0, 64)
                .data(98)
        }

        fn kv(mut self, key: &[u8], ty: u32, value: Vec<u8>) -> Self {
            self.kvs.push((key.to_vec(), ty, value));
            self
        }

        fn tensor(mut self, name: &[u8], dims: &[u64], ty: u32, offset: u64) -> Self {
            self.tensors.push(Tensor {
                name: name.to_vec(),
                dims: dims.to_vec(),
                ty,
                offset,
            });
            self
        }

        fn data(mut self, len: u64) -> Self {
            self.data_len = len;
            self
        }

        fn header(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&self.version.to_le_bytes());
            let tensor_count = self.tensor_count.unwrap_or(self.tensors.len() as u64);
            out.extend_from_slice(&tensor_count.to_le_bytes());
            let kv_count = self.kv_count.unwrap_or(self.kvs.len() as u64);
            out.extend_from_slice(&kv_count.to_le_bytes());
            for (key, ty, value) in &self.kvs {
                out.extend_from_slice(&gstr(key));
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(value);
            }
            for t in &self.tensors {
                out.extend_from_slice(&gstr(&t.name));
                out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
                for d in &t.dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&t.ty.to_le_bytes());
                out.extend_from_slice(&t.offset.to_le_bytes());
            }
            out
        }

        fn build(&self) -> Vec<u8> {
            let mut out = self.header();
            out.resize(out.len().next_multiple_of(self.alignment as usize), 0);
            out.resize(out.len() + self.data_len as usize, 0xAB);
            out
        }

        fn parse(&self) -> Result<TensorTable, ModelFormatError> {
            read_tensor_table_from_bytes(&self.build())
        }
    }

    fn err(g: &Gguf) -> ModelFormatError {
        let e = g.parse().expect_err("the header must be rejected");
        assert_eq!(e.format, "gguf", "{e}");
        e
    }

    #[test]
    fn good_gguf_v3_yields_absolute_offsets_sizes_and_ggml_order_shapes() {
        let g = Gguf::good();
        let header_len = g.header().len() as u64;
        let table = g.parse().unwrap();
        assert_eq!(table.format, ModelFormat::Gguf { version: 3 });
        let data = header_len.next_multiple_of(32);
        assert_eq!(table.data_offset, data);
        assert_eq!(table.tensors.len(), 2);
        let a = &table.tensors[0];
        assert_eq!((a.name.as_str(), a.dtype.as_str()), ("a", "F32"));
        assert_eq!(a.shape, vec![8, 2]);
        assert_eq!((a.offset, a.bytes), (data, 64));
        let b = &table.tensors[1];
        assert_eq!((b.name.as_str(), b.dtype.as_str()), ("b", "Q8_0"));
        assert_eq!((b.offset, b.bytes), (data + 64, 34));
        assert_eq!(table.metadata.len(), 1);
        assert_eq!(table.metadata[0].key, "general.architecture");
        assert_eq!(table.metadata[0].summary, "tiny");
    }

    #[test]
    fn gguf_v2_is_accepted() {
        let mut g = Gguf::good();
        g.version = 2;
        assert_eq!(g.parse().unwrap().format, ModelFormat::Gguf { version: 2 });
    }

    #[test]
    fn gguf_versions_other_than_2_and_3_are_rejected() {
        for version in [0, 1, 4, u32::MAX] {
            let mut g = Gguf::good();
            g.version = version;
            let e = err(&g);
            assert_eq!((e.field.as_str(), e.offset), ("version", 4), "{e}");
        }
    }

    #[test]
    fn big_endian_gguf_is_rejected_as_such() {
        let mut g = Gguf::good();
        g.version = 3u32.swap_bytes();
        let e = err(&g);
        assert_eq!(e.field, "version");
        assert!(e.reason.contains("big-endian"), "{e}");
    }

    #[test]
    fn gguf_truncated_at_any_byte_is_an_error_never_raw() {
        let file = Gguf::good().build();
        for len in 4..file.len() {
            let e = read_tensor_table_from_bytes(&file[..len])
                .expect_err("a truncated GGUF file must be rejected");
            assert_eq!(e.format, "gguf", "len {len}: {e}");
        }
    }

    #[test]
    fn gguf_reader_ending_before_file_len_is_an_error() {
        let file = Gguf::good().build();
        let header = Gguf::good().header();
        let mut short = &header[..header.len() - 3];
        let e = read_tensor_table(&mut short, file.len() as u64).unwrap_err();
        assert_eq!(e.format, "gguf");
        assert!(e.field.starts_with("tensor_info[1]"), "{e}");
    }

    #[test]
    fn huge_tensor_count_is_rejected_before_allocating() {
        for count in [u64::MAX, MAX_TENSOR_COUNT + 1] {
            let mut g = Gguf::good();
            g.tensor_count = Some(count);
            let e = err(&g);
            assert_eq!((e.field.as_str(), e.offset), ("tensor_count", 8), "{e}");
        }
        // Under the hard limit but more than the rest of the file could describe.
        let mut g = Gguf::good();
        g.tensor_count = Some(1000);
        let e = err(&g);
        assert_eq!(e.field, "tensor_count");
        assert!(e.reason.contains("need at least"), "{e}");
    }

    #[test]
    fn huge_metadata_kv_count_is_rejected_before_allocating() {
        let mut g = Gguf::good();
        g.kv_count = Some(u64::MAX);
        let e = err(&g);
        assert_eq!(
            (e.field.as_str(), e.offset),
            ("metadata_kv_count", 16),
            "{e}"
        );
        let mut g = Gguf::good();
        g.kv_count = Some(100_000);
        let e = err(&g);
        assert_eq!(e.field, "metadata_kv_count");
        assert!(e.reason.contains("need at least"), "{e}");
    }

    #[test]
    fn huge_key_length_is_rejected_before_allocating() {
        let mut file = Gguf::good().build();
        file[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = read_tensor_table_from_bytes(&file).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.offset),
            ("metadata_kv[0].key", 32),
            "{e}"
        );
        assert!(e.reason.contains("remain in the file"), "{e}");
    }

    #[test]
    fn huge_string_value_length_is_rejected_before_allocating() {
        let g = Gguf::good().kv(b"k", T_STRING, (1u64 << 40).to_le_bytes().to_vec());
        let e = err(&g);
        assert_eq!(e.field, "metadata[\"k\"].value");
    }

    #[test]
    fn huge_array_count_is_rejected_before_reading_elements() {
        let g = Gguf::good().kv(b"k", T_ARRAY, array(T_U32, 1 << 40, &[]));
        let e = err(&g);
        assert_eq!(e.field, "metadata[\"k\"].value");
        assert!(e.reason.contains("cannot fit"), "{e}");
        // Even 1-byte elements are counted against the remaining bytes.
        let g = Gguf::good().kv(b"k", T_ARRAY, array(T_U8, 100_000, &[]));
        assert!(err(&g).reason.contains("cannot fit"));
    }

    #[test]
    fn header_past_the_256_mib_cap_is_rejected_without_reading_it() {
        // The file claims to be 1 TiB; the metadata string claims 300 MiB. Only the first bytes
        // exist: the cap check must fire before any read or allocation of the string.
        let g = Gguf::empty().kv(b"k", T_STRING, (300u64 << 20).to_le_bytes().to_vec());
        let header = g.header();
        let mut reader = header.as_slice();
        let e = read_tensor_table(&mut reader, 1 << 40).unwrap_err();
        assert_eq!(e.field, "metadata[\"k\"].value");
        assert!(e.reason.contains("256 MiB"), "{e}");
    }

    #[test]
    fn invalid_utf8_in_key_is_rejected_at_the_bad_byte() {
        let g = Gguf::good().kv(b"ok\xFFkey", T_U8, vec![1]);
        let e = err(&g);
        let key_bytes_at = Gguf::good().header().len() as u64 - Gguf::good().tensors_len() + 8;
        assert_eq!(e.field, "metadata_kv[1].key");
        assert_eq!(e.offset, key_bytes_at + 2, "{e}");
        assert_eq!(e.reason, "invalid UTF-8");
    }

    impl Gguf {
        /// Encoded length of the tensor infos (to locate bytes after the key/values).
        fn tensors_len(&self) -> u64 {
            self.tensors
                .iter()
                .map(|t| 8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8)
                .sum()
        }
    }

    #[test]
    fn nul_bytes_in_keys_and_tensor_names_are_rejected_iv_005() {
        let e = err(&Gguf::good().kv(b"general\0x", T_U8, vec![1]));
        assert_eq!(e.field, "metadata_kv[1].key");
        assert_eq!(e.reason, "NUL byte in a name");
        let file = Gguf::good().kv(b"general\0x", T_U8, vec![1]).build();
        assert_eq!(file[e.offset as usize], 0);
        let e = err(&Gguf::good()
            .tensor(b"a\0shadow", &[8], GGML_F32, 128)
            .data(160));
        assert_eq!(e.field, "tensor_info[2].name");
        assert_eq!(e.reason, "NUL byte in a name");
    }

    #[test]
    fn invalid_utf8_in_tensor_name_is_rejected() {
        let g = Gguf::good()
            .tensor(b"bad\xC3", &[8], GGML_F32, 128)
            .data(160);
        let e = err(&g);
        assert_eq!(e.field, "tensor_info[2].name");
        assert_eq!(e.reason, "invalid UTF-8");
    }

    #[test]
    fn invalid_utf8_inside_a_string_array_names_the_element() {
        let mut elements = gstr(b"fine");
        elements.extend(gstr(b"\xFF"));
        let g = Gguf::good().kv(b"tokens", T_ARRAY, array(T_STRING, 2, &elements));
        let e = err(&g);
        assert_eq!(e.field, "metadata[\"tokens\"].value[1]");
        assert_eq!(e.reason, "invalid UTF-8");
    }

    #[test]
    fn unknown_value_types_are_rejected() {
        let e = err(&Gguf::good().kv(b"k", 13, vec![0; 8]));
        assert_eq!(e.field, "metadata[\"k\"].type");
        let e = err(&Gguf::good().kv(b"k", T_ARRAY, array(99, 1, &[0; 8])));
        assert_eq!(e.field, "metadata[\"k\"].value");
        assert!(e.reason.contains("unknown array element type 99"), "{e}");
    }

    /// An array of arrays nested `depth` deep, the innermost holding one u8.
    fn nested(depth: u32) -> Vec<u8> {
        let mut value = array(T_U8, 1, &[7]);
        for _ in 1..depth {
            value = array(T_ARRAY, 1, &value);
        }
        value
    }

    #[test]
    fn arrays_nest_up_to_the_depth_cap_and_no_deeper() {
        let table = Gguf::good()
            .kv(b"k", T_ARRAY, nested(MAX_ARRAY_NESTING))
            .parse()
            .unwrap();
        assert_eq!(table.metadata[1].summary, "array<array>[1]");
        let e = err(&Gguf::good().kv(b"k", T_ARRAY, nested(MAX_ARRAY_NESTING + 1)));
        assert_eq!(e.field, "metadata[\"k\"].value[0][0][0][0]");
        assert!(e.reason.contains("nested deeper"), "{e}");
    }

    #[test]
    fn bool_values_other_than_0_and_1_are_rejected() {
        let e = err(&Gguf::good().kv(b"k", T_BOOL, vec![2]));
        assert_eq!(e.field, "metadata[\"k\"].value");
        let e = err(&Gguf::good().kv(b"k", T_ARRAY, array(T_BOOL, 3, &[0, 1, 9])));
        assert_eq!(e.field, "metadata[\"k\"].value[2]");
    }

    #[test]
    fn duplicate_metadata_keys_are_rejected() {
        let e = err(&Gguf::good().kv(b"general.architecture", T_U8, vec![1]));
        assert_eq!(e.field, "metadata_kv[1].key");
        assert!(e.reason.contains("duplicate key"), "{e}");
    }

    #[test]
    fn alignment_must_be_a_nonzero_power_of_two_u32() {
        for bad in [0u32, 3, 48] {
            let e = err(&Gguf::good().kv(b"general.alignment", T_U32, bad.to_le_bytes().to_vec()));
            assert_eq!(e.field, "metadata[\"general.alignment\"].value", "{e}");
        }
        let e = err(&Gguf::good().kv(b"general.alignment", T_U64, 32u64.to_le_bytes().to_vec()));
        assert_eq!(e.field, "metadata[\"general.alignment\"].type");
    }

    #[test]
    fn custom_alignment_moves_the_data_section_and_constrains_offsets() {
        let mut g = Gguf::empty()
            .kv(b"general.alignment", T_U32, 256u32.to_le_bytes().to_vec())
            .tensor(b"a", &[16], GGML_F32, 0)
            .tensor(b"b", &[16], GGML_F32, 256)
            .data(320);
        g.alignment = 256;
        let table = g.parse().unwrap();
        assert_eq!(table.data_offset % 256, 0);
        assert_eq!(table.tensors[1].offset, table.data_offset + 256);

        let mut g = Gguf::empty()
            .kv(b"general.alignment", T_U32, 256u32.to_le_bytes().to_vec())
            .tensor(b"a", &[16], GGML_F32, 0)
            .tensor(b"b", &[16], GGML_F32, 64)
            .data(320);
        g.alignment = 256;
        let e = err(&g);
        assert_eq!(e.field, "tensor_info[1].offset");
        assert!(e.reason.contains("alignment 256"), "{e}");
    }

    #[test]
    fn zero_or_more_than_four_dimensions_are_rejected() {
        for dims in [&[][..], &[32, 1, 1, 1, 1][..]] {
            let e = err(&Gguf::good().tensor(b"c", dims, GGML_F32, 128).data(256));
            assert_eq!(e.field, "tensor_info[2].dims");
            assert!(e.reason.contains("dimension count"), "{e}");
        }
    }

    #[test]
    fn dimensions_and_element_counts_beyond_i64_are_rejected() {
        let e = err(&Gguf::good().tensor(b"c", &[1 << 63], GGML_F32, 128));
        assert_eq!(e.field, "tensor_info[2].dims[0]");
        let e = err(&Gguf::good().tensor(b"c", &[1 << 32, 1 << 32], GGML_F32, 128));
        assert_eq!(e.field, "tensor_info[2].dims");
        assert!(e.reason.contains("element count"), "{e}");
        // Fits i64 elements, but the byte size overflows u64.
        let e = err(&Gguf::good().tensor(b"c", &[1 << 62], GGML_F32, 128));
        assert!(e.reason.contains("overflows"), "{e}");
    }

    #[test]
    fn unknown_ggml_types_are_rejected() {
        for ty in [4, 5, 31, 36, 42, u32::MAX] {
            let e = err(&Gguf::good().tensor(b"c", &[32], ty, 128).data(256));
            assert_eq!(e.field, "tensor_info[2].type");
            assert!(e.reason.contains("unknown ggml type"), "{e}");
        }
    }

    #[test]
    fn first_dimension_must_be_a_multiple_of_the_block_size() {
        let e = err(&Gguf::good()
            .tensor(b"c", &[16, 2], GGML_Q8_0, 128)
            .data(256));
        assert_eq!(e.field, "tensor_info[2].dims");
        assert!(e.reason.contains("block size 32"), "{e}");
    }

    #[test]
    fn misaligned_tensor_offsets_are_rejected() {
        let e = err(&Gguf::good().tensor(b"c", &[4], GGML_F32, 100).data(256));
        assert_eq!(e.field, "tensor_info[2].offset");
        assert!(
            e.reason.contains("not a multiple of the alignment 32"),
            "{e}"
        );
    }

    #[test]
    fn tensors_past_the_end_of_the_file_are_rejected() {
        let e = err(&Gguf::good().data(97));
        assert_eq!(e.field, "tensor_info[1].offset");
        assert!(e.reason.contains("the file has"), "{e}");
        let e = err(&Gguf::good().tensor(b"c", &[8], GGML_F32, u64::MAX - 31));
        assert!(e.reason.contains("overflows"), "{e}");
    }

    #[test]
    fn overlapping_tensors_are_rejected() {
        // "a" covers data bytes [0, 64); "c" starts at 32.
        let e = err(&Gguf::good().tensor(b"c", &[8], GGML_F32, 32).data(128));
        assert_eq!(e.field, "tensor_info[2].offset");
        assert!(e.reason.contains("overlaps tensor \"a\""), "{e}");
    }

    #[test]
    fn zero_sized_tensors_overlap_nothing() {
        let table = Gguf::good()
            .tensor(b"z", &[0], GGML_F32, 32)
            .parse()
            .unwrap();
        assert_eq!(table.tensors.len(), 3);
    }

    #[test]
    fn duplicate_tensor_names_are_rejected() {
        let e = err(&Gguf::good().tensor(b"a", &[8], GGML_F32, 128).data(256));
        assert_eq!(e.field, "tensor_info[2].name");
        assert!(e.reason.contains("duplicate tensor name"), "{e}");
    }

    #[test]
    fn metadata_summaries_render_scalars_truncate_strings_and_count_arrays() {
        let long = "é".repeat(100);
        let table = Gguf::empty()
            .kv(b"u", T_U32, 4096u32.to_le_bytes().to_vec())
            .kv(b"f", T_F32, 0.5f32.to_le_bytes().to_vec())
            .kv(b"b", T_BOOL, vec![1])
            .kv(b"s", T_STRING, gstr(long.as_bytes()))
            .kv(b"ctl", T_STRING, gstr(b"line\nbreak\x1b[31m"))
            .kv(
                b"tokens",
                T_ARRAY,
                array(T_STRING, 2, &[gstr(b"a"), gstr(b"b")].concat()),
            )
            .kv(b"bytes", T_ARRAY, array(T_U8, 3, &[1, 2, 3]))
            .parse()
            .unwrap();
        let summaries: Vec<&str> = table.metadata.iter().map(|m| m.summary.as_str()).collect();
        assert_eq!(summaries[..3], ["4096", "0.5", "true"]);
        assert_eq!(summaries[3], format!("{}…", "é".repeat(80)));
        assert_eq!(summaries[4], "line\\nbreak\\u{1b}[31m");
        assert_eq!(summaries[5..], ["array<string>[2]", "array<u8>[3]"]);
    }

    /// A reader that fails the test if anything past `limit` bytes is requested.
    struct HeaderOnly<'a> {
        bytes: &'a [u8],
        limit: usize,
        pos: usize,
    }

    impl std::io::Read for HeaderOnly<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.bytes.len() - self.pos);
            assert!(
                self.pos + n <= self.limit,
                "read past the header into tensor data"
            );
            buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn gguf_reader_reads_exactly_the_header_and_no_tensor_data() {
        let g = Gguf::good();
        let file = g.build();
        let header_len = g.header().len();
        let mut reader = HeaderOnly {
            bytes: &file,
            limit: header_len,
            pos: 0,
        };
        let table = read_tensor_table(&mut reader, file.len() as u64).unwrap();
        assert_eq!(reader.pos, header_len);
        assert_eq!(table.tensors.len(), 2);
    }

    #[test]
    fn ggml_type_table_matches_upstream_gguf_quant_sizes() {
        let path = crate::format::test_fixture("ggml-quant-sizes.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let upstream = json["types"].as_object().unwrap();
        assert_eq!(
            upstream.len(),
            GGML_TYPES.len(),
            "type count differs from upstream"
        );
        for t in GGML_TYPES {
            let u = &upstream[t.name];
            assert_eq!(u["id"], t.id, "{}", t.name);
            assert_eq!(u["block_size"], t.block_size, "{}", t.name);
            assert_eq!(u["type_size"], t.type_size, "{}", t.name);
        }
    }
}
