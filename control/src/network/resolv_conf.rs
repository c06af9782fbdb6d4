//! What of a resolv.conf (resolv.conf(5)) a guest is given: the host's
//! for an instance, the pod's (CRI's) for a container. guest-init writes
//! it back as the guest's /etc/resolv.conf from the `kiln.net.dns`,
//! `kiln.net.search` and `kiln.net.options` words.
//!
//! Only what works from inside a VM, and what a kernel command-line word
//! can carry, is passed on: the file's words are split at blanks, and the
//! guest's lists at commas, so neither can hold one. What is left out,
//! and why:
//! - a nameserver that is IPv6 (the guest's NIC has only IPv4) or the
//!   host's loopback (a local stub resolver, such as systemd-resolved's
//!   127.0.0.53, that the guest cannot reach); past the third, which no
//!   resolver reads (glibc's and musl's MAXNS);
//! - a search domain that is not a DNS name; past the sixth, or past 256
//!   characters in all (glibc's MAXDNSRCH and its historic buffer, the
//!   limits of the resolvers that still have them);
//! - an option that is not `NAME` or `NAME:NUMBER`.
use std::net::Ipv4Addr;

/// The nameservers a resolver reads at most (MAXNS).
pub const MAX_NAMESERVERS: usize = 3;
/// The search domains older resolvers read at most (MAXDNSRCH).
pub const MAX_SEARCH_DOMAINS: usize = 6;
/// The characters of the search list, blanks between, that older
/// resolvers read at most.
pub const MAX_SEARCH_CHARS: usize = 256;
/// A DNS name's longest text form (RFC 1035 §2.3.4: 255 octets on the
/// wire, 253 characters written).
const MAX_NAME_CHARS: usize = 253;

/// The DNS set-up a guest is given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestDns {
    /// `nameserver` lines, in order.
    pub nameservers: Vec<Ipv4Addr>,
    /// The last `search` (or its old synonym `domain`) line's domains.
    pub search: Vec<String>,
    /// Every `options` line's options, in order.
    pub options: Vec<String>,
}

impl GuestDns {
    /// What of `resolv_conf`'s text a guest can use, as the module's
    /// rules say. Unknown lines and comments are skipped, as resolvers
    /// skip them.
    pub fn from_resolv_conf(resolv_conf: &str) -> GuestDns {
        let mut dns = GuestDns::default();
        for line in resolv_conf.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => dns.nameservers.extend(guest_nameserver(words.next())),
                Some("search" | "domain") => dns.search = search_list(words),
                Some("options") => dns
                    .options
                    .extend(words.filter(|w| is_option(w)).map(String::from)),
                _ => {}
            }
        }
        dns.nameservers.truncate(MAX_NAMESERVERS);
        dns
    }

    /// The kernel command-line words for guest-init. Without a nameserver
    /// there are none: the guest then keeps its image's own file, whose
    /// search domains go with its nameservers.
    pub fn words(&self) -> Vec<String> {
        if self.nameservers.is_empty() {
            return Vec::new();
        }
        let servers: Vec<String> = self.nameservers.iter().map(Ipv4Addr::to_string).collect();
        let mut words = vec![format!("kiln.net.dns={}", servers.join(","))];
        if !self.search.is_empty() {
            words.push(format!("kiln.net.search={}", self.search.join(",")));
        }
        if !self.options.is_empty() {
            words.push(format!("kiln.net.options={}", self.options.join(",")));
        }
        words
    }
}

/// A `nameserver` line's address, if the guest can reach it.
fn guest_nameserver(word: Option<&str>) -> Option<Ipv4Addr> {
    let address: Ipv4Addr = word?.parse().ok()?;
    (!address.is_loopback()).then_some(address)
}

/// A search line's DNS names, as many as the limits allow.
fn search_list<'a>(words: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut list: Vec<String> = Vec::new();
    let mut chars = 0;
    for name in words.filter(|w| is_dns_name(w)) {
        let with_blank = name.len() + usize::from(!list.is_empty());
        if list.len() == MAX_SEARCH_DOMAINS || chars + with_blank > MAX_SEARCH_CHARS {
            break;
        }
        chars += with_blank;
        list.push(name.to_string());
    }
    list
}

/// Letters, digits, hyphens and underscores in dot-separated labels of 1
/// to 63 characters (RFC 1035 §2.3.4; the underscore as service names use
/// it), with an optional final dot.
fn is_dns_name(name: &str) -> bool {
    let labels = name.strip_suffix('.').unwrap_or(name);
    name.len() <= MAX_NAME_CHARS
        && labels.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `NAME` or `NAME:NUMBER`, as resolv.conf(5)'s options are written
/// (`ndots:5`, `edns0`, `single-request-reopen`).
fn is_option(option: &str) -> bool {
    let (name, number) = match option.split_once(':') {
        Some((name, number)) => (name, Some(number)),
        None => (option, None),
    };
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    name_ok && number.is_none_or(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_leave_out_loopback_ipv6_and_past_the_third() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n\
                    nameserver ::1\n nameserver 1.1.1.1 \nnameserver\n\
                    nameserver 8.8.8.8\nnameserver 9.9.9.9\n";
        assert_eq!(
            GuestDns::from_resolv_conf(conf).nameservers,
            [
                Ipv4Addr::new(10, 0, 0, 2),
                Ipv4Addr::new(1, 1, 1, 1),
                Ipv4Addr::new(8, 8, 8, 8)
            ]
        );
    }

    #[test]
    fn a_kubernetes_pods_file_reaches_the_guest_whole() {
        let conf = "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                    nameserver 10.96.0.10\noptions ndots:5\n";
        let dns = GuestDns::from_resolv_conf(conf);
        assert_eq!(
            dns.words(),
            [
                "kiln.net.dns=10.96.0.10",
                "kiln.net.search=default.svc.cluster.local,svc.cluster.local,cluster.local",
                "kiln.net.options=ndots:5",
            ]
        );
    }

    #[test]
    fn the_last_search_or_domain_line_counts_and_options_add_up() {
        let conf = "nameserver 10.0.0.2\nsearch first.example\ndomain second.example\n\
                    options ndots:2 timeout:1\noptions edns0 rotate\n";
        let dns = GuestDns::from_resolv_conf(conf);
        assert_eq!(dns.search, ["second.example"]);
        assert_eq!(dns.options, ["ndots:2", "timeout:1", "edns0", "rotate"]);
    }

    #[test]
    fn what_a_word_cannot_carry_or_a_resolver_would_not_read_is_left_out() {
        let conf = "nameserver 10.0.0.2\n\
                    search ok.example bad,comma bad..dots -ok_label.example. a b c d e f g\n\
                    options ndots:x ndots: :5 use-vc no,comma trust-ad\n";
        let dns = GuestDns::from_resolv_conf(conf);
        assert_eq!(
            dns.search,
            ["ok.example", "-ok_label.example.", "a", "b", "c", "d"]
        );
        assert_eq!(dns.options, ["use-vc", "trust-ad"]);

        let long = format!("search {}\n", vec!["x".repeat(63); 6].join("."));
        assert!(
            GuestDns::from_resolv_conf(&long).search.is_empty(),
            "over 253 characters"
        );
        let label = "y".repeat(60);
        let many = format!("search {0}.a {0}.b {0}.c {0}.d {0}.e\n", label);
        let search = GuestDns::from_resolv_conf(&many).search;
        assert_eq!(search.len(), 4, "62 characters each, 256 in all");
        assert!(search.join(" ").len() <= MAX_SEARCH_CHARS);
    }

    #[test]
    fn without_a_nameserver_the_guest_keeps_its_own_file() {
        let dns = GuestDns::from_resolv_conf("nameserver 127.0.0.53\nsearch lan\noptions edns0\n");
        assert!(dns.words().is_empty());
        assert!(GuestDns::from_resolv_conf("").words().is_empty());
    }
}
