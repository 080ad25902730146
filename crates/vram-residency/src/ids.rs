//! Ground-level values that every other module uses and that use nothing of this crate: shard ids
//! (IV-003, IV-005), fs-verity digests as values, byte ranges, times as nanoseconds since the Unix
//! epoch, and UUID formatting.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest shard id accepted (IV-003).
pub const MAX_SHARD_ID_LEN: usize = 256;

/// A validated shard identifier: 1 to 256 characters of `A-Z a-z 0-9 - _` (IV-003, IV-005). This
/// excludes NUL, `/`, `.` and therefore `..`, so an id is always safe as a file-name component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ShardId(String);

impl ShardId {
    /// Validates a caller-chosen id.
    ///
    /// # Errors
    /// [`InvalidShardId`] with the reason (it converts into `VramError::InvalidShardId`).
    pub fn new(id: &str) -> Result<Self, InvalidShardId> {
        let refuse = |reason| Err(InvalidShardId { reason });
        if id.is_empty() {
            return refuse("it is empty");
        }
        if id.len() > MAX_SHARD_ID_LEN {
            return refuse("it is longer than 256 characters");
        }
        if id.contains('\0') {
            return refuse("it contains a NUL byte");
        }
        if id.contains('/') || id.contains('\\') {
            return refuse("it contains a path separator");
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return refuse("it contains a character other than A-Z a-z 0-9 '-' '_'");
        }
        Ok(Self(id.to_owned()))
    }

    /// A fresh random id, `shard-` followed by 32 hex digits (128 random bits).
    #[must_use]
    pub fn generate() -> Self {
        let mut random = [0u8; 16];
        if getrandom::fill(&mut random).is_err() {
            // No OS randomness: fall back to time and a process-wide counter, still unique here.
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let t = u64::try_from(t & u128::from(u64::MAX)).unwrap_or_default();
            random[..8].copy_from_slice(&n.to_be_bytes());
            random[8..].copy_from_slice(&t.to_be_bytes());
        }
        Self(format!("shard-{}", hex::encode(random)))
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for ShardId {
    type Err = InvalidShardId;
    fn from_str(s: &str) -> Result<Self, InvalidShardId> {
        Self::new(s)
    }
}

/// A shard id was refused (IV-003, IV-005). Converts into `VramError::InvalidShardId`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidShardId {
    /// Why.
    pub reason: &'static str,
}

impl fmt::Display for InvalidShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid shard id: {} (allowed: 1 to 256 characters of A-Z a-z 0-9 '-' '_')",
            self.reason
        )
    }
}

impl std::error::Error for InvalidShardId {}

/// A byte count for messages: `1 byte`, `0 bytes`, `4096 bytes`.
#[must_use]
pub fn bytes(n: u64) -> String {
    count(n, "byte", "bytes")
}

/// A count with its noun, singular for exactly one: `count(1, "tensor", "tensors")` is `1 tensor`.
#[must_use]
pub fn count(n: u64, singular: &str, plural: &str) -> String {
    if n == 1 {
        format!("{n} {singular}")
    } else {
        format!("{n} {plural}")
    }
}

/// Nanoseconds since the Unix epoch, saturating (0 before the epoch).
#[must_use]
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The time `ns` nanoseconds after the Unix epoch.
#[must_use]
pub fn from_unix_nanos(ns: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_nanos(ns))
        .unwrap_or(UNIX_EPOCH)
}

/// A byte range of a shard (`start..end`, in bytes from the start of the shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ByteRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end)
    }
}

/// Formats 16 bytes as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[must_use]
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    let part = |a: usize, b: usize| h.get(a..b).unwrap_or_default();
    format!(
        "{}-{}-{}-{}-{}",
        part(0, 8),
        part(8, 12),
        part(12, 16),
        part(16, 20),
        part(20, 32)
    )
}

/// An fs-verity SHA-256 file digest. Public data: comparable, hashable, printed as `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Wraps 32 raw bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits, without the `sha256:` prefix.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Digest {
    type Err = InvalidDigest;

    /// Parses `sha256:<64 hex digits>` (IV-004, IV-005). Upper-case hex is accepted and normalised.
    fn from_str(input: &str) -> Result<Self, InvalidDigest> {
        let invalid = |reason: &'static str| InvalidDigest {
            input: input.chars().take(80).collect(),
            reason,
        };
        if input.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let hex_part = input
            .strip_prefix("sha256:")
            .ok_or_else(|| invalid("missing the 'sha256:' prefix"))?;
        if hex_part.len() != 64 {
            return Err(invalid("the hash must be exactly 64 hex digits"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| invalid("the hash contains a character that is not a hex digit"))?;
        Ok(Self(bytes))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A digest string was refused (IV-004, IV-005). Converts into `VramError::InvalidDigest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidDigest {
    /// The offending input, truncated to 80 characters.
    pub input: String,
    /// Why.
    pub reason: &'static str,
}

impl fmt::Display for InvalidDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid digest {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for InvalidDigest {}

/// Unicode bidirectional controls: text that contains them can display as another string
/// ("Trojan Source", CVE-2021-42574). Caller strings that end up in records and logs refuse them.
#[must_use]
pub const fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}
