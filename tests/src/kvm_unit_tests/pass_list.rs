//! The tests QEMU passes on this machine kind, which ours must pass (kept in
//! `tests/kvm-unit-tests/qemu-passes.txt`, refreshed from a QEMU run on request).
//!
//! One test a line: its name, QEMU's subtest count (`-` when the test prints no summary), and
//! optionally `xfail` and why. An `xfail` test is known to fail on ours: it is run and
//! reported, and the run fails if it passes, so the marker cannot outlive its reason.
//! Everything after `#` is a comment.

use std::path::PathBuf;

/// Where the list lives.
pub fn path() -> PathBuf {
    super::workspace()
        .join("tests")
        .join("kvm-unit-tests")
        .join("qemu-passes.txt")
}

/// One test on the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// The subtests QEMU passes (its `SUMMARY`), when the test reports any.
    pub subtests: Option<u32>,
    /// Why the test is expected to fail on ours, for now.
    pub xfail: Option<String>,
}

/// A line the list cannot hold.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what} (expected NAME SUBTESTS|- [xfail REASON])")]
pub struct ParseError {
    pub line: usize,
    pub what: String,
}

/// Reads the list.
pub fn parse(text: &str) -> Result<Vec<Entry>, ParseError> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |what: &str| ParseError {
            line: i + 1,
            what: what.to_string(),
        };
        let (name, rest) = first_word(line);
        let (count, rest) = first_word(rest);
        let subtests = match count {
            "" => return Err(err("no subtest count")),
            "-" => None,
            n => Some(n.parse().map_err(|_| err(&format!("subtests '{n}'")))?),
        };
        let xfail = match rest {
            "" => None,
            rest => match rest.strip_prefix("xfail") {
                Some(reason) if reason.starts_with(char::is_whitespace) => {
                    Some(reason.trim().to_string())
                }
                _ => return Err(err(&format!("'{rest}' is not 'xfail REASON'"))),
            },
        };
        let name = name.to_string();
        if entries.iter().any(|e: &Entry| e.name == name) {
            return Err(err(&format!("{name} twice")));
        }
        entries.push(Entry {
            name,
            subtests,
            xfail,
        });
    }
    Ok(entries)
}

/// The first word of `s` and what follows it, both trimmed.
fn first_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

/// The list as a file: `header` (comment lines), then the entries.
pub fn render(header: &str, entries: &[Entry]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    let width = entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
    for e in entries {
        let subtests = e.subtests.map_or("-".to_string(), |n| n.to_string());
        let line = match &e.xfail {
            Some(reason) => format!("{:width$} {subtests:>3} xfail {reason}", e.name),
            None => format!("{:width$} {subtests:>3}", e.name),
        };
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Reads the comment lines at the top of a list (without their `# `), to keep them on refresh.
pub fn header(text: &str) -> String {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .strip_prefix(' ')
                .unwrap_or(l.trim_start_matches('#'))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The list a QEMU run gives: its passing tests `passed` (name, subtests) in that order, each
/// keeping the marker it had on `old`.
pub fn refreshed(old: &[Entry], passed: &[(String, Option<u32>)]) -> Vec<Entry> {
    passed
        .iter()
        .map(|(name, subtests)| Entry {
            name: name.clone(),
            subtests: *subtests,
            xfail: old
                .iter()
                .find(|e| &e.name == name)
                .and_then(|e| e.xfail.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "# Tests QEMU passes here.\n# Refresh with --qemu.\n\
        intel_iommu 11 xfail interrupt remapping (issue 12)\n\
        smptest      1\n\
        realmode     -   # prints no summary\n";

    #[test]
    fn reads_names_counts_and_markers() {
        let l = parse(LIST).expect("parses");
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].subtests, Some(11));
        assert_eq!(
            l[0].xfail.as_deref(),
            Some("interrupt remapping (issue 12)")
        );
        assert_eq!(
            (l[1].name.as_str(), l[1].subtests, &l[1].xfail),
            ("smptest", Some(1), &None)
        );
        assert_eq!(l[2].subtests, None);
    }

    #[test]
    fn bad_lines_name_their_number() {
        assert_eq!(parse("a 1\nb\n").unwrap_err().line, 2);
        assert!(parse("a x\n").unwrap_err().what.contains("subtests 'x'"));
        assert!(parse("a 1 flaky\n").is_err(), "only xfail markers");
        assert!(parse("a 1 xfail\n").is_err(), "a marker says why");
        assert!(parse("a 1\na 2\n").unwrap_err().what.contains("twice"));
    }

    #[test]
    fn refresh_keeps_the_header_and_markers_and_renders_what_it_reads() {
        let old = parse(LIST).unwrap();
        let new = refreshed(
            &old,
            &[
                ("smptest".into(), Some(1)),
                ("intel_iommu".into(), Some(11)),
                ("s3".into(), None),
            ],
        );
        assert_eq!(new[1].xfail, old[0].xfail);
        assert_eq!(new[2].xfail, None);
        let text = render(&header(LIST), &new);
        assert!(text.starts_with("# Tests QEMU passes here.\n# Refresh with --qemu.\n"));
        assert_eq!(parse(&text).unwrap(), new);
    }
}
