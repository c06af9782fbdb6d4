//! One module per subcommand (or family of them, like the lifecycle verbs):
//! each parses its arguments, calls into `kiln_builder`, `kiln_control` or `kiln_vmm`, and
//! prints the result.
pub mod attach;
pub mod bench;
pub mod build;
pub mod commit;
pub mod doctor;
pub mod exec;
pub mod format;
pub mod function;
pub mod generate;
pub mod image;
pub mod images;
pub mod inspect;
pub mod lifecycle;
pub mod logs;
pub mod pod_probe;
pub mod ps;
pub mod rm;
pub mod run;
pub mod snapshot;
pub mod types;
pub mod vm;
pub mod vmm;
