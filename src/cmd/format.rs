//! `--format`: a table for people, or one JSON document for scripts, as
//! `docker … --format json` and the AWS CLI's `--output json` give.
use std::io::Write;

use serde::Serialize;

/// How a listing command prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with a header line.
    #[default]
    Table,
    /// One JSON document (pretty-printed) on stdout.
    Json,
}

/// The `--format` flag, flattened into a command's arguments.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct Output {
    /// `table` for people, `json` for scripts: one JSON document.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl Output {
    /// With `--format json`, prints `value` as one JSON document and
    /// returns true; the caller prints its table when it returns false.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> anyhow::Result<bool> {
        if self.format != Format::Json {
            return Ok(false);
        }
        // Written, not println!'d: a closed pipe (`| head`) is an error
        // to report, not a panic.
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, value)?;
        writeln!(out)?;
        Ok(true)
    }
}
