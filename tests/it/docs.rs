//! The documentation holds together: every relative link in README.md, ARCHITECTURE.md and
//! docs/*.md points to a file that exists and, with a `#anchor`, to a heading of that file
//! (by GitHub's slug rules: lowercase, spaces to `-`, punctuation but `-` and `_` dropped,
//! a repeated heading's slug numbered `-1`, `-2`, ...), and README.md stays a newcomer's
//! page of at most 200 lines. Links with a scheme (`https:`, `mailto:`, ...), links in
//! code spans and links in fenced code blocks are not checked. Boots no VM.

use std::fs;
use std::path::{Path, PathBuf};

use vm_tests::workspace_root;

/// The most lines README.md may have; the manual is in docs/.
const README_MAX_LINES: usize = 200;

/// GitHub's anchor for a heading's text: inline markup dropped, lowercase, letters,
/// digits, `-` and `_` kept, each space a `-`, anything else dropped.
fn slug(heading: &str) -> String {
    let mut out = String::new();
    for c in render(heading).chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() || c == '-' || c == '_' {
            out.push(c);
        } else if c == ' ' {
            out.push('-');
        }
    }
    out
}

/// A heading's text as GitHub shows it, near enough for its slug: a link's text instead of
/// the link, with backticks and emphasis marks left to [`slug`] to drop.
fn render(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some((label, target_end)) = link_at(&rest[open..]) else {
            out.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            continue;
        };
        out.push_str(&rest[..open]);
        out.push_str(label);
        rest = &rest[open + target_end..];
    }
    out.push_str(rest);
    out
}

/// For text starting with `[`: the label of an inline link `[label](target)` and the
/// length of the whole link, or None when it is no inline link.
fn link_at(text: &str) -> Option<(&str, usize)> {
    let close = text.find("](")?;
    let label = &text[1..close];
    let end = target_end(&text[close + 2..])?;
    Some((label, close + 2 + end + 1))
}

/// The length of a link's destination (and title) up to its closing `)`, parentheses
/// inside balanced, or None when it is not closed on this line.
fn target_end(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The line with every code span (a run of backticks up to the next run of as many) blanked
/// out, so what is quoted there is not taken for a link.
fn without_code_spans(line: &str) -> String {
    let bytes = line.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            let next = line[i..].find('`').map_or(line.len(), |n| i + n);
            out.push_str(&line[i..next]);
            i = next;
            continue;
        }
        let run = bytes[i..].iter().take_while(|&&b| b == b'`').count();
        let fence = "`".repeat(run);
        let mut search = i + run;
        let mut closed = None;
        while let Some(n) = line[search..].find(&fence) {
            let at = search + n;
            let len = bytes[at..].iter().take_while(|&&b| b == b'`').count();
            if len == run {
                closed = Some(at);
                break;
            }
            search = at + len;
        }
        match closed {
            Some(at) => {
                out.push_str(&" ".repeat(at + run - i));
                i = at + run;
            }
            None => {
                out.push_str(&fence);
                i += run;
            }
        }
    }
    out
}

/// The lines of a Markdown text outside fenced code blocks (``` or ~~~), with their
/// 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut lines = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|c| *c == m).count());
        match (fence, marker) {
            (None, Some(m)) if run >= 3 => fence = Some((m, run)),
            (Some((f, len)), Some(m)) if m == f && run >= len && trimmed[run..].trim().is_empty() => fence = None,
            (None, _) => lines.push((n + 1, line)),
            (Some(_), _) => {}
        }
    }
    lines
}

/// The anchors of a Markdown text's ATX headings (`#` to `######`), in order, numbered as
/// GitHub numbers repeated ones.
fn anchors(text: &str) -> Vec<String> {
    let mut anchors: Vec<String> = Vec::new();
    for (_, line) in prose_lines(text) {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let hashes = line[indent..].chars().take_while(|c| *c == '#').count();
        let after = &line[indent + hashes..];
        if indent > 3 || !(1..=6).contains(&hashes) || !(after.is_empty() || after.starts_with([' ', '\t'])) {
            continue;
        }
        let mut title = after.trim();
        let closing = title.trim_end_matches('#');
        if closing.is_empty() || closing.ends_with([' ', '\t']) {
            title = closing.trim_end();
        }
        let base = slug(title);
        let mut anchor = base.clone();
        let mut n = 0;
        while anchors.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        anchors.push(anchor);
    }
    anchors
}

/// Every link destination in a Markdown text, with its line: inline links and images
/// (`[text](dest)`, `![alt](dest)`) and reference definitions (`[label]: dest`), outside
/// fenced code blocks and code spans.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in prose_lines(text) {
        let line = without_code_spans(line);
        let trimmed = line.trim_start();
        if let (true, Some(colon)) = (trimmed.starts_with('['), trimmed.find("]:")) {
            if let Some(dest) = trimmed[colon + 2..].split_whitespace().next() {
                found.push((n, dest.trim_matches(['<', '>']).to_string()));
            }
        }
        let mut rest = line.as_str();
        while let Some(open) = rest.find("](") {
            let after = &rest[open + 2..];
            let Some(end) = target_end(after) else { break };
            let dest = after[..end].split_whitespace().next().unwrap_or("");
            found.push((n, dest.trim_matches(['<', '>']).to_string()));
            rest = &after[end..];
        }
    }
    found
}

/// Whether a destination names a scheme (`https:`, `mailto:`, ...): letters, digits, `+`,
/// `-` or `.` before a `:`, starting with a letter.
fn has_scheme(dest: &str) -> bool {
    let Some(colon) = dest.find(':') else { return false };
    let scheme = &dest[..colon];
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

/// What is wrong with the relative links of `files` (paths under `root`), one line each:
/// `FILE:LINE: DEST: WHY`.
fn broken_links(root: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let shown = file.strip_prefix(root).unwrap_or(file).display().to_string();
        for (n, dest) in links(&text) {
            if dest.is_empty() || has_scheme(&dest) {
                continue;
            }
            let (path, anchor) = dest.split_once('#').unwrap_or((&dest, ""));
            let target = if path.is_empty() {
                file.clone()
            } else if let Some(from_root) = path.strip_prefix('/') {
                root.join(from_root)
            } else {
                file.parent().unwrap().join(path)
            };
            if !target.exists() {
                let name = target.strip_prefix(root).unwrap_or(&target).display().to_string();
                problems.push(format!("{shown}:{n}: `{dest}`: there is no {name}"));
                continue;
            }
            if anchor.is_empty() || target.extension().is_none_or(|e| e != "md") {
                continue;
            }
            let target_text = fs::read_to_string(&target).unwrap();
            if !anchors(&target_text).iter().any(|a| a == anchor) {
                let name = target.strip_prefix(root).unwrap_or(&target).display().to_string();
                problems.push(format!("{shown}:{n}: `{dest}`: {name} has no heading whose anchor is `#{anchor}`"));
            }
        }
    }
    problems
}

/// README.md, ARCHITECTURE.md and docs/*.md of the workspace.
fn documentation(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("the docs/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn relative_links_point_to_files_and_headings_that_exist() {
    let root = workspace_root();
    let files = documentation(&root);
    assert!(files.len() > 5, "found only {files:?}");
    let checked: usize = files.iter().map(|f| links(&fs::read_to_string(f).unwrap()).len()).sum();
    assert!(checked > 50, "found only {checked} links in {files:?}");
    let problems = broken_links(&root, &files);
    assert!(problems.is_empty(), "links that point nowhere:\n{}", problems.join("\n"));
}

#[test]
fn the_readme_is_at_most_200_lines() {
    let readme = fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= README_MAX_LINES, "README.md has {lines} lines (at most {README_MAX_LINES}): move text to docs/");
}

#[test]
fn slugs_follow_githubs_rules() {
    assert_eq!(slug("Scenarios: several VMs on a network"), "scenarios-several-vms-on-a-network");
    assert_eq!(slug("Systems and `run-vm --system`"), "systems-and-run-vm---system");
    assert_eq!(slug("Running the workspace's tests in a VM"), "running-the-workspaces-tests-in-a-vm");
    assert_eq!(slug("Tests in a VM (`cmd::test`)"), "tests-in-a-vm-cmdtest");
    assert_eq!(slug("snake_case and [a link](x.md)"), "snake_case-and-a-link");
    assert_eq!(anchors("# A\n\n## A\n```\n# not a heading\n```\n### A ###\n    # code\n"), ["a", "a-1", "a-2"]);
}

#[test]
fn the_checker_finds_missing_files_and_anchors_and_skips_code_and_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("docs")).unwrap();
    fs::write(root.join("docs/b.md"), "# B\n\n## The lock file\n").unwrap();
    let a = [
        "# A: the top",
        "[fine](docs/b.md#the-lock-file) [fine too](#a-the-top) [root](/docs/b.md) [dir](docs/)",
        "[no file](docs/c.md) and [no anchor](docs/b.md#the-lock) and [no own anchor](#b)",
        "`[quoted](nowhere.md)` [web](https://example.invalid/x#y) [mail](mailto:a@b.c)",
        "```",
        "[fenced](nowhere.md)",
        "```",
        "[ref]: docs/missing.md",
    ]
    .join("\n");
    fs::write(root.join("a.md"), a).unwrap();
    let problems = broken_links(root, &[root.join("a.md")]);
    let expected = [
        "a.md:3: `docs/c.md`: there is no docs/c.md".to_string(),
        "a.md:3: `docs/b.md#the-lock`: docs/b.md has no heading whose anchor is `#the-lock`".to_string(),
        "a.md:3: `#b`: a.md has no heading whose anchor is `#b`".to_string(),
        "a.md:8: `docs/missing.md`: there is no docs/missing.md".to_string(),
    ];
    assert_eq!(problems, expected);
}
