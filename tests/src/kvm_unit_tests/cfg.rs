//! `x86/unittests.cfg`: one `[name]` section a test, `key = value` lines (the suite's
//! `docs/unittests.txt`; read as its `scripts/common.bash` reads it, `extra_params` an alias of
//! `qemu_params`, which may span lines between `"""` quotes).

use std::time::Duration;

/// The suite's timeout when a test names none (`scripts/runtime.bash`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// One test of the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CfgTest {
    pub name: String,
    /// The kernel, relative to the suite's `x86/`.
    pub file: String,
    /// `smp` as written (a number for every x86 test).
    pub smp: Option<String>,
    /// `test_args` as written: shell words, which the suite expands (quotes, backticks).
    pub test_args: Option<String>,
    /// `qemu_params` (or `extra_params`) as written.
    pub qemu_params: Option<String>,
    pub arch: Option<String>,
    pub groups: Vec<String>,
    pub accel: Option<String>,
    /// `timeout` as written: `timeout(1)`'s duration syntax.
    pub timeout: Option<String>,
    /// `check`: files that must hold a value for the test to run.
    pub check: Vec<(String, String)>,
    /// `disabled_if`: a shell condition that skips the test when true.
    pub disabled_if: Option<String>,
}

impl CfgTest {
    /// The vCPU count (`smp`, default 1); None when it is not a number.
    pub fn cpus(&self) -> Option<u8> {
        match &self.smp {
            None => Some(1),
            Some(s) => s.trim().parse().ok(),
        }
    }

    /// How long the test may run: `$TIMEOUT` when set (as the suite's runner), else the
    /// file's `timeout`, else 90 s. None when the value does not parse.
    pub fn timeout(&self, env_override: Option<&str>) -> Option<Duration> {
        match env_override.or(self.timeout.as_deref()) {
            None => Some(DEFAULT_TIMEOUT),
            Some(t) => parse_duration(t),
        }
    }

    /// Whether the test is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// A `timeout(1)` duration: a number with an optional unit `s`, `m`, `h` or `d` (seconds when
/// none). Zero means no timeout to `timeout(1)`; here it is a duration of zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let seconds: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86400.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds * scale).ok()
}

/// Reads `text`; lines outside a section and keys the suite does not know are ignored.
pub fn parse(text: &str) -> Vec<CfgTest> {
    let mut tests = Vec::new();
    let mut current: Option<CfgTest> = None;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            tests.extend(current.take());
            current = Some(CfgTest {
                name: name.to_string(),
                ..CfgTest::default()
            });
            continue;
        }
        let (Some(test), Some((key, value))) = (current.as_mut(), key_value(line)) else {
            continue;
        };
        let raw = value;
        let value = raw.to_string();
        match key {
            "file" => test.file = value,
            "smp" => test.smp = Some(value),
            "test_args" => test.test_args = Some(value),
            "qemu_params" | "extra_params" => {
                test.qemu_params = Some(match raw.strip_prefix("\"\"\"") {
                    Some(first) => multi_line(first, &mut lines),
                    None => value,
                })
            }
            "arch" => test.arch = Some(value),
            "groups" => test.groups = value.split_whitespace().map(str::to_string).collect(),
            "accel" => test.accel = Some(value),
            "timeout" => test.timeout = Some(value),
            "check" => {
                test.check = value
                    .split_whitespace()
                    .filter_map(|c| c.split_once('='))
                    .map(|(path, want)| (path.to_string(), want.to_string()))
                    .collect()
            }
            "disabled_if" => test.disabled_if = Some(value),
            _ => {}
        }
    }
    tests.extend(current);
    tests
}

/// `key = value` at the start of a line (`^key *= *(.*)$`), key made of word characters.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(end);
    let value = rest.trim_start_matches(' ').strip_prefix('=')?;
    (!key.is_empty()).then(|| (key, value.trim_start_matches(' ')))
}

/// A `"""`-quoted value from `first` (the text after the opening quotes) to the line with the
/// closing ones; lines are joined by spaces, as the shell sees them.
fn multi_line<'a>(first: &'a str, lines: &mut impl Iterator<Item = &'a str>) -> String {
    let mut parts = Vec::new();
    let mut line = first;
    loop {
        if let Some(at) = line.find("\"\"\"") {
            parts.push(&line[..at]);
            break;
        }
        parts.push(line.trim_end_matches('\\'));
        match lines.next() {
            Some(next) => line = next,
            None => break,
        }
    }
    parts.join(" ").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"# a comment
[smptest3]
file = smptest.flat
smp = 3

[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit nodefault

[intel_iommu]
file = intel-iommu.flat
arch = x86_64
timeout = 30
smp = 4
qemu_params = -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu

[pmu]
file = pmu.flat
extra_params = -cpu max
check = /sys/module/kvm/parameters/enable_pmu=Y /proc/sys/kernel/nmi_watchdog=0
accel = kvm

[multi]
file = m.flat
qemu_params = """-cpu max \
  -m 2048"""
disabled_if = [[ "$TARGET" != qemu ]]
"#;

    #[test]
    fn reads_each_section_as_the_suites_runner_does() {
        let t = parse(CFG);
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["smptest3", "vmexit_cpuid", "intel_iommu", "pmu", "multi"]
        );
        assert_eq!(t[0].file, "smptest.flat");
        assert_eq!(t[0].cpus(), Some(3));
        assert_eq!(t[1].cpus(), Some(1));
        assert_eq!(t[1].test_args.as_deref(), Some("'cpuid'"));
        assert!(t[1].in_group("nodefault") && t[1].in_group("vmexit"));
        assert_eq!(
            t[2].qemu_params.as_deref(),
            Some("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu")
        );
        assert_eq!(t[2].arch.as_deref(), Some("x86_64"));
        assert_eq!(t[2].timeout(None), Some(Duration::from_secs(30)));
        assert_eq!(
            t[3].qemu_params.as_deref(),
            Some("-cpu max"),
            "extra_params"
        );
        assert_eq!(t[3].check.len(), 2);
        assert_eq!(
            t[3].check[1],
            ("/proc/sys/kernel/nmi_watchdog".into(), "0".into())
        );
        assert_eq!(t[3].accel.as_deref(), Some("kvm"));
        assert_eq!(t[4].qemu_params.as_deref(), Some("-cpu max    -m 2048"));
        assert_eq!(
            t[4].disabled_if.as_deref(),
            Some("[[ \"$TARGET\" != qemu ]]")
        );
    }

    #[test]
    fn timeouts_follow_timeout_1_and_the_environment_override() {
        let t = CfgTest::default();
        assert_eq!(t.timeout(None), Some(DEFAULT_TIMEOUT));
        assert_eq!(t.timeout(Some("5")), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration("-1"), None);
        let named = CfgTest {
            timeout: Some("240".into()),
            ..CfgTest::default()
        };
        assert_eq!(named.timeout(None), Some(Duration::from_secs(240)));
        assert_eq!(named.timeout(Some("1m")), Some(Duration::from_secs(60)));
    }

    #[test]
    fn non_numeric_smp_is_reported_not_guessed() {
        let t = CfgTest {
            smp: Some("$MAX_SMP".into()),
            ..CfgTest::default()
        };
        assert_eq!(t.cpus(), None);
    }
}
