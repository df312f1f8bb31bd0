//! Per-vCPU CPUID from what the hypervisor supports.

use berth_hypervisor::CpuidEntry;

/// The leaves for vCPU `id` of `cpus`: APIC ids, logical processor counts
/// and the x2APIC topology leaf say which CPU this is; the hypervisor bit
/// is set so the guest uses its paravirtual clock.
pub fn for_vcpu(supported: &[CpuidEntry], id: u8, cpus: u8) -> Vec<CpuidEntry> {
    let core_bits = 32 - (cpus.max(1) as u32 - 1).leading_zeros();
    supported
        .iter()
        .map(|e| {
            let mut e = *e;
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | ((cpus as u32) << 16) | ((id as u32) << 24);
                    e.ecx |= 1 << 31;
                    if cpus > 1 {
                        e.edx |= 1 << 28;
                    }
                }
                // Cores per package in eax[31:26] of each cache leaf; threads
                // sharing the cache in eax[25:14] left as the host said.
                4 if e.eax & 0x1f != 0 => {
                    e.eax = (e.eax & 0x03ff_ffff) | ((cpus as u32 - 1) << 26);
                }
                0xb => {
                    e.edx = id as u32;
                    match e.index {
                        0 => {
                            e.eax = 0;
                            e.ebx = 1;
                            e.ecx = 0x100;
                        }
                        1 => {
                            e.eax = core_bits;
                            e.ebx = cpus as u32;
                            e.ecx = 0x201;
                        }
                        i => {
                            e.eax = 0;
                            e.ebx = 0;
                            e.ecx = i;
                        }
                    }
                }
                _ => {}
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            indexed: function == 0xb || function == 4,
            eax: 0x21,
            ebx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn topology_per_vcpu() {
        let sup = [
            leaf(1, 0),
            leaf(4, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
        ];
        let v = for_vcpu(&sup, 2, 4);
        assert_eq!(v[0].ebx >> 24, 2, "initial APIC id");
        assert_eq!((v[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(v[0].ebx & 0xffff, 0xffff, "other fields kept");
        assert!(v[0].ecx & (1 << 31) != 0, "hypervisor bit");
        assert_eq!(v[1].eax >> 26, 3);
        assert_eq!((v[2].ebx, v[2].ecx, v[2].edx), (1, 0x100, 2));
        assert_eq!((v[3].eax, v[3].ebx, v[3].ecx, v[3].edx), (2, 4, 0x201, 2));
        assert_eq!((v[4].ebx, v[4].ecx), (0, 2));
    }
}

/// Hides the features a software instruction emulator (kvm_pvm) can't
/// execute: CX16, POPCNT, XSAVE (and with it AVX), AVX2/AVX-512, SMEP,
/// SMAP, XSAVES. For kernels booted on such a host for testing only.
pub fn hide_for_instruction_emulator(entries: &mut [CpuidEntry]) {
    for e in entries {
        match (e.function, e.index) {
            (1, _) => e.ecx &= !((1 << 13) | (1 << 23) | (1 << 26) | (1 << 27) | (1 << 28)),
            (7, 0) => {
                // AVX2, SMEP, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL, SMAP.
                e.ebx &= !((1 << 5)
                    | (1 << 7)
                    | (1 << 16)
                    | (1 << 17)
                    | (1 << 20)
                    | (1 << 21)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 30)
                    | (1 << 31));
                e.ecx &= !(1 << 1); // AVX512_VBMI
            }
            (0xd, 1) => e.eax &= !(1 << 3),
            _ => {}
        }
    }
}

#[cfg(test)]
mod emulator_tests {
    use super::*;

    #[test]
    fn emulator_mask_clears_the_listed_bits() {
        let mut v = vec![
            CpuidEntry {
                function: 1,
                ecx: u32::MAX,
                ..Default::default()
            },
            CpuidEntry {
                function: 7,
                ebx: u32::MAX,
                ..Default::default()
            },
        ];
        hide_for_instruction_emulator(&mut v);
        assert_eq!(v[0].ecx & (1 << 23), 0, "POPCNT");
        assert_eq!(v[1].ebx & (1 << 20), 0, "SMAP");
        assert_ne!(v[0].ecx & 1, 0, "SSE3 untouched");
    }
}
