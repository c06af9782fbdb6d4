//! Per-port filters: an instance's tap passes only frames its guest sends
//! as itself, so that no guest can take a neighbour's MAC or IPv4 address
//! (and with it the port proxy's connections meant for the neighbour).
//!
//! Each bridged tap gets an nftables table of its own (`kiln-kt-…`), in
//! the netdev family, with one chain on the tap's ingress hook: it sees
//! every frame the guest writes, before the bridge forwards or learns
//! from it and before the host's own stack reads it. The chain accepts
//!
//! - IPv4 from the guest's MAC and address, and
//! - Ethernet/IPv4 ARP from the guest's MAC whose sender hardware and
//!   protocol addresses are the guest's own,
//!
//! and drops everything else: IPv6 (Kiln gives guests none; their
//! kernels' link-local chatter is dropped uncounted), then, counted, other
//! source MACs (which would teach the bridge to send a neighbour's frames
//! here), other source addresses, ARP claims for another address (which
//! would poison the host's and the neighbours' ARP caches), and every
//! other EtherType (a VLAN tag would hide the rest).
//!
//! The rules are written by Debian's `nft` in one transaction (`nft -f -`)
//! that first removes any table of the same name: installing is atomic and
//! replaces what a supervisor killed before it could clean up left. The
//! supervisor removes the table when the tap goes ([`unpin`]); one whose
//! supervisor was killed first is swept by the next [`pin`] of any tap.
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

use super::address::format_mac;

/// The nftables command-line tool (Debian's nftables package).
const NFT: &str = "nft";
/// The start of the name of every tap filter's table.
const TABLE_PREFIX: &str = "kiln-";
/// A device every host has, on which [`check`] tries a chain.
const LOOPBACK: &str = "lo";
/// Where the host's network devices are listed, by name.
const NET_DEVICES: &str = "/sys/class/net";

/// Why a tap's filter cannot be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// `nft` cannot be run: it is not installed, most often.
    #[error("cannot run {NFT} for the filter of tap {tap} (install Debian's nftables package)")]
    Run {
        /// The tap whose filter was being written.
        tap: String,
        /// Why it could not be run.
        #[source]
        source: io::Error,
    },
    /// `nft` refused the rules: the kernel lacks nf_tables' netdev family,
    /// or this process lacks CAP_NET_ADMIN.
    #[error("{NFT} refused the filter of tap {tap}: {stderr}")]
    Refused {
        /// The tap whose filter was being written.
        tap: String,
        /// What `nft` said, on one line.
        stderr: String,
    },
    /// `nft -j list tables` printed what is not its JSON listing.
    #[error("{NFT} listed the netdev tables as unexpected JSON (while pinning tap {tap})")]
    Listing {
        /// The tap being pinned, whose [`pin`] sweeps.
        tap: String,
        /// Why the listing cannot be read.
        #[source]
        source: serde_json::Error,
    },
}

/// Pins `tap` to the guest at `address` with `mac`: from now on it passes
/// only that guest's own IPv4 and ARP. Call it before the tap joins the
/// bridge, so no frame crosses unfiltered. Stale filters of other taps
/// are swept first; a failed sweep is said on stderr, as it leaves only
/// filters of devices that are gone.
pub fn pin(tap: &str, mac: [u8; 6], address: Ipv4Addr) -> Result<(), FilterError> {
    if let Err(err) = sweep(tap) {
        eprintln!("kiln: {}", kiln_vmm::report::one_line(&err));
    }
    apply(tap, &pinned(tap, mac, address))
}

/// Removes the filter of `tap`, if it has one. The tap's end leaves it:
/// Linux 6.1 drops the chain with its device but keeps the table, and
/// newer kernels (6.18) keep both, the chain hookless.
pub fn unpin(tap: &str) -> Result<(), FilterError> {
    apply(tap, &removal(&table(tap)))
}

/// Whether tap filters can be installed here: a dry run (`nft -c`) of a
/// filter on the loopback device, which the kernel checks but keeps not.
pub fn check() -> Result<(), FilterError> {
    let rules = format!(
        "table netdev {table} {{\n\tchain guest {{\n\t\t{hook}\n\t}}\n}}\n",
        table = table(LOOPBACK),
        hook = hook(LOOPBACK),
    );
    run(LOOPBACK, &["-c", "-f", "-"], &rules)
}

/// The table of `tap`'s filter.
fn table(tap: &str) -> String {
    format!("{TABLE_PREFIX}{tap}")
}

/// Removes the filters whose taps are gone (their supervisors were killed
/// before [`unpin`]), while pinning `tap`. By handle: a filter that [`pin`]
/// replaces meanwhile has a new one, and the sweep's transaction then
/// fails whole, touching nothing.
fn sweep(tap: &str) -> Result<(), FilterError> {
    let listing = output(tap, &["-j", "list", "tables", "netdev"])?;
    let stale: String = filter_tables(&listing)
        .map_err(|source| FilterError::Listing {
            tap: tap.to_string(),
            source,
        })?
        .into_iter()
        .filter(|(device, _)| !Path::new(NET_DEVICES).join(device).exists())
        .map(|(_, handle)| format!("delete table netdev handle {handle}\n"))
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    apply(tap, &stale)
}

/// The tap filters' tables in `nft -j list tables netdev` output: each
/// one's tap and handle.
fn filter_tables(listing: &str) -> Result<Vec<(String, u64)>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Listing {
        nftables: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        table: Option<Table>,
    }
    #[derive(serde::Deserialize)]
    struct Table {
        name: String,
        handle: u64,
    }
    let listing: Listing = serde_json::from_str(listing)?;
    Ok(listing
        .nftables
        .into_iter()
        .filter_map(|entry| entry.table)
        .filter_map(|table| {
            let tap = table.name.strip_prefix(TABLE_PREFIX)?;
            Some((tap.to_string(), table.handle))
        })
        .collect())
}

/// Statements that remove `table` whether or not it exists: adding a
/// table that exists is no error, and the deletion then takes it.
fn removal(table: &str) -> String {
    format!("add table netdev {table}\ndelete table netdev {table}\n")
}

/// The base chain's declaration: on `tap`'s ingress, dropping what no
/// rule accepts.
fn hook(tap: &str) -> String {
    format!("type filter hook ingress device \"{tap}\" priority filter; policy drop;")
}

/// The whole transaction pinning `tap` to `mac` and `address`.
fn pinned(tap: &str, mac: [u8; 6], address: Ipv4Addr) -> String {
    let table = table(tap);
    let mac = format_mac(mac);
    // ARP's sender fields sit where nft reads them only in Ethernet/IPv4
    // ARP (RFC 826: hardware type 1, 6-byte MACs, 4-byte addresses); the
    // host's ARP reads other lengths at other offsets, so they are refused.
    // IPv6 is dropped before the counter: every guest kernel sends some
    // (link-local neighbour discovery), which would hide spoofing in it.
    let arp = "arp htype 1 arp ptype ip arp hlen 6 arp plen 4";
    format!(
        "{removal}table netdev {table} {{\n\
         \tchain guest {{\n\
         \t\t{hook}\n\
         \t\tether saddr {mac} ether type ip ip saddr {address} accept\n\
         \t\tether saddr {mac} ether type arp {arp} arp saddr ether {mac} arp saddr ip {address} accept\n\
         \t\tether type ip6 drop\n\
         \t\tcounter drop\n\
         \t}}\n\
         }}\n",
        removal = removal(&table),
        hook = hook(tap),
    )
}

/// Runs `rules` as one `nft` transaction.
fn apply(tap: &str, rules: &str) -> Result<(), FilterError> {
    run(tap, &["-f", "-"], rules)
}

/// Runs `nft` with `args`, `rules` on its standard input.
fn run(tap: &str, args: &[&str], rules: &str) -> Result<(), FilterError> {
    nft(tap, args, rules).map(drop)
}

/// What `nft` with `args` prints.
fn output(tap: &str, args: &[&str]) -> Result<String, FilterError> {
    nft(tap, args, "")
}

/// Runs `nft` with `args` on `input` for the filter of `tap`; what it
/// prints, if it succeeds.
fn nft(tap: &str, args: &[&str], input: &str) -> Result<String, FilterError> {
    let run_err = |source| FilterError::Run {
        tap: tap.to_string(),
        source,
    };
    let mut child = Command::new(NFT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(run_err)?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let output = child.wait_with_output().map_err(run_err)?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(FilterError::Refused {
            tap: tap.to_string(),
            stderr: stderr.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    written.map_err(run_err)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_tap_accepts_only_its_own_ipv4_and_arp() {
        let rules = pinned(
            "kt-0123456789ab",
            [0x02, 0x6b, 10, 89, 0, 5],
            Ipv4Addr::new(10, 89, 0, 5),
        );
        let expected = "\
add table netdev kiln-kt-0123456789ab
delete table netdev kiln-kt-0123456789ab
table netdev kiln-kt-0123456789ab {
\tchain guest {
\t\ttype filter hook ingress device \"kt-0123456789ab\" priority filter; policy drop;
\t\tether saddr 02:6b:0a:59:00:05 ether type ip ip saddr 10.89.0.5 accept
\t\tether saddr 02:6b:0a:59:00:05 ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether 02:6b:0a:59:00:05 arp saddr ip 10.89.0.5 accept
\t\tether type ip6 drop
\t\tcounter drop
\t}
}
";
        assert_eq!(rules, expected);
    }

    #[test]
    fn the_sweep_reads_only_filter_tables() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "netdev", "name": "kiln-kt-0123456789ab", "handle": 4}},
            {"table": {"family": "netdev", "name": "other", "handle": 9}}]}"#;
        assert_eq!(
            filter_tables(listing).unwrap(),
            [("kt-0123456789ab".to_string(), 4)]
        );
        assert!(filter_tables("table netdev kiln-kt-0").is_err());
    }

    #[test]
    fn removal_needs_no_table_to_exist() {
        assert_eq!(
            removal(&table("kt-ab")),
            "add table netdev kiln-kt-ab\ndelete table netdev kiln-kt-ab\n"
        );
    }
}
