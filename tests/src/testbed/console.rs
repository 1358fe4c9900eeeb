//! The console as the harness sees it: lines with host timestamps, and the `@@TB` markers in them.

use std::collections::BTreeMap;
use std::time::Duration;

/// Every marker starts with this; it may appear anywhere in a line (L2 markers come through
/// printk with a `[ time]` prefix, and terminal escapes may precede the first L1 line).
pub const MARKER_PREFIX: &str = "@@TB ";

/// One console line and when the harness received it, counted from L0 QEMU's start.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// A parsed marker such as `@@TB L2 init cpus=2 online=0-1 mem_kb=468164`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Who printed it: `L1`, `L2` or `VMM`.
    pub source: String,
    /// The first word after the source, without any `=value`: `init`, `ready`, `exit`, `action`...
    pub name: String,
    /// Every `key=value` word (including the first one, e.g. `exit` -> `0`).
    pub fields: BTreeMap<String, String>,
    /// Words without `=`, in order (excluding the name).
    pub words: Vec<String>,
    /// The marker text from the prefix on.
    pub raw: String,
    /// When the harness received the line, from L0 QEMU's start.
    pub at: Duration,
}

impl Marker {
    /// Parses the marker in `line`, if it has one.
    pub fn parse(line: &str, at: Duration) -> Option<Marker> {
        let start = line.find(MARKER_PREFIX)?;
        let raw = line[start..].trim_end().to_string();
        let mut tokens = raw[MARKER_PREFIX.len()..].split_whitespace();
        let source = tokens.next()?.to_string();
        let mut name = None;
        let mut fields = BTreeMap::new();
        let mut words = Vec::new();
        for token in tokens {
            let (key, value) = match token.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (token, None),
            };
            if name.is_none() {
                name = Some(key.trim_end_matches(':').to_string());
                if value.is_none() {
                    continue;
                }
            }
            match value {
                Some(v) => {
                    fields.insert(key.to_string(), v.to_string());
                }
                None => words.push(token.to_string()),
            }
        }
        Some(Marker {
            source,
            name: name.unwrap_or_default(),
            fields,
            words,
            raw,
            at,
        })
    }

    /// The value of `key=value` in this marker.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The value of `key=value` parsed as a number.
    pub fn field_num<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.field(key)?.parse().ok()
    }
}

/// Splits raw console bytes into lines: `\n` ends a line, `\r` is dropped, and invalid UTF-8 is
/// replaced rather than rejected (a guest console may print anything).
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; returns the lines they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            match b {
                b'\n' => lines.push(self.take()),
                b'\r' => {}
                _ => self.pending.push(b),
            }
        }
        lines
    }

    /// The unterminated last line, if any (at end of stream).
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_l2_marker_behind_printk_prefix() {
        let m = Marker::parse(
            "[    7.182717] @@TB L2 init cpus=2 online=0-1 mem_kb=468164 uptime=7.11",
            Duration::ZERO,
        )
        .expect("marker");
        assert_eq!(m.source, "L2");
        assert_eq!(m.name, "init");
        assert_eq!(m.field_num::<u32>("cpus"), Some(2));
        assert_eq!(m.field_num::<u64>("mem_kb"), Some(468164));
        assert_eq!(m.field("online"), Some("0-1"));
    }

    #[test]
    fn marker_whose_first_word_is_a_field_keeps_the_value() {
        let m = Marker::parse("@@TB VMM exit=1 secs=11.97", Duration::ZERO).expect("marker");
        assert_eq!(m.source, "VMM");
        assert_eq!(m.name, "exit");
        assert_eq!(m.field_num::<i32>("exit"), Some(1));
        let m = Marker::parse("@@TB L2 action=panic start", Duration::ZERO).expect("marker");
        assert_eq!(m.name, "action");
        assert_eq!(m.field("action"), Some("panic"));
        assert_eq!(m.words, vec!["start".to_string()]);
    }

    #[test]
    fn finds_marker_after_terminal_escapes() {
        let m = Marker::parse("\x1bc\x1b[?7l\x1b[2J@@TB L1 ready kvm=yes", Duration::ZERO)
            .expect("marker");
        assert_eq!((m.source.as_str(), m.name.as_str()), ("L1", "ready"));
        assert_eq!(m.field("kvm"), Some("yes"));
    }

    #[test]
    fn lines_without_prefix_are_not_markers() {
        assert!(Marker::parse("[ 1.0] Linux version 6.1", Duration::ZERO).is_none());
        assert!(Marker::parse("@@TB", Duration::ZERO).is_none());
    }

    #[test]
    fn splitter_handles_crlf_partial_lines_and_bad_utf8() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"ab\r\ncd"), vec!["ab".to_string()]);
        assert_eq!(s.push(b"e\xff\n"), vec!["cde\u{fffd}".to_string()]);
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish(), Some("tail".to_string()));
        assert_eq!(s.finish(), None);
    }
}
