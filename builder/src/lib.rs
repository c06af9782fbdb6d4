//! Kiln's image builder: recipe -> root tree -> ext4 -> chunked zstd image -> store.
pub mod assemble;
pub mod build;
pub mod elf;
pub mod ext4;
pub mod oci;
pub mod recipe;
pub mod stage;
pub mod store;
