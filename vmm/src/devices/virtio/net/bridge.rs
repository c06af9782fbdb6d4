//! The host side of instance networking: the Kiln bridge with the
//! gateway address, and taps joining it. All through the netdevice and
//! bridge ioctls (netdevice(7), linux/sockios.h), so nothing beyond the
//! kernel is needed on the host (no `ip`, no netlink library).
//!
//! The bridge is made on first use and stays, as docker0 does; it holds
//! no state of any instance. Taps are not persistent and leave the bridge
//! when their VM process ends.
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::tap::ifreq;

/// linux/sockios.h: create a bridge (the argument is its name).
const SIOCBRADDBR: libc::c_ulong = 0x89a0;
/// linux/sockios.h: add the interface `ifr_ifindex` to the bridge `ifr_name`.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// Why the bridge or a tap on it cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The bridge ioctls need CAP_NET_ADMIN: said plainly, with what to
    /// do about it.
    #[error(
        "cannot set up the bridge {bridge}: permission denied: networking needs CAP_NET_ADMIN (run as root, or use --network none)"
    )]
    Permission {
        /// The bridge's name.
        bridge: String,
    },
    /// The bridge exists with another address: another subnet's bridge,
    /// which Kiln does not readdress.
    #[error(
        "bridge {bridge} has the address {has}, not {gateway}: every kiln on a host must use one subnet (see $KILN_SUBNET)"
    )]
    OtherAddress {
        /// The bridge's name.
        bridge: String,
        /// The address it has.
        has: Ipv4Addr,
        /// The gateway address Kiln wanted it to have.
        gateway: Ipv4Addr,
    },
    /// A netdevice or bridge ioctl failed.
    #[error("cannot {what} {interface}")]
    Ioctl {
        /// The step, as a verb phrase ("bring up", "find").
        what: &'static str,
        /// The interface it was applied to.
        interface: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// A socket to issue interface ioctls on.
struct Netdev {
    socket: OwnedFd,
}

impl Netdev {
    fn open() -> io::Result<Netdev> {
        // SAFETY: socket() takes no pointers; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netdev { socket })
    }

    /// Issues `request` on `ifr`, an ifreq that outlives the call.
    fn ioctl(&self, request: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here reads or writes one ifreq, and
        // `ifr` is a valid one for the duration of the call.
        let rc = unsafe { libc::ioctl(self.socket.as_raw_fd(), request, ifr as *mut libc::ifreq) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn flags(&self, name: &str) -> io::Result<libc::c_short> {
        let mut ifr = ifreq(name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member.
        Ok(unsafe { ifr.ifr_ifru.ifru_flags })
    }

    fn set_up(&self, name: &str) -> io::Result<()> {
        let flags = self.flags(name)?;
        if flags & libc::IFF_UP as libc::c_short != 0 {
            return Ok(());
        }
        let mut ifr = ifreq(name);
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut ifr)
    }

    /// An interface's IPv4 address or netmask (SIOCGIFADDR, SIOCGIFNETMASK).
    fn ipv4(&self, name: &str, request: libc::c_ulong) -> io::Result<Ipv4Addr> {
        let mut ifr = ifreq(name);
        self.ioctl(request, &mut ifr)?;
        // SAFETY: the SIOCGIF*ADDR requests fill in the address member.
        let addr = unsafe { ifr.ifr_ifru.ifru_addr };
        Ok(sockaddr_ipv4(&addr))
    }

    /// Sets an interface's IPv4 address or netmask (SIOCSIFADDR, SIOCSIFNETMASK).
    fn set_ipv4(&self, name: &str, request: libc::c_ulong, address: Ipv4Addr) -> io::Result<()> {
        let mut ifr = ifreq(name);
        ifr.ifr_ifru.ifru_addr = ipv4_sockaddr(address);
        self.ioctl(request, &mut ifr)
    }

    fn index(&self, name: &str) -> io::Result<libc::c_int> {
        let mut ifr = ifreq(name);
        self.ioctl(libc::SIOCGIFINDEX, &mut ifr)?;
        // SAFETY: SIOCGIFINDEX filled in the index member.
        Ok(unsafe { ifr.ifr_ifru.ifru_ifindex })
    }
}

/// A `sockaddr` holding an AF_INET address: as `sockaddr_in` lays it out
/// (ip(7)), the port in `sa_data[0..2]` and the address in `sa_data[2..6]`,
/// network byte order.
fn ipv4_sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::AF_INET as libc::sa_family_t;
    for (dst, src) in addr.sa_data[2..6].iter_mut().zip(address.octets()) {
        *dst = src as libc::c_char;
    }
    addr
}

fn sockaddr_ipv4(addr: &libc::sockaddr) -> Ipv4Addr {
    let [a, b, c, d] = [2, 3, 4, 5].map(|i| addr.sa_data[i] as u8);
    Ipv4Addr::new(a, b, c, d)
}

fn failed<'a>(
    what: &'static str,
    interface: &'a str,
) -> impl FnOnce(io::Error) -> BridgeError + 'a {
    move |source| BridgeError::Ioctl {
        what,
        interface: interface.to_string(),
        source,
    }
}

/// Makes sure the bridge `name` exists, holds `gateway` with `netmask` and is
/// up. Concurrent callers agree: each step leaves alone what is already so.
pub fn ensure(name: &str, gateway: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), BridgeError> {
    let netdev = Netdev::open().map_err(failed("open a socket for", name))?;
    let mut ifr = ifreq(name);
    match netdev.ioctl(SIOCBRADDBR, &mut ifr) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => {}
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
            return Err(BridgeError::Permission {
                bridge: name.to_string(),
            });
        }
        Err(source) => {
            return Err(BridgeError::Ioctl {
                what: "create the bridge (is the bridge module loaded?)",
                interface: name.to_string(),
                source,
            });
        }
    }
    match netdev.ipv4(name, libc::SIOCGIFADDR) {
        Ok(has) if has == gateway => {}
        // Readdressing it would cut off the instances on it.
        Ok(has) => {
            return Err(BridgeError::OtherAddress {
                bridge: name.to_string(),
                has,
                gateway,
            });
        }
        Err(_) => set_gateway(&netdev, name, gateway, netmask)?,
    }
    netdev.set_up(name).map_err(failed("bring up", name))
}

/// Gives the bridge `name` its address: the gateway, with `netmask`.
fn set_gateway(
    netdev: &Netdev,
    name: &str,
    gateway: Ipv4Addr,
    netmask: Ipv4Addr,
) -> Result<(), BridgeError> {
    netdev
        .set_ipv4(name, libc::SIOCSIFADDR, gateway)
        .map_err(failed("set the gateway address of", name))?;
    netdev
        .set_ipv4(name, libc::SIOCSIFNETMASK, netmask)
        .map_err(failed("set the netmask of", name))
}

/// Brings the interface `name` up.
pub fn link_up(name: &str) -> Result<(), BridgeError> {
    let netdev = Netdev::open().map_err(failed("open a socket for", name))?;
    netdev.set_up(name).map_err(failed("bring up", name))
}

/// Adds the interface `port` (a tap) to `bridge` and brings it up.
pub fn attach(bridge: &str, port: &str) -> Result<(), BridgeError> {
    let netdev = Netdev::open().map_err(failed("open a socket for", port))?;
    let index = netdev.index(port).map_err(failed("find", port))?;
    let mut ifr = ifreq(bridge);
    ifr.ifr_ifru.ifru_ifindex = index;
    netdev
        .ioctl(SIOCBRADDIF, &mut ifr)
        .map_err(failed("add a port to the bridge", bridge))?;
    netdev.set_up(port).map_err(failed("bring up", port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::tap::{Tap, TapError};

    const BRIDGE: &str = "kb-unit-test";
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 250, 7, 1);
    const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
    /// Removes CAP_NET_ADMIN from the calling thread's effective set; the
    /// permitted set keeps it, but nothing here raises it again.
    fn drop_net_admin() {
        caps::drop(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_NET_ADMIN,
        )
        .expect("capset");
    }

    /// Without CAP_NET_ADMIN, the bridge and the tap are refused with the
    /// errors that say what to do, not a bare EPERM.
    #[test]
    fn without_cap_net_admin_the_bridge_and_tap_are_refused_clearly() {
        // Capabilities are per thread: this one drops its own.
        let (bridge, tap) = std::thread::spawn(|| {
            drop_net_admin();
            (
                ensure(BRIDGE, GATEWAY, NETMASK),
                Tap::create("kt-noperm-test", 12),
            )
        })
        .join()
        .unwrap();
        assert!(
            matches!(&bridge, Err(BridgeError::Permission { bridge }) if bridge == BRIDGE),
            "{bridge:?}"
        );
        assert!(
            matches!(&tap, Err(TapError::Permission { name }) if name == "kt-noperm-test"),
            "{tap:?}"
        );
    }

    /// A bridge with an address, a tap on it, the tap gone with its
    /// descriptor. Needs root, as CI and the e2e suite run.
    #[test]
    fn a_tap_joins_a_bridge_with_the_gateway_address() {
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "this test makes a bridge and a tap: it needs root (CAP_NET_ADMIN)"
        );
        ensure(BRIDGE, GATEWAY, NETMASK).unwrap();
        // Again: nothing changes, nothing fails.
        ensure(BRIDGE, GATEWAY, NETMASK).unwrap();
        // Another subnet's gateway would readdress it: refused.
        let other = ensure(BRIDGE, Ipv4Addr::new(10, 251, 0, 1), NETMASK).unwrap_err();
        assert!(matches!(other, BridgeError::OtherAddress { .. }), "{other}");
        let netdev = Netdev::open().unwrap();
        assert_eq!(netdev.ipv4(BRIDGE, libc::SIOCGIFADDR).unwrap(), GATEWAY);
        assert_eq!(netdev.ipv4(BRIDGE, libc::SIOCGIFNETMASK).unwrap(), NETMASK);
        let tap = Tap::create("kt-bridge-test", 12).unwrap();
        attach(BRIDGE, tap.name()).unwrap();
        let port = format!("/sys/class/net/{BRIDGE}/brif/{}", tap.name());
        assert!(std::path::Path::new(&port).exists(), "{port}");
        drop(tap);
        assert!(!std::path::Path::new(&port).exists());
        // The bridge is left for the next test run, as kiln0 is.
    }

    #[test]
    fn ipv4_sockaddrs_are_laid_out_as_sockaddr_in() {
        let address = Ipv4Addr::new(10, 89, 0, 1);
        let addr = ipv4_sockaddr(address);
        assert_eq!(sockaddr_ipv4(&addr), address);
        // SAFETY: sockaddr and sockaddr_in have the same size, and every
        // bit pattern is a valid sockaddr_in.
        let inet: libc::sockaddr_in = unsafe { std::mem::transmute(addr) };
        assert_eq!(inet.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u32::from_be(inet.sin_addr.s_addr), u32::from(address));
    }
}
