//! The Intel MultiProcessor Specification 1.4 table, which tells a kernel
//! without ACPI how many CPUs there are and how ISA interrupts reach the
//! IOAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_END, IOAPIC_ADDR, MPTABLE_START};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const IRQS: u8 = 24;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6, and the FPU + APIC feature bits.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("{0} vCPUs don't fit in the MP table area (at most {1})")]
    TooManyCpus(u8, u8),
    #[error("cannot write the MP table to guest memory")]
    Write,
}

/// Most vCPUs whose table fits below the end of the reserved area.
pub fn max_cpus() -> u8 {
    let fixed = FLOATING_LEN + HEADER_LEN + 8 + 8 + 8 * IRQS as usize + 2 * 8;
    ((EBDA_END - MPTABLE_START) as usize - fixed)
        .div_euclid(20)
        .min(254) as u8
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table for `cpus` vCPUs (APIC ids 0..cpus, IOAPIC id cpus).
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > max_cpus() {
        return Err(MptableError::TooManyCpus(cpus, max_cpus()));
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[
            0,
            id,
            LAPIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IRQS {
        // Conforming polarity and trigger; ISA bus 0 IRQ n → IOAPIC pin n.
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 ExtINT (the 8259), LINT1 NMI, to every local APIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_START as u32 + FLOATING_LEN as u32;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec 1.4, checksum below
    header.extend_from_slice(b"BERTHVMM");
    header.extend_from_slice(b"BERTH-VM-1.0");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table at [`MPTABLE_START`].
pub fn write<M: GuestMemory>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    let table = build(cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

/// What a kernel would find: (CPU APIC ids, IOAPIC address, IRQ routes),
/// after checking signatures and checksums. For tests.
pub fn parse(bytes: &[u8]) -> Option<(Vec<u8>, u32, usize)> {
    let fp = bytes.get(..FLOATING_LEN)?;
    if &fp[..4] != b"_MP_" || fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return None;
    }
    let addr = u32::from_le_bytes(fp[4..8].try_into().ok()?) as u64;
    let off = (addr - MPTABLE_START) as usize;
    let len = u16::from_le_bytes(bytes.get(off + 4..off + 6)?.try_into().ok()?) as usize;
    let table = bytes.get(off..off + len)?;
    if &table[..4] != b"PCMP" || table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) != 0 {
        return None;
    }
    let (mut cpus, mut ioapic, mut routes) = (Vec::new(), 0, 0);
    let mut p = HEADER_LEN;
    while p < table.len() {
        match table[p] {
            0 => {
                cpus.push(table[p + 1]);
                p += 20;
            }
            2 => {
                ioapic = u32::from_le_bytes(table[p + 4..p + 8].try_into().ok()?);
                p += 8;
            }
            3 => {
                routes += 1;
                p += 8;
            }
            1 | 4 => p += 8,
            _ => return None,
        }
    }
    Some((cpus, ioapic, routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_reads_back() {
        for cpus in [1u8, 2, 8, max_cpus()] {
            let t = build(cpus).unwrap();
            assert!(MPTABLE_START + t.len() as u64 <= EBDA_END);
            let (ids, ioapic, routes) = parse(&t).expect("valid signatures and checksums");
            assert_eq!(ids, (0..cpus).collect::<Vec<_>>());
            assert_eq!(ioapic, IOAPIC_ADDR);
            assert_eq!(routes, 24);
        }
        assert!(max_cpus() >= 32);
        assert!(build(0).is_err());
        assert!(build(max_cpus() + 1).is_err());
    }

    #[test]
    fn corrupted_tables_are_rejected() {
        let mut t = build(2).unwrap();
        t[30] ^= 1;
        assert!(parse(&t).is_none());
    }
}
