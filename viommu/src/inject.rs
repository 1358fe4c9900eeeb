//! Fault injection: errors a guest driver's error paths must handle, produced on purpose and
//! exactly as the VT-d spec defines them (the unit carries them out; this module only counts
//! down to them).
//!
//! Each injection names an event and which occurrence of it, counted from when it is armed:
//!
//! - `iqe@N`: the Nth descriptor fetched from the invalidation queue cannot be fetched
//!   (6.5.2.10: FSTS.IQE, IQERCD.IQEI = 2, IQH left at the descriptor, the queue stopped until
//!   software clears IQE);
//! - `ite@N`: the Nth device-TLB invalidation times out (6.5.2.10: the next wait descriptor is
//!   aborted without its status write or interrupt, IQH left past it, FSTS.ITE and
//!   IQERCD.ITESID set, the queue stopped until software clears ITE);
//! - `ice@N`: the Nth device-TLB invalidation completes in error (6.5.2.10: FSTS.ICE and
//!   IQERCD.ICESID set; the queue goes on);
//! - `dma-fault@N`: the Nth DMA translation of an emulated device faults as if its page were
//!   not present (7.1.3, recorded unless FPD);
//! - `records-full@N`: the Nth recorded fault arrives as a burst that fills every free fault
//!   recording register and overflows (7.2.1: all records F, PPF, then PFO; one fault event).
//!
//! `@N` may be left out (N = 1). Several are joined with `+`.

use std::str::FromStr;

/// What an injection counts and produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A descriptor fetch fails (IQE).
    QueueError,
    /// A device-TLB invalidation times out (ITE).
    TimeOut,
    /// A device-TLB invalidation completes in error (ICE).
    CompletionError,
    /// An emulated device's DMA translation faults.
    DmaFault,
    /// A recorded fault fills the fault recording registers and overflows.
    RecordsFull,
}

impl Target {
    const NAMES: [(&'static str, Target); 5] = [
        ("iqe", Target::QueueError),
        ("ite", Target::TimeOut),
        ("ice", Target::CompletionError),
        ("dma-fault", Target::DmaFault),
        ("records-full", Target::RecordsFull),
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("?", |(n, _)| n)
    }
}

/// One armed injection: `target` on its `nth` occurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    pub target: Target,
    pub nth: u64,
}

/// Why an injection does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectionError {
    #[error("unknown injection '{0}' (known: iqe, ite, ice, dma-fault, records-full)")]
    Unknown(String),
    #[error("'{0}': the occurrence after @ must be a whole number from 1")]
    Occurrence(String),
}

impl FromStr for Injection {
    type Err = InjectionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, nth) = match s.split_once('@') {
            Some((name, n)) => (
                name,
                n.parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| InjectionError::Occurrence(s.to_string()))?,
            ),
            None => (s, 1),
        };
        let target = Target::NAMES
            .iter()
            .find(|(n, _)| *n == name.trim())
            .map(|(_, t)| *t)
            .ok_or_else(|| InjectionError::Unknown(name.to_string()))?;
        Ok(Injection { target, nth })
    }
}

impl std::fmt::Display for Injection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.target.name(), self.nth)
    }
}

/// Parses injections joined with `+` (blank ones skipped).
pub fn parse_list(s: &str) -> Result<Vec<Injection>, InjectionError> {
    s.split(['+', '\n'])
        .map(str::trim)
        .filter(|i| !i.is_empty() && !i.starts_with('#'))
        .map(str::parse)
        .collect()
}

/// Injections not yet carried out, each with the occurrences left before it fires.
#[derive(Clone, Debug, Default)]
pub struct Injector {
    armed: Vec<(Target, u64)>,
}

/// Most injections armed at once (a control file is the guest's test, but stays bounded).
const MAX_ARMED: usize = 64;

impl Injector {
    /// Arms `i`, counting from the next occurrence of its event. Returns false when too many
    /// are armed already.
    pub fn arm(&mut self, i: Injection) -> bool {
        if self.armed.len() >= MAX_ARMED {
            return false;
        }
        self.armed.push((i.target, i.nth));
        true
    }

    /// Counts one occurrence of `target`'s event: true when an injection fires on it.
    pub fn occurs(&mut self, target: Target) -> bool {
        if self.armed.is_empty() {
            return false;
        }
        let mut fired = false;
        for (t, left) in self.armed.iter_mut().filter(|(t, _)| *t == target) {
            debug_assert_eq!(*t, target);
            *left -= 1;
            fired |= *left == 0;
        }
        self.armed.retain(|&(_, left)| left > 0);
        fired
    }

    /// Injections still armed.
    pub fn pending(&self) -> usize {
        self.armed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injections_parse_with_and_without_an_occurrence_and_name_bad_ones() {
        assert_eq!(
            parse_list("iqe@3+ite+ dma-fault@1 "),
            Ok(vec![
                Injection {
                    target: Target::QueueError,
                    nth: 3
                },
                Injection {
                    target: Target::TimeOut,
                    nth: 1
                },
                Injection {
                    target: Target::DmaFault,
                    nth: 1
                },
            ])
        );
        assert_eq!(parse_list("# a comment\nice\n").map(|v| v.len()), Ok(1));
        assert_eq!(
            parse_list("iqe@0"),
            Err(InjectionError::Occurrence("iqe@0".into()))
        );
        assert_eq!(
            parse_list("boom"),
            Err(InjectionError::Unknown("boom".into()))
        );
        assert_eq!(
            "records-full@2".parse::<Injection>().map(|i| i.to_string()),
            Ok("records-full@2".to_string())
        );
    }

    #[test]
    fn an_injection_fires_on_its_nth_occurrence_once() {
        let mut j = Injector::default();
        j.arm("iqe@3".parse().expect("valid"));
        j.arm("dma-fault".parse().expect("valid"));
        assert!(!j.occurs(Target::QueueError));
        assert!(!j.occurs(Target::QueueError));
        assert!(j.occurs(Target::DmaFault), "counted apart");
        assert!(j.occurs(Target::QueueError));
        assert!(!j.occurs(Target::QueueError), "once");
        assert_eq!(j.pending(), 0);
        for _ in 0..MAX_ARMED {
            assert!(j.arm("ice".parse().expect("valid")));
        }
        assert!(!j.arm("ice".parse().expect("valid")), "bounded");
    }
}
