//! safetensors header reader.
//!
//! Layout: `N` as a little-endian u64, `N` bytes of UTF-8 JSON, then the data section. The JSON
//! is an object mapping tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}`
//! (offsets relative to the data section) plus an optional `"__metadata__"` object of strings.
//!
//! Stricter than the upstream `safetensors` crate, which keeps the last of duplicate keys and
//! ignores unknown fields: this reader rejects duplicate keys (at the top level and inside
//! `__metadata__`), NUL bytes in tensor names and metadata keys (IV-005), unknown fields in a tensor entry, and shapes of more than [`MAX_DIMS`]
//! dimensions. Like upstream it requires: a known dtype, `end - begin` equal to the element
//! count × dtype size (sub-byte dtypes must end on a byte boundary), and tensors that, sorted by
//! offset, tile the data section exactly (no gap, no overlap, nothing left over).

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::io::Read;

use crate::ids::bytes;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    HeaderReader, MAX_METADATA_COUNT, MAX_TENSOR_COUNT, MetadataEntry, ModelFormat,
    ModelFormatError, SAFETENSORS_HEADER_CAP, TensorInfo, TensorTable, len_u64, quoted,
    sort_tensors, summarize_string, truncate_escaped,
};

/// Most dimensions of one tensor. Real tensors have at most 8; the cap bounds the memory a hostile
/// header can make the reader allocate and keeps `ndims` within one byte of the canonical encoding.
pub(super) const MAX_DIMS: usize = 254;

/// The safetensors dtypes and their size in **bits**, as the upstream `safetensors` crate
/// (v0.8.0, `Dtype::bitsize`) has them. A unit test checks this table against
/// `tests/fixtures/safetensors-dtypes.json`, measured with the upstream reader by
/// `scripts/make-fixtures.py`.
pub(super) const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 8),
    ("F4", 4),
    ("F6_E2M3", 6),
    ("F6_E3M2", 6),
    ("U8", 8),
    ("I8", 8),
    ("F8_E5M2", 8),
    ("F8_E4M3", 8),
    ("F8_E8M0", 8),
    ("F8_E4M3FNUZ", 8),
    ("F8_E5M2FNUZ", 8),
    ("I16", 16),
    ("U16", 16),
    ("F16", 16),
    ("BF16", 16),
    ("I32", 32),
    ("U32", 32),
    ("F32", 32),
    ("C64", 64),
    ("F64", 64),
    ("I64", 64),
    ("U64", 64),
];

/// Key of the free-form string metadata object.
const METADATA_KEY: &str = "__metadata__";

/// Longest JSON parser message kept in an error, in characters.
const MAX_REASON_CHARS: usize = 200;

/// Byte offset of the JSON header in the file.
const JSON_START: u64 = 8;

/// One tensor entry as written in the JSON header.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Shape,
    data_offsets: [u64; 2],
}

/// A tensor shape, refused while parsing once it exceeds [`MAX_DIMS`].
struct Shape(Vec<u64>);

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShapeVisitor;
        impl<'de> Visitor<'de> for ShapeVisitor {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array of at most {MAX_DIMS} dimensions")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                let mut dims = Vec::new();
                while let Some(dim) = seq.next_element::<u64>()? {
                    if dims.len() >= MAX_DIMS {
                        return Err(de::Error::custom(format!(
                            "shape has more than {MAX_DIMS} dimensions"
                        )));
                    }
                    dims.push(dim);
                }
                Ok(Shape(dims))
            }
        }
        deserializer.deserialize_seq(ShapeVisitor)
    }
}

/// A tensor entry with the JSON offset of its key.
struct Entry {
    name: String,
    key_at: u64,
    tensor: RawTensor,
}

/// The parsed JSON header, in file order.
struct Header {
    tensors: Vec<Entry>,
    metadata: Vec<(String, String)>,
}

/// Parse progress shared between the JSON reader and the visitors, so that errors and entries
/// can be given byte offsets (serde_json does not expose positions to visitors).
struct Progress {
    /// JSON bytes handed to serde_json so far (it reads one byte at a time from an `io::Read`).
    consumed: Cell<u64>,
    /// The top-level key whose value is being parsed, for error field names.
    current_key: Cell<Option<String>>,
    /// JSON offset to report instead of the last byte read (set for errors about a whole key).
    error_at: Cell<Option<u64>>,
}

struct CountingReader<'a> {
    bytes: &'a [u8],
    progress: &'a Progress,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.bytes.read(buf)?;
        let consumed = self.progress.consumed.get().saturating_add(len_u64(n));
        self.progress.consumed.set(consumed);
        Ok(n)
    }
}

struct HeaderVisitor<'a> {
    progress: &'a Progress,
    json: &'a [u8],
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut seen = HashSet::new();
        let mut tensors = Vec::new();
        let mut metadata = Vec::new();
        loop {
            self.progress.current_key.set(None);
            let key_at = self.progress.consumed.get();
            let Some(key) = map.next_key::<String>()? else {
                break;
            };
            self.progress.current_key.set(Some(key.clone()));
            if !seen.insert(key.clone()) {
                let at = key_offset(self.json, key_at);
                self.progress.error_at.set(Some(at));
                return Err(de::Error::custom(format!("duplicate key {}", quoted(&key))));
            }
            if key == METADATA_KEY {
                metadata = map.next_value_seed(MetadataSeed)?;
            } else {
                if len_u64(tensors.len()) >= MAX_TENSOR_COUNT {
                    return Err(de::Error::custom(format!(
                        "more than {MAX_TENSOR_COUNT} tensors"
                    )));
                }
                let tensor: RawTensor = map.next_value()?;
                tensors.push(Entry {
                    name: key,
                    key_at,
                    tensor,
                });
            }
        }
        Ok(Header { tensors, metadata })
    }
}

/// `__metadata__`: `null` or an object of unique string keys to string values.
struct MetadataSeed;

impl<'de> DeserializeSeed<'de> for MetadataSeed {
    type Value = Vec<(String, String)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(MetadataVisitor)
    }
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = Vec<(String, String)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of string values")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "duplicate metadata key {}",
                    quoted(&key)
                )));
            }
            if key.contains('\0') {
                return Err(de::Error::custom(format!(
                    "NUL byte in metadata key {}",
                    quoted(&key)
                )));
            }
            if len_u64(entries.len()) >= MAX_METADATA_COUNT {
                return Err(de::Error::custom(format!(
                    "more than {MAX_METADATA_COUNT} metadata entries"
                )));
            }
            let value: String = map.next_value()?;
            entries.push((key, value));
        }
        Ok(entries)
    }
}

/// Reads a safetensors header from `reader` (positioned at byte 0) of a file of `file_len` bytes.
pub(super) fn read(reader: &mut dyn Read, file_len: u64) -> Result<TensorTable, ModelFormatError> {
    let cap = JSON_START.saturating_add(SAFETENSORS_HEADER_CAP);
    let mut r = HeaderReader::new(
        reader,
        "safetensors",
        file_len,
        cap,
        "100 MiB safetensors header",
    );
    let n = r.u64(&|| "header_len".to_owned())?;
    if n > SAFETENSORS_HEADER_CAP {
        return Err(r.error(
            "header_len".to_owned(),
            0,
            format!("header length {n} exceeds the cap of {SAFETENSORS_HEADER_CAP} bytes"),
        ));
    }
    let after_len = file_len.saturating_sub(JSON_START);
    if n > after_len {
        return Err(r.error(
            "header_len".to_owned(),
            0,
            format!(
                "header length {n} exceeds the {} that follow it",
                bytes(after_len)
            ),
        ));
    }
    let mut json = Vec::new();
    r.bytes_into(n, &mut json, &|| "header".to_owned())?;
    if let Err(e) = std::str::from_utf8(&json) {
        return Err(r.error(
            "header".to_owned(),
            JSON_START.saturating_add(len_u64(e.valid_up_to())),
            "invalid UTF-8".to_owned(),
        ));
    }

    let header = parse_json(&r, &json)?;
    // n <= file_len - 8 was checked above, so neither of these can saturate.
    let data_start = JSON_START.saturating_add(n);
    let data_len = file_len.saturating_sub(data_start);
    let tensors = validate(&r, &json, header.tensors, data_start, data_len)?;
    let metadata = header
        .metadata
        .into_iter()
        .map(|(key, value)| MetadataEntry {
            key,
            summary: summarize_string(&value),
        })
        .collect();
    Ok(TensorTable {
        format: ModelFormat::Safetensors,
        tensors,
        data_offset: data_start,
        metadata,
    })
}

fn parse_json(r: &HeaderReader<'_>, json: &[u8]) -> Result<Header, ModelFormatError> {
    let progress = Progress {
        consumed: Cell::new(0),
        current_key: Cell::new(None),
        error_at: Cell::new(None),
    };
    let reader = CountingReader {
        bytes: json,
        progress: &progress,
    };
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let parsed = deserializer
        .deserialize_map(HeaderVisitor {
            progress: &progress,
            json,
        })
        .and_then(|header| deserializer.end().map(|()| header));
    parsed.map_err(|e| {
        let field = progress.current_key.take().map_or_else(
            || "header".to_owned(),
            |key| format!("header[{}]", quoted(&key)),
        );
        // Unless the visitor located the error, the byte serde_json read last is the one it
        // failed on.
        let at = progress
            .error_at
            .get()
            .unwrap_or_else(|| progress.consumed.get().saturating_sub(1));
        let at = JSON_START.saturating_add(at);
        // serde_json quotes offending values in full: bound what reaches a log line.
        r.error(
            field,
            at,
            truncate_escaped(&e.to_string(), MAX_REASON_CHARS),
        )
    })
}

/// A tensor entry that passed the per-entry checks.
struct Checked {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
    begin: u64,
    end: u64,
    at: u64,
}

fn validate(
    r: &HeaderReader<'_>,
    json: &[u8],
    entries: Vec<Entry>,
    data_start: u64,
    data_len: u64,
) -> Result<Vec<TensorInfo>, ModelFormatError> {
    let mut checked = Vec::with_capacity(entries.len());
    for entry in entries {
        let at = JSON_START.saturating_add(key_offset(json, entry.key_at));
        let field = |what: &str| format!("header[{}].{what}", quoted(&entry.name));
        if entry.name.contains('\0') {
            return Err(r.error(
                format!("header[{}]", quoted(&entry.name)),
                at,
                "NUL byte in a tensor name".to_owned(),
            ));
        }
        let t = entry.tensor;
        let Some(&(dtype, bits)) = DTYPES.iter().find(|(name, _)| *name == t.dtype) else {
            return Err(r.error(
                field("dtype"),
                at,
                format!("unknown dtype {}", quoted(&t.dtype)),
            ));
        };
        let [begin, end] = t.data_offsets;
        let Some(span) = end.checked_sub(begin) else {
            return Err(r.error(
                field("data_offsets"),
                at,
                format!("begin {begin} is after end {end}"),
            ));
        };
        if end > data_len {
            return Err(r.error(
                field("data_offsets"),
                at,
                format!(
                    "out of bounds: data_offsets [{begin}, {end}] end past the {data_len}-byte data section"
                ),
            ));
        }
        let shape = t.shape.0;
        let total_bits = shape
            .iter()
            .try_fold(1u64, |acc, dim| acc.checked_mul(*dim))
            .and_then(|elements| elements.checked_mul(bits))
            .ok_or_else(|| r.error(field("shape"), at, "size overflows u64".to_owned()))?;
        let (bytes, rest) = (total_bits.checked_div(8), total_bits.checked_rem(8));
        if rest != Some(0) {
            return Err(r.error(
                field("shape"),
                at,
                format!("{shape:?} of {dtype} does not end on a byte boundary"),
            ));
        }
        if bytes != Some(span) {
            return Err(r.error(
                field("data_offsets"),
                at,
                format!(
                    "{dtype} {shape:?} needs {} bytes but data_offsets [{begin}, {end}] span {span}",
                    bytes.unwrap_or(0)
                ),
            ));
        }
        checked.push(Checked {
            name: entry.name,
            dtype,
            shape,
            begin,
            end,
            at,
        });
    }

    // Sorted by offset, the tensors must tile the data section exactly.
    checked.sort_by_key(|t| (t.begin, t.end));
    let mut cursor = 0u64;
    let mut previous: Option<&str> = None;
    for t in &checked {
        let field = || format!("header[{}].data_offsets", quoted(&t.name));
        if t.begin > cursor {
            return Err(r.error(
                field(),
                t.at,
                format!(
                    "gap: data bytes [{cursor}, {}) belong to no tensor",
                    t.begin
                ),
            ));
        }
        if t.begin < cursor {
            return Err(r.error(
                field(),
                t.at,
                format!(
                    "overlaps tensor {}: starts at data byte {} inside it (it ends at {cursor})",
                    quoted(previous.unwrap_or_default()),
                    t.begin
                ),
            ));
        }
        // Every end is within the data section (checked per tensor above).
        cursor = t.end;
        previous = Some(&t.name);
    }
    if cursor != data_len {
        return Err(r.error(
            "data section".to_owned(),
            data_start.saturating_add(cursor),
            format!(
                "the last {} of the file belong to no tensor",
                bytes(data_len.saturating_sub(cursor))
            ),
        ));
    }

    let mut tensors = Vec::with_capacity(checked.len());
    for t in checked {
        // begin <= end <= data_len, so data_start + begin <= file_len: no overflow.
        tensors.push(TensorInfo {
            name: t.name,
            dtype: t.dtype.to_owned(),
            shape: t.shape,
            offset: data_start.saturating_add(t.begin),
            bytes: t.end.saturating_sub(t.begin),
        });
    }
    sort_tensors(&mut tensors);
    Ok(tensors)
}

/// Offset in the JSON of the key that starts after `pos` (which is where the previous entry
/// ended): skips whitespace, the separating comma and the opening brace.
fn key_offset(json: &[u8], pos: u64) -> u64 {
    let start = usize::try_from(pos).unwrap_or(usize::MAX);
    let skipped = json
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b',' | b'{'))
        .count();
    pos.saturating_add(len_u64(skipped))
}

#[cfg(test)]
mod tests {
    use super::super::{ModelFormat, read_tensor_table, read_tensor_table_from_bytes};
    use super::*;

    /// A safetensors file: length, `json` verbatim, then `data_len` data bytes.
    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + data_len, 0xCD);
        out
    }

    fn err(json: &str, data_len: usize) -> ModelFormatError {
        let e = read_tensor_table_from_bytes(&file(json, data_len))
            .expect_err("the header must be rejected");
        assert_eq!(e.format, "safetensors", "{e}");
        e
    }

    const GOOD: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[4],"data_offsets":[24,32]},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;

    #[test]
    fn good_safetensors_yields_absolute_offsets_sorted_by_offset() {
        let table = read_tensor_table_from_bytes(&file(GOOD, 32)).unwrap();
        let data = 8 + GOOD.len() as u64;
        assert_eq!(table.format, ModelFormat::Safetensors);
        assert_eq!(table.data_offset, data);
        let a = &table.tensors[0];
        assert_eq!((a.name.as_str(), a.dtype.as_str()), ("a", "F32"));
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!((a.offset, a.bytes), (data, 24));
        let b = &table.tensors[1];
        assert_eq!((b.name.as_str(), b.offset, b.bytes), ("b", data + 24, 8));
        assert_eq!(table.metadata.len(), 1);
        assert_eq!(
            (
                table.metadata[0].key.as_str(),
                table.metadata[0].summary.as_str()
            ),
            ("format", "pt")
        );
    }

    #[test]
    fn empty_header_padded_with_spaces_is_a_file_without_tensors() {
        let table = read_tensor_table_from_bytes(&file("{}      ", 0)).unwrap();
        assert_eq!(table.format, ModelFormat::Safetensors);
        assert!(table.tensors.is_empty());
        assert_eq!(table.data_offset, 16);
    }

    #[test]
    fn null_metadata_is_accepted_like_upstream() {
        let json = r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let table = read_tensor_table_from_bytes(&file(json, 1)).unwrap();
        assert!(table.metadata.is_empty());
    }

    #[test]
    fn duplicate_tensor_keys_are_rejected_not_last_one_wins() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
        let e = err(json, 2);
        assert_eq!(e.field, "header[\"a\"]");
        assert!(e.reason.contains("duplicate key \"a\""), "{e}");
        // The offset points at the second "a" key.
        assert_eq!(e.offset, 8 + json.rfind("\"a\"").unwrap() as u64, "{e}");
    }

    #[test]
    fn duplicate_metadata_keys_are_rejected() {
        let json = r#"{"__metadata__":{"k":"1","k":"2"}}"#;
        let e = err(json, 0);
        assert_eq!(e.field, "header[\"__metadata__\"]");
        assert!(e.reason.contains("duplicate metadata key"), "{e}");
    }

    #[test]
    fn nul_bytes_in_tensor_names_and_metadata_keys_are_rejected_iv_005() {
        let json = r#"{"a\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let e = err(json, 1);
        assert_eq!(
            (e.field.as_str(), e.offset),
            ("header[\"a\\0b\"]", 9),
            "{e}"
        );
        let e = err(r#"{"__metadata__":{"k\u0000":"v"}}"#, 0);
        assert!(e.reason.contains("NUL byte in metadata key"), "{e}");
    }

    #[test]
    fn metadata_values_must_be_strings() {
        let e = err(r#"{"__metadata__":{"k":1}}"#, 0);
        assert_eq!(e.field, "header[\"__metadata__\"]");
    }

    #[test]
    fn unknown_fields_in_a_tensor_entry_are_rejected() {
        let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}}"#;
        let e = err(json, 1);
        assert_eq!(e.field, "header[\"a\"]");
        assert!(e.reason.contains("unknown field"), "{e}");
    }

    #[test]
    fn unknown_dtype_is_rejected_at_the_tensor_key() {
        let json = r#"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#;
        let e = err(json, 16);
        assert_eq!(
            (e.field.as_str(), e.offset),
            ("header[\"a\"].dtype", 9),
            "{e}"
        );
        assert_eq!(file(json, 16)[e.offset as usize], b'"');
    }

    #[test]
    fn dtype_size_times_elements_must_equal_the_offset_span() {
        let json = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#;
        let e = err(json, 20);
        assert_eq!(e.field, "header[\"a\"].data_offsets");
        assert!(e.reason.contains("needs 24 bytes"), "{e}");
    }

    #[test]
    fn begin_after_end_is_rejected() {
        let json = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#;
        let e = err(json, 4);
        assert_eq!(e.field, "header[\"a\"].data_offsets");
        assert!(e.reason.contains("after end"), "{e}");
    }

    #[test]
    fn gap_between_tensors_is_rejected() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
        let e = err(json, 12);
        assert_eq!(e.field, "header[\"b\"].data_offsets");
        assert!(e.reason.contains("gap"), "{e}");
    }

    #[test]
    fn overlapping_tensors_are_rejected() {
        let json = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
        let e = err(json, 8);
        assert_eq!(e.field, "header[\"b\"].data_offsets");
        assert!(e.reason.contains("overlaps tensor \"a\""), "{e}");
    }

    #[test]
    fn data_section_must_be_exactly_covered() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        let e = err(json, 5);
        assert_eq!(e.field, "data section");
        assert_eq!(e.offset, 8 + json.len() as u64 + 4);
        let e = err(json, 3);
        assert_eq!(e.field, "header[\"a\"].data_offsets");
        assert!(e.reason.contains("out of bounds"), "{e}");
        assert!(e.reason.contains("past the 3-byte data section"), "{e}");
    }

    #[test]
    fn header_length_beyond_the_file_is_an_error_not_raw() {
        let mut bytes = file(GOOD, 32);
        let n = bytes.len() as u64 - 8 + 1;
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        let e = read_tensor_table_from_bytes(&bytes).unwrap_err();
        assert_eq!(
            (e.format, e.field.as_str(), e.offset),
            ("safetensors", "header_len", 0)
        );
    }

    #[test]
    fn header_length_beyond_the_100_mib_cap_is_rejected_without_reading_it() {
        let mut bytes = file(GOOD, 0);
        let n = SAFETENSORS_HEADER_CAP + 1;
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        let mut reader = bytes.as_slice();
        let e = read_tensor_table(&mut reader, 1 << 40).unwrap_err();
        assert_eq!((e.field.as_str(), e.offset), ("header_len", 0));
        assert!(e.reason.contains("cap"), "{e}");
    }

    #[test]
    fn invalid_utf8_in_header_is_rejected_at_the_bad_byte() {
        let mut bytes = file(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        bytes[10] = 0xFF;
        let e = read_tensor_table_from_bytes(&bytes).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.offset, e.reason.as_str()),
            ("header", 10, "invalid UTF-8")
        );
    }

    #[test]
    fn malformed_json_and_trailing_garbage_are_rejected() {
        let e = err(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#, 1);
        assert_eq!(e.format, "safetensors");
        let e = err(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x"#,
            1,
        );
        assert_eq!(e.field, "header");
        assert!(e.reason.contains("trailing"), "{e}");
        let e = err(
            r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert_eq!(e.field, "header[\"a\"]");
    }

    #[test]
    fn sub_byte_dtypes_must_end_on_a_byte_boundary() {
        let ok = r#"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#;
        assert_eq!(
            read_tensor_table_from_bytes(&file(ok, 2)).unwrap().tensors[0].bytes,
            2
        );
        let bad = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        let e = err(bad, 2);
        assert_eq!(e.field, "header[\"a\"].shape");
        assert!(e.reason.contains("byte boundary"), "{e}");
    }

    #[test]
    fn size_overflow_is_rejected() {
        let json = r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#;
        let e = err(json, 0);
        assert_eq!(e.field, "header[\"a\"].shape");
        assert!(e.reason.contains("overflows"), "{e}");
    }

    #[test]
    fn shapes_beyond_the_dimension_cap_are_rejected_while_parsing() {
        let dims = vec!["1"; MAX_DIMS + 1].join(",");
        let json = format!(r#"{{"a":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,1]}}}}"#);
        let e = err(&json, 1);
        assert_eq!(e.field, "header[\"a\"]");
        assert!(e.reason.contains("more than 254 dimensions"), "{e}");
    }

    #[test]
    fn zero_sized_and_scalar_tensors_are_accepted() {
        let json = r#"{"z":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
        let table = read_tensor_table_from_bytes(&file(json, 4)).unwrap();
        let names: Vec<&str> = table.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["s", "z"]);
        assert_eq!(table.tensors[0].shape, Vec::<u64>::new());
    }

    #[test]
    fn safetensors_reader_reads_exactly_the_header_and_no_tensor_data() {
        struct Counting<'a>(&'a [u8], usize);
        impl std::io::Read for Counting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1 += n;
                Ok(n)
            }
        }
        let bytes = file(GOOD, 32);
        let mut reader = Counting(&bytes, 0);
        read_tensor_table(&mut reader, bytes.len() as u64).unwrap();
        assert_eq!(reader.1, 8 + GOOD.len());
    }

    #[test]
    fn dtype_table_matches_upstream_safetensors() {
        let path = crate::format::test_fixture("safetensors-dtypes.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let upstream = json["bits"].as_object().unwrap();
        assert_eq!(
            upstream.len(),
            DTYPES.len(),
            "dtype count differs from upstream"
        );
        for (name, bits) in DTYPES {
            assert_eq!(upstream[*name], *bits, "{name}");
        }
    }
}
