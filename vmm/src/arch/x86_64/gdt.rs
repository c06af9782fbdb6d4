//! The boot GDT and the segment registers that match it.
//!
//! Long mode ignores most of a segment descriptor, but KVM checks that the
//! hidden parts of the segment registers are consistent with a real
//! descriptor, so both come from the same table (Intel SDM Vol. 3A §3.4.5).
use kvm_bindings::kvm_segment;

/// GDT index of the 64-bit code segment (selector 0x08).
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment (selector 0x10).
pub const DATA_INDEX: u16 = 2;
/// GDT index of the TSS (selector 0x18).
pub const TSS_INDEX: u16 = 3;

/// Access/flags bits of each entry, as `flags << 8 | access` (SDM §3.4.5):
/// code: present, DPL0, execute/read, accessed; L=1 (64-bit), G=1.
const CODE_FLAGS: u16 = 0xa09b;
/// data: present, DPL0, read/write, accessed; D/B=1, G=1.
const DATA_FLAGS: u16 = 0xc093;
/// TSS: present, type 0xb (busy 32/64-bit TSS), G=1.
const TSS_FLAGS: u16 = 0x808b;

/// The boot GDT: null, code, data, TSS (all flat: base 0, limit 4 GiB).
pub const BOOT_GDT: [u64; 4] = [
    0,
    descriptor(CODE_FLAGS, 0, 0xfffff),
    descriptor(DATA_FLAGS, 0, 0xfffff),
    descriptor(TSS_FLAGS, 0, 0xfffff),
];

/// Packs a segment descriptor (SDM Vol. 3A Figure 3-8).
const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The segment register value KVM expects for GDT entry `index`.
pub fn segment(index: u16) -> kvm_segment {
    let entry = BOOT_GDT[usize::from(index)];
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granularity = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        // With G set the limit counts 4 KiB pages.
        limit: if granularity == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granularity,
        avl: bit(52),
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_values_linux_uses_for_boot() {
        // The same encodings as the kernel's GDT_ENTRY(0xa09b, 0, 0xfffff) etc.
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_their_descriptor() {
        let code = segment(CODE_INDEX);
        assert_eq!(
            (code.selector, code.type_, code.l, code.db, code.s),
            (0x08, 0xb, 1, 0, 1)
        );
        assert_eq!(
            (code.base, code.limit, code.g, code.present),
            (0, 0xffff_ffff, 1, 1)
        );
        let data = segment(DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.l, data.db),
            (0x10, 0x3, 0, 1)
        );
        let tss = segment(TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }
}
