//! A tap device (Documentation/networking/tuntap.rst): the host end of a
//! guest's NIC. Each frame read from or written to it starts with a
//! virtio-net header, so the guest's checksum and segmentation offloads
//! pass through to the host's stack untouched.
//!
//! The tap is not persistent: it exists while a descriptor of it is open.
//! An instance's supervisor creates it (in the host's namespaces, with
//! CAP_NET_ADMIN), attaches it to the bridge and passes the open
//! descriptor to its VM process ([`Tap::adopt`]), then closes its own: the
//! tap goes with the VM process however that ends, nothing is left behind
//! after a crash, and the VM process itself needs no CAP_NET_ADMIN.
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The clone device every tap is made from.
pub const TUN_DEVICE: &str = "/dev/net/tun";
/// Interface names hold at most this many bytes, the NUL included
/// (linux/if.h).
pub const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// Why a tap cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long for IFNAMSIZ, or not plain ASCII.
    #[error("tap name {0:?}: expected 1 to {max} ASCII letters, digits, '-' or '_'", max = IFNAMSIZ - 1)]
    Name(String),
    /// The tun clone device could not be opened.
    #[error("cannot open {TUN_DEVICE} (is the tun module loaded?)")]
    Open(#[source] io::Error),
    /// TUNSETIFF refused for want of CAP_NET_ADMIN: said plainly, with
    /// what to do about it.
    #[error(
        "cannot create tap {name}: permission denied: a NIC needs CAP_NET_ADMIN (run as root, or use --network none)"
    )]
    Permission {
        /// The tap's name.
        name: String,
    },
    /// TUNSETIFF failed for another reason.
    #[error("cannot create tap {name}")]
    Create {
        /// The tap's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The eventfds of the NIC's queues could not be created.
    #[error("cannot create the queue eventfds of the NIC on tap {name}")]
    EventFd {
        /// The tap's name.
        name: String,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An inherited descriptor is not the tap the VM definition names.
    #[error("descriptor {fd} is not the tap {expected} (TUNGETIFF says {found:?})")]
    NotTheTap {
        /// The inherited descriptor.
        fd: RawFd,
        /// The tap the VM definition names.
        expected: String,
        /// The interface the descriptor is attached to, if it is a tap.
        found: Option<String>,
    },
    /// A configuration ioctl on the made tap failed.
    #[error("tap {name}: {what} failed")]
    Ioctl {
        /// The tap's name.
        name: String,
        /// The ioctl, by its name in linux/if_tun.h.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` (or attaches to it, if this process may):
    /// frames carry a `vnet_hdr_len`-byte virtio-net header, reads and
    /// writes never block. The host offloads start off ([`Tap::set_offload`]).
    pub fn create(name: &str, vnet_hdr_len: usize) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::Open)?;
        let mut request = ifreq(name);
        // IFF_NO_PI: no packet-information prefix; IFF_VNET_HDR: the
        // virtio-net header instead.
        request.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and updates an ifreq; `request` is one
        // that outlives the call, and `file` is an open tun descriptor.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if rc < 0 {
            let source = io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) => TapError::Permission { name },
                _ => TapError::Create { name, source },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let len = libc::c_int::try_from(vnet_hdr_len).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `len` is.
        let rc = unsafe { libc::ioctl(tap.fd(), libc::TUNSETVNETHDRSZ, &len) };
        tap.check(rc, "TUNSETVNETHDRSZ")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Takes over the tap `name` that a parent created and passed down as
    /// the descriptor `fd`, and checks with TUNGETIFF that it is that tap,
    /// with the virtio-net header: a tap needs no CAP_NET_ADMIN to be used,
    /// only to be made. (A VM process execs nothing, so the descriptor's
    /// close-on-exec flag is left as it came.)
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process
    /// owns: the tap closes it when dropped.
    pub unsafe fn adopt(fd: RawFd, name: &str) -> Result<Tap, TapError> {
        // SAFETY: the caller's guarantee, passed on.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let not_the_tap = |found| TapError::NotTheTap {
            fd,
            expected: name.to_string(),
            found,
        };
        let mut request = ifreq("");
        // SAFETY: TUNGETIFF fills in an ifreq, which `request` is; a
        // descriptor that is not a tun device fails it (ENOTTY, EBADFD).
        let rc = unsafe { libc::ioctl(owned.as_raw_fd(), libc::TUNGETIFF, &mut request) };
        if rc < 0 {
            return Err(not_the_tap(None));
        }
        let found = ifreq_name(&request);
        // SAFETY: TUNGETIFF filled in the flags member.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        let wanted = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if found != name || flags & wanted != wanted {
            return Err(not_the_tap(Some(found)));
        }
        Ok(Tap {
            file: File::from(owned),
            name: found,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloaded frames the tap may hand over (`TUN_F_*`): those the
    /// guest's driver said it takes. Others it checksums and segments
    /// itself first.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        self.check(rc, "TUNSETOFFLOAD")
    }

    /// Reads one frame (header first) into `buf`; WouldBlock when none waits.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (header first), whole.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let written = self.file.write(frame)?;
        if written == frame.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "the tap took {written} of {} bytes",
                frame.len()
            )))
        }
    }

    /// The tap's descriptor, for the event loop to watch: valid while
    /// the tap lives.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc >= 0 {
            return Ok(());
        }
        Err(TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        })
    }
}

impl AsFd for Tap {
    /// The tap's descriptor, for a supervisor to pass to its VM process.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<Tap> for OwnedFd {
    /// The tap's descriptor, which keeps the tap while it is open.
    fn from(tap: Tap) -> OwnedFd {
        tap.file.into()
    }
}

/// Kiln's tap names are plain ASCII, so no shell quoting or locale
/// question ever arises, and fit IFNAMSIZ.
fn check_name(name: &str) -> Result<(), TapError> {
    let valid = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(TapError::Name(name.to_string()))
    }
}

/// An ifreq naming the interface `name` (checked to fit), all else zero.
pub fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request
}

/// The interface name an ifreq holds, up to its NUL.
fn ifreq_name(request: &libc::ifreq) -> String {
    let bytes: Vec<u8> = request
        .ifr_name
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd;

    use super::*;

    #[test]
    fn names_must_fit_ifnamsiz_and_be_plain() {
        assert!(check_name("kt-0123456789ab").is_ok());
        for bad in ["", "kt-0123456789abc", "a b", "tap/0", "tàp"] {
            assert!(matches!(check_name(bad), Err(TapError::Name(_))), "{bad}");
        }
    }

    #[test]
    fn ifreq_carries_the_name_nul_terminated() {
        let request = ifreq("kiln0");
        let name: Vec<u8> = request.ifr_name.iter().map(|&c| c as u8).collect();
        assert_eq!(&name[..6], b"kiln0\0");
        assert_eq!(ifreq_name(&request), "kiln0");
    }

    /// A descriptor that is not a tun device is refused by name.
    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let raw = OwnedFd::from(file).into_raw_fd();
        // SAFETY: `raw` is open and, released above, owned by nothing else.
        let err = unsafe { Tap::adopt(raw, "kt-x") }.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("descriptor {raw} is not the tap kt-x (TUNGETIFF says None)")
        );
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; the e2e suite covers it
    /// where those exist. Here only the permission path is checked when
    /// the test runs unprivileged.
    #[test]
    fn a_tap_is_made_and_goes_with_its_descriptor() {
        match Tap::create("kt-unit-test", 12) {
            Ok(tap) => {
                assert_eq!(tap.name(), "kt-unit-test");
                let sys = std::path::Path::new("/sys/class/net/kt-unit-test");
                assert!(sys.exists());
                // Passed on as a descriptor, it is the same tap.
                let raw = OwnedFd::from(tap.file).into_raw_fd();
                // SAFETY: `raw` was released from its owner just above.
                let tap = unsafe { Tap::adopt(raw, "kt-unit-test") }.unwrap();
                let copy = tap.as_fd().try_clone_to_owned().unwrap().into_raw_fd();
                // SAFETY: `copy` is a fresh duplicate that nothing else owns.
                let other = unsafe { Tap::adopt(copy, "kt-other") };
                assert!(matches!(
                    other,
                    Err(TapError::NotTheTap { found: Some(found), .. }) if found == "kt-unit-test"
                ));
                drop(tap);
                assert!(!sys.exists(), "a dropped tap must vanish");
            }
            Err(TapError::Permission { .. } | TapError::Open(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
}
