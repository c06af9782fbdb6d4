//! Snapshots of a running [`Machine`], and the checks before a restore.
//! Taking one parks the vCPUs, saves every device in slot order and
//! writes the snapshot's files (`crate::snapshot`): guest memory, the
//! root disk's writes if asked, then the state file, whose presence says
//! the rest is whole.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvm_ioctls::Kvm;

use crate::builder::VmmError;
use crate::config::{DiskSource, VmConfig};
use crate::devices::lock;
use crate::devices::persist::Persist;
use crate::event_loop::VmEnd;
use crate::machine::{Devices, Machine, NetDevice, RequestError};
use crate::rpc::{AfterSnapshot, SnapshotStats};
use crate::snapshot::{
    self, LoadedSnapshot, MEMORY_FILE, MachineState, NetState, ROOT_OVERLAY_FILE, STATE_FILE,
    SnapshotError,
};
use crate::vstate::memory;
use crate::vstate::vm;

/// The saved state of every device of a machine, in slot order.
struct DeviceStates {
    ioapic: crate::devices::ioapic::IoapicState,
    serial: crate::devices::serial::SerialSnapshot,
    disks: Vec<crate::devices::virtio::mmio::TransportState>,
    vsock: Option<crate::devices::virtio::mmio::TransportState>,
    net: Option<NetState>,
}

impl Devices {
    /// Every device's state. The destructuring names every field: a
    /// device added to [`Devices`] does not compile until it is saved.
    fn save(&self) -> DeviceStates {
        let Devices {
            ioapic,
            serial,
            transports,
            blocks: _,
            vsock,
            net,
        } = self;
        DeviceStates {
            ioapic: lock(ioapic).save(),
            serial: lock(serial).save(),
            disks: transports.iter().map(|t| lock(t).save()).collect(),
            vsock: vsock.as_ref().map(|t| lock(t).save()),
            net: net.as_ref().map(NetDevice::save),
        }
    }
}

impl Devices {
    /// The position of the first drive built empty (a pod's slot), which
    /// makes the machine one that is not snapshotted.
    pub(crate) fn first_slot(&self) -> Option<usize> {
        self.blocks.iter().position(|block| lock(block).is_slot())
    }
}

impl NetDevice {
    /// The NIC's state and its transport's. One lock at a time: the
    /// transport's save locks the device too (it asks for its queues).
    fn save(&self) -> NetState {
        let device = lock(&self.net).save();
        let transport = lock(&self.transport).save();
        NetState { device, transport }
    }
}

impl Machine {
    /// Pauses the VM (unless it is paused), writes a snapshot into `dir`,
    /// and goes on or ends as `then` says. A VM with a drive slot (a
    /// pod's) is refused: the disk attached to it is in no definition a
    /// restore could be given.
    pub(crate) fn snapshot(
        &mut self,
        dir: &Path,
        copy_root: bool,
        then: AfterSnapshot,
    ) -> Result<SnapshotStats, RequestError> {
        if let Some(index) = self.devices.first_slot() {
            return Err(RequestError::SnapshotOfSlot { index });
        }
        let begun = Instant::now();
        let was_paused = self.paused;
        self.set_paused(true)?;
        let paused_at = Instant::now();
        let written = self.write_snapshot(dir, copy_root);
        match then {
            AfterSnapshot::Continue if !was_paused => self.set_paused(false)?,
            AfterSnapshot::Continue => {}
            // The VM stays paused and ends: the snapshot is where it goes on.
            AfterSnapshot::Stop if written.is_ok() => self.end.signal(VmEnd::Stop),
            AfterSnapshot::Stop => self.set_paused(was_paused)?,
        }
        let mut stats = written?;
        stats.paused_us = paused_at.elapsed().as_micros() as u64;
        stats.total_us = begun.elapsed().as_micros() as u64;
        Ok(stats)
    }

    /// The snapshot's files, with the vCPUs parked: memory, the root
    /// disk's writes if asked, then the state file, whose presence says
    /// the rest is whole.
    fn write_snapshot(&self, dir: &Path, copy_root: bool) -> Result<SnapshotStats, SnapshotError> {
        let io_err = |path: PathBuf| move |source| SnapshotError::Io { path, source };
        let vcpus = self.vcpus.save()?;
        let vm = self.vm.save_state()?;
        let devices = self.devices.save();
        for block in &self.devices.blocks {
            lock(block).flush()?;
        }
        let memory_path = dir.join(MEMORY_FILE);
        let memory_file = File::create(&memory_path).map_err(io_err(memory_path.clone()))?;
        let memory = memory::save_sparse(&self.mem, &memory_file)?;
        let root_bytes = match (copy_root, self.devices.blocks.first()) {
            (true, Some(root)) => {
                let path = dir.join(ROOT_OVERLAY_FILE);
                lock(root)
                    .copy_writes_to(&path)
                    .map_err(io_err(path.clone()))?
            }
            _ => 0,
        };
        let state = MachineState {
            memory_mib: self.memory_mib,
            cmdline: self.cmdline.clone(),
            vm,
            vcpus,
            ioapic: devices.ioapic,
            serial: devices.serial,
            disks: devices.disks,
            vsock: devices.vsock,
            net: devices.net,
        };
        let state_path = dir.join(STATE_FILE);
        snapshot::write_state(&state_path, &state)?;
        let state_bytes = std::fs::metadata(&state_path)
            .map_err(io_err(state_path.clone()))?
            .len();
        Ok(SnapshotStats {
            memory_bytes: memory.total_bytes,
            memory_written: memory.written_bytes,
            state_bytes,
            root_bytes,
            ..SnapshotStats::default()
        })
    }
}

/// The snapshot in `dir`, checked whole, of the shape `config` describes,
/// and taken on a CPU like this host's.
pub(crate) fn load_snapshot(
    kvm: &Kvm,
    dir: &Path,
    config: &VmConfig,
) -> Result<LoadedSnapshot, VmmError> {
    if let Some(index) = config
        .disks
        .iter()
        .position(|d| d.source == DiskSource::Empty)
    {
        return Err(VmmError::SnapshotOntoSlot {
            dir: dir.to_path_buf(),
            index,
        });
    }
    let snapshot = snapshot::load(dir)?;
    let machine = &snapshot.machine;
    let shape = |what, saved: usize, given: usize| {
        (saved != given).then(|| VmmError::SnapshotShape {
            dir: dir.to_path_buf(),
            what,
            saved,
            given,
        })
    };
    let mismatch = shape("vCPUs", machine.vcpus.len(), config.vcpus.into())
        .or_else(|| {
            shape(
                "MiB of memory",
                machine.memory_mib as usize,
                config.memory_mib as usize,
            )
        })
        .or_else(|| shape("disks", machine.disks.len(), config.disks.len()))
        .or_else(|| {
            // A guest that had a vsock device needs one (on any CID: it
            // re-reads it); one that had none gets none (see virtio_vsock).
            let given = usize::from(config.vsock.is_some());
            shape("vsock devices", usize::from(machine.vsock.is_some()), given)
                .filter(|_| machine.vsock.is_some())
        })
        .or_else(|| {
            // The guest's driver holds the NIC it had: it needs one again.
            shape(
                "network devices",
                usize::from(machine.net.is_some()),
                usize::from(config.net.is_some()),
            )
        });
    if let Some(err) = mismatch {
        return Err(err);
    }

    let supported = vm::supported_cpuid(kvm)?;
    snapshot::check_cpu(&dir.join(STATE_FILE), &machine.vcpus[0].cpuid, &supported)?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};
    use std::time::Duration;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::ioapic::Ioapic;
    use crate::devices::serial::Serial;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::net::tap::Tap;
    use crate::devices::virtio::net::{NET_HDR_LEN, Net};

    /// Saving a NIC takes its device's lock and its transport's, which
    /// takes the device's again: held together, they deadlocked the VMM
    /// thread on the first snapshot of a VM with a NIC. Needs root, for
    /// the tap (tests run as root here and in CI).
    #[test]
    fn a_machine_with_a_nic_saves_without_deadlock() {
        let mem = memory::create(16).unwrap();
        let net = Arc::new(Mutex::new(
            Net::new(
                Tap::create("kt-persist-test", NET_HDR_LEN).expect("a tap: this test needs root"),
                [2, 0x6b, 10, 250, 0, 9],
            )
            .unwrap(),
        ));
        let transport = Arc::new(Mutex::new(MmioTransport::new(mem, net.clone()).unwrap()));
        let devices = Devices {
            ioapic: Arc::new(Mutex::new(Ioapic::unrouted())),
            serial: Arc::new(Mutex::new(Serial::new(
                EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
            ))),
            transports: Vec::new(),
            blocks: Vec::new(),
            vsock: None,
            net: Some(NetDevice { net, transport }),
        };
        let (saved_tx, saved_rx) = mpsc::channel();
        std::thread::spawn(move || saved_tx.send(devices.save().net.map(|n| n.device.mac)));
        let mac = saved_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("saving the devices deadlocked");
        assert_eq!(mac, Some([2, 0x6b, 10, 250, 0, 9]));
    }
}
