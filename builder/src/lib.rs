//! Kiln's image builder: recipe -> root tree -> ext4 -> chunked zstd image -> store.
#![warn(missing_docs)]
pub mod assemble;
pub mod build;
pub mod confine;
pub mod elf;
pub mod ext4;
pub mod oci;
pub mod recipe;
pub mod sandbox;
pub mod stage;
pub mod store;
pub mod uids;

/// `err` and its causes joined by ": ", as the CLI prints them: what the
/// tests check a cause's text in, now that no message embeds its cause.
#[cfg(test)]
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        line = format!("{line}: {next}");
        cause = next.source();
    }
    line
}
