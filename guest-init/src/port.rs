//! Reporting events to the VMM on the guest-init port (see `protocol`).
use guest_init::protocol::{INIT_PORT, INIT_PORT_WIDTH, InitEvent};

/// The port, once `ioperm(2)` has granted this process access to it.
pub struct InitPort(());

impl InitPort {
    /// Gains access to the port when the command line says Kiln's VMM
    /// booted us; `None` otherwise, or when the kernel refuses (a kernel
    /// without X86_IOPL_IOPERM), which is said once on the console.
    pub fn open(cmdline: &str) -> Option<InitPort> {
        let flag = guest_init::protocol::VMM_CMDLINE_FLAG;
        if !cmdline.split_whitespace().any(|word| word == flag) {
            return None;
        }
        // SAFETY: ioperm only changes this process's I/O permission bitmap
        // for the given range; no memory is involved.
        let rc = unsafe { libc::ioperm(INIT_PORT.into(), INIT_PORT_WIDTH as libc::c_ulong, 1) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            eprintln!("guest-init: cannot report to the VMM (ioperm port {INIT_PORT:#x}: {err})");
            return None;
        }
        Some(InitPort(()))
    }

    /// Writes one event.
    pub fn report(&self, event: InitEvent) {
        // SAFETY: `self` exists only after ioperm granted this port, so the
        // `out` does not fault; writing it has no effect on this process's
        // memory. The VMM handles it as a 4-byte I/O exit.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") INIT_PORT, in("eax") event.encode(), options(nomem, nostack, preserves_flags));
        }
    }
}
