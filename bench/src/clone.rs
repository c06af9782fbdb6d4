//! The clone scenario: `kiln fn invoke` of a function made from the
//! image, to the first byte of the handler's response. [`create`] makes
//! that function, whose template snapshot the restore scenario restores.
use std::path::PathBuf;

use crate::kiln::Kiln;
use crate::report::{Series, Vmm};
use crate::timing::{Event, Stream, Then, millis, time_to};
use crate::{BenchError, Config, Progress, Scenario, timed_series};

/// The function's name in the benchmark's own Kiln home.
pub const FUNCTION: &str = "bench";

/// The clone scenario's timer.
pub const TIMER: (&str, &str) = (
    "exec of `kiln fn invoke FUNCTION`",
    "the first byte of the handler's response on its stdout (printed before the clone is torn down)",
);

/// The function made for the benchmark.
pub struct Function {
    /// Its template snapshot.
    pub template: PathBuf,
}

/// `kiln fn create --mode command` (untimed): the image booted in
/// function mode with `handler` run afresh per invocation (any image's
/// program, no Lambda runtime needed), snapshotted once guest-init answers.
pub fn create(
    config: &Config,
    kiln: &Kiln,
    handler: &str,
    progress: &dyn Progress,
) -> Result<Function, BenchError> {
    progress.step(&format!("kiln fn create (the {} template)", config.image));
    let memory = config.memory_mib.to_string();
    kiln.output(&[
        "fn",
        "create",
        FUNCTION,
        "--image",
        &config.image,
        "--mode",
        "command",
        "--handler",
        handler,
        "--memory",
        &memory,
        "--timeout",
        &config.limit.as_secs().max(1).to_string(),
    ])?;
    Ok(Function {
        template: kiln
            .home()
            .join("functions")
            .join(FUNCTION)
            .join("template"),
    })
}

/// `kiln fn invoke` to the first response byte; the command must succeed.
pub fn kiln(
    config: &Config,
    kiln: &Kiln,
    _function: &Function,
    progress: &dyn Progress,
) -> Result<Series, BenchError> {
    let run = |i: usize| {
        let mut cmd = kiln.command();
        cmd.args(["fn", "invoke", FUNCTION, "--payload"])
            .arg(format!("{{\"bench\": {i}}}"));
        let timed = time_to(
            cmd,
            "kiln fn invoke",
            Stream::Stdout,
            Event::FirstByte,
            Then::Succeed,
            config.limit,
        )?;
        Ok(millis(timed.elapsed))
    };
    timed_series(config, Scenario::Clone, Vmm::Kiln, TIMER, progress, &run)
}
