//! guest-init: PID 1 of every Kiln image (being written; see issue 2).
fn main() {}
