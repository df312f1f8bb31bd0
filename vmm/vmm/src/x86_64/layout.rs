//! Guest physical memory layout (also in docs/vmm.md).
//!
//! ```text
//! 0x0000_0000  real-mode IVT and BIOS data (left zero)
//! 0x0000_0500  GDT (4 entries)            0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info         0x0000_6100  PVH e820 memmap
//! 0x0000_7000  bzImage boot_params ("zero page")
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4   0x0000_a000 PDPT   0x0000_b000 PD (identity map of 0..1 GiB, bzImage path)
//! 0x0002_0000  kernel command line (up to 4 KiB, NUL-terminated)
//! 0x0009_fc00  MP table (floating pointer + configuration table), reserved in e820
//! 0x000a_0000  legacy VGA/ROM hole (not RAM)
//! 0x0010_0000  kernel load address; RAM continues to min(memory, 3 GiB)
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices from 0xd000_0000, 4 KiB each,
//!              IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6100;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const MPTABLE_START: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0xa0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices (IOAPIC pins 5..=23).
pub const VIRTIO_IRQ_START: u32 = 5;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest RAM regions for `size` bytes of memory: below the MMIO hole,
/// and the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(FOUR_GIB), (size - MMIO_HOLE_START) as usize),
        ]
    }
}

/// The e820 map the guest is told: (start, length, type).
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_START, E820_RAM),
        (MPTABLE_START, EBDA_END - MPTABLE_START, E820_RESERVED),
    ];
    let low_end = size.min(MMIO_HOLE_START);
    map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if size > MMIO_HOLE_START {
        map.push((FOUR_GIB, size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

/// Address and IRQ of the `n`th virtio-mmio device.
pub fn virtio_slot(n: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + n as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_START + n as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let big = ram_regions(4 << 30);
        assert_eq!(big[1], (GuestAddress(FOUR_GIB), 1 << 30));
        let e = e820_map(4 << 30);
        assert_eq!(e[2], (HIMEM_START, MMIO_HOLE_START - HIMEM_START, E820_RAM));
        assert_eq!(e[3], (FOUR_GIB, 1 << 30, E820_RAM));
        // Structures below the kernel don't overlap.
        let mut spans = [
            (GDT_START, 32),
            (IDT_START, 8),
            (PVH_INFO_START, 0x100),
            (PVH_MEMMAP_START, 0x100),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x3000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, EBDA_END - MPTABLE_START),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?}");
        }
        let (last, irq) = virtio_slot(MAX_VIRTIO_DEVICES - 1);
        assert!(last + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR as u64);
        assert_eq!(irq, 23);
    }
}
