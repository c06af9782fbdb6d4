//! Emulated devices. A device never sees a KVM file descriptor: it is handed
//! guest memory and an interrupt `EventFd`, and is reached through a [`bus::Bus`].
pub mod bus;
