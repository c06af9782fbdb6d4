//! `cargo xtask …`: Kiln's developer tasks (being written; see issue 2).
fn main() {}
