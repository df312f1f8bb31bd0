//! The x86_64 Linux boot path: memory layout, kernel loading (PVH ELF or
//! bzImage), boot parameters, e820, MP table, CPUID, registers and MSRs.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
