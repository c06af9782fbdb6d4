//! What kind of virtualization this host offers.
//!
//! Kiln targets hardware-assisted KVM (Intel VMX or AMD SVM). Some cloud
//! machines instead expose PVM (`kvm_pvm`, pagetable-based virtualization):
//! its `/dev/kvm` answers the whole KVM API, but guest kernel mode is
//! emulated instruction by instruction, so a stock Linux guest cannot boot
//! (it would need a PVM-enabled guest kernel). Telling the two apart up front
//! turns a mysterious hang or emulation failure into a plain sentence.

use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::report::one_line;

/// The CPU extension behind hardware KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareVirt {
    /// Intel VT-x (`vmx` in /proc/cpuinfo).
    IntelVmx,
    /// AMD-V (`svm` in /proc/cpuinfo).
    AmdSvm,
}

/// The host's virtualization, as far as Kiln is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostVirt {
    /// Hardware KVM with an openable /dev/kvm: Kiln boots guests here.
    HardwareKvm(HardwareVirt),
    /// PVM: /dev/kvm works, but stock Linux guests cannot boot under it.
    Pvm,
    /// No usable KVM.
    Unavailable {
        /// What is missing and what to do about it, for a person.
        reason: String,
    },
}

impl HostVirt {
    /// True when Kiln can boot Linux guests on this host directly.
    pub fn can_boot_linux(&self) -> bool {
        matches!(self, HostVirt::HardwareKvm(_))
    }
}

impl fmt::Display for HostVirt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostVirt::HardwareKvm(HardwareVirt::IntelVmx) => {
                write!(f, "hardware KVM (Intel VT-x): Kiln boots VMs here")
            }
            HostVirt::HardwareKvm(HardwareVirt::AmdSvm) => {
                write!(f, "hardware KVM (AMD-V): Kiln boots VMs here")
            }
            HostVirt::Pvm => write!(
                f,
                "PVM (kvm_pvm): /dev/kvm works, but guest kernel mode is emulated and a stock \
                 Linux guest cannot boot under it; use a host with hardware KVM (VMX/SVM), or \
                 `cargo xtask vm-test`, which nests a hardware-style KVM under QEMU"
            ),
            HostVirt::Unavailable { reason } => write!(f, "no usable KVM: {reason}"),
        }
    }
}

/// The opt-in that lets the VM process run on PVM anyway: set to `1` by
/// the benchmarks that boot the stub guest (docs/stub-guest.md), whose few
/// instructions run natively under PVM; Linux guests still cannot.
pub const ALLOW_PVM_ENV: &str = "KILN_ALLOW_PVM";

/// True when [`ALLOW_PVM_ENV`] is exactly `1`: the VM process may then
/// run on PVM. Anything else, unset included, keeps PVM refused.
pub fn pvm_allowed() -> bool {
    allows_pvm(env::var_os(ALLOW_PVM_ENV).as_deref())
}

fn allows_pvm(value: Option<&OsStr>) -> bool {
    value == Some(OsStr::new("1"))
}

/// Where detection looks: the real host, or a fake tree in tests.
#[derive(Debug)]
struct HostPaths {
    cpuinfo: PathBuf,
    pvm_module: PathBuf,
    kvm_device: PathBuf,
}

impl HostPaths {
    fn under(root: &Path) -> Self {
        HostPaths {
            cpuinfo: root.join("proc/cpuinfo"),
            pvm_module: root.join("sys/module/kvm_pvm"),
            kvm_device: root.join("dev/kvm"),
        }
    }
}

/// Detects the host's virtualization.
pub fn detect() -> HostVirt {
    detect_with(&HostPaths::under(Path::new("/")))
}

fn detect_with(paths: &HostPaths) -> HostVirt {
    // PVM first: its /dev/kvm opens fine, so only the module tells it apart.
    if paths.pvm_module.exists() {
        return HostVirt::Pvm;
    }
    let cpu = fs::read_to_string(&paths.cpuinfo)
        .ok()
        .and_then(|text| hardware_virt(&text));
    let device = paths.kvm_device.display();
    match (cpu, open_read_write(&paths.kvm_device)) {
        (Some(cpu), Ok(())) => HostVirt::HardwareKvm(cpu),
        (Some(cpu), Err(err)) if err.kind() == io::ErrorKind::NotFound => {
            let module = match cpu {
                HardwareVirt::IntelVmx => "kvm_intel",
                HardwareVirt::AmdSvm => "kvm_amd",
            };
            unavailable(format!(
                "{device} does not exist although the CPU supports virtualization; \
                 load the {module} module (modprobe {module})"
            ))
        }
        (Some(_), Err(err)) => unavailable(format!(
            "cannot open {device}: {}; run as root or add your user to the kvm group",
            one_line(&err)
        )),
        (None, _) => unavailable(
            "the CPU shows neither vmx nor svm in /proc/cpuinfo; enable hardware \
             virtualization (in the firmware, or nested virtualization on a cloud VM)"
                .to_string(),
        ),
    }
}

fn unavailable(reason: String) -> HostVirt {
    HostVirt::Unavailable { reason }
}

fn open_read_write(path: &Path) -> io::Result<()> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
}

/// The hardware virtualization flag of the first CPU in /proc/cpuinfo.
fn hardware_virt(cpuinfo: &str) -> Option<HardwareVirt> {
    let flags = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags")?.split_once(':').map(|(_, v)| v))?;
    flags.split_whitespace().find_map(|flag| match flag {
        "vmx" => Some(HardwareVirt::IntelVmx),
        "svm" => Some(HardwareVirt::AmdSvm),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD_FLAGS: &str = "processor\t: 0\nflags\t\t: fpu vme de pse svm npt\n";
    const PVM_FLAGS: &str = "processor\t: 0\nflags\t\t: fpu vme de pse hypervisor\n";

    /// A fake host tree: cpuinfo text, and whether kvm_pvm and /dev/kvm exist.
    fn fake_host(cpuinfo: &str, pvm: bool, kvm: bool) -> (tempfile::TempDir, HostPaths) {
        let root = tempfile::tempdir().unwrap();
        let paths = HostPaths::under(root.path());
        fs::create_dir_all(paths.cpuinfo.parent().unwrap()).unwrap();
        fs::write(&paths.cpuinfo, cpuinfo).unwrap();
        if pvm {
            fs::create_dir_all(&paths.pvm_module).unwrap();
        }
        if kvm {
            fs::create_dir_all(paths.kvm_device.parent().unwrap()).unwrap();
            fs::write(&paths.kvm_device, "").unwrap();
        }
        (root, paths)
    }

    #[test]
    fn svm_with_device_is_hardware_kvm() {
        let (_root, paths) = fake_host(AMD_FLAGS, false, true);
        assert_eq!(
            detect_with(&paths),
            HostVirt::HardwareKvm(HardwareVirt::AmdSvm)
        );
        assert!(detect_with(&paths).can_boot_linux());
    }

    #[test]
    fn vmx_is_recognised() {
        assert_eq!(
            hardware_virt("flags : fpu vmx sse\n"),
            Some(HardwareVirt::IntelVmx)
        );
        assert_eq!(hardware_virt("flags : fpu sse\n"), None);
        assert_eq!(hardware_virt("no flags line\n"), None);
    }

    #[test]
    fn pvm_module_wins_even_with_a_device() {
        let (_root, paths) = fake_host(PVM_FLAGS, true, true);
        assert_eq!(detect_with(&paths), HostVirt::Pvm);
        assert!(!HostVirt::Pvm.can_boot_linux());
        assert!(HostVirt::Pvm.to_string().contains("cannot boot"));
    }

    #[test]
    fn only_an_explicit_1_allows_pvm() {
        assert!(allows_pvm(Some(OsStr::new("1"))));
        for refused in [
            None,
            Some(""),
            Some("0"),
            Some("yes"),
            Some("true"),
            Some(" 1"),
        ] {
            assert!(!allows_pvm(refused.map(OsStr::new)), "{refused:?}");
        }
    }

    #[test]
    fn missing_device_names_the_module_to_load() {
        let (_root, paths) = fake_host(AMD_FLAGS, false, false);
        let HostVirt::Unavailable { reason } = detect_with(&paths) else {
            panic!("expected Unavailable");
        };
        assert!(reason.contains("modprobe kvm_amd"), "{reason}");
    }

    #[test]
    fn no_virtualization_flag_is_unavailable() {
        let (_root, paths) = fake_host(PVM_FLAGS, false, true);
        let HostVirt::Unavailable { reason } = detect_with(&paths) else {
            panic!("expected Unavailable");
        };
        assert!(reason.contains("neither vmx nor svm"), "{reason}");
    }
}
