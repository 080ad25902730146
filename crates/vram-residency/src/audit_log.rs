//! The durable audit log: append-only JSON lines, each one HMAC-chained to the one before.
//!
//! One line per [`AuditEntry`], written by one process at a time:
//!
//! ```text
//! {"seq":<n>,"prev_mac":"<64 hex>","entry":<entry JSON>,"mac":"<64 hex>"}\n
//! ```
//!
//! `mac` is HMAC-SHA256 under the worker's **audit key** over a canonical, length-prefixed encoding
//! (never re-serialised JSON): the domain tag, the version, `seq`, the previous record's MAC and the
//! exact bytes of `<entry JSON>` as they stand in the line ([`mac_input`]). Records are numbered from 1;
//! the first one chains to 32 zero bytes. So a record cannot be changed, removed, reordered or
//! inserted without the key, and records cut off the *front* are detected. Records cut off the *end*
//! are not detectable from the file alone (no chain can tell its last link was the last one).
//!
//! The writer ([`AuditLog`]) opens the file with `O_APPEND`, holds an exclusive lock on it for its
//! lifetime (a second writer is refused), writes each record with one `write` call and `fdatasync`s it
//! before the operation it records may proceed. Nothing is ever rewritten or truncated, so the file
//! can carry the append-only inode flag (`chattr +a`).
//!
//! A crash in the middle of a write leaves a **torn last line**: bytes after the last newline. When the
//! writer reopens such a log it verifies everything before it, then appends a newline (ending the torn
//! line) and, in the same `write`, an [`AuditEvent::AuditLogRecovered`] record that continues the chain
//! from the last good record and names the skipped bytes (offset, length, SHA-256). The verifier
//! accepts an invalid line only when the record right after it declares exactly those bytes; any other
//! invalid line is tampering. `docs/audit-log.md` has the format and a worked example that a test
//! recomputes.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::audit::{AuditEntry, AuditEvent, AuditSink};
use crate::backend::BackendKind;
use crate::error::{Result, VramError};
use crate::keys::{AuditKey, Tag};
use crate::shard::unix_nanos;

/// Domain-separation tag at the start of every MAC input.
pub const AUDIT_DOMAIN: &[u8] = b"vram-residency/audit-record/v1";
#[expect(clippy::cast_possible_truncation, reason = "a 30-byte constant")]
const AUDIT_DOMAIN_LEN: u8 = AUDIT_DOMAIN.len() as u8;
/// Version of the MAC input encoding and of the line layout.
pub const AUDIT_VERSION: u16 = 1;
/// Longest line accepted (records are a few hundred bytes).
pub const MAX_LINE_LEN: usize = 64 * 1024;
/// `prev_mac` of the first record.
pub const GENESIS_MAC: [u8; 32] = [0u8; 32];

const PREFIX_SEQ: &[u8] = b"{\"seq\":";
const PREFIX_PREV: &[u8] = b",\"prev_mac\":\"";
const PREFIX_ENTRY: &[u8] = b"\",\"entry\":";
const PREFIX_MAC: &[u8] = b",\"mac\":\"";
const SUFFIX: &[u8] = b"\"}";

/// The bytes the MAC of a record is computed over:
///
/// ```text
/// u8      domain length (30)      "vram-residency/audit-record/v1"
/// u16     version                 1
/// u64     seq
/// [32]    prev_mac
/// u32+n   entry                   the entry's JSON text, exactly as written in the line
/// ```
///
/// Integers are big-endian.
///
/// # Errors
/// [`VramError::InvalidInput`] when the entry is longer than `u32::MAX` bytes.
pub fn mac_input(seq: u64, prev_mac: &[u8; 32], entry_json: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(entry_json.len()).map_err(|_| VramError::InvalidInput {
        field: "audit entry",
        reason: "longer than 4 GiB".to_owned(),
    })?;
    let mut out = Vec::with_capacity(entry_json.len().saturating_add(80));
    out.push(AUDIT_DOMAIN_LEN);
    out.extend_from_slice(AUDIT_DOMAIN);
    out.extend_from_slice(&AUDIT_VERSION.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(prev_mac);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(entry_json);
    Ok(out)
}

/// One complete line (with its final newline) for a record.
///
/// # Errors
/// As [`mac_input`].
pub fn encode_line(
    key: &AuditKey,
    seq: u64,
    prev_mac: &[u8; 32],
    entry_json: &[u8],
) -> Result<(Vec<u8>, Tag)> {
    let mac = key.sign(&mac_input(seq, prev_mac, entry_json)?);
    let mut line = Vec::with_capacity(entry_json.len().saturating_add(200));
    line.extend_from_slice(PREFIX_SEQ);
    line.extend_from_slice(seq.to_string().as_bytes());
    line.extend_from_slice(PREFIX_PREV);
    line.extend_from_slice(hex::encode(prev_mac).as_bytes());
    line.extend_from_slice(PREFIX_ENTRY);
    line.extend_from_slice(entry_json);
    line.extend_from_slice(PREFIX_MAC);
    line.extend_from_slice(mac.to_hex().as_bytes());
    line.extend_from_slice(SUFFIX);
    line.push(b'\n');
    Ok((line, mac))
}

/// A record line split into its parts (not yet authenticated).
#[derive(Debug)]
struct ParsedLine<'a> {
    seq: u64,
    prev_mac: [u8; 32],
    entry: &'a [u8],
    mac: Tag,
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
        .ok_or("prev_mac is missing or misplaced")?;
    let (prev_hex, rest) = split_checked(rest, 64).ok_or("prev_mac is truncated")?;
    let prev_mac = lower_hex32(prev_hex).ok_or("prev_mac is not 64 lowercase hex digits")?;
    let rest = rest
        .strip_prefix(PREFIX_ENTRY)
        .ok_or("entry is missing or misplaced")?;
    let tail_len = PREFIX_MAC
        .len()
        .saturating_add(64)
        .saturating_add(SUFFIX.len());
    let entry_len = rest
        .len()
        .checked_sub(tail_len)
        .ok_or("the line is truncated (no mac)")?;
    let (entry, tail) = rest.split_at(entry_len);
    let mac_hex = tail
        .strip_prefix(PREFIX_MAC)
        .and_then(|t| t.strip_suffix(SUFFIX))
        .ok_or("mac is missing or misplaced")?;
    let mac = lower_hex32(mac_hex).ok_or("mac is not 64 lowercase hex digits")?;
    match serde_json::from_slice::<serde_json::Value>(entry) {
        Ok(serde_json::Value::Object(_)) => {}
        _ => return Err("entry is not a JSON object".to_owned()),
    }
    Ok(ParsedLine {
        seq,
        prev_mac,
        entry,
        mac: Tag(mac),
    })
}

fn split_checked(bytes: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= at).then(|| bytes.split_at(at))
}

fn lower_hex32(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// A line skipped by a recovery record (a torn line, ended by the writer that reopened the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset where it starts.
    pub offset: u64,
    /// Its length in bytes, without the newline that ends it.
    pub bytes: u64,
}

/// A torn last line: bytes after the last newline, left by a crash in the middle of a write. Never a
/// record; every record before it is unaffected.
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
    /// `seq` of the last verified record (0 when none).
    pub last_seq: u64,
    /// MAC of the last verified record ([`GENESIS_MAC`] when none).
    pub last_mac: [u8; 32],
    /// Torn lines that recovery records declared skipped.
    pub recovered: Vec<SkippedLine>,
    /// A torn last line, if there is one.
    pub torn_tail: Option<TornTail>,
    /// The first bad record, if any: tampering, another key, or damage.
    pub bad: Option<BadRecord>,
}

impl AuditLogReport {
    /// True when no record failed (a torn last line is not a failure).
    #[must_use]
    pub const fn is_intact(&self) -> bool {
        self.bad.is_none()
    }
}

/// Verifies a whole log from the start: layout, sequence, chain and MAC of every record, recovery
/// records against the spans they declare, and a torn last line.
///
/// # Errors
/// [`VramError::Io`] when reading fails. A log that does not verify is not an error: see
/// [`AuditLogReport::bad`].
pub fn verify_log(reader: &mut dyn BufRead, key: &AuditKey) -> Result<AuditLogReport> {
    let mut report = AuditLogReport {
        records: 0,
        last_seq: 0,
        last_mac: GENESIS_MAC,
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
            // Bytes after the last newline: a write cut short by a crash.
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
        let expected_seq = report.last_seq.saturating_add(1);
        let problem = if parsed.seq != expected_seq {
            Some(format!(
                "seq {} where {expected_seq} was expected: a record was removed, duplicated or reordered",
                parsed.seq
            ))
        } else if parsed.prev_mac != report.last_mac {
            Some(
                "prev_mac is not the previous record's mac: the chain is broken (a record was removed or replaced)"
                    .to_owned(),
            )
        } else {
            let input = mac_input(parsed.seq, &parsed.prev_mac, parsed.entry)?;
            key.verify(&input, &parsed.mac).err().map(|_| {
                "the mac does not verify: the record was altered, or the log was written under another token"
                    .to_owned()
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
        match (pending.take(), declared_line(parsed.entry)) {
            (None, None) => {}
            (Some(pending), Some(declared)) if pending.matches(&declared) => {
                report.recovered.push(declared.skipped);
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
        report.last_seq = parsed.seq;
        report.last_mac = parsed.mac.0;
    }
    if let Some(pending) = pending {
        report.bad = Some(pending.unrecovered());
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
        declared.skipped
            == (SkippedLine {
                line: self.line,
                offset: self.offset,
                bytes: self.bytes,
            })
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
        },
        sha256: lower_hex32(sha.as_bytes())?,
    })
}

struct Writer {
    file: File,
    next_seq: u64,
    prev_mac: [u8; 32],
    /// Set after a failed write or sync: the file may end in a partial line, so nothing more is
    /// appended by this process (fail closed). A restart recovers the torn line.
    failed: Option<String>,
}

/// The audit log writer: an [`AuditSink`] that appends HMAC-chained records to a file.
///
/// One writer per file: it holds an exclusive lock (`flock`) until dropped. Every record is written with
/// one `write` call and made durable (`fdatasync`) before [`record`](AuditSink::record) returns, so the
/// operation it records happens only after its record is on disk. After a failed write or sync the
/// writer refuses every further record until the process restarts (fail closed).
pub struct AuditLog {
    path: PathBuf,
    key: AuditKey,
    backend: BackendKind,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path`, locks it, verifies what is already there and
    /// continues its chain. A torn last line is ended and declared by a recovery record (see the
    /// module docs). `backend` is recorded in the entries this writer makes itself.
    ///
    /// # Errors
    /// [`VramError::Audit`] when the file is locked by another process, when the existing log does not
    /// verify (tampering, another token, damage: nothing is appended then), or on I/O errors.
    pub fn open(
        path: &Path,
        key: AuditKey,
        backend: BackendKind,
    ) -> Result<(Self, AuditLogReport)> {
        let fail = |reason: String| VramError::Audit {
            reason: format!("audit log {}: {reason}", path.display()),
        };
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
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
        let report = verify_log(&mut BufReader::new(&file), &key)?;
        if let Some(bad) = &report.bad {
            return Err(fail(format!(
                "the existing log does not verify at line {} ({}); nothing was appended. Investigate \
                 with `vram-residency audit verify`, then move the file aside",
                bad.line, bad.reason
            )));
        }
        let log = Self {
            path: path.to_path_buf(),
            key,
            backend,
            writer: Mutex::new(Writer {
                file,
                next_seq: report.last_seq.saturating_add(1),
                prev_mac: report.last_mac,
                failed: None,
            }),
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
                },
            };
            crate::audit::trace(&entry);
            log.append(&entry, b"\n")?;
        }
        Ok((log, report))
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of the next record (records so far + 1).
    #[must_use]
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Flushes file data and metadata to disk (`fsync`). Records are already synced one by one; this
    /// is for shutdown.
    ///
    /// # Errors
    /// [`VramError::Audit`] when the sync fails.
    pub fn sync(&self) -> Result<()> {
        self.lock().file.sync_all().map_err(|e| VramError::Audit {
            reason: format!("syncing {}: {e}", self.path.display()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, entry: &AuditEntry, before: &[u8]) -> Result<()> {
        let json = serde_json::to_vec(entry).map_err(|e| VramError::Audit {
            reason: format!("serialising an audit entry: {e}"),
        })?;
        let mut writer = self.lock();
        if let Some(reason) = &writer.failed {
            return Err(VramError::Audit {
                reason: format!(
                    "the audit log stopped accepting records after an earlier failure ({reason}); restart the worker"
                ),
            });
        }
        let (line, mac) = encode_line(&self.key, writer.next_seq, &writer.prev_mac, &json)?;
        if line.len() > MAX_LINE_LEN {
            return Err(VramError::Audit {
                reason: format!("an audit record would be longer than {MAX_LINE_LEN} bytes"),
            });
        }
        let mut bytes = Vec::with_capacity(before.len().saturating_add(line.len()));
        bytes.extend_from_slice(before);
        bytes.extend_from_slice(&line);
        let written = writer
            .file
            .write_all(&bytes)
            .and_then(|()| writer.file.sync_data());
        if let Err(e) = written {
            let reason = format!("writing {}: {e}", self.path.display());
            writer.failed = Some(reason.clone());
            return Err(VramError::Audit { reason });
        }
        writer.next_seq = writer.next_seq.saturating_add(1);
        writer.prev_mac = mac.0;
        Ok(())
    }
}

impl AuditSink for AuditLog {
    fn record(&self, entry: &AuditEntry) -> Result<()> {
        self.append(entry, b"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::WorkerToken;
    use crate::shard::ShardId;

    fn key() -> AuditKey {
        WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdef".to_vec())
            .unwrap()
            .derive_keys()
            .audit
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

    fn write_log(path: &Path, n: u64) {
        let (log, _) = AuditLog::open(path, key(), BackendKind::Sim).unwrap();
        for i in 1..=n {
            log.record(&entry(i)).unwrap();
        }
    }

    fn verify(bytes: &[u8]) -> AuditLogReport {
        verify_log(&mut &bytes[..], &key()).unwrap()
    }

    #[test]
    fn a_written_log_verifies_and_reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 3);
        write_log(&path, 2);
        let bytes = std::fs::read(&path).unwrap();
        let report = verify(&bytes);
        assert!(report.is_intact(), "{report:?}");
        assert_eq!(report.records, 5);
        assert_eq!(report.last_seq, 5);
        assert!(report.torn_tail.is_none());
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (_first, _) = AuditLog::open(&path, key(), BackendKind::Sim).unwrap();
        let err = AuditLog::open(&path, key(), BackendKind::Sim).unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
    }

    #[test]
    fn every_single_byte_change_is_detected_and_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 3);
        let bytes = std::fs::read(&path).unwrap();
        let first_newline = bytes.iter().position(|&b| b == b'\n').unwrap();
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
            if i < first_newline {
                assert_eq!(report.records, 0);
            }
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
        let dropped_middle = verify(join(&[lines[0], lines[2]]).as_bytes());
        assert_eq!(dropped_middle.bad.unwrap().line, 2);
        let dropped_first = verify(join(&[lines[1], lines[2]]).as_bytes());
        assert_eq!(dropped_first.bad.unwrap().line, 1);
        let swapped = verify(join(&[lines[0], lines[2], lines[1]]).as_bytes());
        assert_eq!(swapped.bad.unwrap().line, 2);
        let other_key = WorkerToken::from_bytes(b"0123456789abcdef0123456789abcdeX".to_vec())
            .unwrap()
            .derive_keys()
            .audit;
        let foreign = verify_log(&mut text.as_bytes(), &other_key).unwrap();
        let bad = foreign.bad.unwrap();
        assert_eq!(bad.line, 1);
        assert!(bad.reason.contains("another token"), "{}", bad.reason);
    }

    #[test]
    fn a_torn_last_line_is_reported_and_recovered_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 2);
        let full = std::fs::read(&path).unwrap();
        // Simulate a crash halfway through a third record.
        let (third, _) = encode_line(&key(), 3, &[1; 32], b"{\"event\":\"x\"}").unwrap();
        let mut torn = full.clone();
        torn.extend_from_slice(&third[..third.len() / 2]);
        std::fs::write(&path, &torn).unwrap();
        let report = verify(&torn);
        assert!(report.is_intact());
        assert_eq!(report.records, 2);
        let tail = report.torn_tail.unwrap();
        assert_eq!((tail.line, tail.offset), (3, full.len() as u64));

        write_log(&path, 1);
        let bytes = std::fs::read(&path).unwrap();
        let report = verify(&bytes);
        assert!(report.is_intact(), "{report:?}");
        assert!(report.torn_tail.is_none());
        // Records 1, 2, the recovery record, and the new one.
        assert_eq!(report.records, 4);
        assert_eq!(report.recovered.len(), 1);
        assert_eq!(report.recovered[0].line, 3);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("\"event\":\"audit_log_recovered\""), "{text}");

        // The skipped line cannot be edited afterwards: its hash is under the recovery record's mac.
        let mut edited = bytes.clone();
        edited[full.len() + 3] ^= 0x01;
        assert_eq!(verify(&edited).bad.unwrap().line, 3);
    }

    #[test]
    fn an_invalid_complete_line_is_tampering_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_log(&path, 2);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"seq\":3, garbage\n");
        let report = verify(&bytes);
        assert_eq!(report.bad.unwrap().line, 3);
        std::fs::write(&path, &bytes).unwrap();
        let err = AuditLog::open(&path, key(), BackendKind::Sim).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing appended");
    }

    #[test]
    fn the_mac_input_is_length_prefixed_and_domain_separated() {
        let a = mac_input(1, &GENESIS_MAC, b"{}").unwrap();
        assert_eq!(a[0] as usize, AUDIT_DOMAIN.len());
        assert_eq!(&a[1..31], AUDIT_DOMAIN);
        assert_eq!(a.len(), 1 + 30 + 2 + 8 + 32 + 4 + 2);
        assert_ne!(a, mac_input(2, &GENESIS_MAC, b"{}").unwrap());
    }
}
