//! What the protocol checker reports: the kinds of guest-driver violation it can prove, the
//! spec section that makes each one a violation, and one report of one.

use serde::{Serialize, Serializer};

use crate::SourceId;

/// A kind of violation. Section numbers are those of the VT-d spec, revision 5.10 (chapter 6:
/// "Caching Translation Information").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A request was served from an IOTLB entry that no longer matched the tables, and the
    /// entry was still not invalidated at the next wait descriptor (or when the VM stopped): a
    /// missing IOTLB invalidation, whose effect on hardware is the stale translation.
    StaleIotlb,
    /// Caching mode: a request found a not-present entry cached where the tables now map a
    /// page, and it was not invalidated by the next wait: an entry made present without the
    /// invalidation CM asks for.
    CachingModeNoInvalidation,
    /// A cached context entry no longer matched its table at a wait, and still did not at the
    /// next one (or when the VM stopped), or a request used it so: no context-cache
    /// invalidation after changing the entry.
    StaleContext,
    /// As [`Kind::StaleContext`], for a PASID entry and the PASID-cache.
    StalePasid,
    /// As [`Kind::StaleContext`], for an interrupt remapping table entry and the
    /// interrupt-entry cache.
    StaleIrte,
    /// A page-selective invalidation whose address is not aligned to its mask (or an
    /// index-selective interrupt-entry-cache invalidation whose index is not aligned to its
    /// mask): hardware ignores the low bits, so the pages invalidated are not those meant.
    MisalignedInvalidation,
    /// An invalidation naming a domain id that no context or PASID entry ever carried: it
    /// invalidates nothing, so the domain the driver meant keeps its stale entries.
    UnknownDomain,
    /// A wait descriptor whose status write targets memory that is not guest RAM: the driver
    /// polls a word the unit cannot write.
    WaitStatusNotRam,
    /// A request to an IOVA whose translation was invalidated and waited for while the tables
    /// no longer mapped it: DMA after its unmap completed.
    UseAfterUnmap,
    /// A request to an IOVA whose old translation was invalidated but not yet waited for, now
    /// mapped elsewhere: the IOVA was reused before its invalidation completed.
    ReuseBeforeWait,
    /// A translated request (ATS) was served from a device-TLB entry that no longer matched
    /// the tables, still not invalidated at the next wait (or when the VM stopped).
    StaleDeviceTlb,
    /// An IOTLB invalidation covered pages an ATS-enabled device holds in its device-TLB, and
    /// the wait that followed came without a device-TLB invalidation for them.
    MissingDeviceTlbInvalidation,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::StaleIotlb,
        Kind::CachingModeNoInvalidation,
        Kind::StaleContext,
        Kind::StalePasid,
        Kind::StaleIrte,
        Kind::MisalignedInvalidation,
        Kind::UnknownDomain,
        Kind::WaitStatusNotRam,
        Kind::UseAfterUnmap,
        Kind::ReuseBeforeWait,
        Kind::StaleDeviceTlb,
        Kind::MissingDeviceTlbInvalidation,
    ];

    /// Position in [`Kind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name reports and counters use.
    pub fn name(self) -> &'static str {
        match self {
            Kind::StaleIotlb => "stale-iotlb",
            Kind::CachingModeNoInvalidation => "caching-mode-no-invalidation",
            Kind::StaleContext => "stale-context-entry",
            Kind::StalePasid => "stale-pasid-entry",
            Kind::StaleIrte => "stale-irte",
            Kind::MisalignedInvalidation => "misaligned-invalidation",
            Kind::UnknownDomain => "unknown-domain",
            Kind::WaitStatusNotRam => "wait-status-not-ram",
            Kind::UseAfterUnmap => "use-after-unmap",
            Kind::ReuseBeforeWait => "reuse-before-wait",
            Kind::StaleDeviceTlb => "stale-device-tlb",
            Kind::MissingDeviceTlbInvalidation => "missing-device-tlb-invalidation",
        }
    }

    /// The spec sections that make it a violation.
    pub fn spec(self) -> &'static str {
        match self {
            // 6.2.4: hardware may keep using a cached translation until it is invalidated;
            // 6.5.3.3: modifying a present leaf needs an IOTLB invalidation.
            Kind::StaleIotlb => "6.2.4, 6.5.3.3",
            // 6.1: with CM set, not-present entries may be cached, so software invalidates
            // after making any entry present.
            Kind::CachingModeNoInvalidation => "6.1",
            // 6.2.2, 6.5.2.1, 6.5.3.3: a modified context entry needs a context-cache
            // invalidation.
            Kind::StaleContext => "6.2.2, 6.5.2.1, 6.5.3.3",
            // 6.2.3, 6.5.2.2, 6.5.3.3: a modified PASID entry needs a PASID-cache invalidation.
            Kind::StalePasid => "6.2.3, 6.5.2.2, 6.5.3.3",
            // 6.4, 6.5.2.7: a modified IRTE needs an interrupt-entry-cache invalidation.
            Kind::StaleIrte => "6.4, 6.5.2.7",
            // 6.5.2.3 and 6.5.1.2 (IOTLB, AM: size-aligned regions), 6.5.2.4 (PASID-based
            // IOTLB), 6.5.2.7 (IIDX and IM).
            Kind::MisalignedInvalidation => "6.5.2.3, 6.5.2.4, 6.5.1.2, 6.5.2.7",
            // 6.2.1: cached entries are tagged with the domain id of their context or PASID
            // entry; domain-selective invalidations (6.5.2.1-6.5.2.4) match that tag.
            Kind::UnknownDomain => "6.2.1, 6.5.2.1-6.5.2.4",
            // 6.5.2.8: the status write is a write to memory at the status address.
            Kind::WaitStatusNotRam => "6.5.2.8",
            // 6.5.2.8: the wait completed the unmap's invalidation; 7.1.3: the request faults.
            Kind::UseAfterUnmap => "6.5.2.8, 7.1.3",
            // 6.5.2.8, 6.5.2.11: an invalidation is known complete only once a later wait
            // descriptor completes; until then the old translation may still be used.
            Kind::ReuseBeforeWait => "6.5.2.8, 6.5.2.11",
            // 6.3, 6.5.2.5, 6.5.3.3: an ATS device's cached translations are invalidated with
            // device-TLB invalidations after the IOTLB one.
            Kind::StaleDeviceTlb | Kind::MissingDeviceTlbInvalidation => "6.3, 6.5.2.5, 6.5.3.3",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

fn source_id<S: Serializer>(source: &Option<SourceId>, s: S) -> Result<S::Ok, S::Error> {
    match source {
        Some(id) => s.serialize_str(&id.to_string()),
        None => s.serialize_none(),
    }
}

/// The register write during which the checker found a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RegisterWrite {
    pub name: &'static str,
    pub offset: u64,
    pub value: u64,
}

/// A guest instruction: the vCPU and its instruction pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Instruction {
    pub vcpu: u32,
    pub rip: u64,
}

impl From<vm_device::origin::Origin> for Instruction {
    fn from(o: vm_device::origin::Origin) -> Self {
        Instruction {
            vcpu: o.vcpu,
            rip: o.rip,
        }
    }
}

/// One violation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub kind: Kind,
    /// The spec sections that make it one.
    pub spec: &'static str,
    #[serde(serialize_with = "source_id")]
    pub source: Option<SourceId>,
    pub domain: Option<u16>,
    pub pasid: Option<u32>,
    /// The input address concerned.
    pub iova: Option<u64>,
    /// The interrupt index concerned (IRTE kinds).
    pub index: Option<u32>,
    /// The queue position (IQH, in 128-bit units) of the descriptor concerned.
    pub descriptor: Option<u64>,
    /// The register write that exposed it.
    pub register: Option<RegisterWrite>,
    /// The guest instruction that made that register write.
    pub at: Option<Instruction>,
    /// The guest instruction that started the request concerned (a device register write),
    /// for kinds a request exposes.
    pub request_at: Option<Instruction>,
    /// What happened, in words.
    pub detail: String,
}

impl Violation {
    /// A violation of `kind` with nothing else known yet.
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Violation {
            kind,
            spec: kind.spec(),
            source: None,
            domain: None,
            pasid: None,
            iova: None,
            index: None,
            descriptor: None,
            register: None,
            at: None,
            request_at: None,
            detail: detail.into(),
        }
    }

    pub fn source(mut self, s: SourceId) -> Self {
        self.source = Some(s);
        self
    }

    pub fn domain(mut self, d: Option<u16>) -> Self {
        self.domain = d;
        self
    }

    pub fn pasid(mut self, p: Option<u32>) -> Self {
        self.pasid = p;
        self
    }

    pub fn iova(mut self, a: u64) -> Self {
        self.iova = Some(a);
        self
    }

    pub fn index(mut self, i: u32) -> Self {
        self.index = Some(i);
        self
    }

    pub fn spec(mut self, s: &'static str) -> Self {
        self.spec = s;
        self
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (spec {})", self.kind, self.spec)?;
        if let Some(s) = self.source {
            write!(f, " source {s}")?;
        }
        if let Some(d) = self.domain {
            write!(f, " domain {d}")?;
        }
        if let Some(p) = self.pasid {
            write!(f, " PASID {p}")?;
        }
        if let Some(a) = self.iova {
            write!(f, " IOVA {a:#x}")?;
        }
        if let Some(i) = self.index {
            write!(f, " index {i}")?;
        }
        if let Some(d) = self.descriptor {
            write!(f, " descriptor at IQH {d}")?;
        }
        if let Some(r) = self.register {
            write!(f, " on {} write {:#x}", r.name, r.value)?;
        }
        if let Some(i) = self.at {
            write!(f, " by vCPU {} at RIP {:#x}", i.vcpu, i.rip)?;
        }
        if let Some(i) = self.request_at {
            write!(
                f,
                " (request started by vCPU {} at RIP {:#x})",
                i.vcpu, i.rip
            )?;
        }
        write!(f, ": {}", self.detail)
    }
}
