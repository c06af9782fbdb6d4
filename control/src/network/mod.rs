//! Host-side networking: the Kiln bridge and its addresses, what an
//! instance's VM needs to join it, and the proxy of published ports.
//!
//! An instance on the bridge has a tap (`kt-…`, made by its supervisor,
//! [`open_tap`], whose VM process holds it open and takes it along when
//! it ends) on `kiln0`, whose address is the subnet's first and
//! every guest's gateway; guest-init configures eth0 from the kernel
//! command line (`kiln.net.*`), so the guest needs no DHCP client. Each
//! such tap is pinned to its guest's MAC and address ([`filter`]): a
//! guest cannot pass for a neighbour. The host reaches guests directly
//! on the subnet; nothing is routed or translated beyond it (no firewall
//! rules of the host's are touched), so a guest reaches the host and
//! other instances, and the world only if the host is set up to forward
//! for the subnet.
pub mod address;
pub mod filter;
pub mod proxy;
pub mod resolv_conf;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use address::{AddressError, BRIDGE, Subnet};
use filter::FilterError;
use kiln_vmm::devices::virtio::net::bridge::{self, BridgeError};
use resolv_conf::GuestDns;

use kiln_vmm::devices::virtio::net::tap::{TUN_DEVICE, Tap, TapError};
use kiln_vmm::devices::virtio::net::{NET_HDR_LEN, NetConfig};

/// Where the host's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// capability(7): the bit of CAP_NET_ADMIN in the capability sets.
const CAP_NET_ADMIN: u32 = 12;

/// Why instances on the bridge cannot be had here, for `kiln doctor`
/// (which changes nothing: the bridge is made by the first launch).
pub fn unavailable() -> Option<String> {
    if !std::path::Path::new(TUN_DEVICE).exists() {
        return Some(format!("no {TUN_DEVICE} (load the tun module)"));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !has_net_admin(&status) {
        return Some("this process lacks CAP_NET_ADMIN (run as root)".into());
    }
    filter::check()
        .err()
        .map(|err| kiln_vmm::report::one_line(&err))
}

/// Whether /proc/self/status's effective set holds CAP_NET_ADMIN.
fn has_net_admin(status: &str) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Why an instance's NIC cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The subnet is misconfigured, or the address is not on it.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The bridge could not be made or given its address (this process
    /// lacks CAP_NET_ADMIN, most often).
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// The NIC's tap could not be created.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The tap's filter could not be installed (or checked for).
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// A NIC on the bridge was asked for without the guest's address, to
    /// which its tap is pinned.
    #[error("tap {tap} is to join bridge {bridge}, but its guest has no address to pin it to")]
    Unaddressed {
        /// The tap.
        tap: String,
        /// The bridge it was to join.
        bridge: String,
    },
}

/// Creates the tap of `nic` and attaches it to its bridge, if it has one,
/// here in the host's namespaces: the VM process is handed the open tap
/// and needs no CAP_NET_ADMIN. A tap on the bridge is first pinned to
/// the NIC's MAC and the guest's `address` ([`filter::pin`]). The tap
/// lasts while a descriptor of it is open; its filter, until
/// [`close_tap`].
pub fn open_tap(nic: &NetConfig, address: Option<Ipv4Addr>) -> Result<Tap, NetworkError> {
    let tap = create_tap(&nic.tap)?;
    if let Some(bridge) = &nic.bridge {
        let address = address.ok_or_else(|| NetworkError::Unaddressed {
            tap: nic.tap.clone(),
            bridge: bridge.clone(),
        })?;
        filter::pin(tap.name(), nic.mac, address)?;
        bridge::attach(bridge, tap.name())?;
    }
    Ok(tap)
}

/// How long a new VM of an instance waits for its previous VM process to
/// let go of the instance's tap. A VM process whose supervisor was killed
/// ends on PR_SET_PDEATHSIG's SIGTERM, once it has finished what it was
/// writing (a hibernation, its disks), and holds the tap until it exits:
/// TUNSETIFF says EBUSY meanwhile.
const TAP_BUSY_WAIT: Duration = Duration::from_secs(30);
/// How often a busy tap is tried again.
const TAP_BUSY_POLL: Duration = Duration::from_millis(50);

/// [`Tap::create`], waiting up to [`TAP_BUSY_WAIT`] while another process
/// still holds the tap.
fn create_tap(name: &str) -> Result<Tap, TapError> {
    let deadline = Instant::now() + TAP_BUSY_WAIT;
    loop {
        match Tap::create(name, NET_HDR_LEN) {
            Err(TapError::Create { ref source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(TAP_BUSY_POLL);
            }
            created => return created,
        }
    }
}

/// Removes what outlives the tap of instance `id` once its VM process has
/// ended (the tap went with it): the tap's filter, if the instance has an
/// `address` (is on the bridge). A failure is said on stderr (the
/// console log) and changes nothing else: the filter's device is gone,
/// so it filters nothing, and the next [`open_tap`] replaces it.
pub fn close_tap(id: &str, address: Option<Ipv4Addr>) {
    if address.is_none() {
        return;
    }
    if let Err(err) = filter::unpin(&address::tap_name(id)) {
        eprintln!("kiln: {}", kiln_vmm::report::one_line(&err));
    }
}

/// The NIC of the instance `id` at `address`, and the kernel command-line
/// words from which guest-init configures it; the bridge is made ready.
pub fn guest_nic(id: &str, address: Ipv4Addr) -> Result<(NetConfig, Vec<String>), NetworkError> {
    let subnet = ensure_bridge()?;
    if !subnet.contains(address) {
        return Err(AddressError::Outside { address, subnet }.into());
    }
    let mac = address::mac(address);
    let resolvers = std::fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    let config = NetConfig {
        tap: address::tap_name(id),
        mac,
        bridge: Some(BRIDGE.to_string()),
    };
    let words = guest_words(
        address,
        subnet.prefix(),
        Some(subnet.gateway()),
        mac,
        None,
        &resolvers,
    );
    Ok((config, words))
}

/// Makes the bridge ready and checks that taps can be filtered here
/// ([`filter::check`]), and returns the subnet: what launching an
/// instance on the bridge checks first, so that a host where this process
/// may not set up networking (or filter its taps) is told so before any
/// instance exists.
pub fn prepare_bridge() -> Result<Subnet, NetworkError> {
    let subnet = ensure_bridge()?;
    filter::check()?;
    Ok(subnet)
}

/// Makes the bridge ready with the subnet's gateway address, and returns
/// the subnet: what each VM start needs (its launch checked the rest).
fn ensure_bridge() -> Result<Subnet, NetworkError> {
    let subnet = Subnet::from_env()?;
    bridge::ensure(BRIDGE, subnet.gateway(), subnet.netmask())?;
    Ok(subnet)
}

/// The NIC of the instance `id` when isolated: a tap on no bridge. Only
/// restored guests have one, and they keep the MAC they had.
pub fn isolated_nic(id: &str) -> NetConfig {
    NetConfig {
        tap: address::tap_name(id),
        mac: address::mac(Ipv4Addr::UNSPECIFIED),
        bridge: None,
    }
}

/// The kernel command-line words from which guest-init configures eth0
/// (`kiln.net.*`: `address`/`prefix`, the default route through
/// `gateway` if any, eth0's `mtu` if not the default, and what of the
/// resolv.conf text `resolvers` a guest can use, as [`resolv_conf`]
/// says), and the address and MAC as metadata: an instance's on the
/// bridge, or a container's in its pod's network (the containerd shim's).
pub fn guest_words(
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    mac: [u8; 6],
    mtu: Option<u32>,
    resolvers: &str,
) -> Vec<String> {
    let mut words = vec![format!("kiln.net.ip={address}/{prefix}")];
    words.extend(gateway.map(|gateway| format!("kiln.net.gateway={gateway}")));
    words.extend(mtu.map(|mtu| format!("kiln.net.mtu={mtu}")));
    words.extend([
        format!("kiln.meta.local-ipv4={address}"),
        format!("kiln.meta.mac={}", address::format_mac(mac)),
    ]);
    words.extend(GuestDns::from_resolv_conf(resolvers).words());
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_still_held_by_a_dying_vm_process_is_waited_for() {
        let name = "kt-busy-test";
        let held = Tap::create(name, NET_HDR_LEN).expect("a tap: this test needs root");
        let letting_go = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let started = Instant::now();
        let tap = create_tap(name).expect("the tap, once let go");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(tap.name(), name);
        letting_go.join().unwrap();
    }

    #[test]
    fn cap_net_admin_is_read_from_the_effective_set() {
        assert!(has_net_admin("Name:\tkiln\nCapEff:\t000001ffffffffff\n"));
        assert!(has_net_admin("CapEff:\t0000000000001000\n"));
        assert!(!has_net_admin("CapEff:\t0000000000000400\n"));
        assert!(!has_net_admin("Name:\tkiln\n"));
    }

    #[test]
    fn the_guest_learns_its_address_gateway_and_resolvers() {
        let address = Ipv4Addr::new(10, 89, 0, 7);
        let subnet = address::DEFAULT_SUBNET;
        let words = guest_words(
            address,
            subnet.prefix(),
            Some(subnet.gateway()),
            address::mac(address),
            None,
            "nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch lan\n",
        );
        assert_eq!(
            words,
            [
                "kiln.net.ip=10.89.0.7/24",
                "kiln.net.gateway=10.89.0.1",
                "kiln.meta.local-ipv4=10.89.0.7",
                "kiln.meta.mac=02:6b:0a:59:00:07",
                "kiln.net.dns=10.0.0.2",
                "kiln.net.search=lan",
            ]
        );
        let without = guest_words(address, 24, None, [0; 6], None, "");
        assert!(!without.iter().any(|w| w.starts_with("kiln.net.dns")));
        assert!(!without.iter().any(|w| w.starts_with("kiln.net.gateway")));
        assert!(!without.iter().any(|w| w.starts_with("kiln.net.mtu")));
        let overlay = guest_words(address, 24, None, [0; 6], Some(1450), "");
        assert_eq!(overlay[1], "kiln.net.mtu=1450");
    }
}
