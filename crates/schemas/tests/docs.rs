//! The repository's documentation agrees with the code and stays inside the
//! repository.
//!
//! - The `## Error codes` table of `docs/protocol.md` lists exactly
//!   [`ErrorCode::ALL`], and its `## Close codes` table exactly
//!   [`CloseCode::ALL`].
//! - No text file of the repository refers to the external protocol or
//!   design documents, and every relative markdown link resolves to a file
//!   inside the repository.
//!
//! Every failure names the file and the line.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use schemas::protocol::{CloseCode, ErrorCode};

/// The repository root.
fn root() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .canonicalize()
        .expect("the repository root exists")
}

const PROTOCOL_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");

/// Strings no file of the repository may contain. Built with `concat!` so
/// that this file does not contain them itself.
const FORBIDDEN: [&str; 5] = [
    concat!("..", "/shared"),
    concat!("shared", "/PROTOCOL"),
    concat!("shared", "/DESIGN"),
    concat!("PROTOCOL", ".md"),
    concat!("DESIGN", ".md"),
];

/// A data row of a markdown table: its first cell and its line number.
struct Row {
    line: usize,
    first: String,
}

/// The data rows of the tables in the section under `heading` (up to the
/// next heading of the same or a higher level). Header and separator rows
/// are left out.
fn section_rows(text: &str, heading: &str) -> Result<(usize, Vec<Row>), String> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == heading)
        .ok_or_else(|| format!("docs/protocol.md: no `{heading}` heading"))?;
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut rows = Vec::new();
    let mut in_table = false;
    let mut fenced = false;
    for (i, raw) in lines.iter().enumerate().skip(start + 1) {
        let line = raw.trim();
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if !fenced && line.starts_with('#') {
            let hashes = line.chars().take_while(|&c| c == '#').count();
            if hashes <= level && line[hashes..].starts_with(' ') {
                break;
            }
        }
        if fenced || !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let is_separator = line
            .trim_matches('|')
            .split('|')
            .all(|c| !c.trim().is_empty() && c.trim().chars().all(|ch| "-: ".contains(ch)));
        if !in_table {
            // The first row of a table is its header.
            in_table = true;
            continue;
        }
        if is_separator {
            continue;
        }
        let first = line
            .trim_start_matches('|')
            .split('|')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
        rows.push(Row { line: i + 1, first });
    }
    Ok((start + 1, rows))
}

/// Compares the first cells of a section's rows with the expected codes.
fn check_table(
    heading: &str,
    expected: &[String],
    parse: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let text = std::fs::read_to_string(PROTOCOL_DOC)
        .unwrap_or_else(|e| panic!("docs/protocol.md: cannot read it: {e}"));
    let (heading_line, rows) = match section_rows(&text, heading) {
        Ok(found) => found,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let mut listed: BTreeMap<String, usize> = BTreeMap::new();
    for row in rows {
        let Some(code) = parse(&row.first) else {
            problems.push(format!(
                "docs/protocol.md:{}: the first cell {:?} of a row under `{heading}` is not a code",
                row.line, row.first
            ));
            continue;
        };
        if let Some(first) = listed.get(&code) {
            problems.push(format!(
                "docs/protocol.md:{}: {code} is listed again (first at line {first})",
                row.line
            ));
            continue;
        }
        if !expected.contains(&code) {
            problems.push(format!(
                "docs/protocol.md:{}: {code} is not a code of the server",
                row.line
            ));
        }
        listed.insert(code, row.line);
    }
    for code in expected {
        if !listed.contains_key(code) {
            problems.push(format!(
                "docs/protocol.md:{heading_line}: `{heading}` does not list {code}"
            ));
        }
    }
    problems
}

fn report(problems: Vec<String>) {
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

#[test]
fn error_code_table_lists_every_error_code() {
    let expected: Vec<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    report(check_table("## Error codes", &expected, |cell| {
        let code = cell.strip_prefix('`')?.strip_suffix('`')?;
        (!code.is_empty() && !code.contains('`')).then(|| code.to_owned())
    }));
}

#[test]
fn close_code_table_lists_every_close_code() {
    let expected: Vec<String> = CloseCode::ALL
        .iter()
        .map(|c| c.code().to_string())
        .collect();
    report(check_table("## Close codes", &expected, |cell| {
        let cell = cell.trim_matches('`');
        cell.parse::<u16>().ok().map(|n| n.to_string())
    }));
}

/// Directories never scanned, wherever they are.
fn skipped_dir(name: &str) -> bool {
    name == ".git" || name == "node_modules" || name == "target" || name.starts_with("target-")
}

/// Plain names ignored at the root by `.gitignore` (`/data`, `node_modules/`):
/// build output and data dirs, not files of the repository.
fn ignored_at_root(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(root.join(".gitignore")).unwrap_or_default();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_owned())
        .filter(|l| !l.is_empty() && !l.contains(['*', '?', '[', '/']))
        .collect()
}

/// Every text file of the repository, with its contents.
fn text_files(root: &Path) -> Vec<(PathBuf, String)> {
    let ignored = ignored_at_root(root);
    let mut files = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: cannot list it: {e}", dir.display()))
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if dir == root && ignored.contains(&name) {
                continue;
            }
            if kind.is_dir() {
                if !skipped_dir(&name) {
                    dirs.push(path);
                }
            } else if kind.is_file() {
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                // Binary files (NUL bytes, or not UTF-8) are not text.
                if bytes.contains(&0) {
                    continue;
                }
                if let Ok(text) = String::from_utf8(bytes) {
                    files.push((path, text));
                }
            }
        }
    }
    files
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn no_file_refers_outside_the_repository() {
    let root = root();
    let mut problems = Vec::new();
    for (path, text) in text_files(&root) {
        for (i, line) in text.lines().enumerate() {
            for needle in FORBIDDEN {
                if line.contains(needle) {
                    problems.push(format!(
                        "{}:{}: refers to {needle:?}, outside the repository; point to docs/ instead",
                        relative(&root, &path),
                        i + 1
                    ));
                }
            }
        }
    }
    report(problems);
}

/// The targets of the inline links `[text](target)` on a line.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        let inside = after[..end].trim();
        // `[text](path "title")`: the path is the first word.
        let target = inside.split_whitespace().next().unwrap_or("");
        let target = target.trim_start_matches('<').trim_end_matches('>');
        targets.push(target.to_owned());
        rest = &after[end..];
    }
    targets
}

/// `path` with `.` and `..` resolved, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[test]
fn markdown_links_resolve_inside_the_repository() {
    let root = root();
    let mut problems = Vec::new();
    for (path, text) in text_files(&root) {
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let dir = path.parent().expect("a file has a directory");
        let mut fenced = false;
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            if fenced {
                continue;
            }
            for target in link_targets(line) {
                let lower = target.to_ascii_lowercase();
                if target.is_empty()
                    || target.starts_with('#')
                    || lower.starts_with("http://")
                    || lower.starts_with("https://")
                    || lower.starts_with("mailto:")
                {
                    continue;
                }
                let file = target.split('#').next().unwrap_or("");
                let resolved = if let Some(from_root) = file.strip_prefix('/') {
                    normalize(&root.join(from_root))
                } else {
                    normalize(&dir.join(file))
                };
                let at = format!("{}:{}", relative(&root, &path), i + 1);
                if !resolved.starts_with(&root) {
                    problems.push(format!(
                        "{at}: link {target:?} points outside the repository"
                    ));
                } else if !resolved.exists() {
                    problems.push(format!(
                        "{at}: link {target:?} points to {}, which does not exist",
                        relative(&root, &resolved)
                    ));
                }
            }
        }
    }
    report(problems);
}

/// Top-level folders of the repository a path in a comment or a doc starts
/// with, and the extensions of the files such paths name.
const PATH_ROOTS: [&str; 9] = [
    "crates/",
    "src/",
    "tests/",
    "docs/",
    "benches/",
    "schemas/",
    "scripts/",
    "redpanda/",
    ".ci/",
];
const PATH_EXTENSIONS: [&str; 12] = [
    ".rs", ".md", ".toml", ".sh", ".yaml", ".yml", ".cql", ".avsc", ".json", ".html", ".mjs", ".py",
];

/// The repository paths named on a line (`crates/ingest/src/ws.rs`), as
/// written: a token that starts with one of [`PATH_ROOTS`] and ends with one
/// of [`PATH_EXTENSIONS`]. A token with a placeholder segment (`vN`, `PRESET`,
/// `*`) names no one file and is left out.
fn repository_paths(line: &str) -> Vec<String> {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    let mut paths = Vec::new();
    let mut start = 0;
    for (i, c) in line.char_indices() {
        if i < start {
            continue;
        }
        let boundary = i == 0 || !line[..i].ends_with(is_path_char);
        if !boundary || !is_path_char(c) {
            continue;
        }
        let end = line[i..]
            .find(|c: char| !is_path_char(c))
            .map_or(line.len(), |n| i + n);
        start = end;
        let token = line[i..end].trim_end_matches('.');
        if !PATH_ROOTS.iter().any(|r| token.starts_with(r))
            || !PATH_EXTENSIONS.iter().any(|e| token.ends_with(e))
        {
            continue;
        }
        let placeholder = token.split('/').any(|segment| {
            let stem = segment.split('.').next().unwrap_or("");
            stem == "vN" || (stem.len() > 1 && stem.chars().all(|c| c.is_ascii_uppercase()))
        });
        if !placeholder {
            paths.push(token.to_owned());
        }
    }
    paths
}

#[test]
fn repository_paths_pick_out_paths_and_skip_placeholders() {
    assert_eq!(
        repository_paths("see `crates/ingest/src/ws.rs`, and src/lib.rs."),
        ["crates/ingest/src/ws.rs", "src/lib.rs"]
    );
    assert!(repository_paths("schemas/avro/history/vN/chat_event.avsc").is_empty());
    assert!(repository_paths("benches/results/PRESET.json").is_empty());
    assert!(repository_paths("x/crates/a.rs and mysrc/lib.rs").is_empty());
}

/// A path of the repository that a comment or a doc names exists: a file
/// moved or deleted is not left named in the text.
#[test]
fn every_repository_path_named_in_text_exists() {
    let root = root();
    let mut problems = Vec::new();
    for (path, text) in text_files(&root) {
        let crate_dir = path
            .strip_prefix(&root)
            .ok()
            .and_then(|p| p.strip_prefix("crates").ok())
            .and_then(|p| p.components().next())
            .map(|c| root.join("crates").join(c.as_os_str()));
        for (i, line) in text.lines().enumerate() {
            for named in repository_paths(line) {
                let found = root.join(&named).exists()
                    || crate_dir.as_ref().is_some_and(|d| d.join(&named).exists());
                if !found {
                    problems.push(format!(
                        "{}:{}: names {named}, which is not in the repository",
                        relative(&root, &path),
                        i + 1
                    ));
                }
            }
        }
    }
    report(problems);
}
