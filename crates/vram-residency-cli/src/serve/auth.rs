//! Who may call what: API tokens, their roles, and the worker token that is never a credential.
//!
//! The worker token is the root secret the seal key and the Ed25519 identity derive from; it stays on
//! the worker. API clients present tokens of their own, configured in two files (one token per line,
//! several per role so they can be rotated):
//!
//! | role       | may call                                                                        |
//! |------------|---------------------------------------------------------------------------------|
//! | `observer` | `GET /v1/shards`, `GET /v1/shards/{id}`, `GET /v1/worker`, `POST .../attest`, `GET /metrics` |
//! | `operator` | everything an observer may, and commit, evict, verify                           |
//!
//! Only SHA-256 hashes of the tokens are kept ([`BearerCheck`]). A presented token is compared with
//! every configured hash in constant time, and the results are OR-ed without stopping at the first
//! match, so the time taken says nothing about which token, if any, matched. A request presenting
//! the worker token gets the same 401 as any wrong token, and is audited as critical.

use std::fmt;
use std::path::Path;

use anyhow::Context as _;
use vram_residency::keys::{MAX_TOKEN_LEN, MIN_TOKEN_LEN, read_secret_file};
use vram_residency::{BearerCheck, VramError};

/// Largest token file read: room for many tokens and comments.
const MAX_TOKEN_FILE_LEN: usize = 64 << 10;

/// What an API token may do. An operator may do everything an observer may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read-only routes, attestations and metrics.
    Observer,
    /// Every route.
    Operator,
}

impl Role {
    /// The role's name, as in the docs and in 403 answers.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Observer => "observer",
            Self::Operator => "operator",
        }
    }
}

/// What a request's `Authorization` header turned out to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented {
    /// A configured API token of this role.
    Role(Role),
    /// The worker token: refused like any wrong token, and audited.
    WorkerToken,
    /// No header, another scheme, or a token that is not configured.
    Unknown,
}

/// The hashes of the configured API tokens and of the worker token (to recognise it, never to let
/// it in). `Debug` says how many tokens each role has, nothing else.
pub struct Access {
    worker: BearerCheck,
    operators: Vec<BearerCheck>,
    observers: Vec<BearerCheck>,
    /// `/metrics` answers without a token (allowed only on a loopback listen address).
    pub metrics_without_token: bool,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("operators", &self.operators.len())
            .field("observers", &self.observers.len())
            .field("metrics_without_token", &self.metrics_without_token)
            .finish_non_exhaustive()
    }
}

/// One token of a token file, with its line number (for messages, which never show the token).
struct TokenLine<'a> {
    line: usize,
    token: &'a [u8],
}

impl Access {
    /// Reads the operator and observer token files and checks them: each file readable by its owner
    /// only, each token acceptable, at least one token in all, none equal to the worker token, none
    /// in both files.
    ///
    /// # Errors
    /// When a file cannot be read or is refused, or a check fails; the message names the file and
    /// line, never a token.
    pub fn load(
        worker: BearerCheck,
        operator_file: Option<&Path>,
        observer_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let read = |path: Option<&Path>, role: Role| {
            path.map(|path| {
                read_secret_file(path, MAX_TOKEN_FILE_LEN)
                    .map_err(|error| match error {
                        // Its Display says "worker token"; the reason alone fits an API token file.
                        VramError::InvalidToken { reason } => anyhow::anyhow!(reason),
                        other => anyhow::Error::new(other),
                    })
                    .with_context(|| {
                        format!("reading the {} tokens from {}", role.name(), path.display())
                    })
            })
            .transpose()
        };
        let operator_text = read(operator_file, Role::Operator)?;
        let observer_text = read(observer_file, Role::Observer)?;
        let operators = tokens_of(operator_text.as_deref(), operator_file)?;
        let observers = tokens_of(observer_text.as_deref(), observer_file)?;
        if operators.is_empty() && observers.is_empty() {
            anyhow::bail!(
                "no API token configured: pass --operator-tokens FILE and/or --observer-tokens FILE \
                 (one token per line, at least {MIN_TOKEN_LEN} bytes, e.g. from `openssl rand -hex \
                 32`; the files readable by their owner only). The worker token is not accepted as \
                 an API credential"
            );
        }
        for (tokens, path) in [(&operators, operator_file), (&observers, observer_file)] {
            let shown = path.map_or_else(String::new, |p| p.display().to_string());
            for token in tokens {
                if worker.matches(token.token) {
                    anyhow::bail!(
                        "{shown}: line {}: an API token must not be the worker token (the worker \
                         token is the root secret of the seal and signing keys; give clients tokens \
                         of their own)",
                        token.line
                    );
                }
            }
        }
        for observer in &observers {
            if let Some(operator) = operators.iter().find(|o| o.token == observer.token) {
                anyhow::bail!(
                    "the same token is in both token files (line {} of the operator tokens, line {} \
                     of the observer tokens); a token has one role",
                    operator.line,
                    observer.line
                );
            }
        }
        let hashes = |tokens: &[TokenLine<'_>]| {
            tokens
                .iter()
                .map(|t| BearerCheck::from_secret(t.token))
                .collect()
        };
        Ok(Self {
            worker,
            operators: hashes(&operators),
            observers: hashes(&observers),
            metrics_without_token: false,
        })
    }

    /// One operator token, for the unit tests of other modules.
    #[cfg(test)]
    pub fn operator_only(worker: BearerCheck, operator: &[u8]) -> Self {
        Self {
            worker,
            operators: vec![BearerCheck::from_secret(operator)],
            observers: Vec::new(),
            metrics_without_token: false,
        }
    }

    /// What the value of an `Authorization` header holds. A `Bearer` token is compared with every
    /// configured hash (constant time, no early exit). The worker token is recognised under any
    /// scheme, or none, so that every request carrying it is audited.
    pub fn identify(&self, authorization: &[u8]) -> Presented {
        let bearer = authorization
            .split_at_checked(7)
            .and_then(|(scheme, token)| scheme.eq_ignore_ascii_case(b"bearer ").then_some(token));
        let Some(token) = bearer else {
            let after_scheme = authorization
                .iter()
                .position(|&b| b == b' ')
                .and_then(|space| authorization.get(space.saturating_add(1)..))
                .unwrap_or_default();
            return if self.worker.matches(authorization) | self.worker.matches(after_scheme) {
                Presented::WorkerToken
            } else {
                Presented::Unknown
            };
        };
        let worker = self.worker.matches(token);
        let operator = any_matches(&self.operators, token);
        let observer = any_matches(&self.observers, token);
        // No API token equals the worker token, and no token has two roles (checked at start).
        if worker {
            Presented::WorkerToken
        } else if operator {
            Presented::Role(Role::Operator)
        } else if observer {
            Presented::Role(Role::Observer)
        } else {
            Presented::Unknown
        }
    }
}

/// The tokens of a file read from `path` (none when no file was given).
fn tokens_of<'a>(
    text: Option<&'a Vec<u8>>,
    path: Option<&Path>,
) -> anyhow::Result<Vec<TokenLine<'a>>> {
    match (text, path) {
        (Some(text), Some(path)) => parse_token_lines(text)
            .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display())),
        _ => Ok(Vec::new()),
    }
}

/// Compares `presented` with every hash and ORs the results: no early exit on a match.
fn any_matches(checks: &[BearerCheck], presented: &[u8]) -> bool {
    checks
        .iter()
        .fold(false, |found, check| found | check.matches(presented))
}

/// The tokens of a token file: one per line; blank lines and lines starting with `#` are skipped;
/// a trailing `\r` is removed. A token is [`MIN_TOKEN_LEN`] to [`MAX_TOKEN_LEN`] bytes of printable
/// ASCII without whitespace. The error names the line, never its content.
fn parse_token_lines(text: &[u8]) -> Result<Vec<TokenLine<'_>>, String> {
    let mut tokens = Vec::new();
    for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line = index.saturating_add(1);
        let token = raw.strip_suffix(b"\r").unwrap_or(raw);
        let trimmed = token.trim_ascii();
        if trimmed.is_empty() || trimmed.starts_with(b"#") {
            continue;
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "line {line}: a token must be printable ASCII without whitespace or control \
                 characters"
            ));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "line {line}: the token is {} long; at least {MIN_TOKEN_LEN} are required \
                 (generate one with `openssl rand -hex 32`)",
                vram_residency::ids::bytes(u64::try_from(token.len()).unwrap_or(u64::MAX))
            ));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(format!(
                "line {line}: the token is longer than {MAX_TOKEN_LEN} bytes"
            ));
        }
        tokens.push(TokenLine { line, token });
    }
    Ok(tokens)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const WORKER: &[u8] = b"worker-token-0123456789abcdef0123456789";
    const OP1: &[u8] = b"operator-one-0123456789abcdef0123456789";
    const OP2: &[u8] = b"operator-two-0123456789abcdef0123456789";
    const OBS: &[u8] = b"observer-0123456789abcdef0123456789abcd";

    fn access() -> Access {
        Access {
            worker: BearerCheck::from_secret(WORKER),
            operators: vec![BearerCheck::from_secret(OP1), BearerCheck::from_secret(OP2)],
            observers: vec![BearerCheck::from_secret(OBS)],
            metrics_without_token: false,
        }
    }

    fn bearer(token: &[u8]) -> Vec<u8> {
        [b"Bearer ".as_slice(), token].concat()
    }

    #[test]
    fn tokens_map_to_their_role_and_the_worker_token_is_recognised_under_any_scheme_ci_006() {
        let a = access();
        assert_eq!(a.identify(&bearer(OP1)), Presented::Role(Role::Operator));
        assert_eq!(a.identify(&bearer(OP2)), Presented::Role(Role::Operator));
        assert_eq!(a.identify(&bearer(OBS)), Presented::Role(Role::Observer));
        assert_eq!(
            a.identify(&[b"bEaReR ".as_slice(), OBS].concat()),
            Presented::Role(Role::Observer)
        );
        assert_eq!(a.identify(&bearer(WORKER)), Presented::WorkerToken);
        assert_eq!(a.identify(WORKER), Presented::WorkerToken);
        assert_eq!(
            a.identify(&[b"Basic ".as_slice(), WORKER].concat()),
            Presented::WorkerToken
        );
        for unknown in [
            bearer(b"operator-one-0123456789abcdef012345678X"),
            bearer(&[OP1, b"\n"].concat()),
            bearer(b""),
            b"Bearer".to_vec(),
            [b"Basic ".as_slice(), OP1].concat(),
            OP1.to_vec(),
            Vec::new(),
        ] {
            assert_eq!(a.identify(&unknown), Presented::Unknown);
        }
        assert!(Role::Operator > Role::Observer);
    }

    #[test]
    fn debug_of_access_counts_tokens_and_shows_no_hash_ci_006() {
        assert_eq!(
            format!("{:?}", access()),
            "Access { operators: 2, observers: 1, metrics_without_token: false, .. }"
        );
    }

    #[test]
    fn token_files_skip_blank_and_comment_lines_and_refuse_bad_tokens_by_line_number() {
        let text = b"# rotated 2026-12\n\n  \nabcdefghijklmnopqrstuvwxyz0123456789\r\n# old\nABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let tokens = parse_token_lines(text).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].line, 4);
        assert_eq!(tokens[0].token, b"abcdefghijklmnopqrstuvwxyz0123456789");
        assert_eq!(tokens[1].line, 6);
        assert!(parse_token_lines(b"").unwrap().is_empty());
        for (bad, needle) in [
            (
                &b"# c\nshort-secret-token\n"[..],
                "line 2: the token is 18 bytes",
            ),
            (
                b"abcdefghijklmnop qrstuvwxyz0123456789\n",
                "line 1: a token must",
            ),
            (
                b" abcdefghijklmnopqrstuvwxyz0123456789\n",
                "line 1: a token must",
            ),
            (
                b"abcdefghijklmnopqrstuvwxyz0123456789\t\n",
                "line 1: a token must",
            ),
        ] {
            let error = parse_token_lines(bad).err().unwrap();
            assert!(error.contains(needle), "{error}");
            assert!(!error.contains("abcdefghij") && !error.contains("short-secret"));
        }
    }
}
