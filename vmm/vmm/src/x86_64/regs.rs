//! Initial vCPU state for the two entry protocols: PVH (32-bit protected
//! mode, paging off) and the 64-bit Linux boot protocol (long mode with an
//! identity map of the first GiB).

use berth_hypervisor::{DescriptorTable, Regs, Segment, SpecialRegs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSRs and their boot values.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        // Fast string operations on.
        (MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default type write-back.
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit flat protected mode, `rbx` = start info.
    Pvh,
    /// 64-bit Linux boot protocol: long mode, `rsi` = boot_params.
    Linux64,
}

/// A GDT descriptor from flags (access byte in bits 0..8, flags in 12..16),
/// base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The hidden segment state a descriptor loads.
pub fn segment(entry: u64, index: u16) -> Segment {
    let flags = (entry >> 40) as u16;
    let g = (flags >> 15) & 1 == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    Segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: (flags >> 7) & 1 == 1,
        dpl: ((flags >> 5) & 3) as u8,
        db: (flags >> 14) & 1 == 1,
        s: (flags >> 4) & 1 == 1,
        l: (flags >> 13) & 1 == 1,
        g,
        avl: (flags >> 12) & 1 == 1,
        unusable: false,
    }
}

/// The GDT for `mode`: null, code, data, TSS.
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write boot structures to guest memory")]
pub struct WriteError;

/// Writes GDT, IDT and (for 64-bit entry) page tables; returns the special
/// registers to load.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    mode: EntryMode,
    base: SpecialRegs,
) -> Result<SpecialRegs, WriteError> {
    let table = gdt(mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|_| WriteError)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|_| WriteError)?;
    let code = segment(table[1], 1);
    let data = segment(table[2], 2);
    let mut s = base;
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(table[3], 3);
    s.gdt = DescriptorTable {
        base: GDT_START,
        limit: (8 * table.len() - 1) as u16,
    };
    s.idt = DescriptorTable {
        base: IDT_START,
        limit: 7,
    };
    match mode {
        EntryMode::Pvh => {
            s.cr0 = CR0_PE | CR0_ET;
            s.cr3 = 0;
            s.cr4 = 0;
            s.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_map(mem)?;
            s.cr3 = PML4_START;
            s.cr4 = CR4_PAE;
            s.cr0 = CR0_PE | CR0_ET | CR0_PG;
            s.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(s)
}

/// PML4 → PDPT → PD with 512 2-MiB pages: the first GiB, identity mapped.
fn write_identity_map<M: GuestMemory>(mem: &M) -> Result<(), WriteError> {
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(|_| WriteError)?;
    mem.write_obj(PDE_START | 0x3, GuestAddress(PDPTE_START))
        .map_err(|_| WriteError)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(|_| WriteError)?;
    }
    Ok(())
}

/// General registers at the kernel's entry point.
pub fn boot_regs(mode: EntryMode, entry: u64) -> Regs {
    let mut r = Regs {
        rip: entry,
        rflags: 2,
        ..Regs::default()
    };
    match mode {
        EntryMode::Pvh => r.rbx = PVH_INFO_START,
        EntryMode::Linux64 => {
            r.rsp = BOOT_STACK_POINTER;
            r.rbp = BOOT_STACK_POINTER;
            r.rsi = ZERO_PAGE_START;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.base, code64.limit, code64.selector),
            (0, 0xffff_ffff, 8)
        );
        assert!(code64.l && code64.present && code64.s && code64.g && !code64.db);
        assert_eq!(code64.type_, 0xb);
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert!(code32.db && !code32.l);
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.selector), (3, 16));
        let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert!(!tss.s && tss.type_ == 0xb);
        // Base bits are split across the descriptor.
        assert_eq!(
            segment(gdt_entry(0xc093, 0x1234_5678, 0xfff), 0).base,
            0x1234_5678
        );
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use crate::x86_64::layout::ram_regions;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn long_mode_state_and_identity_map_read_back() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ram_regions(64 << 20)).unwrap();
        let s = setup_sregs(&mem, EntryMode::Linux64, SpecialRegs::default()).unwrap();
        assert_eq!(
            (s.cr3, s.cr4 & CR4_PAE, s.cr0 & (CR0_PE | CR0_PG)),
            (PML4_START, CR4_PAE, CR0_PE | CR0_PG)
        );
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert!(s.cs.l && s.cs.selector == 8 && s.ds.selector == 16 && s.tr.selector == 24);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        let pde_last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!((pml4, pdpte), (PDPTE_START | 3, PDE_START | 3));
        assert_eq!(pde_last, (511 << 21) | 0x83, "2 MiB pages up to 1 GiB");
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt(EntryMode::Linux64)[1]);
        let r = boot_regs(EntryMode::Linux64, 0x100200);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100200, ZERO_PAGE_START, BOOT_STACK_POINTER, 2)
        );
    }

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ram_regions(64 << 20)).unwrap();
        let s = setup_sregs(&mem, EntryMode::Pvh, SpecialRegs::default()).unwrap();
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert!(s.cs.db && !s.cs.l && s.cs.limit == 0xffff_ffff);
        assert_eq!(boot_regs(EntryMode::Pvh, 0x1000500).rbx, PVH_INFO_START);
        assert!(boot_msrs()
            .iter()
            .any(|&(i, v)| i == MSR_MTRR_DEF_TYPE && v == (1 << 11) | 6));
    }
}
