//! A container's NIC in its pod's network namespace, as Kata's `tcfilter`
//! mode makes it: when the spec names a network namespace (CRI makes one
//! per pod, and CNI puts a veth in it with the pod's address and default
//! route), the shim finds that interface, creates a tap beside it, and
//! joins the two with a TC ingress qdisc on each and a u32 filter that
//! matches every frame and redirects it (`mirred egress redirect`) to the
//! other: what comes in on the veth leaves through the tap to the guest,
//! and what the guest sends leaves through the veth. The guest's NIC has
//! the veth's MAC and guest-init gives eth0 the veth's address, prefix and
//! gateway (`kiln.net.*`), so the pod's address is the guest's own and
//! nothing is routed or translated in the namespace.
//!
//! Everything happens on a thread of its own that enters the namespace
//! (setns(2) changes only the calling thread's namespaces), so the shim
//! stays in its own; the tap is created there (a tun device joins the
//! network namespace of the thread that opens /dev/net/tun) and handed to
//! the VM process as an open descriptor, as an instance's supervisor does,
//! so it goes with that process. The veth's qdisc, which outlives it, is
//! removed on Delete ([`PodNetwork::disconnect`]); the namespace and the
//! veth are CNI's and stay.
//!
//! The rtnetlink messages are built and parsed by `netlink-packet-route`
//! and sent on a blocking `netlink-sys` socket: a handful of requests,
//! one at a time, need no async runtime (which rtnetlink would bring).
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_vmm::config::VmConfig;
use kiln_vmm::devices::virtio::net::tap::{Tap, TapError};
use kiln_vmm::devices::virtio::net::{NET_HDR_LEN, NetConfig};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The tap's name. The namespace is the pod's, so one name serves every
/// pod; a second tap in one namespace is refused before it is made (the
/// first is an Ethernet interface beside the veth).
pub const TAP_NAME: &str = "tap0_kiln";
/// linux/if_ether.h: an Ethernet frame's largest payload (ETH_DATA_LEN),
/// every interface's MTU unless set otherwise.
const ETHERNET_MTU: u32 = 1500;
/// linux/if_ether.h: every protocol, the `protocol all` of tc-filter(8).
const ETH_P_ALL: u16 = 0x0003;
/// The redirect filter's priority: the one tc-filter(8) gives the first
/// filter of a qdisc when none is named. Each qdisc has only this filter.
const FILTER_PRIORITY: u16 = 0xc000;
/// linux/pkt_sched.h: the ingress qdisc's handle, `ffff:`, which its
/// filters name as their parent.
const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// Why a container's NIC cannot be connected to its pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The namespace's file cannot be opened: the path does not exist,
    /// most often.
    #[error("cannot open the network namespace {netns}")]
    Open {
        /// The spec's `linux.namespaces` path.
        netns: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// setns(2) refused the file: it is not a network namespace (EINVAL),
    /// or this process may not enter it.
    #[error("cannot enter {netns}: expected a network namespace")]
    Enter {
        /// The spec's `linux.namespaces` path.
        netns: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The namespace has no Ethernet interface: no CNI plugin ran for it.
    #[error("network namespace {netns} has no Ethernet interface: expected the one CNI made")]
    NoInterface {
        /// The namespace.
        netns: PathBuf,
    },
    /// The namespace has several Ethernet interfaces, of which the shim
    /// cannot tell the pod's (or another container's VM has its tap there).
    #[error(
        "network namespace {netns} has the Ethernet interfaces {names:?}: expected exactly one, the one CNI made"
    )]
    Several {
        /// The namespace.
        netns: PathBuf,
        /// The interfaces' names.
        names: Vec<String>,
    },
    /// The interface's link-layer address is not a MAC.
    #[error(
        "interface {interface} in {netns} has the link-layer address {address:02x?}: expected a MAC"
    )]
    NoMac {
        /// The namespace.
        netns: PathBuf,
        /// The interface.
        interface: String,
        /// What it has.
        address: Vec<u8>,
    },
    /// The interface has no IPv4 address, or several: the guest takes one.
    #[error(
        "interface {interface} in {netns} has the IPv4 addresses {addresses:?}: expected exactly one, which the guest takes"
    )]
    Addresses {
        /// The namespace.
        netns: PathBuf,
        /// The interface.
        interface: String,
        /// Its addresses, with their prefix lengths.
        addresses: Vec<String>,
    },
    /// The tap cannot be created in the namespace.
    #[error("network namespace {netns}")]
    Tap {
        /// The namespace.
        netns: PathBuf,
        /// Why.
        #[source]
        source: TapError,
    },
    /// An rtnetlink request failed.
    #[error("network namespace {netns}: cannot {step}")]
    Netlink {
        /// The namespace.
        netns: PathBuf,
        /// The request, as a verb phrase ("add an ingress qdisc to eth0").
        step: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The kernel does not know the qdisc, classifier or action (ENOENT):
    /// its module is not loaded and could not be.
    #[error(
        "network namespace {netns}: cannot {step}: this kernel lacks {modules} (modprobe them)"
    )]
    NoModule {
        /// The namespace.
        netns: PathBuf,
        /// The request, as a verb phrase.
        step: String,
        /// The modules that provide what it needs.
        modules: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The pod's resolv.conf, which the spec mounts, cannot be read.
    #[error("cannot read the pod's resolv.conf {path}")]
    ResolvConf {
        /// The host file the spec mounts at /etc/resolv.conf.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The namespace's thread could not be started, or ended abruptly.
    #[error("cannot start a thread to enter {netns}")]
    Thread {
        /// The namespace.
        netns: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// The pod's interface, as the shim found it: what the guest takes over.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Veth {
    index: u32,
    name: String,
    mac: [u8; 6],
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    /// Its MTU (the kernel's default, 1500, if the link message had none).
    mtu: u32,
}

/// A container's NIC connected to its pod's network: the pod's interface
/// and the tap joined to it. The tap lives while the VM process holds it;
/// the veth's qdisc until [`PodNetwork::disconnect`].
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    veth: Veth,
    /// The pod's resolv.conf, as text (empty without one).
    resolv_conf: String,
}

impl PodNetwork {
    /// Finds the one Ethernet interface of the network namespace at
    /// `netns`, creates the tap beside it and redirects each one's frames
    /// to the other; reads the pod's `resolv_conf` (the spec's mount), if
    /// any, for the guest's nameservers. Nothing is left in the namespace
    /// when it fails.
    pub fn connect(
        netns: &Path,
        resolv_conf: Option<&Path>,
    ) -> Result<(PodNetwork, Tap), NetError> {
        let resolv_conf = read_resolv_conf(resolv_conf)?;
        let (veth, tap) = in_namespace(netns, |rtnl| {
            let veth = find_veth(rtnl)?;
            let tap = Tap::create(TAP_NAME, NET_HDR_LEN).map_err(|source| NetError::Tap {
                netns: netns.to_path_buf(),
                source,
            })?;
            redirect_both_ways(rtnl, &veth)?;
            Ok((veth, tap))
        })?;
        let network = PodNetwork {
            netns: netns.to_path_buf(),
            veth,
            resolv_conf,
        };
        Ok((network, tap))
    }

    /// Gives `config`'s VM the NIC on the tap, with the veth's MAC, and
    /// the kernel command-line words from which guest-init gives eth0 the
    /// veth's address, prefix and gateway, and the guest the pod's
    /// nameservers.
    pub fn attach(&self, config: &mut VmConfig) {
        let veth = &self.veth;
        config.net = Some(NetConfig {
            tap: TAP_NAME.to_string(),
            mac: veth.mac,
            bridge: None,
        });
        let words = kiln_control::network::guest_words(
            veth.address,
            veth.prefix,
            veth.gateway,
            veth.mac,
            guest_mtu(veth.mtu),
            &self.resolv_conf,
        );
        for word in words {
            config.extra_cmdline.push(' ');
            config.extra_cmdline.push_str(&word);
        }
    }

    /// Removes the veth's ingress qdisc, and with it its filter; the tap
    /// went with the VM process, its own qdisc with it. A namespace or
    /// veth that CNI has removed already leaves nothing to do.
    pub fn disconnect(self) -> Result<(), NetError> {
        let veth = &self.veth;
        unless_gone(in_namespace(&self.netns, |rtnl| {
            rtnl.del_ingress(veth.index, &veth.name)
        }))
    }

    /// After a shim died with its VM (`shim delete`): removes the ingress
    /// qdisc its [`PodNetwork::connect`] left on the veth of `netns`,
    /// redirecting to a tap that went with the VM process. A tap still
    /// there is a live VM's (a container whose Create was refused, or a
    /// pod member, shares the namespace with it), whose qdisc stays.
    pub fn clear_left(netns: &Path) -> Result<(), NetError> {
        unless_gone(in_namespace(netns, |rtnl| {
            match rtnl.link_index(TAP_NAME) {
                Ok(_) => Ok(()),
                Err(err) if gone(&err) => {
                    let veth = find_veth(rtnl)?;
                    rtnl.del_ingress(veth.index, &veth.name)
                }
                Err(err) => Err(err),
            }
        }))
    }
}

/// `done`, with what failed only because the namespace, the interface or
/// its qdisc is gone already (CNI removed it, or it was never made) as
/// done too.
fn unless_gone(done: Result<(), NetError>) -> Result<(), NetError> {
    match done {
        Err(err) if gone(&err) => Ok(()),
        done => done,
    }
}

/// Whether `err` says that what it was about does not exist.
fn gone(err: &NetError) -> bool {
    match err {
        NetError::Open { source, .. } => source.kind() == io::ErrorKind::NotFound,
        NetError::Netlink { source, .. } => matches!(
            source.raw_os_error(),
            Some(libc::ENODEV | libc::ENOENT | libc::EINVAL)
        ),
        NetError::NoInterface { .. } => true,
        _ => false,
    }
}

/// The text of the pod's resolv.conf at `path` (the spec's mount), or
/// none without one.
fn read_resolv_conf(path: Option<&Path>) -> Result<String, NetError> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    std::fs::read_to_string(path).map_err(|source| NetError::ResolvConf {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `work` with an rtnetlink socket in the network namespace at
/// `netns`, on a thread that enters it and ends with `work`.
fn in_namespace<T: Send>(
    netns: &Path,
    work: impl FnOnce(&mut Rtnl) -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    let file = File::open(netns).map_err(|source| NetError::Open {
        netns: netns.to_path_buf(),
        source,
    })?;
    let thread_err = |source| NetError::Thread {
        netns: netns.to_path_buf(),
        source,
    };
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, || {
                // SAFETY: setns takes a descriptor, which `file` holds open,
                // and a flag; it changes only this thread, which ends here.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                    return Err(NetError::Enter {
                        netns: netns.to_path_buf(),
                        source: io::Error::last_os_error(),
                    });
                }
                let mut rtnl = Rtnl::open(netns)?;
                work(&mut rtnl)
            })
            .map_err(thread_err)?;
        thread
            .join()
            .unwrap_or_else(|_| Err(thread_err(io::Error::other("the thread panicked"))))
    })
}

/// The namespace's one Ethernet interface (not `lo`, nor the tunnels'
/// fallback devices some modules add to every namespace), its one IPv4
/// address and the main table's default route through it, if any.
fn find_veth(rtnl: &mut Rtnl) -> Result<Veth, NetError> {
    let links = rtnl.dump(
        "list the interfaces",
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )?;
    let ethernet: Vec<LinkMessage> = links
        .into_iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewLink(link)
                if link.header.link_layer_type == LinkLayerType::Ether =>
            {
                Some(link)
            }
            _ => None,
        })
        .collect();
    let netns = rtnl.netns.clone();
    let link = match &ethernet[..] {
        [] => return Err(NetError::NoInterface { netns }),
        [link] => link,
        several => {
            let names = several.iter().map(link_name).collect();
            return Err(NetError::Several { netns, names });
        }
    };
    let name = link_name(link);
    let mac = link
        .attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::Address(address) => Some(address.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let mac = <[u8; 6]>::try_from(&mac[..]).map_err(|_| NetError::NoMac {
        netns: netns.clone(),
        interface: name.clone(),
        address: mac,
    })?;
    let mtu = link
        .attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(ETHERNET_MTU);
    let index = link.header.index;
    let (address, prefix) = only_address(rtnl, index, &name)?;
    let gateway = default_gateway(rtnl, index)?;
    Ok(Veth {
        index,
        name,
        mac,
        address,
        prefix,
        gateway,
        mtu,
    })
}

/// The MTU the guest's eth0 is given for a pod interface of `mtu`: the
/// same, so the guest's frames fit the pod's network (an overlay's, such
/// as VXLAN's 1450) and use its jumbo frames; `None` for Ethernet's 1500,
/// the guest's own default. Larger frames reach the guest in mergeable
/// receive buffers (VIRTIO_NET_F_MRG_RXBUF, virtio 1.2 §5.1.6.3), which
/// Kiln's device offers.
fn guest_mtu(mtu: u32) -> Option<u32> {
    (mtu != ETHERNET_MTU).then_some(mtu)
}

/// The interface's name, as its link message has it.
fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The one IPv4 address (and prefix length) of interface `index`.
fn only_address(rtnl: &mut Rtnl, index: u32, name: &str) -> Result<(Ipv4Addr, u8), NetError> {
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet;
    let messages = rtnl.dump(
        "list the addresses",
        RouteNetlinkMessage::GetAddress(request),
    )?;
    let addresses: Vec<(Ipv4Addr, u8)> = messages
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == index => Some(a),
            _ => None,
        })
        .filter_map(|a| {
            a.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, a.header.prefix_len)),
                _ => None,
            })
        })
        .collect();
    match addresses[..] {
        [only] => Ok(only),
        _ => Err(NetError::Addresses {
            netns: rtnl.netns.clone(),
            interface: name.to_string(),
            addresses: addresses
                .iter()
                .map(|(ip, prefix)| format!("{ip}/{prefix}"))
                .collect(),
        }),
    }
}

/// The gateway of the main table's IPv4 default route out of interface
/// `index`: none when the pod has no default route (only its subnet).
fn default_gateway(rtnl: &mut Rtnl, index: u32) -> Result<Option<Ipv4Addr>, NetError> {
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    let routes = rtnl.dump("list the routes", RouteNetlinkMessage::GetRoute(request))?;
    Ok(routes.iter().find_map(|message| match message {
        RouteNetlinkMessage::NewRoute(route)
            if route.header.table == RouteHeader::RT_TABLE_MAIN
                && route.header.destination_prefix_length == 0
                && route.attributes.contains(&RouteAttribute::Oif(index)) =>
        {
            route.attributes.iter().find_map(|attr| match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => Some(*gateway),
                _ => None,
            })
        }
        _ => None,
    }))
}

/// Brings the tap up and joins it to the veth both ways; on a failure the
/// veth's qdisc goes again (the tap's goes with the tap).
fn redirect_both_ways(rtnl: &mut Rtnl, veth: &Veth) -> Result<(), NetError> {
    let tap = rtnl.link_index(TAP_NAME)?;
    rtnl.add_ingress(veth.index, &veth.name)?;
    let rest = (|| {
        rtnl.set_up(tap, TAP_NAME)?;
        rtnl.add_ingress(tap, TAP_NAME)?;
        rtnl.add_redirect(veth.index, tap, &veth.name, TAP_NAME)?;
        rtnl.add_redirect(tap, veth.index, TAP_NAME, &veth.name)
    })();
    if rest.is_err() {
        let _ = rtnl.del_ingress(veth.index, &veth.name);
    }
    rest
}

/// The ingress qdisc of interface `index`: `tc qdisc add dev X ingress`.
fn ingress_qdisc(index: u32) -> TcMessage {
    let mut qdisc = TcMessage::default();
    qdisc.header.index = index as i32;
    qdisc.header.handle = INGRESS_HANDLE;
    qdisc.header.parent = TcHandle::INGRESS;
    qdisc.attributes = vec![TcAttribute::Kind("ingress".into())];
    qdisc
}

/// The filter on interface `from`'s ingress qdisc that matches every
/// frame and redirects it to leave through interface `to`: `tc filter add
/// dev FROM parent ffff: protocol all u32 match u32 0 0 action mirred
/// egress redirect dev TO`. The frame is stolen: `from`'s own stack never
/// sees it.
fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut key = TcU32Key::default();
    (key.mask, key.val, key.off) = (0, 0, 0);
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![key];
    let mut mirred = TcMirror::default();
    mirred.generic.action = TcActionType::Stolen;
    mirred.eaction = TcMirrorActionType::EgressRedir;
    mirred.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirred,
        ))]),
    ];
    let mut filter = TcMessage::default();
    filter.header.index = from as i32;
    filter.header.parent = INGRESS_HANDLE;
    // tcm_info: the priority above the protocol, in network order.
    filter.header.info = u32::from(FILTER_PRIORITY) << 16 | u32::from(ETH_P_ALL.to_be());
    filter.attributes = vec![
        TcAttribute::Kind("u32".into()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    filter
}

/// An rtnetlink socket in one network namespace, sending one request at
/// a time and reading its answer whole.
struct Rtnl {
    socket: Socket,
    sequence: u32,
    /// The namespace, which its errors name.
    netns: PathBuf,
}

impl Rtnl {
    /// A socket in this thread's network namespace, which is `netns`.
    fn open(netns: &Path) -> Result<Rtnl, NetError> {
        let socket = (|| {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            Ok(socket)
        })();
        let socket = socket.map_err(|source| NetError::Netlink {
            netns: netns.to_path_buf(),
            step: "open an rtnetlink socket".into(),
            source,
        })?;
        Ok(Rtnl {
            socket,
            sequence: 0,
            netns: netns.to_path_buf(),
        })
    }

    /// The index of the interface `name`.
    fn link_index(&mut self, name: &str) -> Result<u32, NetError> {
        let mut request = LinkMessage::default();
        request.attributes = vec![LinkAttribute::IfName(name.into())];
        let step = format!("find {name}");
        let answer = self.exchange(&step, RouteNetlinkMessage::GetLink(request), NLM_F_ACK)?;
        answer
            .iter()
            .find_map(|message| match message {
                RouteNetlinkMessage::NewLink(link) => Some(link.header.index),
                _ => None,
            })
            .ok_or_else(|| self.error(step, io::Error::from_raw_os_error(libc::ENODEV)))
    }

    fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        let step = format!("bring {name} up");
        self.change(&step, RouteNetlinkMessage::SetLink(link), 0)
    }

    fn add_ingress(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let step = format!("add an ingress qdisc to {name}");
        let message = RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index));
        self.add_tc(&step, message, "sch_ingress")
    }

    fn del_ingress(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let step = format!("remove the ingress qdisc of {name}");
        let message = RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index));
        self.change(&step, message, 0)
    }

    fn add_redirect(
        &mut self,
        from: u32,
        to: u32,
        from_name: &str,
        to_name: &str,
    ) -> Result<(), NetError> {
        let step = format!("redirect {from_name}'s ingress to {to_name}");
        let message = RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from, to));
        self.add_tc(&step, message, "cls_u32 and act_mirred")
    }

    /// Adds a TC object that must not exist yet; the kernel's ENOENT for
    /// a kind it does not know names the `modules` that provide it.
    fn add_tc(
        &mut self,
        step: &str,
        message: RouteNetlinkMessage,
        modules: &'static str,
    ) -> Result<(), NetError> {
        match self.change(step, message, NLM_F_CREATE | NLM_F_EXCL) {
            Err(NetError::Netlink {
                netns,
                step,
                source,
            }) if source.raw_os_error() == Some(libc::ENOENT) => Err(NetError::NoModule {
                netns,
                step,
                modules,
                source,
            }),
            done => done,
        }
    }

    /// A dump request's answer.
    fn dump(
        &mut self,
        step: &str,
        request: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        self.exchange(step, request, NLM_F_DUMP)
    }

    /// A request that changes something, acknowledged.
    fn change(
        &mut self,
        step: &str,
        request: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NetError> {
        self.exchange(step, request, flags | NLM_F_ACK).map(drop)
    }

    /// Sends `request` with `flags` and reads its answer up to its end:
    /// the dump's end, or the acknowledgement asked of every other
    /// request (after the answer of a get).
    fn exchange(
        &mut self,
        step: &str,
        request: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        self.sequence += 1;
        let payload = NetlinkPayload::from(request);
        let mut message = NetlinkMessage::new(NetlinkHeader::default(), payload);
        message.header.flags = NLM_F_REQUEST | flags;
        message.header.sequence_number = self.sequence;
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        let failed = |source| self.error(step.into(), source);
        self.socket.send(&buf, 0).map_err(failed)?;
        let mut answer = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full().map_err(failed)?;
            let mut rest = &buf[..];
            while !rest.is_empty() {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|err| failed(io::Error::other(err)))?;
                let len = (message.header.length as usize).clamp(1, rest.len());
                rest = &rest[len..];
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Error(err) if err.code.is_some() => {
                        return Err(failed(err.to_io()));
                    }
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(answer),
                    NetlinkPayload::InnerMessage(inner) => answer.push(inner),
                    _ => {}
                }
            }
        }
    }

    fn error(&self, step: String, source: io::Error) -> NetError {
        NetError::Netlink {
            netns: self.netns.clone(),
            step,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use kiln_vmm::report::one_line;
    use netlink_packet_core::{Emitable, Parseable};

    use super::*;

    #[test]
    fn the_filter_redirects_every_frame_to_the_other_interface_and_steals_it() {
        let filter = redirect_filter(7, 9);
        let mut buf = vec![0; filter.buffer_len()];
        filter.emit(&mut buf);
        let parsed = TcMessage::parse(&buf).unwrap();
        assert_eq!(parsed, filter);
        assert_eq!(parsed.header.index, 7);
        assert_eq!(parsed.header.parent, INGRESS_HANDLE);
        // `prio 49152 protocol all`, the protocol in network order.
        assert_eq!(parsed.header.info >> 16, 49152);
        assert_eq!(u16::from_be(parsed.header.info as u16), 0x0003);
        let TcAttribute::Options(options) = &parsed.attributes[1] else {
            panic!("{parsed:?}");
        };
        let TcOption::U32(TcFilterU32Option::Selector(selector)) = &options[0] else {
            panic!("{options:?}");
        };
        // One key that masks every bit off: it matches every frame.
        assert_eq!((selector.nkeys, selector.keys.len()), (1, 1));
        assert_eq!((selector.keys[0].mask, selector.keys[0].val), (0, 0));
        let TcOption::U32(TcFilterU32Option::Action(actions)) = &options[1] else {
            panic!("{options:?}");
        };
        let TcActionAttribute::Options(mirred) = &actions[0].attributes[1] else {
            panic!("{actions:?}");
        };
        let TcActionOption::Mirror(TcActionMirrorOption::Parms(parms)) = &mirred[0] else {
            panic!("{mirred:?}");
        };
        assert_eq!(parms.eaction, TcMirrorActionType::EgressRedir);
        assert_eq!(parms.ifindex, 9);
        assert_eq!(parms.generic.action, TcActionType::Stolen);
    }

    /// A scratch network namespace (`ip netns add`), deleted when dropped;
    /// None when this process may not make one (not root).
    struct Scratch(String);

    impl Scratch {
        /// Needs root and iproute2's `ip`, as CI has them: without, the
        /// test fails and says why rather than pass untested.
        fn new(tag: &str) -> Scratch {
            let name = format!("kiln-unit-{tag}-{}", std::process::id());
            assert!(
                ip(&["netns", "add", &name]),
                "`ip netns add {name}` failed: these tests need root and iproute2"
            );
            Scratch(name)
        }

        fn path(&self) -> PathBuf {
            Path::new("/run/netns").join(&self.0)
        }

        fn run(&self, args: &[&str]) -> String {
            let output = Command::new("ip")
                .args(["-n", &self.0])
                .args(args)
                .output()
                .unwrap();
            assert!(output.status.success(), "ip {args:?}: {output:?}");
            String::from_utf8(output.stdout).unwrap()
        }

        /// No tap and no qdisc of ours: the namespace as CNI made it.
        fn assert_as_made(&self) {
            assert!(!self.run(&["link"]).contains(TAP_NAME));
            let qdiscs = self.tc(&["qdisc", "show", "dev", "eth0"]);
            assert!(!qdiscs.contains("ingress"), "{qdiscs}");
        }

        fn tc(&self, args: &[&str]) -> String {
            let output = Command::new("ip")
                .args(["netns", "exec", &self.0, "tc"])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8(output.stdout).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            ip(&["netns", "del", &self.0]);
        }
    }

    /// Why connecting to `netns` fails, the path as NETNS.
    fn refusal(netns: &Path) -> String {
        let err = one_line(&PodNetwork::connect(netns, None).unwrap_err());
        err.replace(&netns.display().to_string(), "NETNS")
    }

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|out| out.status.success())
    }

    /// A pod's namespace as CNI leaves it: one end of a veth pair with an
    /// address and a default route, the other end in a namespace of its
    /// own (the host's side). None when not root.
    fn pod(tag: &str) -> (Scratch, Scratch) {
        let pod = Scratch::new(tag);
        let host = Scratch::new(&format!("{tag}-host"));
        assert!(ip(&[
            "link", "add", "eth0", "netns", &pod.0, "type", "veth", "peer", "name", "veth-h",
            "netns", &host.0,
        ]));
        pod.run(&["addr", "add", "10.77.0.5/24", "dev", "eth0"]);
        // An overlay network's MTU, as VXLAN's CNI plugins set it.
        pod.run(&["link", "set", "eth0", "mtu", "1450", "up"]);
        pod.run(&["route", "add", "default", "via", "10.77.0.1"]);
        (pod, host)
    }

    #[test]
    fn a_pods_interface_is_joined_to_a_tap_both_ways_and_unjoined_on_disconnect() {
        let (pod, _host) = pod("join");
        let resolv_conf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(resolv_conf.path(), "nameserver 10.96.0.10\nsearch svc\n").unwrap();
        let (network, tap) = PodNetwork::connect(&pod.path(), Some(resolv_conf.path())).unwrap();
        let links = pod.run(&["-o", "link"]);
        let mac = links
            .lines()
            .find(|l| l.contains(" eth0@"))
            .and_then(|l| l.split("link/ether ").nth(1))
            .and_then(|l| l.split(' ').next())
            .unwrap();
        assert_eq!(
            kiln_control::network::address::format_mac(network.veth.mac),
            mac
        );
        assert_eq!(
            (
                network.veth.address,
                network.veth.prefix,
                network.veth.gateway
            ),
            (
                Ipv4Addr::new(10, 77, 0, 5),
                24,
                Some(Ipv4Addr::new(10, 77, 0, 1))
            )
        );
        let tap_line = links.lines().find(|l| l.contains(" tap0_kiln: <"));
        assert!(tap_line.is_some_and(|l| l.contains(",UP")), "{links}");
        let veth_filter = pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
        assert!(
            veth_filter.contains("Egress Redirect to device tap0_kiln"),
            "{veth_filter}"
        );
        let tap_filter = pod.tc(&["filter", "show", "dev", TAP_NAME, "ingress"]);
        assert!(
            tap_filter.contains("Egress Redirect to device eth0"),
            "{tap_filter}"
        );

        let mut config = VmConfig {
            boot: kiln_vmm::config::Boot::Kernel("/vmlinux".into()),
            disks: Vec::new(),
            vcpus: 1,
            memory_mib: 128,
            extra_cmdline: "init=/init".into(),
            seccomp: true,
            vsock: None,
            net: None,
            announce_boot: false,
        };
        network.attach(&mut config);
        assert!(
            config
                .extra_cmdline
                .ends_with(" kiln.net.dns=10.96.0.10 kiln.net.search=svc")
        );
        assert_eq!(config.net.as_ref().unwrap().mac, network.veth.mac);
        assert!(
            config
                .extra_cmdline
                .contains(" kiln.net.ip=10.77.0.5/24 kiln.net.gateway=10.77.0.1 kiln.net.mtu=1450")
        );
        // A second container's VM in the namespace is refused: its first
        // tap is an Ethernet interface beside the pod's.
        let err = refusal(&pod.path());
        assert!(
            err.contains("Ethernet interfaces [\"eth0\", \"tap0_kiln\"]"),
            "{err}"
        );

        // A live VM's qdisc stays when a shim that died is cleaned up.
        PodNetwork::clear_left(&pod.path()).unwrap();
        assert!(
            pod.tc(&["qdisc", "show", "dev", "eth0"])
                .contains("ingress")
        );

        drop(tap);
        network.disconnect().unwrap();
        pod.assert_as_made();
        // The veth is CNI's, and stays.
        assert!(pod.run(&["addr", "show", "eth0"]).contains("10.77.0.5/24"));
    }

    #[test]
    fn a_dead_shims_qdisc_is_cleared_once_its_tap_has_gone() {
        let (pod, _host) = pod("left");
        let (network, tap) = PodNetwork::connect(&pod.path(), None).unwrap();
        // The shim dies, never disconnecting: its VM process, holding the
        // tap, with it.
        drop((network, tap));
        PodNetwork::clear_left(&pod.path()).unwrap();
        pod.assert_as_made();
        // Again, or in a namespace that is gone: nothing to do.
        PodNetwork::clear_left(&pod.path()).unwrap();
        PodNetwork::clear_left(Path::new("/run/netns/kiln-none")).unwrap();
    }

    #[test]
    fn a_namespace_without_one_addressed_interface_is_refused_and_left_as_it_was() {
        let empty = Scratch::new("empty");
        assert_eq!(
            refusal(&empty.path()),
            "network namespace NETNS has no Ethernet interface: expected the one CNI made"
        );
        let (pod, _host) = pod("noaddr");
        pod.run(&["addr", "flush", "dev", "eth0"]);
        assert_eq!(
            refusal(&pod.path()),
            "interface eth0 in NETNS has the IPv4 addresses []: expected exactly one, which the guest takes"
        );
        pod.assert_as_made();
    }

    #[test]
    fn a_path_that_is_no_network_namespace_is_refused_by_name() {
        let err =
            one_line(&PodNetwork::connect(Path::new("/run/netns/kiln-none"), None).unwrap_err());
        assert!(
            err.starts_with("cannot open the network namespace /run/netns/kiln-none: "),
            "{err}"
        );
        let missing = Path::new("/run/kiln-none/resolv.conf");
        let err = one_line(
            &PodNetwork::connect(Path::new("/run/netns/kiln-none"), Some(missing)).unwrap_err(),
        );
        assert!(
            err.starts_with("cannot read the pod's resolv.conf /run/kiln-none/resolv.conf: "),
            "{err}"
        );
        assert_eq!(read_resolv_conf(None).unwrap(), "");
        let file = tempfile::NamedTempFile::new().unwrap();
        match PodNetwork::connect(file.path(), None) {
            Err(NetError::Enter { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
            }
            other => panic!("{other:?}"),
        }
    }
}
