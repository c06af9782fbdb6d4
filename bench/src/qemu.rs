//! The peer: QEMU's microvm machine on KVM, with the guest kernel and
//! root filesystem Kiln boots (or the stub guest, without a disk), set up
//! as close to Kiln's VM as QEMU goes (one legacy UART, no
//! PIT/PIC/ACPI/option ROMs, virtio-mmio block).
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_init::protocol::{INIT_PORT, VMM_CMDLINE_FLAG};

/// The QEMU binary `--peer qemu` runs, looked up on `PATH`.
pub const QEMU: &str = "qemu-system-x86_64";

/// The guest's CPU: the host's, as Kiln gives it.
pub const CPU_HOST: &str = "host";
/// The host's CPU without `IA32_ARCH_CAPABILITIES` (MSR 0x10a), which
/// QEMU cannot set under PVM (docs/stub-guest.md).
pub const CPU_HOST_PVM: &str = "host,-arch-capabilities";

/// What sits on the guest-init port (0x440).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitPort {
    /// Nothing: the guest's writes there go nowhere.
    None,
    /// An `isa-debugcon` whose bytes go to QEMU's stdout, and `kiln.vmm=1`
    /// on the command line so that guest-init reports there as it does to
    /// Kiln: the first byte on stdout is guest-init's boot-timer write.
    /// Needs `console` set, as stdout is taken.
    BootTimerOnStdout,
    /// An `isa-debug-exit`: the first write there (the stub's
    /// `InitStarted`) ends QEMU, with exit status 1 (`value << 1 | 1`, of
    /// which the status keeps the low byte).
    ExitOnWrite,
}

/// QEMU's exit status when the guest wrote `InitStarted` to an
/// [`InitPort::ExitOnWrite`].
pub const DEBUG_EXIT_STATUS: i32 = 1;

/// One QEMU microvm boot.
#[derive(Clone, Debug)]
pub struct Microvm {
    /// An uncompressed vmlinux, the one `kiln run` boots.
    pub kernel: PathBuf,
    /// A raw ext4 root filesystem (`kiln image flatten` of the image);
    /// none for a guest without a disk (the stub).
    pub rootfs: Option<PathBuf>,
    /// `-cpu`: [`CPU_HOST`] or [`CPU_HOST_PVM`].
    pub cpu: &'static str,
    /// Guest memory in MiB, as `kiln run` gives it.
    pub memory_mib: u32,
    /// Virtual CPUs, as `kiln run` gives them.
    pub vcpus: u8,
    /// Writes to the root filesystem are thrown away when QEMU ends
    /// (`snapshot=on`, like an unnamed `kiln run`'s overlay), else the
    /// disk is read-only and mounted `ro`.
    pub throwaway_writes: bool,
    /// Words appended to the kernel command line.
    pub extra_cmdline: String,
    /// Where the serial console goes: a file, or QEMU's stdout when none.
    pub console: Option<PathBuf>,
    /// What sits on the guest-init port.
    pub init_port: InitPort,
}

impl Microvm {
    /// The command line, for the QEMU binary `qemu`.
    pub fn command(&self, qemu: &Path) -> Command {
        let mut cmd = Command::new(qemu);
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,acpi=off",
        ])
        .args(["-enable-kvm", "-cpu", self.cpu])
        .args(["-m", &self.memory_mib.to_string()])
        .args(["-smp", &self.vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        match &self.console {
            Some(file) => cmd.arg("-serial").arg(format!("file:{}", file.display())),
            None => cmd.args(["-serial", "stdio"]),
        };
        match self.init_port {
            InitPort::None => {}
            InitPort::BootTimerOnStdout => {
                cmd.args(["-chardev", "stdio,id=boot-timer", "-device"])
                    .arg(format!(
                        "isa-debugcon,iobase={INIT_PORT:#x},chardev=boot-timer"
                    ));
            }
            InitPort::ExitOnWrite => {
                cmd.arg("-device")
                    .arg(format!("isa-debug-exit,iobase={INIT_PORT:#x},iosize=4"));
            }
        }
        cmd.arg("-kernel")
            .arg(&self.kernel)
            .arg("-append")
            .arg(self.kernel_cmdline());
        if let Some(drive) = self.drive() {
            cmd.arg("-drive")
                .arg(drive)
                .args(["-device", "virtio-blk-device,drive=root"]);
        }
        cmd
    }

    /// Kiln's kernel command line where QEMU's machine differs: a triple
    /// fault resets it (no i8042 wired to reset), QEMU adds the
    /// virtio-mmio devices itself.
    fn kernel_cmdline(&self) -> String {
        let mut words = vec!["console=ttyS0", "reboot=t", "panic=-1", "quiet"];
        if self.init_port == InitPort::BootTimerOnStdout {
            words.push(VMM_CMDLINE_FLAG);
        }
        match (&self.rootfs, self.throwaway_writes) {
            (None, _) => {}
            (Some(_), true) => words.push("root=/dev/vda rw"),
            (Some(_), false) => words.push("root=/dev/vda ro"),
        }
        words.push(self.extra_cmdline.trim());
        words.join(" ").trim_end().to_string()
    }

    fn drive(&self) -> Option<String> {
        // QEMU's option syntax doubles a comma inside a value.
        let file = self
            .rootfs
            .as_ref()?
            .display()
            .to_string()
            .replace(',', ",,");
        let mode = if self.throwaway_writes {
            "snapshot=on"
        } else {
            "readonly=on"
        };
        Some(format!("id=root,file={file},format=raw,if=none,{mode}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn microvm() -> Microvm {
        Microvm {
            kernel: "/k/vmlinux".into(),
            rootfs: Some("/w/root,1.ext4".into()),
            cpu: CPU_HOST,
            memory_mib: 128,
            vcpus: 1,
            throwaway_writes: true,
            extra_cmdline: String::new(),
            console: Some("/w/console.log".into()),
            init_port: InitPort::BootTimerOnStdout,
        }
    }

    #[test]
    fn the_boot_timer_is_a_debugcon_on_the_guest_init_port() {
        let args = args(&microvm().command(Path::new(QEMU)));
        let at = |word: &str| args.iter().position(|a| a == word).unwrap();
        assert_eq!(args[at("-serial") + 1], "file:/w/console.log");
        assert_eq!(args[at("-chardev") + 1], "stdio,id=boot-timer");
        assert_eq!(
            args[at("-chardev") + 3],
            "isa-debugcon,iobase=0x440,chardev=boot-timer"
        );
        assert_eq!(
            args[at("-append") + 1],
            "console=ttyS0 reboot=t panic=-1 quiet kiln.vmm=1 root=/dev/vda rw"
        );
        assert_eq!(
            args[at("-drive") + 1],
            "id=root,file=/w/root,,1.ext4,format=raw,if=none,snapshot=on"
        );
        assert_eq!(args[at("-m") + 1], "128");
    }

    #[test]
    fn the_stub_has_no_disk_and_its_first_write_ends_qemu() {
        let vm = Microvm {
            rootfs: None,
            cpu: CPU_HOST_PVM,
            console: None,
            init_port: InitPort::ExitOnWrite,
            ..microvm()
        };
        let args = args(&vm.command(Path::new(QEMU)));
        let at = |word: &str| args.iter().position(|a| a == word).unwrap();
        assert_eq!(args[at("-cpu") + 1], "host,-arch-capabilities");
        assert_eq!(
            args[at("-device") + 1],
            "isa-debug-exit,iobase=0x440,iosize=4"
        );
        assert_eq!(
            args[at("-append") + 1],
            "console=ttyS0 reboot=t panic=-1 quiet"
        );
        assert!(!args.iter().any(|a| a == "-drive"), "{args:?}");
    }

    #[test]
    fn a_plain_boot_has_its_console_on_stdout_and_a_read_only_root() {
        let vm = Microvm {
            throwaway_writes: false,
            console: None,
            init_port: InitPort::None,
            extra_cmdline: "kiln.entrypoint=/x ".into(),
            ..microvm()
        };
        let args = args(&vm.command(Path::new(QEMU)));
        assert!(args.windows(2).any(|w| w == ["-serial", "stdio"]));
        assert!(!args.iter().any(|a| a.contains("debugcon")));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro kiln.entrypoint=/x"
        );
        assert!(args.iter().any(|a| a.ends_with(",readonly=on")));
    }
}
