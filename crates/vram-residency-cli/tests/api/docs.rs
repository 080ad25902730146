//! The docs cannot point at what is not there: every relative link in `README.md` and `docs/*.md`
//! names a file of the repository (and, with `#anchor`, a heading of it).

use crate::support::repo_path;

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation other than `-`/`_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_owned());
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_readme_and_docs_names_a_file_and_heading_that_exist() {
    let mut docs = vec![repo_path("README.md")];
    for entry in std::fs::read_dir(repo_path("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    let mut checked = 0;
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") || link.contains(' ') {
                continue;
            }
            let (file, fragment) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(file)
            };
            assert!(
                target.exists(),
                "{}: the link ({link}) names {} which is not in the repository",
                doc.display(),
                target.display()
            );
            if !fragment.is_empty() && target.extension().is_some_and(|e| e == "md") {
                let headings: Vec<String> = std::fs::read_to_string(&target)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with('#'))
                    .map(|l| anchor(l.trim_start_matches('#')))
                    .collect();
                assert!(
                    headings.iter().any(|h| h == fragment),
                    "{}: the link ({link}) names no heading of {}",
                    doc.display(),
                    target.display()
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} links found: is the parser broken?"
    );
}

// ---------------------------------------------------------------------------------------------
// Requirement traceability: test names <-> docs/requirements.md.
//
// A test cites the requirements it proves at the very end of its function name (the rule is in
// docs/requirements.md, "How tests cite requirements"):
//
//   citation = group+          group = prefix item+          item = NUM | NUM "to" NUM
//   prefix   = ms | ci | vp | iv | rp   (NUM of 3 digits)  |  worker   (NUM of 4 digits)
//
// `_ci_001` is CI-001; `_rp_001_rp_004` is RP-001 and RP-004; `_vp_001_003` is VP-001 and VP-003
// (the prefix is shared); `_iv_001_to_005` is IV-001 to IV-005. A prefix followed by a number
// anywhere else in a name, a wrong digit count, a descending range or a repeated ID is an error.

/// Requirement IDs of the seed spec (`shared/seed/security-spec.md`, outside this repository), which
/// docs/requirements.md must list: the 30 requirements of its §2 and the four upstream IDs they
/// cite (WORKER-4083, WORKER-4103, WORKER-4245, ORCH-2.13).
const SEED_IDS: [&str; 34] = [
    "MS-001",
    "MS-002",
    "MS-003",
    "MS-004",
    "MS-005",
    "MS-006",
    "MS-007",
    "CI-001",
    "CI-002",
    "CI-003",
    "CI-004",
    "CI-005",
    "CI-006",
    "CI-007",
    "VP-001",
    "VP-002",
    "VP-003",
    "VP-004",
    "VP-005",
    "VP-006",
    "IV-001",
    "IV-002",
    "IV-003",
    "IV-004",
    "IV-005",
    "RP-001",
    "RP-002",
    "RP-003",
    "RP-004",
    "RP-005",
    "WORKER-4083",
    "WORKER-4103",
    "WORKER-4245",
    "ORCH-2.13",
];

/// Test-name prefixes, the ID prefix they stand for, and the digits of their numbers.
const CITATION_PREFIXES: [(&str, &str, usize); 6] = [
    ("ms", "MS", 3),
    ("ci", "CI", 3),
    ("vp", "VP", 3),
    ("iv", "IV", 3),
    ("rp", "RP", 3),
    ("worker", "WORKER", 4),
];

fn citation_prefix(token: &str) -> Option<(&'static str, usize)> {
    CITATION_PREFIXES
        .iter()
        .find(|(lower, _, _)| *lower == token)
        .map(|(_, upper, width)| (*upper, *width))
}

fn all_digits(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit())
}

/// The requirement IDs a test function name cites (empty when it cites none), or why its citation
/// is malformed.
pub fn cited_ids(name: &str) -> Result<Vec<String>, String> {
    let tokens: Vec<&str> = name.split('_').collect();
    let Some(start) = (0..tokens.len()).find(|&i| {
        citation_prefix(tokens[i]).is_some() && tokens.get(i + 1).is_some_and(|t| all_digits(t))
    }) else {
        return Ok(Vec::new());
    };
    let mut ids: Vec<String> = Vec::new();
    let mut i = start;
    while i < tokens.len() {
        let Some((upper, width)) = citation_prefix(tokens[i]) else {
            return Err(format!(
                "`{name}`: `{}` follows a citation: requirement IDs go at the very end of the name \
                 (`..._ci_001`), and only prefixes ms, ci, vp, iv, rp, worker may follow one another",
                tokens[i]
            ));
        };
        let prefix = tokens[i];
        i += 1;
        let number = |token: &str| -> Result<u32, String> {
            if token.len() == width && all_digits(token) {
                Ok(token.parse().unwrap())
            } else {
                Err(format!(
                    "`{name}`: `{prefix}_{token}`: numbers after `{prefix}` have {width} digits"
                ))
            }
        };
        let mut items = 0;
        while let Some(token) = tokens.get(i).filter(|t| all_digits(t)) {
            let from = number(token)?;
            i += 1;
            let to = if tokens.get(i) == Some(&"to") {
                let last = tokens
                    .get(i + 1)
                    .ok_or_else(|| format!("`{name}`: `to` ends the name without a number"))?;
                let to = number(last)?;
                if to <= from {
                    return Err(format!(
                        "`{name}`: the range {prefix}_{token}_to_{last} does not ascend"
                    ));
                }
                i += 2;
                to
            } else {
                from
            };
            for n in from..=to {
                let id = format!("{upper}-{n:0width$}");
                if ids.contains(&id) {
                    return Err(format!("`{name}` cites {id} twice"));
                }
                ids.push(id);
            }
            items += 1;
        }
        if items == 0 {
            return Err(format!(
                "`{name}`: `{prefix}` without a number after it ends the citation"
            ));
        }
    }
    Ok(ids)
}

#[test]
fn the_citation_decoder_reads_the_documented_forms_and_refuses_malformed_ones() {
    let ok = |name: &str| cited_ids(name).unwrap();
    assert_eq!(
        ok("seal_then_verify_round_trip_records_the_vram_digest_ci_001"),
        ["CI-001"]
    );
    assert_eq!(
        ok("insufficient_vram_is_retriable_rp_001_rp_004"),
        ["RP-001", "RP-004"]
    );
    assert_eq!(
        ok("shards_live_in_device_memory_vp_001_003"),
        ["VP-001", "VP-003"]
    );
    assert_eq!(
        ok("bad_input_is_refused_iv_001_to_005_rp_003"),
        ["IV-001", "IV-002", "IV-003", "IV-004", "IV-005", "RP-003"]
    );
    assert_eq!(ok("stops_the_worker_worker_4122"), ["WORKER-4122"]);
    assert_eq!(
        ok("huge_requests_do_not_overflow_rp_002_ms_003"),
        ["RP-002", "MS-003"]
    );
    // Numbers that belong to the words, not to a citation.
    assert_eq!(ok("hmac_sha256_matches_rfc_4231_ci_001"), ["CI-001"]);
    assert!(ok("windows_cover_the_shard_and_scratch_stays_under_len_over_128").is_empty());
    assert!(ok("a_worker_refuses_to_start").is_empty());
    for (bad, says) in [
        ("token_is_refused_ci_06", "have 3 digits"),
        ("stops_worker_412", "have 4 digits"),
        ("drop_ci_005_never_panics", "follows a citation"),
        ("range_iv_005_to_001", "does not ascend"),
        ("range_iv_001_to", "without a number"),
        ("twice_ci_001_ci_001", "twice"),
        ("overlap_iv_001_to_003_002", "twice"),
        ("dangling_ci_001_rp", "without a number"),
    ] {
        let error = cited_ids(bad).expect_err(bad);
        assert!(error.contains(says), "{bad}: {error}");
    }
}

/// A test function of the workspace: where it is and its qualified name, `<crate>::<module>::<fn>`
/// with crate `core` (crates/vram-residency/src), `cuda` (crates/vram-residency-cuda/src), `cli`
/// (crates/vram-residency-cli/src) or `api` (the integration tests, crates/vram-residency-cli/tests/api),
/// and the module the file's path (`format/mod.rs` is `format`; a unit test's inner `mod tests` is
/// not part of it).
#[derive(Debug, Clone)]
struct TestFn {
    qualified: String,
    name: String,
    at: String,
}

const TEST_ROOTS: [(&str, &str); 5] = [
    ("core", "crates/vram-residency/src"),
    ("cuda", "crates/vram-residency-cuda/src"),
    ("cli", "crates/vram-residency-cli/src"),
    ("api", "crates/vram-residency-cli/tests/api"),
    ("py", "crates/vram-residency-py/src"),
];

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `#[test]` / `#[tokio::test]` function of the workspace, and the names of every other `fn`
/// (to catch a helper whose name cites an ID).
fn workspace_functions() -> (Vec<TestFn>, Vec<(String, String)>) {
    let crates: Vec<String> = std::fs::read_dir(repo_path("crates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in &crates {
        assert!(
            TEST_ROOTS
                .iter()
                .any(|(_, root)| root.starts_with(&format!("crates/{name}/"))),
            "crates/{name} is new: give its tests a prefix in TEST_ROOTS (tests/api/docs.rs)"
        );
    }
    let fn_name = |line: &str| -> Option<String> {
        let at = line.find("fn ")?;
        let before = &line[..at];
        if !before
            .split_whitespace()
            .all(|w| ["pub", "pub(crate)", "async", "const", "unsafe"].contains(&w))
        {
            return None;
        }
        let name: String = line[at + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        (!name.is_empty()).then_some(name)
    };
    let mut tests = Vec::new();
    let mut others = Vec::new();
    for (prefix, root) in TEST_ROOTS {
        let root = repo_path(root);
        let mut files = Vec::new();
        rust_files(&root, &mut files);
        files.sort();
        for file in files {
            let relative = file.strip_prefix(&root).unwrap().with_extension("");
            let mut module: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module
                .last()
                .is_some_and(|m| ["mod", "lib", "main"].contains(&m.as_str()))
            {
                module.pop();
            }
            let module = std::iter::once(prefix.to_owned())
                .chain(module)
                .collect::<Vec<_>>()
                .join("::");
            let text = std::fs::read_to_string(&file).unwrap();
            let shown = file
                .strip_prefix(repo_path(""))
                .unwrap_or(&file)
                .display()
                .to_string();
            let mut attribute: Option<usize> = None;
            for (n, line) in text.lines().enumerate() {
                let trimmed = line.trim();
                if trimmed == "#[test]" || trimmed.starts_with("#[tokio::test") {
                    attribute = Some(n + 1);
                    continue;
                }
                if let Some(at_line) = attribute {
                    if trimmed.is_empty() || trimmed.starts_with("#[") || trimmed.starts_with("//")
                    {
                        continue;
                    }
                    let name = fn_name(trimmed).unwrap_or_else(|| {
                        panic!(
                            "{shown}:{at_line}: a test attribute not followed by a fn: {trimmed}"
                        )
                    });
                    tests.push(TestFn {
                        qualified: format!("{module}::{name}"),
                        name,
                        at: format!("{shown}:{}", n + 1),
                    });
                    attribute = None;
                } else if let Some(name) = fn_name(trimmed) {
                    others.push((name, format!("{shown}:{}", n + 1)));
                }
            }
        }
    }
    (tests, others)
}

/// A row of a requirements table in docs/requirements.md.
#[derive(Debug)]
struct Row {
    id: String,
    requirement: String,
    status: String,
    why: String,
    tests: Vec<String>,
    line: usize,
}

const STATUSES: [&str; 4] = ["met", "partly met", "not tested", "not met"];

/// The rows of every table whose header starts with `| ID |`, parsed strictly.
fn requirement_rows(text: &str) -> (Vec<Row>, Vec<String>) {
    let id_pattern =
        regex_lite::Regex::new(r"^(?:(?:MS|CI|VP|IV|RP)-\d{3}|WORKER-\d{4}|ORCH-\d+\.\d+)$")
            .unwrap();
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut in_table = false;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_start_matches('|')
            .trim_end_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.first() == Some(&"ID") {
            in_table = true;
            continue;
        }
        if !in_table
            || cells
                .iter()
                .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        if cells.len() != 5 {
            errors.push(format!(
                "docs/requirements.md:{line_no}: {} cells, expected 5 (ID | requirement | status | \
                 how, and what is missing | tests); a `|` inside a cell splits it",
                cells.len()
            ));
            continue;
        }
        let id = cells[0].to_owned();
        if !id_pattern.is_match(&id) {
            errors.push(format!(
                "docs/requirements.md:{line_no}: `{id}` is not a requirement ID (MS-001, \
                 WORKER-4122, ORCH-2.13)"
            ));
        }
        let status = cells[2].to_owned();
        if !STATUSES.contains(&status.as_str()) && !status.starts_with("= ") {
            errors.push(format!(
                "docs/requirements.md:{line_no}: {id}: status `{status}` is none of {STATUSES:?} \
                 or `= ID` (an upstream ID traced through the requirement that cites it)"
            ));
        }
        let mut tests = Vec::new();
        let mut rest = cells[4];
        while let Some(open) = rest.find('`') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('`') else {
                errors.push(format!(
                    "docs/requirements.md:{line_no}: unbalanced backtick"
                ));
                break;
            };
            tests.push(after[..close].to_owned());
            rest = &after[close + 1..];
        }
        let mut leftover = cells[4].to_owned();
        for test in &tests {
            leftover = leftover.replacen(&format!("`{test}`"), "", 1);
        }
        let leftover = leftover.replace("<br>", "");
        if !(leftover.trim().is_empty() || (tests.is_empty() && leftover.trim() == "—")) {
            errors.push(format!(
                "docs/requirements.md:{line_no}: {id}: the tests cell holds `qualified::names` \
                 separated by <br>, or — for none; found `{}`",
                leftover.trim()
            ));
        }
        for (what, cell) in [("requirement", cells[1]), ("how / why", cells[3])] {
            if cell.is_empty() || cell == "—" {
                errors.push(format!(
                    "docs/requirements.md:{line_no}: {id}: the {what} cell is empty"
                ));
            }
        }
        rows.push(Row {
            id,
            requirement: cells[1].to_owned(),
            status,
            why: cells[3].to_owned(),
            tests,
            line: line_no,
        });
    }
    (rows, errors)
}

#[test]
fn every_requirement_id_is_traced_between_test_names_and_docs_requirements_md() {
    let text = std::fs::read_to_string(repo_path("docs/requirements.md")).unwrap();
    let (rows, mut errors) = requirement_rows(&text);
    let (tests, others) = workspace_functions();
    assert!(
        tests.len() >= 200,
        "only {} tests found: is the scan broken?",
        tests.len()
    );
    assert!(
        rows.len() >= 30,
        "only {} rows found: is the parser broken?",
        rows.len()
    );

    // The table: every seed ID once; other IDs declared project-defined; aliases resolve.
    let seed = SEED_IDS;
    for id in seed {
        if !rows.iter().any(|r| r.id == id) {
            errors.push(format!(
                "docs/requirements.md does not list {id}, a requirement ID of the seed spec"
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for row in &rows {
        let at = format!("docs/requirements.md:{}: {}", row.line, row.id);
        if !seen.insert(row.id.as_str()) {
            errors.push(format!("{at} is listed a second time"));
        }
        if !seed.contains(&row.id.as_str()) && !row.requirement.starts_with("project-defined:") {
            errors.push(format!(
                "{at} is not in the seed spec: say so, its requirement cell must start with \
                 `project-defined:`"
            ));
        }
        if let Some(target) = row.status.strip_prefix("= ") {
            match rows.iter().find(|r| r.id == target) {
                Some(t) if t.status.starts_with("= ") => {
                    errors.push(format!("{at}: = {target}, which is itself an alias"));
                }
                Some(_) => {}
                None => errors.push(format!("{at}: = {target}, which is not in the table")),
            }
            if !row.tests.is_empty() {
                errors.push(format!(
                    "{at}: an alias lists no tests (they are under {target})"
                ));
            }
            continue;
        }
        let proven = row.status == "met" || row.status == "partly met";
        if proven && row.tests.is_empty() {
            errors.push(format!(
                "{at} is `{}` but lists no test: name one that proves it (its name must cite \
                 {}), or say `not tested` / `not met` and why",
                row.status, row.id
            ));
        }
        if !proven && !row.tests.is_empty() {
            errors.push(format!(
                "{at} is `{}` and lists tests: a requirement a test proves is `met` or `partly met`",
                row.status
            ));
        }
        if row.why.len() < 20 {
            errors.push(format!(
                "{at}: say how it is met, or why not, in more than `{}`",
                row.why
            ));
        }
        // Every listed test exists and cites the row's ID.
        for listed in &row.tests {
            match tests.iter().find(|t| &t.qualified == listed) {
                None => errors.push(format!(
                    "{at} lists `{listed}`, which is no test of the workspace (names are \
                     crate::module::function: core::keys::..., cuda::vram::..., cli::serve::auth::..., \
                     api::manager::...)"
                )),
                Some(test) => match cited_ids(&test.name) {
                    Ok(ids) if ids.contains(&row.id) => {}
                    Ok(ids) => errors.push(format!(
                        "{at} lists `{listed}` ({}), whose name cites {ids:?}, not {}: add `_{}` \
                         to its name or take it off the row",
                        test.at,
                        row.id,
                        row.id.to_lowercase().replace('-', "_")
                    )),
                    Err(_) => {} // reported below
                },
            }
        }
    }

    // Every test's citation is well-formed, names a row that is neither an alias nor unproven, and
    // is listed on it.
    for test in &tests {
        let ids = match cited_ids(&test.name) {
            Ok(ids) => ids,
            Err(error) => {
                errors.push(format!("{}: {error}", test.at));
                continue;
            }
        };
        for id in ids {
            let Some(row) = rows.iter().find(|r| r.id == id) else {
                errors.push(format!(
                    "{}: `{}` cites {id}, which docs/requirements.md does not list",
                    test.at, test.name
                ));
                continue;
            };
            if let Some(target) = row.status.strip_prefix("= ") {
                errors.push(format!(
                    "{}: `{}` cites {id}, which is traced through {target}: cite {target}",
                    test.at, test.name
                ));
            } else if !row.tests.contains(&test.qualified) {
                errors.push(format!(
                    "{}: `{}` cites {id}: list `{}` in the tests cell of {id} in \
                     docs/requirements.md (line {})",
                    test.at, test.name, test.qualified, row.line
                ));
            }
        }
    }
    for (name, at) in &others {
        if cited_ids(name).is_ok_and(|ids| !ids.is_empty()) {
            errors.push(format!(
                "{at}: `{name}` cites a requirement but is not a #[test]: only tests cite IDs"
            ));
        }
    }
    assert!(
        errors.is_empty(),
        "docs/requirements.md and the test names disagree ({} problems):\n  {}",
        errors.len(),
        errors.join("\n  ")
    );
}
