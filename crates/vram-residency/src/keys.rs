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
                "it is {} long; at least {MIN_TOKEN_LEN} are required (generate one with `openssl rand -hex 32`)",
                crate::ids::bytes(u64::try_from(bytes.len()).unwrap_or(u64::MAX))
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

    /// Reads the token from a file. The file must be a regular file that only its owner can read
    /// (mode 0600 or stricter, as ssh requires of private keys).
    ///
    /// # Errors
    /// [`VramError::Io`] when the file cannot be read, [`VramError::InvalidToken`] when it is readable
    /// by group or others (the message gives the `chmod 600` command) or its content is not an
    /// acceptable token.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = read_secret_file(path, MAX_TOKEN_LEN.saturating_add(2))?;
        Self::from_bytes(bytes.to_vec())
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

    /// What the worker service needs to *recognise* this token when a client presents it, so that
    /// it can refuse it (the worker token is never an HTTP credential) and audit the attempt: the
    /// SHA-256 of this token. The service keeps only this (and the derived keys), never the token.
    #[must_use]
    pub fn bearer_check(&self) -> BearerCheck {
        BearerCheck(sha256(&self.0))
    }

    /// Derives the worker's keys (HKDF-SHA256, RFC 5869; CI-005): the HMAC seal key and the Ed25519
    /// identity seed, each under its own `info`.
    pub(crate) fn derive_keys(&self) -> KeySet {
        let hkdf = hkdf::Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0);
        let expand = |info: &[u8]| {
            let mut out = Zeroizing::new([0u8; 32]);
            // 32 bytes is far below HKDF's limit of 255 * 32, so expand cannot fail; if it ever did,
            // `out` would stay all-zero and every seal would fail to verify rather than pass.
            let _ = hkdf.expand(info, &mut out[..]);
            out
        };
        let seal = expand(b"vram-residency seal key v1");
        let seed = expand(b"vram-residency ed25519 identity v1");
        KeySet {
            seal: SealKey(*seal),
            identity: WorkerIdentity::from_seed(&seed),
        }
    }

    /// The worker's public Ed25519 key (what `vram-residency identity` prints).
    #[must_use]
    pub fn public_key(&self) -> PublicKey {
        self.derive_keys().identity.public_key().clone()
    }
}

/// Key that signs seal records (HMAC-SHA256). Crate-private: no code outside this crate can make a
/// seal tag.
///
/// 32 bytes; zeroised on drop; no `Clone`, no `Serialize`; `Debug` prints no key material.
#[derive(ZeroizeOnDrop)]
pub(crate) struct SealKey([u8; 32]);

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey { .. }")
    }
}

impl SealKey {
    /// HMAC-SHA256 of `message` under this key.
    pub(crate) fn sign(&self, message: &[u8]) -> Tag {
        Tag(hmac_sha256(&self.0, message))
    }

    /// Checks `tag` against `message` in constant time (CI-003).
    ///
    /// # Errors
    /// [`TagMismatch`], which carries nothing: never the expected tag.
    pub(crate) fn verify(&self, message: &[u8], tag: &Tag) -> Result<(), TagMismatch> {
        let mut mac = HmacSha256::new_from_slice(&self.0).map_err(|_| TagMismatch)?;
        mac.update(message);
        mac.verify_slice(&tag.0).map_err(|_| TagMismatch)
    }
}

/// The worker's Ed25519 signing key, derived from the worker token with HKDF (CI-005). It signs
/// attestations (as DSSE envelopes) and audit records; anyone with the [`PublicKey`] can check them.
///
/// Crate-private, and it offers no "sign these bytes": only [`sign_dsse`](Self::sign_dsse) (a DSSE
/// envelope's pre-authentication encoding, which starts with `DSSEv1`) and
/// [`sign_audit_record`](Self::sign_audit_record) (an audit record's canonical bytes, which start with
/// the audit domain tag). No `Clone`, no `Serialize`, `Debug` prints only the public key id; the
/// secret scalar is zeroised on drop (ed25519-dalek's `ZeroizeOnDrop`).
pub(crate) struct WorkerIdentity {
    signing: ed25519_dalek::SigningKey,
    public: PublicKey,
}

impl fmt::Debug for WorkerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WorkerIdentity {{ key_id: {}, .. }}",
            self.public.key_id()
        )
    }
}

impl WorkerIdentity {
    fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = ed25519_dalek::SigningKey::from_bytes(seed);
        let public = PublicKey(signing.verifying_key());
        Self { signing, public }
    }

    /// The public half.
    pub(crate) const fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs a DSSE envelope: Ed25519 over `PAE(payload_type, payload)` (DSSE v1).
    pub(crate) fn sign_dsse(&self, payload_type: &str, payload: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.signing
            .sign(&dsse_pae(payload_type, payload))
            .to_bytes()
    }

    /// Signs an audit record's canonical bytes ([`crate::audit_log`]); `record` must start with the
    /// audit record's domain tag, so it can never be mistaken for a DSSE encoding.
    pub(crate) fn sign_audit_record(&self, record: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.signing.sign(record).to_bytes()
    }
}

/// The DSSE v1 pre-authentication encoding: `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`,
/// lengths as ASCII decimal (<https://github.com/secure-systems-lab/dsse/blob/master/protocol.md>).
#[must_use]
pub fn dsse_pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        payload
            .len()
            .saturating_add(payload_type.len())
            .saturating_add(32),
    );
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// A worker's public Ed25519 key: what a verifier holds. Public data (`Clone`, `Eq`, `Debug`).
///
/// Published as PEM (`SubjectPublicKeyInfo`, RFC 8410, what `openssl pkey -pubin` reads) and named
/// by its [`key_id`](Self::key_id). Verification is strict (`verify_strict`: no small-order keys, no
/// malleable signatures).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

/// A signature did not verify. Deliberately empty (STYLE.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureMismatch;

impl PublicKey {
    /// The 32 raw key bytes (RFC 8032).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// From the 32 raw key bytes.
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when the bytes are not a valid Ed25519 point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| VramError::InvalidInput {
                field: "public key",
                reason: "not a valid Ed25519 public key".to_owned(),
            })
    }

    /// The `SubjectPublicKeyInfo` DER encoding (RFC 8410): 12 fixed bytes, then the key.
    #[must_use]
    pub fn to_der(&self) -> Vec<u8> {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.to_bytes());
        der
    }

    /// PEM (`-----BEGIN PUBLIC KEY-----`), as `openssl pkey -pubout` writes it.
    #[must_use]
    pub fn to_pem(&self) -> String {
        use ed25519_dalek::pkcs8::EncodePublicKey as _;
        use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
        self.0.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// Reads a PEM public key (`-----BEGIN PUBLIC KEY-----`, Ed25519).
    ///
    /// # Errors
    /// [`VramError::InvalidInput`] when the text is not a PEM Ed25519 public key.
    pub fn from_pem(text: &str) -> Result<Self> {
        use ed25519_dalek::pkcs8::DecodePublicKey as _;
        ed25519_dalek::VerifyingKey::from_public_key_pem(text.trim())
            .map(Self)
            .map_err(|e| VramError::InvalidInput {
                field: "public key",
                reason: format!("not a PEM Ed25519 public key (-----BEGIN PUBLIC KEY-----): {e}"),
            })
    }

    /// Short fingerprint used as the DSSE `keyid` and in audit records:
    /// `ed25519:` + the first 16 bytes of SHA-256 of the key's DER encoding, lowercase hex.
    #[must_use]
    pub fn key_id(&self) -> String {
        let hash = sha256(&self.to_der());
        format!(
            "ed25519:{}",
            hex::encode(hash.get(..16).unwrap_or_default())
        )
    }

    /// Checks an Ed25519 signature over a DSSE pre-authentication encoding (strict verification).
    ///
    /// # Errors
    /// [`SignatureMismatch`], which carries nothing.
    pub fn verify_dsse(
        &self,
        payload_type: &str,
        payload: &[u8],
        signature: &[u8; 64],
    ) -> Result<(), SignatureMismatch> {
        self.verify_raw(&dsse_pae(payload_type, payload), signature)
    }

    /// Checks an Ed25519 signature over an audit record's canonical bytes (strict verification).
    ///
    /// # Errors
    /// [`SignatureMismatch`], which carries nothing.
    pub(crate) fn verify_audit_record(
        &self,
        record: &[u8],
        signature: &[u8; 64],
    ) -> Result<(), SignatureMismatch> {
        self.verify_raw(record, signature)
    }

    fn verify_raw(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), SignatureMismatch> {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0
            .verify_strict(message, &signature)
            .map_err(|_| SignatureMismatch)
    }
}

/// The fixed DER prefix of an Ed25519 `SubjectPublicKeyInfo` (RFC 8410 §4): SEQUENCE, AlgorithmIdentifier
/// (OID 1.3.101.112), BIT STRING of 33 bytes (a zero "unused bits" byte, then the key).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Reads a file that holds a secret (the worker token, API tokens): a regular file of at most
/// `max_len` bytes that neither group nor others can read or write (checked before reading).
///
/// # Errors
/// [`VramError::Io`] when it cannot be read; [`VramError::InvalidToken`] when it is not a regular
/// file, is too large, or is accessible to group or others (the message gives the fix:
/// `chmod 600 PATH`). The message never contains the file's content.
pub fn read_secret_file(path: &Path, max_len: usize) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Read as _;
    let io = |source| VramError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Open first, then check what was opened (fstat), so a swap between the check and the read
    // cannot slip another file in.
    let file = std::fs::File::open(path).map_err(io)?;
    let metadata = file.metadata().map_err(io)?;
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
    let mut bytes = Zeroizing::new(Vec::with_capacity(
        usize::try_from(metadata.len()).unwrap_or(0),
    ));
    // Bounded even if the file grows after the fstat.
    file.take((max_len as u64).saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() > max_len {
        return Err(VramError::InvalidToken {
            reason: format!("{} is larger than {max_len} bytes", path.display()),
        });
    }
    Ok(bytes)
}

/// Checks a presented bearer token against a secret without keeping the secret.
///
/// Holds SHA-256 of the secret. [`matches`](Self::matches) hashes the presented bytes and
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

    /// True when `presented` is the secret (constant-time comparison of SHA-256 hashes).
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

/// A worker's keys: the HMAC seal key and the Ed25519 identity. Crate-private.
#[derive(Debug)]
pub(crate) struct KeySet {
    /// Seals (HMAC-SHA256).
    pub(crate) seal: SealKey,
    /// Attestations and audit records (Ed25519).
    pub(crate) identity: WorkerIdentity,
}

/// A seal tag: HMAC-SHA256 over a seal record. Public (it travels with the record it authenticates)
/// but opaque: no public field, no `==` (a tag is only ever checked in constant time, by the worker
/// that holds the seal key). Built from bytes only to be *checked*: a tag that travelled between
/// processes of one worker ([`Tag::from_public_bytes`]) is worth nothing until the worker verifies it.
#[derive(Clone, Copy)]
pub struct Tag([u8; 32]);

impl Tag {
    /// Lowercase hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From its bytes (decoders of this crate only).
    pub(crate) const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A tag received from elsewhere (another process of this worker handing over a shard's seal
    /// record and tag, [`VramManager::seal_model_records`](crate::VramManager::seal_model_records)),
    /// to be checked by the worker; it proves nothing by itself.
    #[must_use]
    pub const fn from_public_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Its bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
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
        let id = keys.identity.public_key().key_id();
        assert_eq!(
            format!("{:?}", keys.identity),
            format!("WorkerIdentity {{ key_id: {id}, .. }}")
        );
        assert_eq!(
            format!("{keys:?}"),
            format!(
                "KeySet {{ seal: SealKey {{ .. }}, identity: WorkerIdentity {{ key_id: {id}, .. }} }}"
            )
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
        let api = BearerCheck::from_secret(b"another-secret-0123456789abcdef012");
        assert!(api.matches(b"another-secret-0123456789abcdef012"));
        assert!(!api.matches(b"0123456789abcdef0123456789abcdef"));
    }

    #[test]
    fn same_token_gives_same_keys_different_token_different_keys_ci_005() {
        let a = token().derive_keys().seal.sign(b"m");
        let b = token().derive_keys().seal.sign(b"m");
        let other_token =
            WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdeX".to_vec()).unwrap();
        let other = other_token.derive_keys().seal.sign(b"m");
        assert_eq!(a.to_hex(), b.to_hex());
        assert_ne!(a.to_hex(), other.to_hex());
        assert_eq!(token().public_key(), token().public_key());
        assert_ne!(token().public_key(), other_token.public_key());
    }

    #[test]
    fn the_ed25519_identity_signs_dsse_and_only_its_public_key_verifies() {
        let keys = token().derive_keys();
        let public = keys.identity.public_key().clone();
        let sig = keys
            .identity
            .sign_dsse("application/vnd.in-toto+json", b"{}");
        assert!(
            public
                .verify_dsse("application/vnd.in-toto+json", b"{}", &sig)
                .is_ok()
        );
        assert!(
            public
                .verify_dsse("application/vnd.in-toto+json", b"{ }", &sig)
                .is_err()
        );
        assert!(public.verify_dsse("text/plain", b"{}", &sig).is_err());
        let other = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdeX".to_vec())
            .unwrap()
            .public_key();
        assert!(
            other
                .verify_dsse("application/vnd.in-toto+json", b"{}", &sig)
                .is_err()
        );
        // An audit-record signature over the same bytes is not a DSSE signature (different input).
        let audit_sig = keys.identity.sign_audit_record(b"{}");
        assert!(
            public
                .verify_dsse("application/vnd.in-toto+json", b"{}", &audit_sig)
                .is_err()
        );
    }

    #[test]
    fn dsse_pae_matches_the_spec_example() {
        // The DSSE protocol document's example: PAE("http://example.com/HelloWorld", "hello world").
        assert_eq!(
            dsse_pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn the_public_key_round_trips_through_pem_and_der_is_rfc_8410() {
        let public = token().public_key();
        let pem = public.to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        assert_eq!(PublicKey::from_pem(&pem).unwrap(), public);
        let der = public.to_der();
        assert_eq!(der.len(), 44);
        assert_eq!(&der[12..], &public.to_bytes());
        assert!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
                .is_err()
        );
        let id = public.key_id();
        assert!(id.starts_with("ed25519:") && id.len() == 8 + 32, "{id}");
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
    fn a_token_file_readable_by_group_or_others_is_refused_with_the_chmod_command_ci_006() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"0123456789abcdef0123456789abcdef\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = WorkerToken::from_file(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            assert!(!err.contains("0123456789abcdef"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            WorkerToken::from_file(&path).unwrap().public_key(),
            token().public_key()
        );
    }

    #[test]
    fn one_trailing_newline_is_stripped() {
        let a = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdef\n".to_vec()).unwrap();
        assert_eq!(
            a.derive_keys().seal.sign(b"m").to_hex(),
            token().derive_keys().seal.sign(b"m").to_hex()
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
