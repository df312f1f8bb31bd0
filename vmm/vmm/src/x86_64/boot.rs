//! Loading the kernel and writing what it reads at entry: the command line,
//! the PVH start info or the boot_params "zero page", both with the e820 map.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::layout::{
    e820_map, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};
use super::regs::EntryMode;

/// Offset of the 64-bit entry point in a loaded bzImage's protected-mode part.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open the kernel {0}: {1}")]
    Open(String, std::io::Error),
    #[error("{0} is neither an ELF vmlinux nor a bzImage ({1})")]
    Load(String, linux_loader::loader::Error),
    #[error("the kernel command line is {0} bytes; at most {max} fit", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot structures to guest memory")]
    Write,
}

/// Where and how to enter the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub mode: EntryMode,
    pub entry: u64,
    /// The bzImage's setup header, for boot_params.
    pub setup_header: Option<setup_header>,
    pub kernel_end: u64,
}

/// Loads a PVH ELF vmlinux (preferred) or a bzImage at 1 MiB.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> Result<KernelEntry, BootError> {
    let shown = path.display().to_string();
    let mut f = File::open(path).map_err(|e| BootError::Open(shown.clone(), e))?;
    match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let (mode, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (EntryMode::Pvh, a.raw_value()),
                _ => (EntryMode::Linux64, r.kernel_load.raw_value()),
            };
            return Ok(KernelEntry {
                mode,
                entry,
                setup_header: None,
                kernel_end: r.kernel_end,
            });
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {}
        Err(e) => return Err(BootError::Load(shown, e)),
    }
    let mut f = File::open(path).map_err(|e| BootError::Open(shown.clone(), e))?;
    let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BootError::Load(shown, e))?;
    Ok(KernelEntry {
        mode: EntryMode::Linux64,
        entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY,
        setup_header: r.setup_header,
        kernel_end: r.kernel_end,
    })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn write_cmdline<M: GuestMemory>(mem: &M, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::Write)
}

/// PVH: hvm_start_info and its memory map.
pub fn write_pvh_info<M: GuestMemory>(mem: &M, mem_size: u64) -> Result<(), BootError> {
    let map = e820_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(|_| BootError::Write)?;
    }
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::Write)
}

/// Linux boot protocol: the zero page.
pub fn write_boot_params<M: GuestMemory>(
    mem: &M,
    header: Option<setup_header>,
    cmdline_len: usize,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if p.hdr.kernel_alignment == 0 {
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    let map = e820_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
        };
    }
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::{ram_regions, E820_RAM};
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn cmdline_is_nul_terminated_and_bounded() {
        let m = mem(64 << 20);
        write_cmdline(&m, "console=ttyS0 root=/dev/vda").unwrap();
        let mut b = [0u8; 28];
        m.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"console=ttyS0 root=/dev/vda\0");
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE)),
            Err(BootError::CmdlineTooLong(_))
        ));
        assert!(matches!(
            write_cmdline(&m, "a\0b"),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn pvh_start_info_reads_back() {
        let m = mem(256 << 20);
        write_pvh_info(&m, 256 << 20).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(
            (info.magic, info.version, info.cmdline_paddr),
            (PVH_MAGIC, 1, CMDLINE_START)
        );
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(
                info.memmap_paddr + 2 * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
            ))
            .unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn boot_params_read_back() {
        let m = mem(4 << 30);
        write_boot_params(&m, None, 30, 4 << 30).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (flag, magic, ptr, size, loader) = (
            p.hdr.boot_flag,
            p.hdr.header,
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.type_of_loader,
        );
        assert_eq!(
            (flag, magic, ptr, size, loader),
            (0xaa55, KERNEL_HDR_MAGIC, CMDLINE_START as u32, 30, 0xff)
        );
        assert_eq!(p.e820_entries, 4);
        let hi = p.e820_table[3];
        let (a, s) = (hi.addr, hi.size);
        assert_eq!((a, s), (1 << 32, (4u64 << 30) - 0xc000_0000));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("berth-notkernel-{}", std::process::id()));
        std::fs::write(&dir, vec![0x55u8; 8192]).unwrap();
        let r = load_kernel(&mem(64 << 20), &dir);
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(r, Err(BootError::Load(..))), "{r:?}");
        assert!(matches!(
            load_kernel(&mem(64 << 20), Path::new("/nonexistent")),
            Err(BootError::Open(..))
        ));
    }
}
