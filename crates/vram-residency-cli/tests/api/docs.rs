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
