//! One module per subcommand: each parses its arguments, calls one function
//! of `kiln_builder` or `kiln_vmm`, and prints the result.
pub mod build;
pub mod doctor;
pub mod image;
pub mod images;
pub mod inspect;
pub mod rm;
pub mod run;
