//! `cargo xtask stub`: the stub guest, a few instructions that stand in
//! for a guest kernel when the VMM's own cost is measured
//! (docs/stub-guest.md). `xtask/stub/stub.s` is assembled and linked with
//! binutils (`as`, `ld`): plain assembly needs no Rust target for bare
//! metal, and one source assembles the code twice, for the 64-bit entry
//! Kiln uses and the 32-bit PVH entry QEMU uses. The result is checked with
//! Kiln's own loader and installed as `$KILN_HOME/stub/vmlinux-stub`.
//!
//! `xtask/stub/hostile.s`, the hostile stub guest (docs/security.md, "Bad
//! guests"), is built the same way, 64-bit only (it never runs under
//! QEMU), and installed as `$KILN_HOME/stub/vmlinux-hostile`.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use goblin::elf::Elf;
use goblin::elf::program_header::{PF_X, PT_LOAD};
use guest_init::protocol::{self, InitEvent};
use kiln_vmm::arch::x86_64::layout;
use kiln_vmm::devices::virtio::mmio::MMIO_REGION_SIZE;

use crate::{apt, install, sh};

/// What assembling the stub needs.
pub const BUILD_PACKAGES: &[&str] = &["binutils"];
/// Where the stub is installed, under `$KILN_HOME`.
const INSTALLED: &str = "stub/vmlinux-stub";
/// Where the hostile stub is installed, under `$KILN_HOME`.
const HOSTILE_INSTALLED: &str = "stub/vmlinux-hostile";
/// The ELF note that names the PVH entry: owner "Xen", type
/// XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h).
const PVH_NOTE_OWNER: &str = "Xen";
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Guest memory the check loads the stub into: the least a VM gets.
const CHECK_MEMORY_MIB: u32 = 16;

/// The stub's two ways in.
#[derive(Debug, PartialEq, Eq)]
struct Entries {
    /// The ELF entry: the Linux 64-bit boot protocol's, which Kiln uses.
    elf: u64,
    /// The PVH note's: a 32-bit protected-mode entry, which QEMU uses.
    pvh: u64,
}

/// One of the stub guests' sources under `xtask/stub`.
struct Source {
    /// The file's name without `.s`; also the ELF's, `vmlinux-NAME`.
    name: &'static str,
    /// The symbol `ld` makes the ELF entry.
    entry: &'static str,
}

/// The stub guest.
const STUB: Source = Source {
    name: "stub",
    entry: "stub_entry64",
};
/// The hostile stub guest.
const HOSTILE: Source = Source {
    name: "hostile",
    entry: "hostile_entry",
};

/// Assembles the stub, checks it, installs it and returns the installed path.
pub fn build() -> Result<PathBuf> {
    apt::ensure(BUILD_PACKAGES)?;
    let out = sh::workspace_root().join("target/stub");
    let stub = assemble(&out, &STUB)?;
    let entries = check(&stub)?;
    let size = fs::metadata(&stub)?.len();
    eprintln!(
        "xtask: the stub guest is {size} bytes, ELF entry {:#x}, PVH entry {:#x}",
        entries.elf, entries.pvh
    );
    let installed = install::kiln_home().join(INSTALLED);
    install::publish(&stub, &installed)?;
    Ok(installed)
}

/// Assembles the hostile stub, checks that Kiln's loader takes it,
/// installs it and returns the installed path.
pub fn build_hostile() -> Result<PathBuf> {
    apt::ensure(BUILD_PACKAGES)?;
    let out = sh::workspace_root().join("target/stub");
    let hostile = assemble(&out, &HOSTILE)?;
    load(&hostile)?;
    let installed = install::kiln_home().join(HOSTILE_INSTALLED);
    install::publish(&hostile, &installed)?;
    Ok(installed)
}

/// Assembles and links `xtask/stub/NAME.s` into `out`; returns the ELF.
/// Both stubs share `stub.ld`'s layout: `ld -e` names each one's entry.
fn assemble(out: &Path, source: &Source) -> Result<PathBuf> {
    let dir = sh::workspace_root().join("xtask/stub");
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let object = out.join(format!("{}.o", source.name));
    let elf = out.join(format!("vmlinux-{}", source.name));
    // The numbers the stubs share with the VMM, from the one place that
    // defines each.
    let defsyms = [
        ("INIT_PORT", u64::from(protocol::INIT_PORT)),
        ("INIT_STARTED", InitEvent::InitStarted.encode().into()),
        ("VIRTIO_MMIO_START", layout::VIRTIO_MMIO_START),
        ("MMIO_SLOT_SIZE", MMIO_REGION_SIZE),
        ("IOAPIC_START", layout::IOAPIC_START),
        ("PDPT_START", layout::PDPTE_START),
    ];
    sh::run(
        Command::new("as")
            .args(["--64", "--fatal-warnings"])
            .args(
                defsyms
                    .iter()
                    .map(|(name, value)| format!("--defsym={name}={value:#x}")),
            )
            .arg("-o")
            .arg(&object)
            .arg(dir.join(format!("{}.s", source.name))),
    )?;
    sh::run(
        Command::new("ld")
            .arg("-T")
            .arg(dir.join("stub.ld"))
            .args(["-e", source.entry])
            // Page-aligned segments, but no larger pages than x86's 4 KiB:
            // the file stays a few KiB.
            .args(["-z", "max-page-size=0x1000", "--build-id=none"])
            .args(["--fatal-warnings", "-o"])
            .arg(&elf)
            .arg(&object),
    )?;
    Ok(elf)
}

/// Loads `stub` with Kiln's loader, as `kiln run --kernel` would, and
/// finds its PVH entry; both entries must lie in its loaded code.
fn check(stub: &Path) -> Result<Entries> {
    let shown = stub.display();
    let elf_entry = load(stub)?;
    let bytes = fs::read(stub).with_context(|| format!("cannot read {shown}"))?;
    let elf = Elf::parse(&bytes).with_context(|| format!("{shown} is not an ELF file"))?;
    let pvh = pvh_entry(&elf, &bytes)
        .with_context(|| format!("{shown}: malformed ELF notes"))?
        .with_context(|| format!("{shown} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"))?;
    for (what, address) in [("ELF entry", elf_entry), ("PVH entry", pvh)] {
        ensure!(
            in_loaded_code(&elf, address),
            "{shown}: the {what} {address:#x} is not in an executable loadable segment"
        );
    }
    Ok(Entries {
        elf: elf_entry,
        pvh,
    })
}

/// Loads `stub` with Kiln's loader, as `kiln run --kernel` would; returns
/// its entry.
fn load(stub: &Path) -> Result<u64> {
    let memory = kiln_vmm::vstate::memory::create(CHECK_MEMORY_MIB)?;
    kiln_vmm::loader::load_kernel(&memory, stub)
        .with_context(|| format!("Kiln's loader refuses {}", stub.display()))
}

/// The address the XEN_ELFNOTE_PHYS32_ENTRY note gives, if there is one:
/// 4 bytes, or 8 as Linux writes it; either way below 4 GiB.
fn pvh_entry(elf: &Elf, bytes: &[u8]) -> Result<Option<u64>> {
    let Some(notes) = elf.iter_note_headers(bytes) else {
        return Ok(None);
    };
    for note in notes {
        let note = note?;
        if note.name != PVH_NOTE_OWNER || note.n_type != XEN_ELFNOTE_PHYS32_ENTRY {
            continue;
        }
        let address = match *note.desc {
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => bail!("a PVH entry note of {} bytes", note.desc.len()),
        };
        ensure!(
            u32::try_from(address).is_ok(),
            "the PVH entry {address:#x} is above 4 GiB"
        );
        return Ok(Some(address));
    }
    Ok(None)
}

/// True when `address` is in the file-backed part of an executable
/// PT_LOAD segment (by physical address, as both loaders place them).
fn in_loaded_code(elf: &Elf, address: u64) -> bool {
    elf.program_headers.iter().any(|ph| {
        ph.p_type == PT_LOAD
            && ph.p_flags & PF_X != 0
            && (ph.p_paddr..ph.p_paddr + ph.p_filesz).contains(&address)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs binutils (`cargo xtask test` installs them up front).
    #[test]
    fn the_stub_assembles_with_both_entries_in_its_code() {
        let out = tempfile::tempdir().unwrap();
        let stub = assemble(out.path(), &STUB).unwrap();
        let entries = check(&stub).unwrap();
        // stub.ld puts the 64-bit entry first, at 1 MiB.
        assert_eq!(entries.elf, 0x10_0000);
        assert_ne!(entries.pvh, entries.elf, "one copy of the code per mode");
        let size = fs::metadata(&stub).unwrap().len();
        assert!(size <= 8 << 10, "{size} bytes");
    }

    #[test]
    fn a_stub_without_the_pvh_note_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let stub = assemble(out.path(), &STUB).unwrap();
        let mut bytes = fs::read(&stub).unwrap();
        // The note's type comes just before its owner's name.
        let name = bytes.windows(4).position(|w| w == b"Xen\0").unwrap();
        bytes[name - 4] = XEN_ELFNOTE_PHYS32_ENTRY as u8 + 1;
        fs::write(&stub, &bytes).unwrap();
        let err = format!("{:#}", check(&stub).unwrap_err());
        assert!(err.contains("has no PVH entry note"), "{err}");
    }

    #[test]
    fn the_hostile_stub_assembles_and_loads_at_its_entry() {
        let out = tempfile::tempdir().unwrap();
        let hostile = assemble(out.path(), &HOSTILE).unwrap();
        assert_eq!(load(&hostile).unwrap(), 0x10_0000);
    }
}
