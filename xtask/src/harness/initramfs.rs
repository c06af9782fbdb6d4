//! The L1 guest's initramfs: busybox, the KVM modules, the programs under
//! test with their shared libraries (`kiln`, containerd-shim-kiln-v2,
//! kiln-cri-client and Debian's containerd, ctr, runc and CNI plugins),
//! QEMU as the peer, e2fsck, nft, the guest kernel, the images (raw and
//! the store) and the scenarios.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sh;

/// What goes into the L1 guest.
pub struct Payload<'a> {
    pub kiln: &'a Path,
    /// xtask itself: the benchmark runner.
    pub xtask: &'a Path,
    pub kernel: &'a Path,
    pub guest_init: &'a Path,
    pub assets: &'a Path,
    /// The image store the recipes were built into.
    pub images: &'a Path,
    /// Whether a scenario builds recipes/debian: the recipe goes under
    /// [`WORKSPACE_DIR`] as it is in the workspace (its parent image is in
    /// [`Payload::images`]).
    pub debian_recipe: bool,
    /// The command line /init runs.
    pub job: &'a str,
    /// The host link's shell variables ([`super::host_steps::l1_environment`]),
    /// which /init exports.
    pub host_link_env: &'a str,
    /// The L1 kernel's version: the KVM modules must match it.
    pub l1_version: &'a str,
}

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// containerd, its CLI, runc and runc's shim (Debian's), for
/// tests/vm/containerd.sh and tests/vm/cri.sh (whose baseline pod runs
/// on containerd's own runtime).
const CONTAINERD: [&str; 4] = [
    "/usr/bin/containerd",
    "/usr/bin/ctr",
    "/usr/sbin/runc",
    "/usr/bin/containerd-shim-runc-v2",
];
/// The CNI plugins (Debian's containernetworking-plugins) that give a
/// CRI pod its network namespace in tests/vm/cri.sh: a bridge with
/// host-local addresses, and the loopback the CRI plugin adds itself.
const CNI_PLUGINS: [&str; 3] = [
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
];
/// Programs built beside `kiln`: the shim containerd runs Kiln containers
/// with, and the CRI client of tests/vm/cri.sh.
const BESIDE_KILN: [&str; 2] = ["containerd-shim-kiln-v2", "kiln-cri-client"];
/// Modules only some scenarios need, which they load themselves:
/// containerd's overlayfs snapshotter's (tests/vm/containerd*.sh, cri.sh).
const SCENARIO_MODULES: [&str; 1] = ["fs/overlayfs/overlay.ko"];
/// Checks the volumes scenarios flatten.
const E2FSCK: &str = "/usr/sbin/e2fsck";
/// Make the filesystem of an image `kiln build` builds inside L1, where
/// KVM works and the recipe's tests run (tests/vm/build-tests.sh).
const MKFS_EXT4: &str = "/usr/sbin/mkfs.ext4";
const DEBUGFS: &str = "/usr/sbin/debugfs";
/// Installs the instances' tap filters (control/src/network/filter.rs);
/// tests/vm/network-spoof.sh reads their counters with it.
const NFT: &str = "/usr/sbin/nft";
/// iproute2's ip and tc, with which tests/vm/containerd-net.sh makes a
/// pod's namespace and veth and reads the shim's qdiscs (busybox's have
/// no netns, veth or TC filters; its sh runs its own applet for a bare
/// `ip`, whatever PATH says, so the scenario names these by path).
const IPROUTE2: [&str; 2] = ["/usr/sbin/ip", "/usr/sbin/tc"];
/// The firmware QEMU 7.2's microvm machine loads by default (qboot).
const QEMU_FIRMWARE: &str = "/usr/share/qemu/qboot.rom";
/// The L1 kernel's modules the scenarios need, in insmod order (l1-init.sh
/// loads them so): kvm needs irqbypass, kvm-amd needs kvm; instances'
/// taps need tun, and the kiln0 bridge needs bridge, which needs stp and
/// llc; the taps' filters (control/src/network/filter.rs) need
/// nf_tables, which needs nfnetlink and libcrc32c; L1's own NIC
/// (virtio-net-pci, for host steps: host_steps.rs) needs the virtio core
/// and PCI transport, and virtio_net needs net_failover, which needs
/// failover; a pod's network namespace (the shim's `network`) needs veth
/// for the pod's interface and sch_ingress, cls_u32 and act_mirred for
/// the TC redirects between it and the VM's tap.
const MODULES: [&str; 22] = [
    "virt/lib/irqbypass.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
    "drivers/net/tun.ko",
    "net/llc/llc.ko",
    "net/802/stp.ko",
    "net/bridge/bridge.ko",
    "lib/libcrc32c.ko",
    "net/netfilter/nfnetlink.ko",
    "net/netfilter/nf_tables.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/net/veth.ko",
    "net/sched/sch_ingress.ko",
    "net/sched/cls_u32.ko",
    "net/sched/act_mirred.ko",
];
const L1_INIT: &str = include_str!("l1-init.sh");
/// Where the scenarios are inside L1.
pub const TESTS_DIR: &str = "/kiln/tests";
/// Where the parts of the workspace a scenario builds from are inside L1,
/// at their workspace paths (`$KILN_WORKSPACE`).
const WORKSPACE_DIR: &str = "kiln/workspace";
/// Where the xtask binary is inside L1.
pub const XTASK_PATH: &str = "/kiln/bin/xtask";

/// Lays out the initramfs in `tree` and packs it as a newc cpio archive.
pub fn pack(tree: &Path, archive: &Path, payload: &Payload) -> Result<()> {
    let _ = fs::remove_dir_all(tree);
    for dir in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "lib/modules",
        "kiln/bin",
        "kiln/tests",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    copy(Path::new("/bin/busybox"), &tree.join("bin/busybox"))?;
    write_executable(&tree.join("init"), L1_INIT)?;
    let modules = Path::new("/lib/modules")
        .join(payload.l1_version)
        .join("kernel");
    for module in MODULES.iter().chain(&SCENARIO_MODULES) {
        let name = Path::new(module)
            .file_name()
            .expect("module paths name a file");
        copy(&modules.join(module), &tree.join("lib/modules").join(name))?;
    }
    copy_with_libraries(payload.kiln, &tree.join("kiln/bin/kiln"), tree)?;
    for program in BESIDE_KILN {
        copy_with_libraries(
            &payload.kiln.with_file_name(program),
            &tree.join("kiln/bin").join(program),
            tree,
        )?;
    }
    for program in CONTAINERD.iter().chain(&CNI_PLUGINS) {
        copy_with_libraries(Path::new(program), &tree.join(&program[1..]), tree)?;
    }
    copy_with_libraries(payload.xtask, &tree.join(&XTASK_PATH[1..]), tree)?;
    copy_with_libraries(Path::new(QEMU), &tree.join(&QEMU[1..]), tree)?;
    copy(Path::new(QEMU_FIRMWARE), &tree.join(&QEMU_FIRMWARE[1..]))?;
    for tool in [E2FSCK, MKFS_EXT4, DEBUGFS, NFT].iter().chain(&IPROUTE2) {
        copy_with_libraries(Path::new(tool), &tree.join(&tool[1..]), tree)?;
    }
    copy(payload.kernel, &tree.join("kiln/vmlinux"))?;
    copy(payload.guest_init, &tree.join("kiln/guest-init"))?;
    copy_dir(payload.assets, &tree.join("kiln/assets"), "ext4")?;
    copy_tree(payload.images, &tree.join("kiln/images"))?;
    copy_scenarios(&tree.join("kiln/tests"))?;
    if payload.debian_recipe {
        copy_tree(
            &sh::workspace_root().join("recipes/debian"),
            &tree.join(WORKSPACE_DIR).join("recipes/debian"),
        )?;
    }
    fs::write(tree.join("kiln/job"), payload.job)?;
    fs::write(tree.join("kiln/host-link.env"), payload.host_link_env)?;
    let cpio = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
        tree.display(),
        archive.display()
    );
    sh::run(Command::new("sh").arg("-c").arg(cpio))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().expect("targets are inside the tree"))?;
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn write_executable(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Copies a program and, if it is dynamically linked, every library
/// `ldd` lists, at their own paths, so it runs in the initramfs as on the
/// host.
fn copy_with_libraries(program: &Path, to: &Path, tree: &Path) -> Result<()> {
    copy(program, to)?;
    for library in shared_libraries(program)? {
        copy(
            &library,
            &tree.join(
                library
                    .strip_prefix("/")
                    .expect("ldd prints absolute paths"),
            ),
        )?;
    }
    Ok(())
}

fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let listing = sh::output(Command::new("ldd").arg(program))?;
    if listing.trim() == "statically linked" {
        return Ok(Vec::new());
    }
    let libraries: Vec<PathBuf> = listing
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
        .map(PathBuf::from)
        .collect();
    if libraries.is_empty() {
        bail!(
            "ldd found no libraries for {}; is it a dynamic executable?",
            program.display()
        );
    }
    Ok(libraries)
}

fn copy_dir(from: &Path, to: &Path, extension: &str) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == extension) {
            copy(&path, &to.join(path.file_name().expect("a file")))?;
        }
    }
    Ok(())
}

/// Copies the directory `from` and everything below it.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            copy(&entry.path(), &target)?;
        }
    }
    Ok(())
}

/// tests/vm/*.sh (scenarios, runner, library) and tests/vm/guest/.
fn copy_scenarios(to: &Path) -> Result<()> {
    let source = sh::workspace_root().join("tests/vm");
    copy_dir(&source, to, "sh")?;
    if source.join("guest").is_dir() {
        copy_dir(&source.join("guest"), &to.join("guest"), "sh")?;
    }
    Ok(())
}
