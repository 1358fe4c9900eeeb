//! The results table: a row a test with QEMU's result and ours, the subtests each passed, both
//! wall times and their ratio, and what a reader needs to know (the pass list's judgement, QEMU
//! options ours has no counterpart for, the notes kept in `tests/kvm-unit-tests/notes.txt`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::runner::{Judgement, Outcome, Verdict};

/// Where the notes on tests live: a test name, then the note, one a line; `#` starts a comment
/// line.
pub fn notes_path() -> PathBuf {
    super::workspace()
        .join("tests")
        .join("kvm-unit-tests")
        .join("notes.txt")
}

/// Reads the notes file.
pub fn parse_notes(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            let (name, note) = l.split_once(char::is_whitespace)?;
            Some((name.to_string(), note.trim().to_string()))
        })
        .collect()
}

/// One test's results.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub name: String,
    /// Why neither side ran it (the suite's runner would skip it here too).
    pub skipped: Option<String>,
    pub qemu: Option<Outcome>,
    pub ours: Option<Outcome>,
    /// QEMU options ours has no counterpart for.
    pub unmapped: Vec<String>,
    /// The pass list's judgement on ours, for a test on it.
    pub judgement: Option<Judgement>,
    pub note: Option<String>,
}

impl Row {
    /// Ours / QEMU's wall time, when both ran.
    pub fn ratio(&self) -> Option<f64> {
        let (q, o) = (self.qemu.as_ref()?, self.ours.as_ref()?);
        (q.duration > Duration::ZERO).then(|| o.duration.as_secs_f64() / q.duration.as_secs_f64())
    }

    fn cells(&self) -> [String; 9] {
        let result = |o: &Option<Outcome>| match (o, &self.skipped) {
            (Some(o), _) => o.verdict.to_string(),
            (None, Some(why)) => Verdict::Skip(why.clone()).to_string(),
            (None, None) => String::new(),
        };
        let subtests = |o: &Option<Outcome>| {
            o.as_ref()
                .and_then(|o| o.summary)
                .map_or(String::new(), |s| s.to_string())
        };
        let time = |o: &Option<Outcome>| {
            o.as_ref()
                .filter(|o| o.duration > Duration::ZERO)
                .map_or(String::new(), |o| {
                    format!("{:.2} s", o.duration.as_secs_f64())
                })
        };
        let mut notes = Vec::new();
        if let Some(j) = &self.judgement {
            notes.push(format!("list: {j}"));
        }
        if !self.unmapped.is_empty() {
            notes.push(format!("not mapped: {}", self.unmapped.join(" ")));
        }
        notes.extend(self.note.clone());
        [
            self.name.clone(),
            result(&self.qemu),
            result(&self.ours),
            subtests(&self.qemu),
            subtests(&self.ours),
            time(&self.qemu),
            time(&self.ours),
            self.ratio().map_or(String::new(), |r| format!("{r:.2}")),
            notes.join("; "),
        ]
    }
}

const HEADER: [&str; 9] = [
    "test",
    "QEMU",
    "ours",
    "subtests QEMU",
    "subtests ours",
    "time QEMU",
    "time ours",
    "ours/QEMU",
    "notes",
];

/// The rows as aligned text; without QEMU results, QEMU's columns are left out.
pub fn render_text(rows: &[Row], with_qemu: bool) -> String {
    let columns = columns(with_qemu);
    let cells: Vec<Vec<String>> = std::iter::once(HEADER.map(str::to_string))
        .chain(rows.iter().map(Row::cells))
        .map(|r| columns.iter().map(|&i| r[i].clone()).collect())
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &cells {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The rows as a Markdown table.
pub fn render_markdown(rows: &[Row], with_qemu: bool) -> String {
    let columns = columns(with_qemu);
    let row = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut out = row(columns.iter().map(|&i| HEADER[i].to_string()).collect());
    out.push_str(&row(columns.iter().map(|_| "---".to_string()).collect()));
    for r in rows {
        let cells = r.cells();
        out.push_str(&row(columns
            .iter()
            .map(|&i| cells[i].replace('|', "\\|"))
            .collect()));
    }
    out
}

fn columns(with_qemu: bool) -> Vec<usize> {
    if with_qemu {
        (0..HEADER.len()).collect()
    } else {
        vec![0, 2, 4, 6, 8]
    }
}

/// The tests QEMU passes that ours takes more than `factor` times QEMU's time on: the goal is
/// that there are none.
pub fn slower_than(rows: &[Row], factor: f64) -> Vec<(&str, f64)> {
    rows.iter()
        .filter(|r| r.qemu.as_ref().is_some_and(|q| q.verdict == Verdict::Pass))
        .filter_map(|r| Some((r.name.as_str(), r.ratio()?)))
        .filter(|(_, ratio)| *ratio > factor)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm_unit_tests::runner::parse_summary;

    fn ran(verdict: Verdict, summary: &str, secs: f64) -> Option<Outcome> {
        Some(Outcome {
            verdict,
            summary: parse_summary(summary),
            duration: Duration::from_secs_f64(secs),
            log: String::new(),
        })
    }

    fn rows() -> Vec<Row> {
        vec![
            Row {
                name: "setjmp".into(),
                qemu: ran(Verdict::Pass, "SUMMARY: 10 tests", 5.0),
                ours: ran(Verdict::Pass, "SUMMARY: 10 tests", 0.25),
                judgement: Some(Judgement::Passed),
                ..Row::default()
            },
            Row {
                name: "xapic".into(),
                qemu: ran(Verdict::Timeout(Duration::from_secs(60)), "", 60.0),
                ours: ran(Verdict::Pass, "SUMMARY: 3 tests", 130.0),
                unmapped: vec!["-cpu -x2apic".into()],
                note: Some("QEMU's own".into()),
                ..Row::default()
            },
            Row {
                name: "cmpxchg8b".into(),
                skipped: Some("i386 only".into()),
                ..Row::default()
            },
        ]
    }

    #[test]
    fn rows_show_results_subtests_times_ratio_and_notes() {
        let text = render_text(&rows(), true);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("test "));
        assert!(lines[1].contains("PASS") && lines[1].contains("10/10"));
        assert!(lines[1].contains("5.00 s") && lines[1].contains("0.25 s"));
        assert!(lines[1].contains("0.05") && lines[1].ends_with("list: as QEMU"));
        assert!(lines[2].contains("FAIL (timeout; 60s)"));
        assert!(lines[2].ends_with("not mapped: -cpu -x2apic; QEMU's own"));
        assert!(lines[3].contains("SKIP (i386 only)"));
        let md = render_markdown(&rows(), false);
        assert!(md.starts_with("| test | ours | subtests ours | time ours | notes |\n| --- |"));
        assert_eq!(md.lines().count(), 5);
    }

    #[test]
    fn the_2x_goal_counts_only_tests_qemu_passes() {
        let mut r = rows();
        assert!(slower_than(&r, 2.0).is_empty(), "xapic: QEMU fails it");
        r[0].ours = ran(Verdict::Pass, "", 11.0);
        assert_eq!(slower_than(&r, 2.0), [("setjmp", 2.2)]);
    }

    #[test]
    fn notes_are_a_name_then_text() {
        let n = parse_notes("# comment\nxapic  QEMU's own emulation\n\nbad\n");
        assert_eq!(n.len(), 1);
        assert_eq!(n["xapic"], "QEMU's own emulation");
    }
}
