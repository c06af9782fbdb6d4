//! Architecture-specific setup. Kiln targets x86_64 only.
pub mod x86_64;
