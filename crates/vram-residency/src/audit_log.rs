//! The durable audit log: append-only JSON lines, hash-chained and each one signed with the worker's
//! Ed25519 key, so that **anyone with the worker's public key** can check it — no secret needed.
//!
//! One line per [`AuditEntry`], written by one process at a time:
//!
//! ```text
//! {"seq":<n>,"prev":"<64 hex>","entry":<entry JSON>,"sig":"<128 hex>"}\n
//! ```
//!
//! The signed bytes of a record ([`record_input`]) are its canonical encoding
//! ([`crate::encoding`]): the domain tag `vram-residency/audit-record/v2`, the version, `seq`, the
//! previous record's hash and the exact bytes of `<entry JSON>` as they stand in the line (never
//! re-serialised). `sig` is Ed25519 over those bytes; the record's **hash** is SHA-256 of them, and
//! the next record's `prev` is that hash (the first record's is 32 zero bytes). Records are numbered
//! from 1. So a record cannot be changed, removed, reordered or inserted without the worker's key,
//! and records cut off the front are detected.
//!
//! **Every record is signed** (not periodic checkpoints): an Ed25519 signature costs tens of
//! microseconds against the millisecond of the `fdatasync` that makes it durable, so signing each
//! record costs nothing measurable, and a crash leaves **zero** unsigned records.
//!
//! **The head** — the last record's `seq` and hash ([`AuditHead`]) — is published by the worker
//! (`GET /v1/worker`, every attestation). A verifier that holds a head checks the log against it
//! ([`verify_log`] with `expect_head`): a log cut at a record boundary after that head, or rewritten
//! from it on, is detected. Without a head, records cut off the *end* cannot be detected from the file
//! alone (no chain can tell its last link was the last one); the verifier says whether the log ends
//! with a clean shutdown (`service_stopped`).
//!
//! The writer ([`AuditLog`]) creates a new log atomically with its first record (`audit_log_created`,
//! naming the key id), so a log file is never empty; it refuses to append to an existing file with no
//! valid record (empty, or not an audit log). It opens the file with `O_APPEND`, holds an exclusive
//! lock on it for its lifetime, and uses **group commit**: records of concurrent callers are encoded
//! and signed in `seq` order under one lock, then written and `fdatasync`ed together by one of them;
//! each caller returns only once its own record is durable, so the operation a record describes still
//! happens only after the record is on disk. Nothing is ever rewritten or truncated, so the file can
//! carry the append-only inode flag (`chattr +a`).
//!
//! A crash in the middle of a write leaves a **torn last line**: bytes after the last newline. When the
//! writer reopens such a log it verifies everything before it, then appends a newline (ending the torn
//! line) and, in the same `write`, an [`AuditEvent::AuditLogRecovered`] record that continues the chain
//! from the last good record and declares the cut bytes (offset, length, SHA-256). Both the recovery
//! record and the verifier say plainly that bytes were cut and how many: a torn line is what a crash
//! leaves, but also what a deliberate cut in the middle of a record leaves. The verifier accepts an
//! invalid line only when the record right after it declares exactly those bytes; any other invalid
//! line is tampering. `docs/audit-log.md` has the format and a worked example that a test recomputes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::audit::{AuditEntry, AuditEvent, AuditHead, AuditSink};
use crate::backend::BackendKind;
use crate::encoding::{Encoder, lower_hex};
use crate::error::{Result, VramError};
use crate::ids::unix_nanos;
use crate::keys::{PublicKey, WorkerIdentity, WorkerToken};

/// Domain-separation tag at the start of every record's signed bytes.
pub const AUDIT_DOMAIN: &str = "vram-residency/audit-record/v2";
/// Version of the record encoding and of the line layout.
pub const AUDIT_VERSION: u16 = 2;
/// Longest line accepted (records are a few hundred bytes).
pub const MAX_LINE_LEN: usize = 64 * 1024;
/// `prev` of the first record.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

const PREFIX_SEQ: &[u8] = b"{\"seq\":";
const PREFIX_PREV: &[u8] = b",\"prev\":\"";
const PREFIX_ENTRY: &[u8] = b"\",\"entry\":";
const PREFIX_SIG: &[u8] = b",\"sig\":\"";
const SUFFIX: &[u8] = b"\"}";

/// The bytes a record's signature and hash are computed over (the canonical encoding, see
/// [`crate::encoding`]):
///
/// ```text
/// u32+n   domain                  "vram-residency/audit-record/v2"
/// u16     version                 2
/// u64     seq
/// [32]    prev                    the previous record's hash (zeros for the first record)
/// u32+n   entry                   the entry's JSON text, exactly as written in the line
/// ```
///
/// # Errors
/// [`VramError::InvalidInput`] when the entry is 4 GiB or longer.
pub fn record_input(seq: u64, prev: &[u8; 32], entry_json: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = Encoder::new(AUDIT_DOMAIN, AUDIT_VERSION);
    encoder.u64(seq).fixed(prev);
    encoder.bytes(entry_json, "audit entry")?;
    Ok(encoder.finish())
}

/// A record's hash: SHA-256 of its [`record_input`].
#[must_use]
pub fn record_hash(input: &[u8]) -> [u8; 32] {
    Sha256::digest(input).into()
}

/// One complete line (with its final newline) for a record, and the record's hash.
fn encode_line(
    identity: &WorkerIdentity,
    seq: u64,
    prev: &[u8; 32],
    entry_json: &[u8],
) -> Result<(Vec<u8>, [u8; 32])> {
    let input = record_input(seq, prev, entry_json)?;
    let sig = identity.sign_audit_record(&input);
    let mut line = Vec::with_capacity(entry_json.len().saturating_add(300));
    line.extend_from_slice(PREFIX_SEQ);
    line.extend_from_slice(seq.to_string().as_bytes());
    line.extend_from_slice(PREFIX_PREV);
    line.extend_from_slice(hex::encode(prev).as_bytes());
    line.extend_from_slice(PREFIX_ENTRY);
    line.extend_from_slice(entry_json);
    line.extend_from_slice(PREFIX_SIG);
    line.extend_from_slice(hex::encode(sig).as_bytes());
    line.extend_from_slice(SUFFIX);
    line.push(b'\n');
    Ok((line, record_hash(&input)))
}

/// [`encode_line`] for the documentation's worked example (tests only).
#[cfg(test)]
pub(crate) fn encode_line_for_docs(
    identity: &WorkerIdentity,
    seq: u64,
    prev: &[u8; 32],
    entry_json: &[u8],
) -> (Vec<u8>, [u8; 32]) {
    encode_line(identity, seq, prev, entry_json).unwrap_or_default()
}

/// A record line split into its parts (not yet authenticated).
#[derive(Debug)]
struct ParsedLine<'a> {
    seq: u64,
    prev: [u8; 32],
    entry: &'a [u8],
    sig: [u8; 64],
}

/// Splits a line (without its newline) by the fixed layout. Strict: canonical decimal `seq`, lowercase
/// hex, an entry that is a JSON object, nothing before or after.
fn parse_line(line: &[u8]) -> std::result::Result<ParsedLine<'_>, String> {
    let rest = line
        .strip_prefix(PREFIX_SEQ)
        .ok_or("not a record line (it does not start with {\"seq\":)")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (seq_text, rest) = rest.split_at(digits);
    if seq_text.is_empty()
        || seq_text.len() > 20
        || (seq_text.len() > 1 && seq_text.starts_with(b"0"))
    {
        return Err("seq is not a canonical decimal number".to_owned());
    }
    let seq: u64 = std::str::from_utf8(seq_text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("seq is out of range")?;
    let rest = rest
        .strip_prefix(PREFIX_PREV)
        .ok_or("prev is missing or misplaced")?;
    let (prev_hex, rest) = split_checked(rest, 64).ok_or("prev is truncated")?;
    let prev = lower_hex::<32>(prev_hex).ok_or("prev is not 64 lowercase hex digits")?;
    let rest = rest
        .strip_prefix(PREFIX_ENTRY)
        .ok_or("entry is missing or misplaced")?;
    let tail_len = PREFIX_SIG
        .len()
        .saturating_add(128)
        .saturating_add(SUFFIX.len());
    let entry_len = rest
        .len()
        .checked_sub(tail_len)
        .ok_or("the line is truncated (no signature)")?;
    let (entry, tail) = rest.split_at(entry_len);
    let sig_hex = tail
        .strip_prefix(PREFIX_SIG)
        .and_then(|t| t.strip_suffix(SUFFIX))
        .ok_or("sig is missing or misplaced")?;
    let sig = lower_hex::<64>(sig_hex).ok_or("sig is not 128 lowercase hex digits")?;
    match serde_json::from_slice::<serde_json::Value>(entry) {
        Ok(serde_json::Value::Object(_)) => {}
        _ => return Err("entry is not a JSON object".to_owned()),
    }
    Ok(ParsedLine {
        seq,
        prev,
        entry,
        sig,
    })
}

fn split_checked(bytes: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= at).then(|| bytes.split_at(at))
}

/// A line skipped by a recovery record (a torn line, ended by the writer that reopened the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset where it starts.
    pub offset: u64,
    /// Its length in bytes, without the newline that ends it: the bytes that were cut.
    pub bytes: u64,
    /// `seq` of the recovery record that declares it.
    pub declared_by: u64,
}

/// A torn last line: bytes after the last newline, left by a crash in the middle of a write (or by a
/// cut inside a record). Never a record; every record before it is unaffected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset where it starts.
    pub offset: u64,
    /// Its length in bytes.
    pub bytes: u64,
    /// SHA-256 of its bytes.
    pub sha256: [u8; 32],
}

/// The first record that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset where the line starts.
    pub offset: u64,
    /// Why it is bad.
    pub reason: String,
}

/// What verifying a log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLogReport {
    /// Records that verified (before the first problem, if any).
    pub records: u64,
    /// The last verified record (`seq` 0 and zero hash when none).
    pub head: AuditHead,
    /// Event name of the last verified record (`service_stopped` when the log ends with a clean
    /// shutdown of the worker service).
    pub last_event: Option<String>,
    /// Torn lines that recovery records declared skipped.
    pub recovered: Vec<SkippedLine>,
    /// A torn last line, if there is one.
    pub torn_tail: Option<TornTail>,
    /// The first bad record, if any: tampering, another key, damage, no record at all, or a log that
    /// ends before (or disagrees with) the expected head.
    pub bad: Option<BadRecord>,
}

impl AuditLogReport {
    /// True when no record failed and (if one was given) the expected head is in the log. A torn last
    /// line is not a failure.
    #[must_use]
    pub const fn is_intact(&self) -> bool {
        self.bad.is_none()
    }

    /// True when the last record is the worker service's `service_stopped`.
    #[must_use]
    pub fn ends_with_clean_shutdown(&self) -> bool {
        self.torn_tail.is_none() && self.last_event.as_deref() == Some("service_stopped")
    }
}

/// Verifies a whole log from the start with the worker's **public** key: layout, sequence, chain and
/// signature of every record, recovery records against the spans they declare, and a torn last line.
/// With `expect_head` (a head the verifier obtained earlier, from `GET /v1/worker` or an
/// attestation), the record at that `seq` must be in the log with that hash: a log cut at a record
/// boundary after it, or rewritten, fails. A file with no valid record (empty, or not an audit log)
/// fails.
///
/// # Errors
/// [`VramError::Io`] when reading fails. A log that does not verify is not an error: see
/// [`AuditLogReport::bad`].
pub fn verify_log(
    reader: &mut dyn BufRead,
    key: &PublicKey,
    expect_head: Option<AuditHead>,
) -> Result<AuditLogReport> {
    let mut report = AuditLogReport {
        records: 0,
        head: AuditHead {
            seq: 0,
            hash: GENESIS_HASH,
        },
        last_event: None,
        recovered: Vec::new(),
        torn_tail: None,
        bad: None,
    };
    // An invalid complete line, waiting for the recovery record that must follow it.
    let mut pending: Option<Pending> = None;
    let mut offset: u64 = 0;
    let mut line_no: u64 = 0;
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        let limit = u64::try_from(MAX_LINE_LEN.saturating_add(1)).unwrap_or(u64::MAX);
        let n = (&mut *reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|source| VramError::Io {
                path: PathBuf::from("<audit log>"),
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no = line_no.saturating_add(1);
        let start = offset;
        offset = offset.saturating_add(n as u64);
        let Some(line) = buf.strip_suffix(b"\n") else {
            if buf.len() > MAX_LINE_LEN {
                report.bad = Some(BadRecord {
                    line: line_no,
                    offset: start,
                    reason: format!("the line is longer than {MAX_LINE_LEN} bytes"),
                });
                return Ok(report);
            }
            // Bytes after the last newline: a write cut short by a crash (or a cut inside a record).
            if let Some(pending) = pending {
                report.bad = Some(pending.unrecovered());
                return Ok(report);
            }
            report.torn_tail = Some(TornTail {
                line: line_no,
                offset: start,
                bytes: n as u64,
                sha256: Sha256::digest(&buf).into(),
            });
            break;
        };
        let parsed = match parse_line(line) {
            Ok(parsed) => parsed,
            Err(reason) => {
                if let Some(pending) = pending {
                    report.bad = Some(pending.unrecovered());
                    return Ok(report);
                }
                pending = Some(Pending {
                    line: line_no,
                    offset: start,
                    bytes: line.len() as u64,
                    sha256: Sha256::digest(line).into(),
                    reason: format!("not a valid record: {reason}"),
                });
                continue;
            }
        };
        let expected_seq = report.head.seq.saturating_add(1);
        let input = record_input(parsed.seq, &parsed.prev, parsed.entry)?;
        let hash = record_hash(&input);
        let problem = if parsed.seq != expected_seq {
            Some(format!(
                "seq {} where {expected_seq} was expected: a record was removed, duplicated or reordered",
                parsed.seq
            ))
        } else if parsed.prev != report.head.hash {
            Some(
                "prev is not the previous record's hash: the chain is broken (a record was removed or replaced)"
                    .to_owned(),
            )
        } else if key.verify_audit_record(&input, &parsed.sig).is_err() {
            Some(
                "the signature does not verify: the record was altered, or the log was written by another worker key"
                    .to_owned(),
            )
        } else {
            expect_head
                .filter(|head| head.seq == parsed.seq && head.hash != hash)
                .map(|head| {
                    format!(
                        "record {} is not the expected head {head}: the log was rewritten from here on",
                        parsed.seq
                    )
                })
        };
        if let Some(reason) = problem {
            // An authentic record is the only thing that may end a pending span; report the span first.
            report.bad = Some(match pending {
                Some(pending) => pending.unrecovered(),
                None => BadRecord {
                    line: line_no,
                    offset: start,
                    reason,
                },
            });
            return Ok(report);
        }
        let event = entry_event(parsed.entry);
        match (pending.take(), declared_line(parsed.entry)) {
            (None, None) => {}
            (Some(pending), Some(declared)) if pending.matches(&declared) => {
                report.recovered.push(SkippedLine {
                    declared_by: parsed.seq,
                    ..declared.skipped
                });
            }
            (Some(pending), _) => {
                report.bad = Some(pending.unrecovered());
                return Ok(report);
            }
            (None, Some(_)) => {
                report.bad = Some(BadRecord {
                    line: line_no,
                    offset: start,
                    reason: "a recovery record declares a skipped line that is not there"
                        .to_owned(),
                });
                return Ok(report);
            }
        }
        report.records = report.records.saturating_add(1);
        report.head = AuditHead {
            seq: parsed.seq,
            hash,
        };
        report.last_event = event;
    }
    if let Some(pending) = pending {
        report.bad = Some(pending.unrecovered());
        return Ok(report);
    }
    if report.records == 0 {
        report.bad = Some(BadRecord {
            line: line_no.max(1),
            offset: 0,
            reason: if offset == 0 {
                "the file is empty: not an audit log".to_owned()
            } else {
                "no valid record: not an audit log".to_owned()
            },
        });
        return Ok(report);
    }
    if let Some(head) = expect_head.filter(|head| head.seq > report.head.seq) {
        report.bad = Some(BadRecord {
            line: line_no.saturating_add(1),
            offset,
            reason: format!(
                "the log ends at record {} but the expected head is record {}: {} record(s) were cut off the end",
                report.head.seq,
                head.seq,
                head.seq.saturating_sub(report.head.seq)
            ),
        });
    }
    Ok(report)
}

/// An invalid complete line that only a recovery record right after it can excuse.
struct Pending {
    line: u64,
    offset: u64,
    bytes: u64,
    sha256: [u8; 32],
    reason: String,
}

impl Pending {
    fn matches(&self, declared: &DeclaredLine) -> bool {
        (
            declared.skipped.line,
            declared.skipped.offset,
            declared.skipped.bytes,
        ) == (self.line, self.offset, self.bytes)
            && declared.sha256 == self.sha256
    }

    fn unrecovered(self) -> BadRecord {
        BadRecord {
            line: self.line,
            offset: self.offset,
            reason: format!(
                "{} (and the next line is not a recovery record that declares it)",
                self.reason
            ),
        }
    }
}

struct DeclaredLine {
    skipped: SkippedLine,
    sha256: [u8; 32],
}

fn entry_event(entry: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(entry).ok()?;
    Some(value.get("event")?.as_str()?.to_owned())
}

/// The line an authenticated `audit_log_recovered` entry declares skipped, if the entry is one.
fn declared_line(entry: &[u8]) -> Option<DeclaredLine> {
    let value: serde_json::Value = serde_json::from_slice(entry).ok()?;
    if value.get("event")?.as_str()? != "audit_log_recovered" {
        return None;
    }
    let sha = value.get("skipped_sha256")?.as_str()?;
    Some(DeclaredLine {
        skipped: SkippedLine {
            line: value.get("skipped_line")?.as_u64()?,
            offset: value.get("skipped_offset")?.as_u64()?,
            bytes: value.get("skipped_bytes")?.as_u64()?,
            declared_by: 0,
        },
        sha256: lower_hex::<32>(sha.as_bytes())?,
    })
}

/// The writer's chain state, under one lock.
struct Chain {
    /// `seq` the next record gets.
    next_seq: u64,
    /// Hash of the last record encoded (durable or not).
    prev: [u8; 32],
    /// Encoded records not yet written (group commit).
    pending: Vec<u8>,
    /// The last durable record.
    durable: AuditHead,
    /// A caller is writing and syncing a group right now.
    flushing: bool,
    /// Set after a failed write or sync: the file may end in a partial line, so nothing more is
    /// appended by this process (fail closed). A restart recovers the torn line.
    failed: Option<String>,
}

/// The audit log writer: an [`AuditSink`] that appends hash-chained, Ed25519-signed records to a
/// file, with group commit (see the module docs).
///
/// One writer per file: it holds an exclusive lock (`flock`) until dropped. [`record`](AuditSink::record)
/// returns only once the record is durable (`fdatasync`), so the operation it records happens only
/// after its record is on disk. After a failed write or sync the writer refuses every further record
/// until the process restarts (fail closed).
pub struct AuditLog {
    path: PathBuf,
    identity: WorkerIdentity,
    backend: BackendKind,
    file: File,
    chain: Mutex<Chain>,
    durable_changed: Condvar,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("backend", &self.backend)
            .field("key_id", &self.identity.public_key().key_id())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log at `path`, signing with the Ed25519 key derived from `token`.
    ///
    /// - No file at `path`: a new log is created (mode 0600) **with** its first record,
    ///   `audit_log_created` naming the key id, atomically (written to a temporary file, synced, then
    ///   linked into place), so a log file never exists empty.
    /// - An existing file: locked, verified with this worker's public key and continued. A torn last
    ///   line is ended and declared by a recovery record (see the module docs). A file with no valid
    ///   record (empty, not an audit log) or one that does not verify is refused and left untouched.
    ///
    /// `backend` is recorded in the entries this writer makes itself.
    ///
    /// # Errors
    /// [`VramError::Audit`] when the file is locked by another process, holds no valid record, does
    /// not verify (tampering, another worker's key, damage: nothing is appended then), or on I/O
    /// errors.
    pub fn open(
        path: &Path,
        token: &WorkerToken,
        backend: BackendKind,
    ) -> Result<(Self, AuditLogReport)> {
        let fail = |reason: String| VramError::Audit {
            reason: format!("audit log {}: {reason}", path.display()),
        };
        let identity = token.derive_keys().identity;
        let created = match std::fs::symlink_metadata(path) {
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_log(path, &identity, backend).map_err(&fail)?;
                true
            }
            Err(e) => return Err(fail(format!("cannot stat: {e}"))),
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| fail(format!("cannot open: {e}")))?;
        if !file
            .metadata()
            .map_err(|e| fail(format!("cannot stat: {e}")))?
            .is_file()
        {
            return Err(fail("not a regular file".to_owned()));
        }
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => fail(
                "it is locked by another process (is another worker writing to it?)".to_owned(),
            ),
            std::fs::TryLockError::Error(e) => fail(format!("cannot lock: {e}")),
        })?;
        let report = verify_log(&mut BufReader::new(&file), identity.public_key(), None)?;
        if let Some(bad) = &report.bad {
            return Err(fail(format!(
                "the existing file does not verify at line {} ({}); nothing was appended. Investigate \
                 with `vram-residency audit verify`, then move the file aside (a new log is created \
                 when none exists)",
                bad.line, bad.reason
            )));
        }
        let log = Self {
            path: path.to_path_buf(),
            identity,
            backend,
            file,
            chain: Mutex::new(Chain {
                next_seq: report.head.seq.saturating_add(1),
                prev: report.head.hash,
                pending: Vec::new(),
                durable: report.head,
                flushing: false,
                failed: None,
            }),
            durable_changed: Condvar::new(),
        };
        if let Some(torn) = &report.torn_tail {
            // End the torn line and declare it, in one write.
            let entry = AuditEntry {
                at_ns: unix_nanos(SystemTime::now()),
                backend,
                severity: crate::audit::Severity::Warning,
                event: AuditEvent::AuditLogRecovered {
                    skipped_line: torn.line,
                    skipped_offset: torn.offset,
                    skipped_bytes: torn.bytes,
                    skipped_sha256: hex::encode(torn.sha256),
                    note: format!(
                        "{} byte(s) after record {} were cut: a record torn by a crash, or a deliberate cut",
                        torn.bytes, report.head.seq
                    ),
                },
            };
            crate::audit::trace(&entry);
            log.append(&entry, b"\n")?;
        }
        if created {
            tracing::info!(path = %path.display(), "created a new audit log");
        }
        Ok((log, report))
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public key that verifies this log.
    #[must_use]
    pub fn public_key(&self) -> &PublicKey {
        self.identity.public_key()
    }

    /// Number of the next record (records so far + 1).
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// The last durable record.
    #[must_use]
    pub fn durable_head(&self) -> AuditHead {
        self.lock().durable
    }

    /// Flushes file data and metadata to disk (`fsync`). Records are already synced as they are
    /// recorded; this is for shutdown.
    ///
    /// # Errors
    /// [`VramError::Audit`] when the sync fails.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| VramError::Audit {
            reason: format!("syncing {}: {e}", self.path.display()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encodes, signs and queues one record (after `before`, bytes to write ahead of it), then waits
    /// until it is durable: either another caller's group write covers it, or this caller writes the
    /// group itself (group commit).
    fn append(&self, entry: &AuditEntry, before: &[u8]) -> Result<()> {
        let json = serde_json::to_vec(entry).map_err(|e| VramError::Audit {
            reason: format!("serialising an audit entry: {e}"),
        })?;
        let mut chain = self.lock();
        if let Some(reason) = &chain.failed {
            return Err(stopped_accepting(reason));
        }
        let seq = chain.next_seq;
        let (line, hash) = encode_line(&self.identity, seq, &chain.prev, &json)?;
        if line.len() > MAX_LINE_LEN {
            return Err(VramError::Audit {
                reason: format!("an audit record would be longer than {MAX_LINE_LEN} bytes"),
            });
        }
        chain.pending.extend_from_slice(before);
        chain.pending.extend_from_slice(&line);
        chain.next_seq = seq.saturating_add(1);
        chain.prev = hash;
        loop {
            if chain.durable.seq >= seq {
                return Ok(());
            }
            if let Some(reason) = &chain.failed {
                return Err(stopped_accepting(reason));
            }
            if chain.flushing {
                chain = self
                    .durable_changed
                    .wait(chain)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead: write every queued record (ours included) with one write and one sync.
            chain.flushing = true;
            let group = std::mem::take(&mut chain.pending);
            let group_head = AuditHead {
                seq: chain.next_seq.saturating_sub(1),
                hash: chain.prev,
            };
            drop(chain);
            let written = (&self.file)
                .write_all(&group)
                .and_then(|()| self.file.sync_data());
            chain = self.lock();
            chain.flushing = false;
            match written {
                Ok(()) => chain.durable = group_head,
                Err(e) => chain.failed = Some(format!("writing {}: {e}", self.path.display())),
            }
            self.durable_changed.notify_all();
        }
    }
}

fn stopped_accepting(reason: &str) -> VramError {
    VramError::Audit {
        reason: format!(
            "the audit log stopped accepting records after an earlier failure ({reason}); restart the worker"
        ),
    }
}

/// Creates a new log at `path` holding its first record, atomically: written to a temporary file in
/// the same directory, synced, then hard-linked to `path` (which fails if `path` appeared meanwhile)
/// and the temporary name removed.
fn create_log(
    path: &Path,
    identity: &WorkerIdentity,
    backend: BackendKind,
) -> std::result::Result<(), String> {
    let entry = AuditEntry {
        at_ns: unix_nanos(SystemTime::now()),
        backend,
        severity: crate::audit::Severity::Info,
        event: AuditEvent::AuditLogCreated {
            key_id: identity.public_key().key_id(),
        },
    };
    let json = serde_json::to_vec(&entry).map_err(|e| format!("serialising: {e}"))?;
    let (line, _) = encode_line(identity, 1, &GENESIS_HASH, &json).map_err(|e| e.to_string())?;
    let mut suffix = [0u8; 8];
    getrandom::fill(&mut suffix).map_err(|e| format!("no randomness for a temporary name: {e}"))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{file_name}.{}.new", hex::encode(suffix)));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = options
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(&line)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    result.map_err(|e| format!("cannot create: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the new directory entry durable too; a failure here is not fatal for the log itself.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

impl AuditSink for AuditLog {
    fn record(&self, entry: &AuditEntry) -> Result<()> {
        self.append(entry, b"")
    }

    fn head(&self) -> Option<AuditHead> {
        Some(self.durable_head())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ShardId;

    fn token() -> WorkerToken {
        WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
    }

    fn public() -> PublicKey {
        token().public_key()
    }

    fn entry(n: u64) -> AuditEntry {
        let event = AuditEvent::VramDeallocated {
            shard_id: ShardId::new(&format!("s{n}")).unwrap(),
            gpu: 0,
            bytes: n,
        };
        AuditEntry {
            at_ns: n,
            backend: BackendKind::Sim,
            severity: event.severity(),
            event,
        }
    }

    /// Opens (creating it if needed: record 1 is `audit_log_created`) and appends `n` records.
    fn write_log(path: &Path, n: u64) -> AuditHead {
        let (log, _) = AuditLog::open(path, &token(), BackendKind::Sim).unwrap();
        for i in 1..=n {
            log.record(&entry(i)).unwrap();
        }
        log.durable_head()
    }

    fn verify(bytes: &[u8]) -> AuditLogReport {
        verify_log(&mut &bytes[..], &public(), None).unwrap()
    }

    #[test]
    fn a_new_log_starts_with_a_created_record_and_reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 3);
        let head = write_log(&path, 2);
        let bytes = std::fs::read(&path).unwrap();
        let report = verify(&bytes);
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 6);
        assert_eq!(report.head, head);
        assert_eq!(head.seq, 6);
        assert!(report.torn_tail.is_none());
        let first = String::from_utf8_lossy(&bytes)
            .lines()
            .next()
            .unwrap()
            .to_owned();
        assert!(first.contains("\"event\":\"audit_log_created\""), "{first}");
        assert!(first.contains(&public().key_id()), "{first}");
        assert!(!report.ends_with_clean_shutdown());
        // Only the log is left in the directory: the temporary name used to create it is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (_first, _) = AuditLog::open(&path, &token(), BackendKind::Sim).unwrap();
        let err = AuditLog::open(&path, &token(), BackendKind::Sim).unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
    }

    #[test]
    fn an_empty_or_foreign_file_is_refused_by_the_verifier_and_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in [
            ("empty.log", &b""[..]),
            (
                "model.bin",
                &b"GGUF\x03\x00\x00\x00 not an audit log\n\x00\x01"[..],
            ),
            ("text.log", &b"hello\nworld\n"[..]),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let report = verify(content);
            assert!(!report.is_intact(), "{name}: {report:?}");
            assert_eq!(report.records, 0);
            let err = AuditLog::open(&path, &token(), BackendKind::Sim).unwrap_err();
            assert!(err.to_string().contains("does not verify"), "{name}: {err}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                content,
                "{name}: nothing appended"
            );
        }
        assert!(verify(b"").bad.unwrap().reason.contains("empty"));
    }

    #[test]
    fn every_single_byte_change_is_detected_and_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 2);
        let bytes = std::fs::read(&path).unwrap();
        for i in 0..bytes.len() {
            if bytes[i] == b'\n' {
                continue;
            }
            let mut changed = bytes.clone();
            changed[i] = if changed[i] == b'1' { b'2' } else { b'1' };
            let report = verify(&changed);
            let bad = report
                .bad
                .unwrap_or_else(|| panic!("byte {i} changed undetected"));
            let expected_line = 1 + bytes[..i].iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(bad.line, expected_line, "byte {i}: {}", bad.reason);
        }
    }

    #[test]
    fn removed_reordered_and_foreign_records_are_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 3);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let join = |ls: &[&str]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
        let dropped_middle = verify(join(&[lines[0], lines[2], lines[3]]).as_bytes());
        assert_eq!(dropped_middle.bad.unwrap().line, 2);
        let dropped_first = verify(join(&[lines[1], lines[2]]).as_bytes());
        assert_eq!(dropped_first.bad.unwrap().line, 1);
        let swapped = verify(join(&[lines[0], lines[2], lines[1]]).as_bytes());
        assert_eq!(swapped.bad.unwrap().line, 2);
        let other_key = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdeX".to_vec())
            .unwrap()
            .public_key();
        let foreign = verify_log(&mut text.as_bytes(), &other_key, None).unwrap();
        let bad = foreign.bad.unwrap();
        assert_eq!(bad.line, 1);
        assert!(bad.reason.contains("another worker key"), "{}", bad.reason);
    }

    #[test]
    fn a_cut_at_a_record_boundary_is_caught_by_the_expected_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let head = write_log(&path, 4);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            verify_log(&mut text.as_bytes(), &public(), Some(head))
                .unwrap()
                .is_intact()
        );
        // Cut the last two records at a line boundary: without a head this looks like a shorter log.
        let cut: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert!(verify(cut.as_bytes()).is_intact());
        let report = verify_log(&mut cut.as_bytes(), &public(), Some(head)).unwrap();
        let bad = report.bad.unwrap();
        assert!(
            bad.reason.contains("2 record(s) were cut off the end"),
            "{}",
            bad.reason
        );
        // A head with the right seq but another hash: the log was rewritten.
        let forged = AuditHead {
            seq: 2,
            hash: [9; 32],
        };
        let bad = verify_log(&mut text.as_bytes(), &public(), Some(forged))
            .unwrap()
            .bad
            .unwrap();
        assert_eq!(bad.line, 2);
        assert!(bad.reason.contains("rewritten"), "{}", bad.reason);
        // An older head is fine: the log only grew after it.
        let older = verify_log(&mut cut.as_bytes(), &public(), None)
            .unwrap()
            .head;
        assert!(
            verify_log(&mut text.as_bytes(), &public(), Some(older))
                .unwrap()
                .is_intact()
        );
    }

    #[test]
    fn a_torn_last_line_is_reported_and_recovered_on_reopen_saying_how_many_bytes_were_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 2);
        let full = std::fs::read(&path).unwrap();
        // Simulate a crash halfway through a fourth record.
        let identity = token().derive_keys().identity;
        let (fourth, _) = encode_line(&identity, 4, &[1; 32], b"{\"event\":\"x\"}").unwrap();
        let half = fourth.len() / 2;
        let mut torn = full.clone();
        torn.extend_from_slice(&fourth[..half]);
        std::fs::write(&path, &torn).unwrap();
        let report = verify(&torn);
        assert!(report.is_intact());
        assert_eq!(report.records, 3);
        let tail = report.torn_tail.unwrap();
        assert_eq!(
            (tail.line, tail.offset, tail.bytes),
            (4, full.len() as u64, half as u64)
        );

        write_log(&path, 1);
        let bytes = std::fs::read(&path).unwrap();
        let report = verify(&bytes);
        assert!(report.is_intact(), "{report:?}");
        assert!(report.torn_tail.is_none());
        // Records 1-3, the recovery record, and the new one.
        assert_eq!(report.records, 5);
        assert_eq!(report.recovered.len(), 1);
        assert_eq!(report.recovered[0].line, 4);
        assert_eq!(report.recovered[0].bytes, half as u64);
        assert_eq!(report.recovered[0].declared_by, 4);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("\"event\":\"audit_log_recovered\""), "{text}");
        assert!(
            text.contains(&format!("{half} byte(s) after record 3 were cut")),
            "{text}"
        );

        // The skipped line cannot be edited afterwards: its hash is under the recovery record's signature.
        let mut edited = bytes.clone();
        edited[full.len() + 3] ^= 0x01;
        assert_eq!(verify(&edited).bad.unwrap().line, 4);
    }

    #[test]
    fn an_invalid_complete_line_is_tampering_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 2);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":4, garbage\n");
        let report = verify(&bytes);
        assert_eq!(report.bad.unwrap().line, 4);
        std::fs::write(&path, &bytes).unwrap();
        let err = AuditLog::open(&path, &token(), BackendKind::Sim).unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing appended");
    }

    #[test]
    fn concurrent_records_share_writes_and_all_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&path, &token(), BackendKind::Sim).unwrap();
        let log = std::sync::Arc::new(log);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = std::sync::Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        log.record(&entry(t * 1000 + i)).unwrap();
                        // Returned: the record is durable, so the durable head covers it.
                        assert!(log.durable_head().seq >= 2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let head = log.durable_head();
        assert_eq!(head.seq, 1 + 8 * 50);
        drop(log);
        let report = verify(&std::fs::read(&path).unwrap());
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.head, head);
    }

    #[test]
    fn the_record_input_is_the_canonical_encoding_with_its_domain() {
        let a = record_input(1, &GENESIS_HASH, b"{}").unwrap();
        assert_eq!(&a[..4], &30u32.to_be_bytes());
        assert_eq!(&a[4..34], AUDIT_DOMAIN.as_bytes());
        assert_eq!(&a[34..36], &AUDIT_VERSION.to_be_bytes());
        assert_eq!(a.len(), 4 + 30 + 2 + 8 + 32 + 4 + 2);
        assert_ne!(a, record_input(2, &GENESIS_HASH, b"{}").unwrap());
    }
}
