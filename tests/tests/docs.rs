//! The docs name only what a reader of the repository can open: every
//! source path `docs/ARCHITECTURE.md` (and the other design docs) gives in
//! backticks exists — as written from the repository's root, or as the end
//! of one file's or directory's path there (`storage/rows.rs`,
//! `openai.rs`), braces expanded (`control/{grants,local}.rs`).

use std::path::{Path, PathBuf};

const DOCS: &[&str] = &["docs/ARCHITECTURE.md", "docs/GRANTS.md", "docs/LEDGER.md"];

/// Extensions of the files the docs point readers to.
const SOURCE: &[&str] = &[".rs", ".proto", ".sql", ".toml", ".yaml", ".md", ".snap"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file and directory of the repository, relative to its root, with
/// `/` separators (build output and VCS internals left out).
fn tree(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" || name == "node_modules" {
            continue;
        }
        let path = format!("{prefix}{name}");
        if entry.file_type().unwrap().is_dir() {
            out.push(format!("{path}/"));
            tree(&entry.path(), &format!("{path}/"), out);
        } else {
            out.push(path);
        }
    }
}

/// The spans between backticks that look like a path to a source file or
/// a directory of one.
fn named_paths(doc: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (i, span) in doc.split('`').enumerate() {
        if i % 2 == 0 || span.contains(char::is_whitespace) || span.contains("::") {
            continue;
        }
        let is_source = SOURCE.iter().any(|ext| span.ends_with(ext));
        let is_dir = span.ends_with('/') && span.len() > 1;
        if is_source || is_dir {
            paths.extend(expand(span));
        }
    }
    paths
}

/// `a/{b,c}.rs` → `a/b.rs`, `a/c.rs`.
fn expand(span: &str) -> Vec<String> {
    let (Some(open), Some(close)) = (span.find('{'), span.find('}')) else {
        return vec![span.to_string()];
    };
    span[open + 1..close]
        .split(',')
        .map(|part| format!("{}{part}{}", &span[..open], &span[close + 1..]))
        .collect()
}

/// Whether `path` is a file or directory of `tree`, or the end of one's
/// path. A segment `<name>` stands for any one name, and `*` in a segment
/// for any run of characters (`aex/v1/*.proto`).
fn exists(path: &str, tree: &[String]) -> bool {
    let pattern: Vec<&str> = path.trim_start_matches("./").split('/').collect();
    tree.iter().any(|t| {
        let names: Vec<&str> = t.split('/').collect();
        names.len() >= pattern.len()
            && names[names.len() - pattern.len()..]
                .iter()
                .zip(&pattern)
                .all(|(name, want)| segment_matches(name, want))
    })
}

fn segment_matches(name: &str, want: &str) -> bool {
    if want.starts_with('<') && want.ends_with('>') {
        return !name.is_empty();
    }
    match want.split_once('*') {
        Some((before, after)) => {
            name.len() >= before.len() + after.len()
                && name.starts_with(before)
                && name.ends_with(after)
        }
        None => name == want,
    }
}

#[test]
fn every_source_path_the_design_docs_name_exists() {
    let root = root();
    let mut files = Vec::new();
    tree(&root, "", &mut files);
    let mut missing = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        let named = named_paths(&text);
        assert!(
            !named.is_empty(),
            "{doc} names no path: is the scan broken?"
        );
        for path in named {
            if !exists(&path, &files) {
                missing.push(format!("{doc}: `{path}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "paths the docs name that the repository does not hold:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_scan_finds_paths_and_expands_braces() {
    let doc = "see `control/src/a.rs`, `dataplane/src/control/{grants,local}.rs`, \
               `storage/`, `aex_core::policy`, `cargo test -p x`";
    assert_eq!(
        named_paths(doc),
        [
            "control/src/a.rs",
            "dataplane/src/control/grants.rs",
            "dataplane/src/control/local.rs",
            "storage/",
        ]
    );
    let tree = vec!["control/".to_string(), "control/src/storage/rows.rs".into()];
    assert!(exists("storage/rows.rs", &tree));
    assert!(!exists("rows2.rs", &tree));
    assert!(
        !exists("ows.rs", &tree),
        "a suffix matches whole names only"
    );
    assert!(exists("control/src/<x>/rows.rs", &tree));
    assert!(exists("storage/*.rs", &tree));
    assert!(!exists("storage/*.proto", &tree));
}
