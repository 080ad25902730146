//! The canonical binary encoding of the records this crate authenticates (seal records, audit
//! records): one rule set, written by hand, never re-serialised JSON, so that the bytes under a MAC
//! or a signature have exactly one form.
//!
//! Rules:
//!
//! - every encoding starts with its **domain tag**, `vram-residency/<record>/v<N>`, as a string (below),
//!   then its version as a `u16`, so a tag or signature made for one kind of record can never pass as
//!   another;
//! - integers are big-endian and fixed-width (`u8`, `u16`, `u32`, `u64`);
//! - fixed-size values (digests, UUIDs, hashes) are written as they are, with no prefix;
//! - variable-length values (strings, byte strings) are a `u32` length, then the bytes; strings are
//!   UTF-8;
//! - a decoder reads the fields in order and refuses a short input, trailing bytes, a wrong domain tag
//!   or version, and invalid UTF-8.
//!
//! This module is ground level: it uses nothing else of the crate; its [`EncodingError`] converts into
//! `VramError` (`InvalidInput` when encoding, `MalformedRecord` when decoding).

/// An encoding or decoding failure. Converts into `VramError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodingError {
    /// A value does not fit its length prefix (4 GiB or longer).
    TooLong {
        /// Which field.
        field: &'static str,
    },
    /// The bytes are not a valid encoding of `what`.
    Malformed {
        /// Which record.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for EncodingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLong { field } => write!(f, "{field} is longer than 4 GiB"),
            Self::Malformed { what, reason } => write!(f, "malformed {what}: {reason}"),
        }
    }
}

impl std::error::Error for EncodingError {}

type Result<T, E = EncodingError> = std::result::Result<T, E>;

/// Exactly `2 * N` lowercase hex digits → `N` bytes; anything else (upper case, other length) is
/// `None`. The one spelling of fixed-size hashes in our text formats (audit lines, heads).
pub(crate) fn lower_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != N.saturating_mul(2)
        || !text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// Writes one canonical encoding.
#[derive(Debug)]
pub(crate) struct Encoder {
    out: Vec<u8>,
}

impl Encoder {
    /// Starts an encoding with its domain tag and version.
    pub(crate) fn new(domain: &str, version: u16) -> Self {
        let mut encoder = Self {
            out: Vec::with_capacity(256),
        };
        // Domain tags are short constants; their length always fits.
        encoder.put_len(domain.len());
        encoder.out.extend_from_slice(domain.as_bytes());
        encoder.u16(version);
        encoder
    }

    pub(crate) fn u8(&mut self, value: u8) -> &mut Self {
        self.out.push(value);
        self
    }

    pub(crate) fn u16(&mut self, value: u16) -> &mut Self {
        self.out.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u32(&mut self, value: u32) -> &mut Self {
        self.out.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.out.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A fixed-size value, no prefix.
    pub(crate) fn fixed(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }

    /// A variable-length byte string: `u32` length, then the bytes.
    ///
    /// # Errors
    /// [`EncodingError::TooLong`] naming `field` when it is 4 GiB or longer.
    pub(crate) fn bytes(&mut self, bytes: &[u8], field: &'static str) -> Result<&mut Self> {
        if u32::try_from(bytes.len()).is_err() {
            return Err(EncodingError::TooLong { field });
        }
        self.put_len(bytes.len());
        self.out.extend_from_slice(bytes);
        Ok(self)
    }

    /// A UTF-8 string: `u32` length, then the bytes.
    ///
    /// # Errors
    /// As [`bytes`](Self::bytes).
    pub(crate) fn str(&mut self, text: &str, field: &'static str) -> Result<&mut Self> {
        self.bytes(text.as_bytes(), field)
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.out
    }

    fn put_len(&mut self, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.out.extend_from_slice(&len.to_be_bytes());
    }
}

/// Reads one canonical encoding, strictly.
#[derive(Debug)]
pub(crate) struct Decoder<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Decoder<'a> {
    /// Starts decoding `bytes`, which must begin with `domain` and `version`.
    ///
    /// # Errors
    /// [`EncodingError::Malformed`] naming `what`.
    pub(crate) fn new(
        bytes: &'a [u8],
        what: &'static str,
        domain: &str,
        version: u16,
    ) -> Result<Self> {
        let mut decoder = Self { bytes, at: 0, what };
        let found = decoder.bytes_field()?;
        if found != domain.as_bytes() {
            return Err(decoder.malformed(&format!("wrong domain tag: not a {domain} encoding")));
        }
        let found_version = decoder.u16()?;
        if found_version != version {
            return Err(decoder.malformed(&format!("unsupported version {found_version}")));
        }
        Ok(decoder)
    }

    pub(crate) fn malformed(&self, reason: &str) -> EncodingError {
        EncodingError::Malformed {
            what: self.what,
            reason: reason.to_owned(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.malformed("truncated"))?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| self.malformed("truncated"))?;
        self.at = end;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    pub(crate) fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A variable-length byte string.
    pub(crate) fn bytes_field(&mut self) -> Result<&'a [u8]> {
        let len = usize::try_from(self.u32()?).map_err(|_| self.malformed("length too large"))?;
        self.take(len)
    }

    /// A UTF-8 string.
    pub(crate) fn str(&mut self) -> Result<&'a str> {
        let bytes = self.bytes_field()?;
        std::str::from_utf8(bytes).map_err(|_| self.malformed("a string is not UTF-8"))
    }

    /// Ends decoding: no byte may be left.
    ///
    /// # Errors
    /// [`EncodingError::Malformed`] for trailing bytes.
    pub(crate) fn finish(self) -> Result<()> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after the record"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        let mut e = Encoder::new("vram-residency/test/v1", 1);
        e.u8(7).u16(8).u32(9).u64(10).fixed(&[1, 2, 3]);
        e.str("hé", "s").unwrap();
        let bytes = e.finish();
        assert_eq!(&bytes[..4], &22u32.to_be_bytes());
        assert_eq!(&bytes[4..26], b"vram-residency/test/v1");
        let mut d = Decoder::new(&bytes, "test", "vram-residency/test/v1", 1).unwrap();
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u16().unwrap(), 8);
        assert_eq!(d.u32().unwrap(), 9);
        assert_eq!(d.u64().unwrap(), 10);
        assert_eq!(d.array::<3>().unwrap(), [1, 2, 3]);
        assert_eq!(d.str().unwrap(), "hé");
        d.finish().unwrap();
        // Every truncation fails, a trailing byte fails, another domain or version fails.
        for cut in 0..bytes.len() {
            let r = Decoder::new(&bytes[..cut], "test", "vram-residency/test/v1", 1).and_then(
                |mut d| {
                    d.u8()?;
                    d.u16()?;
                    d.u32()?;
                    d.u64()?;
                    d.array::<3>()?;
                    d.str()?;
                    d.finish()
                },
            );
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        let mut d = Decoder::new(&long, "test", "vram-residency/test/v1", 1).unwrap();
        d.u8().unwrap();
        d.u16().unwrap();
        d.u32().unwrap();
        d.u64().unwrap();
        d.array::<3>().unwrap();
        d.str().unwrap();
        assert!(d.finish().is_err());
        assert!(Decoder::new(&bytes, "test", "vram-residency/test/v2", 1).is_err());
        assert!(Decoder::new(&bytes, "test", "vram-residency/test/v1", 2).is_err());
    }
}
