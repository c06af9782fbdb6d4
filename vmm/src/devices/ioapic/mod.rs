//! The I/O APIC (Intel 82093AA datasheet): the chip every device
//! interrupt line goes through, emulated in the VMM while the local APICs
//! stay in KVM (KVM's split irqchip, `KVM_CAP_SPLIT_IRQCHIP`, as Cloud
//! Hypervisor and QEMU's `kernel-irqchip=split` have it).
//!
//! Why not KVM's own chips (KVM_CREATE_IRQCHIP: two 8259 PICs and an
//! IOAPIC): making them starts an SRCU grace period that ends about 16 ms
//! later on this project's hosts, and closing the VM waits for it. A VM
//! that lives less than that (the stub guest's cold run, a clone torn down
//! as soon as it answers) spent most of its exit waiting: 13 to 14 ms to
//! close a VM 1 ms old, against 0.5 to 1 ms with the split irqchip
//! (docs/benchmark-log.md).
//!
//! Interrupts still never pass through the VMM. Every device line is an
//! irqfd on the GSI of its pin, and each unmasked pin's redirection entry
//! becomes that GSI's MSI route in KVM (KVM_SET_GSI_ROUTING): the message
//! an 82093AA sends the local APICs for the entry, which KVM delivers as
//! its own IOAPIC would. The VMM only sees the guest program the chip:
//! MMIO exits at boot, and when the guest masks or moves a pin.
//!
//! Every line is an edge: a write to its eventfd is one pulse (the UART's,
//! a virtio transport's). A pin is delivered as an edge whatever trigger
//! mode the guest gives it, and its Remote IRR reads 0; Linux programs
//! these pins edge-triggered, as the MP table's "conforms to the bus" (ISA)
//! says. A masked pin has no route, so an edge while it is masked is lost,
//! as on the 82093AA (Linux resends one it held back itself). There is no
//! 8259: Linux's probe reads back all ones from its ports and uses the
//! IOAPIC alone.
mod persist;

pub use persist::{IoapicError, IoapicState};

use std::io;

use crate::devices::bus::BusDevice;

/// The chip's MMIO window: IOREGSEL at 0x00 and IOWIN at 0x10 (82093AA
/// §3.1); Linux maps a page.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// The 82093AA's 24 pins (and KVM's in-kernel IOAPIC's).
pub const IOAPIC_PINS: usize = 24;
/// The 82093AA's version (IOAPICVER bits 7:0, §3.2.2), which the MP
/// table gives too.
pub const IOAPIC_VERSION: u8 = 0x11;

/// IOREGSEL: which register IOWIN reads and writes (§3.1.1).
const IOREGSEL: u64 = 0x00;
/// IOWIN: the selected register's 32 bits (§3.1.2).
const IOWIN: u64 = 0x10;

/// IOAPICID (§3.2.1): the chip's APIC ID, in bits 27:24.
const IOAPICID: u8 = 0x00;
/// IOAPICVER (§3.2.2): read-only.
const IOAPICVER: u8 = 0x01;
/// IOAPICARB (§3.2.3): the arbitration ID, read-only, the APIC ID's bits.
const IOAPICARB: u8 = 0x02;
/// IOREDTBL0 (§3.2.4): each pin's 64-bit entry is two registers from
/// here, the low half first.
const IOREDTBL: u8 = 0x10;

/// IOAPICID's and IOAPICARB's ID bits.
const ID_BITS: u32 = 0x0f << 24;
/// IOAPICVER: the version in bits 7:0, the last entry's index in 23:16.
const VERSION: u32 = IOAPIC_VERSION as u32 | ((IOAPIC_PINS as u32 - 1) << 16);

/// A redirection entry's fields (§3.2.4): vector in bits 7:0, delivery
/// mode in 10:8, destination mode in 11, mask in 16, destination in 63:56.
const ENTRY_VECTOR: u64 = 0xff;
const ENTRY_DELIVERY_MODE: u64 = 0x7 << 8;
const ENTRY_DEST_LOGICAL: u64 = 1 << 11;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DEST_SHIFT: u32 = 56;
/// What the guest may write of an entry: all but Delivery Status (12) and
/// Remote IRR (14), read-only, and the reserved bits 55:17.
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An MSI's address (Intel SDM Vol. 3A §11.11.1): 0xFEE in bits 31:20,
/// the destination APIC ID in 19:12, logical destination mode in bit 2.
const MSI_ADDRESS: u32 = 0xfee0_0000;
const MSI_DEST_SHIFT: u32 = 12;
const MSI_DEST_LOGICAL: u32 = 1 << 2;

/// One pin's route: a message for KVM to deliver when the pin's GSI is
/// raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiRoute {
    /// The pin, which is its line's GSI.
    pub gsi: u32,
    /// The message's address (SDM §11.11.1).
    pub address: u32,
    /// The message's data (SDM §11.11.2): vector and delivery mode,
    /// edge-triggered.
    pub data: u32,
}

/// Where the chip's routes go: KVM's GSI routing table
/// (`crate::vstate::vm::GsiRouting`), or a test's record.
pub trait MsiRouter: Send {
    /// Replaces every route with `routes`.
    fn set_routes(&self, routes: &[MsiRoute]) -> io::Result<()>;
}

/// The chip: its ID, the register IOWIN reaches, and the redirection
/// table, whose unmasked entries KVM holds as routes.
pub struct Ioapic {
    id: u32,
    selected: u8,
    entries: [u64; IOAPIC_PINS],
    router: Box<dyn MsiRouter>,
    /// The routes KVM was last given.
    routes: Vec<MsiRoute>,
}

impl Ioapic {
    /// The chip after reset, with APIC ID `id` (the MP table's): every
    /// pin masked, so no route.
    pub fn new(id: u8, router: Box<dyn MsiRouter>) -> Self {
        Self {
            id: u32::from(id) << 24 & ID_BITS,
            selected: 0,
            entries: [ENTRY_MASKED; IOAPIC_PINS],
            router,
            routes: Vec::new(),
        }
    }

    /// The selected register's value.
    fn read_selected(&self) -> u32 {
        match self.selected {
            IOAPICID | IOAPICARB => self.id,
            IOAPICVER => VERSION,
            register => match Self::entry_half(register) {
                Some((pin, high)) => (self.entries[pin] >> if high { 32 } else { 0 }) as u32,
                // Reserved registers read as zero.
                None => 0,
            },
        }
    }

    /// Writes `value` to the selected register; read-only bits keep theirs.
    fn write_selected(&mut self, value: u32) {
        match self.selected {
            IOAPICID => self.id = value & ID_BITS,
            register => {
                let Some((pin, high)) = Self::entry_half(register) else {
                    return;
                };
                let shift = if high { 32 } else { 0 };
                let half = 0xffff_ffff_u64 << shift;
                let written = (self.entries[pin] & !half) | (u64::from(value) << shift);
                self.entries[pin] =
                    (written & ENTRY_WRITABLE) | (self.entries[pin] & !ENTRY_WRITABLE);
                self.update_routes();
            }
        }
    }

    /// The pin whose entry `register` is half of, and whether it is the
    /// high half.
    fn entry_half(register: u8) -> Option<(usize, bool)> {
        let index = usize::from(register.checked_sub(IOREDTBL)?);
        (index < 2 * IOAPIC_PINS).then_some((index / 2, index % 2 == 1))
    }

    /// [`Self::sync_routes`] after a guest's write. A route KVM refuses
    /// leaves the pin without interrupts, which the guest cannot be told
    /// of: it is logged.
    fn update_routes(&mut self) {
        if let Err(err) = self.sync_routes() {
            log::error!("cannot route the IOAPIC's pins in KVM: {err}");
        }
    }

    /// Gives KVM the routes of the unmasked pins, if they are not the ones
    /// it was last given: a guest rewriting an entry as it was (Linux
    /// writes the high half, then the low) costs no ioctl, nor does a
    /// restored chip with every pin masked (a VM's table starts empty).
    fn sync_routes(&mut self) -> io::Result<()> {
        let routes = self.current_routes();
        if routes != self.routes {
            self.router.set_routes(&routes)?;
            self.routes = routes;
        }
        Ok(())
    }

    /// Each unmasked pin's MSI.
    fn current_routes(&self) -> Vec<MsiRoute> {
        (0..)
            .zip(self.entries)
            .filter(|(_, entry)| entry & ENTRY_MASKED == 0)
            .map(|(gsi, entry)| MsiRoute {
                gsi,
                address: msi_address(entry),
                data: (entry & (ENTRY_VECTOR | ENTRY_DELIVERY_MODE)) as u32,
            })
            .collect()
    }
}

/// The address of the MSI that redirection entry `entry` sends.
fn msi_address(entry: u64) -> u32 {
    let destination = (entry >> ENTRY_DEST_SHIFT) as u32;
    let logical = if entry & ENTRY_DEST_LOGICAL != 0 {
        MSI_DEST_LOGICAL
    } else {
        0
    };
    MSI_ADDRESS | destination << MSI_DEST_SHIFT | logical
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => u32::from(self.selected),
            IOWIN => self.read_selected(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(bytes.len());
        data.fill(0);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    /// IOREGSEL takes its low byte from a write of any width; IOWIN only
    /// 32-bit writes, as the datasheet allows (§3.1).
    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (IOREGSEL, [register, ..]) => self.selected = *register,
            (IOWIN, &[a, b, c, d]) => self.write_selected(u32::from_le_bytes([a, b, c, d])),
            _ => {}
        }
    }
}

/// Keeps every routing table it is given, for tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<Vec<MsiRoute>>>>);

#[cfg(test)]
impl Recorder {
    /// Every table given so far, oldest first.
    pub(crate) fn tables(&self) -> Vec<Vec<MsiRoute>> {
        self.0.lock().unwrap().clone()
    }
}

#[cfg(test)]
impl MsiRouter for Recorder {
    fn set_routes(&self, routes: &[MsiRoute]) -> io::Result<()> {
        self.0.lock().unwrap().push(routes.to_vec());
        Ok(())
    }
}

#[cfg(test)]
impl Ioapic {
    /// A chip whose routes are only recorded, for tests of the machine
    /// around it.
    pub(crate) fn unrouted() -> Self {
        Self::new(0, Box::new(Recorder::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chip() -> (Ioapic, Recorder) {
        let recorder = Recorder::default();
        (Ioapic::new(2, Box::new(recorder.clone())), recorder)
    }

    fn write_register(chip: &mut Ioapic, register: u8, value: u32) {
        chip.write(IOREGSEL, &[register]);
        chip.write(IOWIN, &value.to_le_bytes());
    }

    fn read_register(chip: &mut Ioapic, register: u8) -> u32 {
        chip.write(IOREGSEL, &u32::from(register).to_le_bytes());
        let mut data = [0; 4];
        chip.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identifies_itself_as_an_82093aa_with_24_pins() {
        let (mut chip, _) = chip();
        assert_eq!(read_register(&mut chip, IOAPICVER), 0x0017_0011);
        assert_eq!(read_register(&mut chip, IOAPICID), 2 << 24);
        write_register(&mut chip, IOAPICID, 0xffff_ffff);
        assert_eq!(read_register(&mut chip, IOAPICID), 0x0f00_0000);
        assert_eq!(read_register(&mut chip, IOAPICARB), 0x0f00_0000);
        // Past the last entry: reserved, zero, and not writable.
        write_register(&mut chip, IOREDTBL + 48, 0x1234);
        assert_eq!(read_register(&mut chip, IOREDTBL + 48), 0);
    }

    #[test]
    fn every_pin_starts_masked_without_a_route() {
        let (mut chip, recorder) = chip();
        for pin in 0..IOAPIC_PINS as u8 {
            assert_eq!(read_register(&mut chip, IOREDTBL + 2 * pin), 1 << 16);
        }
        assert!(recorder.tables().is_empty());
    }

    #[test]
    fn an_unmasked_entry_becomes_its_pins_msi() {
        let (mut chip, recorder) = chip();
        // Pin 4 (COM1): destination APIC 1, then vector 0x31, fixed,
        // physical, unmasked: Linux's order, high half first.
        write_register(&mut chip, IOREDTBL + 9, 1 << 24);
        write_register(&mut chip, IOREDTBL + 8, 0x31);
        // Pin 5: logical destination 0x3, lowest priority, vector 0x40.
        write_register(&mut chip, IOREDTBL + 11, 0x03 << 24);
        write_register(&mut chip, IOREDTBL + 10, 0x40 | 1 << 8 | 1 << 11);
        let tables = recorder.tables();
        assert_eq!(
            tables.last().unwrap(),
            &[
                MsiRoute {
                    gsi: 4,
                    address: 0xfee0_1000,
                    data: 0x31
                },
                MsiRoute {
                    gsi: 5,
                    address: 0xfee0_3004,
                    data: 0x140
                },
            ]
        );
        // The high halves, written while the pins were masked, cost no
        // table; each unmasking did.
        assert_eq!(tables.len(), 2);
    }

    #[test]
    fn masking_a_pin_takes_its_route_away_and_rewrites_cost_nothing() {
        let (mut chip, recorder) = chip();
        write_register(&mut chip, IOREDTBL + 8, 0x31);
        write_register(&mut chip, IOREDTBL + 8, 0x31);
        write_register(&mut chip, IOREDTBL + 8, 0x31 | 1 << 16);
        let tables = recorder.tables();
        assert_eq!(tables.len(), 2);
        assert_eq!(tables[1], []);
    }

    #[test]
    fn delivery_status_and_remote_irr_stay_zero_and_level_is_delivered_as_an_edge() {
        let (mut chip, recorder) = chip();
        // Level-triggered, active low, with the read-only bits set.
        write_register(
            &mut chip,
            IOREDTBL,
            0x31 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15,
        );
        assert_eq!(read_register(&mut chip, IOREDTBL), 0x31 | 1 << 13 | 1 << 15);
        assert_eq!(recorder.tables()[0][0].data, 0x31);
    }

    #[test]
    fn narrow_or_stray_accesses_change_nothing() {
        let (mut chip, recorder) = chip();
        chip.write(IOREGSEL, &[IOREDTBL + 8]);
        chip.write(IOWIN, &[0x31, 0]);
        chip.write(0x20, &0x31u32.to_le_bytes());
        let mut data = [0xaa; 4];
        chip.read(0x20, &mut data);
        assert_eq!(data, [0; 4]);
        let mut byte = [0; 1];
        chip.read(IOREGSEL, &mut byte);
        assert_eq!(byte, [IOREDTBL + 8]);
        assert_eq!(read_register(&mut chip, IOREDTBL + 8), 1 << 16);
        assert!(recorder.tables().is_empty());
    }
}
