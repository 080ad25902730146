//! The worker token and the keys derived from it (CI-005, CI-006).
//!
//! The token is read from a file or an environment variable — never from the command line, where
//! every user of the machine can read it in `/proc/*/cmdline`. Separate 32-byte keys are derived
//! for each purpose with HKDF-SHA256 (RFC 5869), so a key that leaks from one use (an audit verifier,
//! say) cannot forge seals.
//!
//! Guarantees of the secret types here: no `Clone`, no `Serialize`, a hand-written `Debug` that prints
//! no byte of the secret (pinned by tests), and zeroised on drop.

use std::fmt;
use std::path::Path;

use hmac::{KeyInit as _, Mac as _};
use sha2::Sha256;
use zeroize::{Zeroize as _, ZeroizeOnDrop, Zeroizing};

use crate::error::{Result, VramError};

/// Shortest token accepted, in bytes. 32 random characters carry well over 128 bits.
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token accepted, in bytes (a guard against reading a wrong, huge file).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Environment variable the CLI and the service read the token from when no file is given.
pub const TOKEN_ENV: &str = "VRAM_RESIDENCY_TOKEN";

/// HKDF salt: fixed, public, versioned (RFC 5869 §3.1 allows a non-secret salt).
const HKDF_SALT: &[u8] = b"vram-residency/hkdf-salt/v1";

/// HMAC-SHA256 type used throughout.
pub(crate) type HmacSha256 = hmac::Hmac<Sha256>;

/// The worker's secret token, from which all keys are derived. Zeroised on drop.
#[derive(ZeroizeOnDrop)]
pub struct WorkerToken(Vec<u8>);

impl fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerToken { .. }")
    }
}

impl WorkerToken {
    /// Accepts a token given as bytes. One trailing newline (`\n` or `\r\n`) is removed, as files
    /// written by `echo` end with one.
    ///
    /// # Errors
    /// [`VramError::InvalidToken`] when the token is shorter than [`MIN_TOKEN_LEN`], longer than
    /// [`MAX_TOKEN_LEN`], contains a NUL byte or any whitespace or control character.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Result<Self> {
        for suffix in [&b"\r\n"[..], b"\n"] {
            if bytes.ends_with(suffix) {
                bytes.truncate(bytes.len().saturating_sub(suffix.len()));
                break;
            }
        }
        let refuse = |bytes: &mut Vec<u8>, reason: String| {
            bytes.zeroize();
            Err(VramError::InvalidToken { reason })
        };
        if bytes.len() < MIN_TOKEN_LEN {
            let reason = format!(
                "it is {} bytes long; at least {MIN_TOKEN_LEN} are required (generate one with `openssl rand -hex 32`)",
                bytes.len()
            );
            return refuse(&mut bytes, reason);
        }
        if bytes.len() > MAX_TOKEN_LEN {
            return refuse(
                &mut bytes,
                format!("it is longer than {MAX_TOKEN_LEN} bytes"),
            );
        }
        if bytes.contains(&0) {
            return refuse(&mut bytes, "it contains a NUL byte".to_owned());
        }
        if bytes
            .iter()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return refuse(
                &mut bytes,
                "it contains whitespace or a control character".to_owned(),
            );
        }
        Ok(Self(bytes))
    }

    /// Reads the token from a file.
    ///
    /// # Errors
    /// [`VramError::Io`] when the file cannot be read, [`VramError::InvalidToken`] when its content
    /// is not an acceptable token.
    pub fn from_file(path: &Path) -> Result<Self> {
        let metadata = std::fs::metadata(path).map_err(|source| VramError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !metadata.is_file() {
            return Err(VramError::InvalidToken {
                reason: format!("{} is not a regular file", path.display()),
            });
        }
        if metadata.len() > MAX_TOKEN_LEN.saturating_add(2) as u64 {
            return Err(VramError::InvalidToken {
                reason: format!("{} is larger than {MAX_TOKEN_LEN} bytes", path.display()),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| VramError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(bytes)
    }

    /// Reads the token from the environment variable `name` (normally [`TOKEN_ENV`]).
    ///
    /// # Errors
    /// [`VramError::InvalidToken`] when it is unset, not UTF-8, or not an acceptable token.
    pub fn from_env(name: &str) -> Result<Self> {
        let value = Zeroizing::new(std::env::var(name).map_err(|_| VramError::InvalidToken {
            reason: format!("environment variable {name} is not set (or not UTF-8)"),
        })?);
        Self::from_bytes(value.as_bytes().to_vec())
    }

    /// What the worker service needs to check a presented bearer token: the SHA-256 of this token.
    /// The service keeps only this (and the derived keys), never the token itself.
    #[must_use]
    pub fn bearer_check(&self) -> BearerCheck {
        BearerCheck(sha256(&self.0))
    }

    /// Derives the per-purpose keys (HKDF-SHA256, RFC 5869).
    #[must_use]
    pub fn derive_keys(&self) -> KeySet {
        let hkdf = hkdf::Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0);
        let expand = |info: &[u8]| {
            let mut out = [0u8; 32];
            // 32 bytes is far below HKDF's limit of 255 * 32, so expand cannot fail; if it ever did,
            // `out` would stay all-zero and every seal would fail to verify rather than pass.
            let _ = hkdf.expand(info, &mut out);
            out
        };
        KeySet {
            seal: SealKey(expand(b"vram-residency seal key v1")),
            audit: AuditKey(expand(b"vram-residency audit key v1")),
            attestation: AttestationKey(expand(b"vram-residency attestation key v1")),
        }
    }
}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// 32 bytes; zeroised on drop; no `Clone`, no `Serialize`; `Debug` prints no key material.
        #[derive(ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), " { .. }"))
            }
        }

        impl $name {
            /// HMAC-SHA256 of `message` under this key.
            #[must_use]
            pub fn sign(&self, message: &[u8]) -> Tag {
                Tag(hmac_sha256(&self.0, message))
            }

            /// Checks `tag` against `message` in constant time (CI-003).
            ///
            /// # Errors
            /// [`TagMismatch`], which carries nothing: never the expected tag.
            pub fn verify(&self, message: &[u8], tag: &Tag) -> Result<(), TagMismatch> {
                let mut mac = HmacSha256::new_from_slice(&self.0).map_err(|_| TagMismatch)?;
                mac.update(message);
                mac.verify_slice(&tag.0).map_err(|_| TagMismatch)
            }
        }
    };
}

secret_key!(
    /// Key that signs seal records.
    SealKey
);
secret_key!(
    /// Key that chains audit records.
    AuditKey
);
secret_key!(
    /// Key that signs attestations.
    AttestationKey
);

/// Reads a file that holds a secret (the worker token, API tokens): a regular file of at most
/// `max_len` bytes that neither group nor others can read or write (checked before reading).
///
/// # Errors
/// [`VramError::Io`] when it cannot be read; [`VramError::InvalidToken`] when it is not a regular
/// file, is too large, or is accessible to group or others (the message gives the fix:
/// `chmod 600 PATH`). The message never contains the file's content.
pub fn read_secret_file(path: &Path, max_len: usize) -> Result<Zeroizing<Vec<u8>>> {
    let io = |source| VramError::Io {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(VramError::InvalidToken {
            reason: format!("{} is not a regular file", path.display()),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(VramError::InvalidToken {
                reason: format!(
                    "{} is accessible to group or others (mode {mode:04o}); a secret file must be \
                     readable by its owner only: run `chmod 600 {}`",
                    path.display(),
                    path.display()
                ),
            });
        }
    }
    if metadata.len() > max_len as u64 {
        return Err(VramError::InvalidToken {
            reason: format!("{} is larger than {max_len} bytes", path.display()),
        });
    }
    std::fs::read(path).map(Zeroizing::new).map_err(io)
}

/// Checks a presented bearer token against the worker token without keeping the token.
///
/// Holds SHA-256 of the worker token. [`matches`](Self::matches) hashes the presented bytes and
/// compares the two 32-byte hashes in constant time (`subtle`), so neither the length nor the content
/// of the presented token steers the time the comparison takes. Zeroised on drop; `Debug` prints no
/// byte of the hash.
#[derive(ZeroizeOnDrop)]
pub struct BearerCheck([u8; 32]);

impl fmt::Debug for BearerCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerCheck { .. }")
    }
}

impl BearerCheck {
    /// Keeps SHA-256 of `secret` (an API token) to check presented tokens against.
    #[must_use]
    pub fn from_secret(secret: &[u8]) -> Self {
        Self(sha256(secret))
    }

    /// True when `presented` is the worker token (constant-time comparison of SHA-256 hashes).
    #[must_use]
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mut hash = sha256(presented);
        let equal = bool::from(subtle::ConstantTimeEq::ct_eq(&hash[..], &self.0[..]));
        hash.zeroize();
        equal
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    Sha256::digest(bytes).into()
}

/// The three purpose keys of a worker.
#[derive(Debug)]
pub struct KeySet {
    /// Seals.
    pub seal: SealKey,
    /// Audit chain.
    pub audit: AuditKey,
    /// Attestations.
    pub attestation: AttestationKey,
}

/// A public HMAC-SHA256 tag (the output of [`SealKey::sign`] and friends). Not secret: it travels
/// with the record it authenticates.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub [u8; 32]);

impl Tag {
    /// Lowercase hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.to_hex())
    }
}

/// The tag did not verify. Deliberately empty (STYLE.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagMismatch;

/// HMAC-SHA256 (RFC 2104 / FIPS 198-1).
#[must_use]
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail for HMAC-SHA256.
    match HmacSha256::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(message);
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0u8; 32],
    }
}

/// HKDF-SHA256 (RFC 5869) extract-then-expand into `okm`.
///
/// # Errors
/// [`VramError::InvalidInput`] when `okm` is longer than 255 × 32 bytes.
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], okm: &mut [u8]) -> Result<()> {
    hkdf::Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, okm)
        .map_err(|_| VramError::InvalidInput {
            field: "hkdf output length",
            reason: "longer than 255 * 32 bytes".to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> WorkerToken {
        WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
    }

    #[test]
    fn debug_of_secrets_is_pinned_and_leaks_nothing_ci_006() {
        let t = token();
        assert_eq!(format!("{t:?}"), "WorkerToken { .. }");
        let keys = t.derive_keys();
        assert_eq!(format!("{:?}", keys.seal), "SealKey { .. }");
        assert_eq!(format!("{:?}", keys.audit), "AuditKey { .. }");
        assert_eq!(format!("{:?}", keys.attestation), "AttestationKey { .. }");
        assert_eq!(
            format!("{keys:?}"),
            "KeySet { seal: SealKey { .. }, audit: AuditKey { .. }, attestation: AttestationKey { .. } }"
        );
    }

    #[test]
    fn bearer_check_accepts_only_the_token_and_leaks_nothing_ci_006() {
        let check = token().bearer_check();
        assert_eq!(format!("{check:?}"), "BearerCheck { .. }");
        assert!(check.matches(b"0123456789abcdef0123456789abcdef"));
        assert!(!check.matches(b"0123456789abcdef0123456789abcdeX"));
        assert!(!check.matches(b"0123456789abcdef0123456789abcdef\n"));
        assert!(!check.matches(b""));
    }

    #[test]
    fn purpose_keys_differ_so_one_cannot_forge_for_another() {
        let keys = token().derive_keys();
        let m = b"message";
        let seal = keys.seal.sign(m);
        assert_ne!(seal, keys.audit.sign(m));
        assert_ne!(seal, keys.attestation.sign(m));
        assert!(keys.audit.verify(m, &seal).is_err());
    }

    #[test]
    fn same_token_gives_same_keys_different_token_different_keys_ci_005() {
        let a = token().derive_keys().seal.sign(b"m");
        let b = token().derive_keys().seal.sign(b"m");
        let other = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdeX".to_vec())
            .unwrap()
            .derive_keys()
            .seal
            .sign(b"m");
        assert_eq!(a, b);
        assert_ne!(a, other);
    }

    #[test]
    fn short_nul_whitespace_tokens_are_refused_without_echoing_them() {
        for bad in [
            b"short".to_vec(),
            b"0123456789abcdef0123456789abcde\0".to_vec(),
            b"0123456789abcdef 0123456789abcdef".to_vec(),
            vec![b'a'; MAX_TOKEN_LEN + 1],
        ] {
            let err = WorkerToken::from_bytes(bad.clone()).unwrap_err();
            assert!(matches!(err, VramError::InvalidToken { .. }));
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("0123456789abcdef"), "{shown}");
        }
    }

    #[test]
    fn one_trailing_newline_is_stripped() {
        let a = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdef\n".to_vec()).unwrap();
        assert_eq!(
            a.derive_keys().seal.sign(b"m"),
            token().derive_keys().seal.sign(b"m")
        );
    }

    #[test]
    fn tag_verification_rejects_every_single_bit_flip_ci_003() {
        let keys = token().derive_keys();
        let tag = keys.seal.sign(b"record");
        assert!(keys.seal.verify(b"record", &tag).is_ok());
        for bit in 0..256 {
            let mut bad = tag;
            bad.0[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(keys.seal.verify(b"record", &bad), Err(TagMismatch));
        }
    }
}
