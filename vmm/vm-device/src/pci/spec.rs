//! PCI configuration-space constants, named after the specifications (and Linux's
//! `include/uapi/linux/pci_regs.h`, which uses the same names).

// Type-0 header, byte offsets (PCI Local Bus 3.0, 6.1, Figure 6-1).
pub const PCI_VENDOR_ID: usize = 0x00;
pub const PCI_COMMAND: usize = 0x04;
pub const PCI_STATUS: usize = 0x06;
pub const PCI_CLASS_REVISION: usize = 0x08;
/// Cache line size, latency timer, header type and BIST.
pub const PCI_CACHE_LINE_SIZE: usize = 0x0c;
/// Header type (6.2.1): layout in bits 6:0, multi-function device in bit 7.
pub const PCI_HEADER_TYPE: usize = 0x0e;
/// Header type bit 7 (6.2.1): the device has functions other than 0.
pub const PCI_HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;
pub const PCI_BASE_ADDRESS_0: usize = 0x10;
/// First byte past the six BAR registers.
pub const PCI_BASE_ADDRESS_5_END: usize = 0x28;
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const PCI_ROM_ADDRESS: usize = 0x30;
pub const PCI_CAPABILITY_LIST: usize = 0x34;
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
pub const PCI_INTERRUPT_PIN: usize = 0x3d;
/// Bytes of conventional configuration space.
pub const PCI_CONFIG_SIZE: usize = 0x100;
/// Bytes of PCI Express extended configuration space per function (PCIe Base 4.0, 7.2.2).
pub const PCIE_CONFIG_SIZE: usize = 0x1000;
/// Dword registers per function.
pub const PCIE_CONFIG_REGS: usize = PCIE_CONFIG_SIZE / 4;

// Command register bits (PCI 3.0, 6.2.2).
pub const PCI_COMMAND_IO: u16 = 0x0001;
pub const PCI_COMMAND_MEMORY: u16 = 0x0002;
pub const PCI_COMMAND_MASTER: u16 = 0x0004;
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x0400;

// Status register (PCI 3.0, 6.2.3): the function's INTx# is asserted; capability list present.
pub const PCI_STATUS_INTERRUPT: u16 = 0x0008;
pub const PCI_STATUS_CAP_LIST: u16 = 0x0010;

// BAR encoding (PCI 3.0, 6.2.5.1).
pub const PCI_BASE_ADDRESS_SPACE_IO: u32 = 0x1;
pub const PCI_BASE_ADDRESS_MEM_TYPE_64: u32 = 0x4;
pub const PCI_BASE_ADDRESS_MEM_PREFETCH: u32 = 0x8;
pub const PCI_BASE_ADDRESS_IO_MASK: u32 = !0x3;
pub const PCI_BASE_ADDRESS_MEM_MASK: u32 = !0xf;
/// Number of BARs in a type-0 header.
pub const PCI_NUM_BARS: usize = 6;
/// The smallest I/O BAR (PCI 3.0, 6.2.5.1: "up to 256 bytes", at least 4).
pub const PCI_IO_BAR_MIN_SIZE: u64 = 4;
/// The smallest memory BAR: its four low bits are type bits.
pub const PCI_MEM_BAR_MIN_SIZE: u64 = 16;
/// Ports the x86 I/O space has (BARs of I/O kind decode below this).
pub const PCI_IO_SPACE_SIZE: u64 = 0x1_0000;

// Capability IDs (PCI 3.0, Appendix H).
pub const PCI_CAP_ID_MSI: u8 = 0x05;
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

// MSI capability (PCI 3.0, 6.8.1): control at +2, address at +4, then data at +8 (32-bit) or
// upper address at +8 and data at +12 (64-bit); mask and pending after the data when
// per-vector masking is capable.
pub const PCI_MSI_FLAGS: usize = 2;
pub const PCI_MSI_FLAGS_ENABLE: u16 = 0x0001;
pub const PCI_MSI_FLAGS_QMASK: u16 = 0x000e;
pub const PCI_MSI_FLAGS_QSIZE: u16 = 0x0070;
pub const PCI_MSI_FLAGS_64BIT: u16 = 0x0080;
pub const PCI_MSI_FLAGS_MASKBIT: u16 = 0x0100;

// MSI-X capability (PCI 3.0, 6.8.2): control at +2, table offset/BIR at +4, PBA offset/BIR at
// +8; table entries of 16 bytes (address low, address high, data, vector control).
pub const PCI_MSIX_FLAGS: usize = 2;
pub const PCI_MSIX_FLAGS_QSIZE: u16 = 0x07ff;
pub const PCI_MSIX_FLAGS_MASKALL: u16 = 0x4000;
pub const PCI_MSIX_FLAGS_ENABLE: u16 = 0x8000;
pub const PCI_MSIX_TABLE: usize = 4;
pub const PCI_MSIX_PBA: usize = 8;
pub const PCI_MSIX_BIR_MASK: u32 = 0x7;
pub const PCI_MSIX_ENTRY_SIZE: u64 = 16;
pub const PCI_MSIX_ENTRY_CTRL_MASKBIT: u32 = 0x1;

// PCI Express capability (PCIe Base 4.0, 7.5.3), version 2: 0x3c bytes for every function
// type; registers a function type does not implement read as zero.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
pub const PCI_CAP_EXP_SIZEOF: usize = 0x3c;
/// PCI Express Capabilities register (7.5.3.2): version in bits 3:0, device/port type in 7:4.
pub const PCI_EXP_FLAGS: usize = 0x02;
pub const PCI_EXP_FLAGS_VERS2: u16 = 0x0002;
pub const PCI_EXP_FLAGS_TYPE_SHIFT: u16 = 4;
/// Device/port type: Root Complex Integrated Endpoint (no link, on a root bus).
pub const PCI_EXP_TYPE_RC_END: u16 = 0x9;
/// Device Capabilities (7.5.3.3): Max_Payload_Size Supported in bits 2:0 (0: 128 bytes);
/// Role-Based Error Reporting, which functions of PCIe 1.1 on set.
pub const PCI_EXP_DEVCAP: usize = 0x04;
pub const PCI_EXP_DEVCAP_RBER: u32 = 0x0000_8000;
/// Device Control (7.5.3.4): error reporting enables (bits 3:0), Enable Relaxed Ordering,
/// Max_Payload_Size (7:5), Enable No Snoop, Max_Read_Request_Size (14:12).
pub const PCI_EXP_DEVCTL: usize = 0x08;
pub const PCI_EXP_DEVCTL_ERRORS: u16 = 0x000f;
pub const PCI_EXP_DEVCTL_RELAX_EN: u16 = 0x0010;
pub const PCI_EXP_DEVCTL_PAYLOAD: u16 = 0x00e0;
pub const PCI_EXP_DEVCTL_NOSNOOP_EN: u16 = 0x0800;
pub const PCI_EXP_DEVCTL_READRQ: u16 = 0x7000;
/// Max_Read_Request_Size's default, 512 bytes (010b).
pub const PCI_EXP_DEVCTL_READRQ_512B: u16 = 0x2000;

// PCI Express extended capabilities (PCIe Base 4.0, 7.6.3): a header dword at 0x100 and on,
// ID in bits 15:0, version in 19:16, next offset in 31:20 (0: the last).
pub const PCI_EXT_CAP_START: usize = PCI_CONFIG_SIZE;
pub const PCI_EXT_CAP_VER_SHIFT: u32 = 16;
pub const PCI_EXT_CAP_NEXT_SHIFT: u32 = 20;

// Address Translation Services extended capability (PCIe Base 4.0, 10.5.1): the ATS
// Capability register at +4, the ATS Control register at +6.
pub const PCI_EXT_CAP_ID_ATS: u16 = 0x000f;
pub const PCI_EXT_CAP_ATS_SIZEOF: usize = 8;
pub const PCI_ATS_CAP: usize = 0x04;
/// Invalidate Queue Depth: invalidate requests the function takes before back-pressure
/// (0: 32).
pub const PCI_ATS_CAP_QDEP_MASK: u16 = 0x001f;
/// Page Aligned Request: untranslated requests start on a 4 KiB boundary.
pub const PCI_ATS_CAP_PAGE_ALIGNED: u16 = 0x0020;
pub const PCI_ATS_CTRL: usize = 0x06;
/// Smallest Translation Unit: 2^(12 + STU) bytes.
pub const PCI_ATS_CTRL_STU_MASK: u16 = 0x001f;
pub const PCI_ATS_CTRL_ENABLE: u16 = 0x8000;
