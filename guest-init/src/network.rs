//! Host identity and networking: the hostname, `lo`, and eth0 as the
//! kernel command line says. The guest runs no DHCP client: the VMM puts
//! the NIC's addressing in `kiln.net.*` words, which [`NetConfig`] reads.
//!
//! - `kiln.net.ip=IPV4/PREFIX` (e.g. `10.89.0.2/24`): eth0's address and
//!   prefix length. Without it eth0, if any, stays down and the other
//!   words must be absent too.
//! - `kiln.net.gateway=IPV4` (optional): the default route's gateway, an
//!   address in eth0's subnet; without it only the subnet is reachable.
//! - `kiln.net.mtu=BYTES` (optional): eth0's MTU, 68 (IPv4's least, RFC
//!   791) to 65535; without it the driver's 1500.
//! - `kiln.net.dns=IPV4[,IPV4…]` (optional): one to three nameservers
//!   (the resolvers read no more), written to /etc/resolv.conf; without
//!   it the image's own file stays.
//! - `kiln.net.search=NAME[,NAME…]` and `kiln.net.options=OPT[,OPT…]`
//!   (optional, with `kiln.net.dns` only): that file's `search` and
//!   `options` lines (the host chose what a resolver reads of them:
//!   `kiln_control::network::resolv_conf`).
//!
//! The interface is set up with the ioctls ifconfig and route use
//! (SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU, SIOCSIFFLAGS, SIOCADDRT): they need no
//! netlink code, and the kernel's virtio-net driver, built in, has
//! probed eth0 before init runs, so nothing waits for it.
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::check;
use crate::config::{ConfigError, kiln_params};

/// The VMM's virtio-net device, the guest's only NIC.
pub const INTERFACE: &str = "eth0";
/// Where the nameservers go, in every root.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// The resolv.conf guest-init wrote from the command line, kept in memory
/// (/run is a tmpfs): what a read-only root, and every root of a pod's
/// container (`guest_init::roots`), gets bind-mounted at [`RESOLV_CONF`].
pub const GUEST_RESOLV_CONF: &str = "/run/kiln/resolv.conf";
/// IPv4's least MTU (RFC 791: every host takes 68-byte datagrams whole).
const MIN_MTU: u32 = 68;
/// The largest MTU an interface can have (ETH_MAX_MTU, a u16's range).
const MAX_MTU: u32 = 65535;
/// glibc's and musl's resolvers use no more nameservers than this (MAXNS).
const MAX_NAMESERVERS: usize = 3;

/// Why the network was left unconfigured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A `kiln.net.*` word is malformed.
    #[error("{param}: expected {expected}")]
    Param {
        /// The word as the command line has it.
        param: String,
        /// What its value should look like.
        expected: String,
    },
    /// The command line as a whole does not split into words.
    #[error(transparent)]
    Cmdline(#[from] ConfigError),
    /// The kernel has no eth0: the VM was started without a NIC.
    #[error("{INTERFACE} is missing (ENODEV): this VM has no network device")]
    NoDevice,
    /// The kernel refused a step.
    #[error("cannot {step}")]
    Step {
        /// The step, as a verb phrase ("bring eth0 up").
        step: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// eth0's addressing, from the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// eth0's address (`kiln.net.ip`, before the slash).
    pub address: Ipv4Addr,
    /// The subnet's prefix length (after the slash): the netmask.
    pub prefix_len: u8,
    /// The default route's next hop (`kiln.net.gateway`); without it, only
    /// the subnet is reachable.
    pub gateway: Option<Ipv4Addr>,
    /// `kiln.net.mtu`; without it the driver's default stays.
    pub mtu: Option<u32>,
    /// `kiln.net.dns`, in order, at most the resolvers' limit of three.
    pub nameservers: Vec<Ipv4Addr>,
    /// `kiln.net.search`: the search domains, in order.
    pub search: Vec<String>,
    /// `kiln.net.options`: the resolver's options, in order.
    pub options: Vec<String>,
}

impl NetConfig {
    /// The `kiln.net.*` words of `cmdline` (the last of each counts);
    /// `None` when it has none.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Self>, NetError> {
        let (mut ip, mut gateway, mut mtu, mut dns) = (None, None, None, None);
        let (mut search, mut options) = (None, None);
        for (key, value) in kiln_params(cmdline)? {
            match key {
                "net.ip" => ip = Some(value),
                "net.gateway" => gateway = Some(("gateway", value)),
                "net.mtu" => mtu = Some(("mtu", value)),
                "net.dns" => dns = Some(("dns", value)),
                "net.search" => search = Some(("search", value)),
                "net.options" => options = Some(("options", value)),
                _ => {}
            }
        }
        let Some(ip) = ip else {
            // A gateway or DNS alone mean the VMM lost the address.
            return match gateway.or(mtu).or(dns).or(search).or(options) {
                Some((key, value)) => Err(malformed(key, &value, "kiln.net.ip=IPV4/PREFIX too")),
                None => Ok(None),
            };
        };
        let (address, prefix_len) = parse_address(&ip)?;
        let mut config = NetConfig {
            address,
            prefix_len,
            gateway: None,
            mtu: None,
            nameservers: Vec::new(),
            search: Vec::new(),
            options: Vec::new(),
        };
        if let Some((_, value)) = gateway {
            config.gateway = Some(config.parse_gateway(&value)?);
        }
        if let Some((_, value)) = mtu {
            config.mtu = Some(parse_mtu(&value)?);
        }
        if let Some((_, value)) = dns {
            config.nameservers = parse_nameservers(&value)?;
        } else if let Some((key, value)) = search.as_ref().or(options.as_ref()) {
            // Lines of a resolv.conf that the host would write only with
            // its nameservers.
            return Err(malformed(key, value, "kiln.net.dns=IPV4 too"));
        }
        if let Some((key, value)) = search {
            config.search = parse_list(key, &value)?;
        }
        if let Some((key, value)) = options {
            config.options = parse_list(key, &value)?;
        }
        Ok(Some(config))
    }

    /// The netmask of `prefix_len` (never a panic, whatever the field holds).
    pub fn netmask(&self) -> Ipv4Addr {
        let host_bits = 32u32.saturating_sub(self.prefix_len.into());
        Ipv4Addr::from(u32::MAX.checked_shl(host_bits).unwrap_or(0))
    }

    /// The subnet's own address (host bits zero).
    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & u32::from(self.netmask()))
    }

    /// A gateway must be on eth0's link, or the kernel cannot reach it.
    fn parse_gateway(&self, value: &str) -> Result<Ipv4Addr, NetError> {
        let gateway: Ipv4Addr = value
            .parse()
            .map_err(|_| malformed("gateway", value, "IPV4"))?;
        let differing_bits = u32::from(gateway) ^ u32::from(self.address);
        if differing_bits & u32::from(self.netmask()) != 0 || gateway == self.address {
            let expected = format!(
                "an address in {}/{} other than {}",
                self.network(),
                self.prefix_len,
                self.address
            );
            return Err(malformed("gateway", value, &expected));
        }
        Ok(gateway)
    }

    /// The /etc/resolv.conf that names the nameservers, the search
    /// domains and the options.
    pub fn resolv_conf(&self) -> String {
        let mut text = String::from("# Written by guest-init from kiln.net.dns.\n");
        for server in &self.nameservers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        for (keyword, list) in [("search", &self.search), ("options", &self.options)] {
            if !list.is_empty() {
                text.push_str(&format!("{keyword} {}\n", list.join(" ")));
            }
        }
        text
    }
}

fn malformed(key: &str, value: &str, expected: &str) -> NetError {
    NetError::Param {
        param: format!("kiln.net.{key}={value}"),
        expected: expected.to_string(),
    }
}

/// `IPV4/PREFIX`, the address a host's (not a subnet's or a group's).
fn parse_address(value: &str) -> Result<(Ipv4Addr, u8), NetError> {
    let bad = |expected| malformed("ip", value, expected);
    let (ip, prefix) = value.split_once('/').ok_or_else(|| bad("IPV4/PREFIX"))?;
    let (Ok(ip), Ok(prefix)) = (ip.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
        return Err(bad("IPV4/PREFIX"));
    };
    if !(1..=32).contains(&prefix) {
        return Err(bad("IPV4/PREFIX with a PREFIX of 1 to 32"));
    }
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() {
        return Err(bad("IPV4/PREFIX with a unicast IPV4"));
    }
    Ok((ip, prefix))
}

fn parse_nameservers(value: &str) -> Result<Vec<Ipv4Addr>, NetError> {
    let servers: Vec<Ipv4Addr> = value
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| malformed("dns", value, "IPV4[,IPV4…]"))?;
    if servers.len() > MAX_NAMESERVERS {
        return Err(malformed("dns", value, "at most 3 nameservers"));
    }
    Ok(servers)
}

fn parse_mtu(value: &str) -> Result<u32, NetError> {
    match value.parse() {
        Ok(mtu) if (MIN_MTU..=MAX_MTU).contains(&mtu) => Ok(mtu),
        _ => Err(malformed("mtu", value, "BYTES from 68 to 65535")),
    }
}

/// A comma-separated list of words, none empty.
fn parse_list(key: &str, value: &str) -> Result<Vec<String>, NetError> {
    let list: Vec<String> = value.split(',').map(String::from).collect();
    if list.iter().any(String::is_empty) {
        return Err(malformed(key, value, "WORD[,WORD…]"));
    }
    Ok(list)
}

/// Sets the hostname (UTS namespace of this PID 1).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which the
    // kernel only reads.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Brings `lo` up, as `ifconfig lo up` would.
pub fn loopback_up() -> io::Result<()> {
    interface_up(&inet_socket()?, "lo")
}

/// Gives eth0 `net`'s address and netmask, brings it up and adds the
/// default route: in that order, because the kernel finds the gateway
/// through the subnet route that an interface going up gets.
pub fn configure_interface(net: &NetConfig) -> Result<(), NetError> {
    let socket = step(inet_socket(), || "open an AF_INET socket".to_string())?;
    let (address, netmask) = (net.address, net.netmask());
    step(set_address(&socket, IfRequest::SetAddress, address), || {
        format!("set {INTERFACE}'s address to {address}")
    })?;
    step(set_address(&socket, IfRequest::SetNetmask, netmask), || {
        format!("set {INTERFACE}'s netmask to {netmask}")
    })?;
    if let Some(mtu) = net.mtu {
        step(set_mtu(&socket, mtu), || {
            format!("set {INTERFACE}'s MTU to {mtu}")
        })?;
    }
    step(interface_up(&socket, INTERFACE), || {
        format!("bring {INTERFACE} up")
    })?;
    if let Some(gateway) = net.gateway {
        step(add_default_route(&socket, gateway), || {
            format!("add the default route via {gateway}")
        })?;
    }
    Ok(())
}

/// Names the step that failed; a missing eth0 fails the first one.
fn step<T>(result: io::Result<T>, what: impl FnOnce() -> String) -> Result<T, NetError> {
    result.map_err(|source| match source.raw_os_error() {
        Some(libc::ENODEV) => NetError::NoDevice,
        _ => NetError::Step {
            step: what(),
            source,
        },
    })
}

/// Replaces `path` with `contents` (mode 0644) so that a reader sees the
/// old file or the new one, never a part: a temporary file beside it,
/// fsynced, renamed over it.
pub fn replace_file(path: &Path, contents: &str) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.guest-init"));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temp)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// The interface ioctls made here: each reads or fills one `ifreq`.
#[derive(Clone, Copy)]
enum IfRequest {
    GetFlags,
    SetFlags,
    SetAddress,
    SetNetmask,
    SetMtu,
}

impl IfRequest {
    fn code(self) -> libc::Ioctl {
        match self {
            IfRequest::GetFlags => libc::SIOCGIFFLAGS,
            IfRequest::SetFlags => libc::SIOCSIFFLAGS,
            IfRequest::SetAddress => libc::SIOCSIFADDR,
            IfRequest::SetNetmask => libc::SIOCSIFNETMASK,
            IfRequest::SetMtu => libc::SIOCSIFMTU,
        }
    }
}

/// The socket the interface and route ioctls go through (any AF_INET one).
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq_ioctl(socket: &OwnedFd, request: IfRequest, ifreq: &mut libc::ifreq) -> io::Result<()> {
    let ifreq: *mut libc::ifreq = ifreq;
    // SAFETY: every IfRequest reads or fills exactly one ifreq, and
    // `ifreq` points to one that is exclusively borrowed across the call.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), request.code(), ifreq) })
}

/// Sets IFF_UP and keeps the other flags, as `ifconfig up` does (setting
/// the flags outright would clear IFF_MULTICAST, for one).
fn interface_up(socket: &OwnedFd, interface: &str) -> io::Result<()> {
    let mut request = ifreq(interface)?;
    ifreq_ioctl(socket, IfRequest::GetFlags, &mut request)?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags; any bits are a valid
    // c_short.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ifreq_ioctl(socket, IfRequest::SetFlags, &mut request)
}

fn set_address(socket: &OwnedFd, request: IfRequest, address: Ipv4Addr) -> io::Result<()> {
    let mut ifreq = ifreq_with_address(INTERFACE, address)?;
    ifreq_ioctl(socket, request, &mut ifreq)
}

fn set_mtu(socket: &OwnedFd, mtu: u32) -> io::Result<()> {
    let mut request = ifreq(INTERFACE)?;
    // Parsing kept it within 65535, a c_int's range.
    request.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ifreq_ioctl(socket, IfRequest::SetMtu, &mut request)
}

/// An ifreq naming `interface`, the rest zero.
fn ifreq(interface: &str) -> io::Result<libc::ifreq> {
    // The kernel reads a NUL-terminated name from a fixed array.
    if interface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {interface:?} is too long"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(interface.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Ok(request)
}

fn ifreq_with_address(interface: &str, address: Ipv4Addr) -> io::Result<libc::ifreq> {
    let mut request = ifreq(interface)?;
    request.ifr_ifru.ifru_addr = sockaddr_v4(address);
    Ok(request)
}

/// `address` as the generic `sockaddr` the ioctls take, laid out as a
/// `sockaddr_in`: the family, a zero port, the address, zero padding.
fn sockaddr_v4(address: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (dst, src) in data[2..6].iter_mut().zip(address.octets()) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

fn add_default_route(socket: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let mut route = default_route(gateway);
    let route: *mut libc::rtentry = &mut route;
    // SAFETY: SIOCADDRT reads one rtentry, and `route` points to one that
    // lives across the call; its rt_dev is null, so no string is read.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, route) })
}

/// `route add default gw GATEWAY`: destination and mask 0.0.0.0 and no
/// device, which the kernel takes from the route to the gateway.
fn default_route(gateway: Ipv4Addr) -> libc::rtentry {
    // SAFETY: rtentry is plain old data; all zeroes (rt_dev null) is valid.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_v4(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route
}

#[cfg(test)]
mod tests {
    use super::*;

    const CMDLINE: &str = "console=ttyS0 kiln.vmm=1 kiln.net.ip=10.89.0.2/24 \
                           kiln.net.gateway=10.89.0.1 kiln.net.mtu=1450 \
                           kiln.net.dns=10.0.0.53,1.1.1.1 \
                           kiln.net.search=svc.cluster.local,cluster.local \
                           kiln.net.options=ndots:5,edns0 quiet\n";

    fn parse(cmdline: &str) -> Result<Option<NetConfig>, String> {
        NetConfig::from_cmdline(cmdline).map_err(|err| crate::one_line(&err))
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn full_words_parse() {
        let net = parse(CMDLINE).unwrap().unwrap();
        assert_eq!(
            net,
            NetConfig {
                address: ip("10.89.0.2"),
                prefix_len: 24,
                gateway: Some(ip("10.89.0.1")),
                mtu: Some(1450),
                nameservers: vec![ip("10.0.0.53"), ip("1.1.1.1")],
                search: vec!["svc.cluster.local".into(), "cluster.local".into()],
                options: vec!["ndots:5".into(), "edns0".into()],
            }
        );
        assert_eq!(net.netmask(), ip("255.255.255.0"));
    }

    #[test]
    fn gateway_and_dns_are_optional_and_the_last_word_counts() {
        let net = parse("kiln.net.ip=10.0.0.9/8 kiln.net.ip=\"172.16.5.4/30\"")
            .unwrap()
            .unwrap();
        assert_eq!((net.address, net.prefix_len), (ip("172.16.5.4"), 30));
        assert_eq!((net.gateway, net.nameservers.len()), (None, 0));
        assert_eq!(net.netmask(), ip("255.255.255.252"));
    }

    #[test]
    fn no_ip_means_no_network() {
        assert_eq!(parse("console=ttyS0 kiln.vmm=1 kiln.hostname=x"), Ok(None));
        assert_eq!(parse(""), Ok(None));
    }

    #[test]
    fn malformed_words_name_the_word_and_what_was_expected() {
        let ip = "kiln.net.ip=10.89.0.2/24";
        let cases = [
            (
                "kiln.net.ip=10.89.0.300/24",
                "kiln.net.ip=10.89.0.300/24: expected IPV4/PREFIX",
            ),
            (
                "kiln.net.ip=10.89.0.2",
                "kiln.net.ip=10.89.0.2: expected IPV4/PREFIX",
            ),
            (
                "kiln.net.ip=10.89.0.2/x",
                "kiln.net.ip=10.89.0.2/x: expected IPV4/PREFIX",
            ),
            ("kiln.net.ip=", "kiln.net.ip=: expected IPV4/PREFIX"),
            (
                "kiln.net.ip=fd00::2/64",
                "kiln.net.ip=fd00::2/64: expected IPV4/PREFIX",
            ),
            (
                "kiln.net.ip=10.89.0.2/33",
                "expected IPV4/PREFIX with a PREFIX of 1 to 32",
            ),
            (
                "kiln.net.ip=10.89.0.2/0",
                "expected IPV4/PREFIX with a PREFIX of 1 to 32",
            ),
            (
                "kiln.net.ip=0.0.0.0/24",
                "expected IPV4/PREFIX with a unicast IPV4",
            ),
            (
                "kiln.net.ip=224.0.0.1/4",
                "expected IPV4/PREFIX with a unicast IPV4",
            ),
            (
                "kiln.net.gateway=10.89.0.1",
                "kiln.net.gateway=10.89.0.1: expected kiln.net.ip=",
            ),
            (
                "kiln.net.dns=1.1.1.1",
                "kiln.net.dns=1.1.1.1: expected kiln.net.ip=",
            ),
        ];
        for (cmdline, message) in cases {
            let err = parse(cmdline).unwrap_err();
            assert!(
                err.contains(message),
                "{cmdline}: {err} should say {message}"
            );
        }
        let with_ip = [
            (
                "kiln.net.gateway=10.89.0.256",
                "kiln.net.gateway=10.89.0.256: expected IPV4",
            ),
            (
                "kiln.net.gateway=10.89.1.1",
                "kiln.net.gateway=10.89.1.1: expected an address in 10.89.0.0/24 other than 10.89.0.2",
            ),
            ("kiln.net.gateway=10.89.0.2", "other than 10.89.0.2"),
            ("kiln.net.dns=", "kiln.net.dns=: expected IPV4[,IPV4…]"),
            (
                "kiln.net.dns=1.1.1.1,",
                "kiln.net.dns=1.1.1.1,: expected IPV4[,IPV4…]",
            ),
            (
                "kiln.net.dns=one.one",
                "kiln.net.dns=one.one: expected IPV4[,IPV4…]",
            ),
            (
                "kiln.net.dns=1.1.1.1,1.0.0.1,8.8.8.8,9.9.9.9",
                "expected at most 3 nameservers",
            ),
            (
                "kiln.net.mtu=67",
                "kiln.net.mtu=67: expected BYTES from 68 to 65535",
            ),
            ("kiln.net.mtu=65536", "expected BYTES from 68 to 65535"),
            ("kiln.net.mtu=jumbo", "expected BYTES from 68 to 65535"),
            (
                "kiln.net.search=lan",
                "kiln.net.search=lan: expected kiln.net.dns=IPV4 too",
            ),
            (
                "kiln.net.options=edns0",
                "kiln.net.options=edns0: expected kiln.net.dns=IPV4 too",
            ),
            (
                "kiln.net.dns=1.1.1.1 kiln.net.search=a,,b",
                "kiln.net.search=a,,b: expected WORD[,WORD…]",
            ),
            (
                "kiln.net.dns=1.1.1.1 kiln.net.options=",
                "kiln.net.options=: expected WORD[,WORD…]",
            ),
        ];
        for (word, message) in with_ip {
            let err = parse(&format!("{ip} {word}")).unwrap_err();
            assert!(err.contains(message), "{word}: {err} should say {message}");
        }
        let err = parse("kiln.net.ip=\"10.89.0.2/24").unwrap_err();
        assert!(err.contains("unbalanced"), "{err}");
    }

    #[test]
    fn netmask_covers_every_prefix_without_panicking() {
        let mut net = parse(CMDLINE).unwrap().unwrap();
        for (prefix, mask) in [(1, "128.0.0.0"), (8, "255.0.0.0"), (32, "255.255.255.255")] {
            net.prefix_len = prefix;
            assert_eq!(net.netmask(), ip(mask), "/{prefix}");
        }
        // Not reachable through parsing, which refuses them, but no panic.
        net.prefix_len = 0;
        assert_eq!(net.netmask(), Ipv4Addr::UNSPECIFIED);
        net.prefix_len = 40;
        assert_eq!(net.netmask(), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn resolv_conf_lists_nameservers_search_domains_and_options_in_order() {
        let mut net = parse(CMDLINE).unwrap().unwrap();
        assert_eq!(
            net.resolv_conf(),
            "# Written by guest-init from kiln.net.dns.\n\
             nameserver 10.0.0.53\n\
             nameserver 1.1.1.1\n\
             search svc.cluster.local cluster.local\n\
             options ndots:5 edns0\n"
        );
        (net.search, net.options) = (Vec::new(), Vec::new());
        assert!(!net.resolv_conf().contains("search"));
        assert!(!net.resolv_conf().contains("options"));
    }

    #[test]
    fn replace_file_swaps_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        fs::write(&path, "nameserver 192.0.2.1\nsearch old.example\n").unwrap();
        replace_file(&path, "nameserver 10.0.0.53\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 10.0.0.53\n");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["resolv.conf"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn replace_file_fails_cleanly_when_the_directory_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc").join("resolv.conf");
        let err = replace_file(&path, "nameserver 10.0.0.53\n").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// The bytes a sockaddr carries, read back as the sockaddr_in the
    /// kernel takes it for.
    fn as_sockaddr_in(address: &libc::sockaddr) -> libc::sockaddr_in {
        assert_eq!(
            std::mem::size_of::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>()
        );
        let address: *const libc::sockaddr = address;
        // SAFETY: both types are 16 bytes of plain old data (checked
        // above), and read_unaligned needs no alignment.
        unsafe { address.cast::<libc::sockaddr_in>().read_unaligned() }
    }

    #[test]
    fn sockaddr_v4_is_a_sockaddr_in() {
        let address = as_sockaddr_in(&sockaddr_v4(ip("10.89.0.2")));
        assert_eq!(address.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(address.sin_port, 0);
        assert_eq!(u32::from_be(address.sin_addr.s_addr), 0x0a59_0002);
        assert_eq!(address.sin_zero, [0; 8]);
    }

    #[test]
    fn ifreq_names_the_interface_and_carries_the_address() {
        let request = ifreq_with_address("eth0", ip("255.255.255.0")).unwrap();
        let name: Vec<u8> = request.ifr_name.iter().map(|&c| c as u8).collect();
        assert_eq!(&name[..5], b"eth0\0");
        assert!(name[5..].iter().all(|&b| b == 0));
        // SAFETY: ifreq_with_address set the union's address member.
        let address = unsafe { request.ifr_ifru.ifru_addr };
        let address = as_sockaddr_in(&address);
        assert_eq!(u32::from_be(address.sin_addr.s_addr), 0xffff_ff00);
        let err = ifreq("an-interface-name").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(ifreq("fifteen-chars-x").is_ok());
    }

    #[test]
    fn default_route_goes_everywhere_through_the_gateway() {
        let route = default_route(ip("10.89.0.1"));
        assert_eq!(route.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        let gateway = as_sockaddr_in(&route.rt_gateway);
        assert_eq!(gateway.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u32::from_be(gateway.sin_addr.s_addr), 0x0a59_0001);
        for any in [route.rt_dst, route.rt_genmask] {
            let any = as_sockaddr_in(&any);
            assert_eq!(any.sin_family, libc::AF_INET as libc::sa_family_t);
            assert_eq!(any.sin_addr.s_addr, 0);
        }
        assert!(route.rt_dev.is_null());
        assert_eq!(route.rt_metric, 0);
    }

    #[test]
    fn a_missing_interface_is_said_to_be_missing() {
        let enodev = io::Error::from_raw_os_error(libc::ENODEV);
        let err = step::<()>(Err(enodev), || "set eth0's address".to_string()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "eth0 is missing (ENODEV): this VM has no network device"
        );
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let err = step::<()>(Err(eperm), || "bring eth0 up".to_string()).unwrap_err();
        assert!(
            crate::one_line(&err).starts_with("cannot bring eth0 up: "),
            "{err}"
        );
    }
}
