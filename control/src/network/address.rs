//! Instance addressing: the Kiln bridge's subnet, an address per instance,
//! and the names and MACs derived from it.
//!
//! The bridge (`kiln0`) holds the subnet's first address, which is every
//! guest's gateway; instances get the others, lowest free first. An
//! address belongs to an instance from its launch until it is terminated
//! (as a private IP stays with an EC2 instance across stop and start),
//! and the registry hands it out under a lock, so concurrent launches
//! never share one.
use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The bridge every instance's tap joins.
pub const BRIDGE: &str = "kiln0";
/// The subnet unless `$KILN_SUBNET` says otherwise: private (RFC 1918),
/// and far from the 172.17/16 and 192.168/16 ranges other tools take.
pub const DEFAULT_SUBNET: Subnet = Subnet {
    network: Ipv4Addr::new(10, 89, 0, 0),
    prefix: 24,
};
/// Overrides [`DEFAULT_SUBNET`]; every kiln process of a host must agree.
pub const SUBNET_ENV: &str = "KILN_SUBNET";
/// The first bytes of every guest MAC: the locally administered bit set,
/// the multicast bit clear (IEEE 802 §8.2), then 'k'.
const MAC_PREFIX: [u8; 2] = [0x02, 0x6b];

/// Why no address can be had.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    /// `$KILN_SUBNET` is not a subnet Kiln can use.
    #[error("{value:?}: expected an IPv4 subnet such as 10.89.0.0/24, prefix 16 to 29")]
    Subnet {
        /// The value as given.
        value: String,
    },
    /// Every instance address is held by an instance not terminated.
    #[error(
        "subnet {subnet} is exhausted: its {count} instance addresses are taken (terminate an instance, or set {SUBNET_ENV} to a larger one)"
    )]
    Exhausted {
        /// The subnet.
        subnet: Subnet,
        /// How many instance addresses it has.
        count: usize,
    },
    /// An address asked for (a restored guest's) is not on the bridge's
    /// subnet: `$KILN_SUBNET` changed since the snapshot.
    #[error("address {address} is outside the subnet {subnet}")]
    Outside {
        /// The address asked for.
        address: Ipv4Addr,
        /// The subnet in use.
        subnet: Subnet,
    },
    /// An address asked for (a restored guest's) is another instance's.
    #[error("address {address} is held by instance {holder}")]
    Taken {
        /// The address asked for.
        address: Ipv4Addr,
        /// The id of the instance that holds it.
        holder: String,
    },
}

/// An IPv4 subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// `$KILN_SUBNET`, else the default.
    pub fn from_env() -> Result<Subnet, AddressError> {
        match std::env::var(SUBNET_ENV) {
            Ok(value) => value.parse(),
            Err(_) => Ok(DEFAULT_SUBNET),
        }
    }

    /// The prefix length: how many leading bits name the network.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The prefix as a dotted netmask (255.255.255.0 for a /24), as the
    /// bridge's address is set with it.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// The bridge's address, the guests' gateway: the first one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Every address an instance may have: neither the network, the
    /// gateway nor the broadcast address.
    fn instance_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | !self.mask();
        (first..broadcast).map(Ipv4Addr::from)
    }

    /// Whether `address` is on this subnet (its network and broadcast
    /// addresses included).
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.network)
    }

    /// The lowest instance address not in `taken`.
    pub fn allocate(&self, taken: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, AddressError> {
        self.instance_addresses()
            .find(|address| !taken.contains(address))
            .ok_or(AddressError::Exhausted {
                subnet: *self,
                count: self.instance_addresses().count(),
            })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = AddressError;

    fn from_str(value: &str) -> Result<Subnet, AddressError> {
        let bad = || AddressError::Subnet {
            value: value.to_string(),
        };
        let (network, prefix) = value.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = network.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        // At least a /29's five instance addresses; at most a /16, so a
        // scan of the taken ones stays cheap.
        if !(16..=29).contains(&prefix) {
            return Err(bad());
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(bad());
        }
        Ok(subnet)
    }
}

/// The guest MAC of the instance at `address`: unique wherever the
/// address is, and the same at every boot and restore.
pub fn mac(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [MAC_PREFIX[0], MAC_PREFIX[1], a, b, c, d]
}

/// `mac` as six colon-separated pairs of lowercase hex digits
/// (`02:6b:0a:59:00:05`), as `ip link` shows it and the guest's metadata
/// gives it.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// The tap of instance `id` (`i-` and hex digits): `kt-` and the first 12
/// digits, which fits IFNAMSIZ.
pub fn tap_name(id: &str) -> String {
    let digits: String = id.trim_start_matches("i-").chars().take(12).collect();
    format!("kt-{digits}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_skip_network_gateway_and_broadcast() {
        let small = subnet("10.1.2.0/29");
        assert_eq!(small.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        let all: Vec<_> = small.instance_addresses().collect();
        assert_eq!(all.first(), Some(&Ipv4Addr::new(10, 1, 2, 2)));
        assert_eq!(all.last(), Some(&Ipv4Addr::new(10, 1, 2, 6)));
        assert_eq!(all.len(), 5);
        assert_eq!(DEFAULT_SUBNET.instance_addresses().count(), 253);
    }

    #[test]
    fn allocation_takes_the_lowest_free_and_reports_exhaustion() {
        let small = subnet("10.1.2.0/29");
        let mut taken = BTreeSet::new();
        for last in [2, 3, 5] {
            taken.insert(Ipv4Addr::new(10, 1, 2, last));
        }
        assert_eq!(small.allocate(&taken), Ok(Ipv4Addr::new(10, 1, 2, 4)));
        taken.extend([4, 6].map(|last| Ipv4Addr::new(10, 1, 2, last)));
        let err = small.allocate(&taken).unwrap_err();
        assert_eq!(
            err,
            AddressError::Exhausted {
                subnet: small,
                count: 5
            }
        );
        assert!(
            err.to_string().contains("10.1.2.0/29 is exhausted"),
            "{err}"
        );
    }

    #[test]
    fn subnets_must_be_aligned_and_sized() {
        assert_eq!(subnet("10.89.0.0/24"), DEFAULT_SUBNET);
        assert_eq!(DEFAULT_SUBNET.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            subnet("10.1.2.0/29").netmask(),
            Ipv4Addr::new(255, 255, 255, 248)
        );
        for bad in [
            "10.89.0.0",
            "10.89.0.1/24",
            "10.89.0.0/30",
            "10.0.0.0/8",
            "x/24",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert!(DEFAULT_SUBNET.contains(Ipv4Addr::new(10, 89, 0, 200)));
        assert!(!DEFAULT_SUBNET.contains(Ipv4Addr::new(10, 89, 1, 2)));
    }

    #[test]
    fn macs_and_taps_are_derived() {
        let mac = mac(Ipv4Addr::new(10, 89, 0, 5));
        assert_eq!(format_mac(mac), "02:6b:0a:59:00:05");
        // Unicast, locally administered.
        assert_eq!(mac[0] & 0b11, 0b10);
        let tap = tap_name("i-0123456789abcdef");
        assert_eq!(tap, "kt-0123456789ab");
        assert!(tap.len() < libc::IFNAMSIZ);
    }
}
