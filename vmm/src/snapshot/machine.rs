//! What a snapshot's `state` file holds about the machine, and the checks
//! a restore makes before anything runs: the files are whole and of this
//! format (see [`super::file`]), the memory file is the guest's size, and
//! this host's CPU offers every feature the guest was shown.
use std::path::{Path, PathBuf};

use kvm_bindings::{CpuId, kvm_cpuid_entry2};
use serde::{Deserialize, Serialize};

use super::file::{self, SnapshotFileError};
use crate::arch::x86_64::cpuid::{LEAF1_ECX_KILN_BITS, LEAF1_EDX_KILN_BITS};
use crate::devices::ioapic::IoapicState;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::net::NetDeviceState;
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::{VmError, VmState};

/// The snapshot directory's state file: everything but RAM, framed by
/// [`super::file`]. Written last, so its presence says the rest is whole.
pub const STATE_FILE: &str = "state";
/// The snapshot directory's guest RAM: one flat, sparse image of the
/// guest's memory, mapped copy-on-write at restore.
pub const MEMORY_FILE: &str = "memory";
/// The root disk's writes at the snapshot (snapshots that carry their disk).
pub const ROOT_OVERLAY_FILE: &str = "root.overlay";

/// Everything about a paused VM but its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM in MiB; the memory file must be exactly this size.
    pub memory_mib: u32,
    /// The kernel command line it booted with (for `kiln snapshot` to show).
    pub cmdline: String,
    /// The VM-wide KVM state (kvmclock).
    pub vm: VmState,
    /// Each vCPU's registers and KVM state (its local APIC's too), in
    /// vCPU index order.
    pub vcpus: Vec<VcpuState>,
    /// The IOAPIC's registers.
    pub ioapic: IoapicState,
    /// The serial port's registers and the bytes in its receive FIFO.
    pub serial: SerialSnapshot,
    /// The virtio-mmio block devices, in slot order (/dev/vda first).
    pub disks: Vec<TransportState>,
    /// The vsock device, in the slot after the disks (snapshots from
    /// before vsock have none). Its connections are not saved.
    #[serde(default)]
    pub vsock: Option<TransportState>,
    /// The NIC, in the slot after the vsock device (or the disks), with
    /// the MAC its guest knows.
    #[serde(default)]
    pub net: Option<NetState>,
}

/// A NIC at a snapshot: its transport and the MAC the guest's driver read
/// at probe time (and keeps using: it never re-reads it).
#[derive(Debug, Serialize, Deserialize)]
pub struct NetState {
    /// The NIC's own state: the MAC address the guest's driver holds
    /// (saved as `mac`, as before this was a device's state).
    #[serde(rename = "mac")]
    pub device: NetDeviceState,
    /// The NIC's virtio-mmio transport and queues.
    pub transport: TransportState,
}

/// Why a snapshot cannot be taken or restored here.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file cannot be written or read back whole.
    #[error(transparent)]
    File(#[from] SnapshotFileError),
    /// A vCPU's state cannot be saved or restored.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM-wide KVM state cannot be saved or restored.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory cannot be written to or mapped from the memory file.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A disk cannot be flushed before its state is saved.
    #[error(transparent)]
    Disk(#[from] BlockError),
    /// A file of the snapshot directory cannot be created, read or sized.
    #[error("cannot read or write the snapshot file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why the file operation failed.
        #[source]
        source: std::io::Error,
    },
    /// The memory file is not the size of the guest's RAM: it was cut
    /// short or belongs to another snapshot.
    #[error("{path}: the memory file holds {found} bytes; the snapshot's guest has {expected}")]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its size in bytes.
        found: u64,
        /// The guest's RAM in bytes, from the state file.
        expected: u64,
    },
    /// The state file lists no vCPUs, so there is no CPUID to check and
    /// nothing to resume.
    #[error("{path}: the snapshot has no vCPUs")]
    NoVcpus {
        /// The state file.
        path: PathBuf,
    },
    /// The snapshot was taken on another CPU vendor, whose MSRs and CPUID
    /// the guest cannot keep using here.
    #[error(
        "{path}: taken on a {saved} CPU; this host's is {host}: a snapshot only restores on the CPU vendor it was taken on"
    )]
    CpuVendor {
        /// The state file.
        path: PathBuf,
        /// The vendor string the guest was shown (CPUID leaf 0).
        saved: String,
        /// This host's vendor string.
        host: String,
    },
    /// The guest was shown a CPU feature this host cannot offer; it would
    /// fault on the first instruction that uses it.
    #[error(
        "{path}: the guest was shown CPU features this host lacks (CPUID leaf {leaf:#x}.{subleaf} {register}: bits {missing:#x})"
    )]
    CpuFeatures {
        /// The state file.
        path: PathBuf,
        /// The CPUID leaf (EAX input).
        leaf: u32,
        /// The CPUID subleaf (ECX input).
        subleaf: u32,
        /// The output register holding the features: "eax" to "edx".
        register: &'static str,
        /// The feature bits the guest saw and this host lacks.
        missing: u32,
    },
}

/// A snapshot read back and checked against its memory file.
#[derive(Debug)]
pub struct LoadedSnapshot {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The Kiln version that wrote it.
    pub kiln_version: String,
    /// The machine state to restore.
    pub machine: MachineState,
}

impl LoadedSnapshot {
    /// The snapshot's memory file, which a restore maps as guest RAM.
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

/// Reads the snapshot in `dir` and checks it is whole: the state file's
/// frame and checksum, and a memory file of the guest's size.
pub fn load(dir: &Path) -> Result<LoadedSnapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let saved = file::read_state::<MachineState>(&state_path)?;
    let machine = saved.state;
    if machine.vcpus.is_empty() {
        return Err(SnapshotError::NoVcpus { path: state_path });
    }
    let memory = dir.join(MEMORY_FILE);
    let found = std::fs::metadata(&memory)
        .map_err(|source| SnapshotError::Io {
            path: memory.clone(),
            source,
        })?
        .len();
    let expected = u64::from(machine.memory_mib) << 20;
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: memory,
            found,
            expected,
        });
    }
    Ok(LoadedSnapshot {
        dir: dir.to_path_buf(),
        kiln_version: saved.kiln_version,
        machine,
    })
}

/// The CPUID registers whose bits are features a guest may rely on once
/// it has seen them (Intel SDM Vol. 2A "CPUID"; AMD APM Vol. 3 E.3):
/// (leaf, subleaf, register).
const FEATURE_REGISTERS: [(u32, u32, &str); 8] = [
    (0x1, 0, "ecx"),
    (0x1, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0xd, 0, "eax"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

/// Checks that this host (`supported`: KVM_GET_SUPPORTED_CPUID) can show
/// the guest everything its saved CPUID (`saved`) showed it.
pub fn check_cpu(
    path: &Path,
    saved: &[kvm_cpuid_entry2],
    supported: &CpuId,
) -> Result<(), SnapshotError> {
    let host = supported.as_slice();
    let (saved_vendor, host_vendor) = (vendor(saved), vendor(host));
    if saved_vendor != host_vendor {
        return Err(SnapshotError::CpuVendor {
            path: path.to_path_buf(),
            saved: saved_vendor,
            host: host_vendor,
        });
    }
    for (leaf, subleaf, register) in FEATURE_REGISTERS {
        let kiln_bits = match (leaf, register) {
            (0x1, "ecx") => LEAF1_ECX_KILN_BITS,
            (0x1, "edx") => LEAF1_EDX_KILN_BITS,
            _ => 0,
        };
        let wanted = register_of(saved, leaf, subleaf, register) & !kiln_bits;
        let offered = register_of(host, leaf, subleaf, register);
        let missing = wanted & !offered;
        if missing != 0 {
            return Err(SnapshotError::CpuFeatures {
                path: path.to_path_buf(),
                leaf,
                subleaf,
                register,
                missing,
            });
        }
    }
    Ok(())
}

/// Leaf 0's vendor string (EBX, EDX, ECX), e.g. "AuthenticAMD".
fn vendor(entries: &[kvm_cpuid_entry2]) -> String {
    let bytes: Vec<u8> = ["ebx", "edx", "ecx"]
        .iter()
        .flat_map(|register| register_of(entries, 0, 0, register).to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn register_of(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, register: &str) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && (e.index == subleaf || leaf_ignores_subleaf(leaf)))
        .map_or(0, |e| match register {
            "eax" => e.eax,
            "ebx" => e.ebx,
            "ecx" => e.ecx,
            _ => e.edx,
        })
}

/// Leaves without subleaves report index 0, but KVM does not promise it.
fn leaf_ignores_subleaf(leaf: u32) -> bool {
    matches!(leaf, 0x0 | 0x1 | 0x8000_0001)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// Leaf 0 for `vendor` (12 bytes), and leaf 1 with `ecx`.
    fn cpu(vendor: &[u8; 12], leaf1_ecx: u32) -> Vec<kvm_cpuid_entry2> {
        let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        vec![
            entry(0, word(0), word(8), word(4)),
            entry(1, 0, leaf1_ecx, 0),
        ]
    }

    fn host(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    #[test]
    fn the_same_cpu_or_a_richer_one_restores() {
        let path = Path::new("snap/state");
        let saved = cpu(b"AuthenticAMD", 0b1010);
        assert_eq!(vendor(&saved), "AuthenticAMD");
        check_cpu(path, &saved, &host(&saved)).unwrap();
        check_cpu(path, &saved, &host(&cpu(b"AuthenticAMD", 0b1111))).unwrap();
        // Bits Kiln sets itself (HYPERVISOR, and TSC-deadline, which
        // older kernels emulate without reporting) are not asked of the host.
        let with_kiln_bits = cpu(b"AuthenticAMD", 0b1010 | (1 << 31) | (1 << 24));
        check_cpu(path, &with_kiln_bits, &host(&saved)).unwrap();
    }

    #[test]
    fn a_missing_feature_or_another_vendor_is_refused_by_name() {
        let path = Path::new("snap/state");
        // Leaf 1 ECX bit 4, a feature bit Kiln passes through unchanged.
        let saved = cpu(b"AuthenticAMD", 0b10100);
        let err = check_cpu(path, &saved, &host(&cpu(b"AuthenticAMD", 0b00100))).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::CpuFeatures {
                    leaf: 1,
                    missing: 0b10000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("snap/state"), "{err}");
        let err = check_cpu(path, &saved, &host(&cpu(b"GenuineIntel", 0b1010))).unwrap_err();
        assert!(err.to_string().contains("GenuineIntel"), "{err}");
    }
}
