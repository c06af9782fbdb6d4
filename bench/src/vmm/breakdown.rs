//! Where a restore's milliseconds go: the stage lines Kiln's processes
//! append to `KILN_TRACE` ([`kiln_vmm::trace`]: `STAGE PID NS`, on
//! `CLOCK_MONOTONIC`), put on one axis with the benchmark's own spawn and
//! heartbeat times, and cut into the stages of [`instance_path`] or
//! [`vm_path`].
use std::path::Path;

use crate::stats::{nearest_rank, sorted};
use crate::{BenchError, io_err};

use super::report::Stage;

/// Which process a trace line comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The `kiln` command the benchmark spawned.
    Command,
    /// The instance's VMM process (`kiln __vmm`, the supervisor).
    Vmm,
    /// The VM process (`kiln __vm`).
    Vm,
    /// The benchmark, seeing the first heartbeat.
    Bench,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Command => "kiln command",
            Role::Vmm => "VMM process",
            Role::Vm => "VM process",
            Role::Bench => "guest, console, bench",
        }
    }
}

/// The stage that ends when a process passes a trace point: the role,
/// the trace point (the benchmark's heartbeat for [`Role::Bench`]), and
/// what happened since the stage before.
pub type Milestone = (Role, &'static str, &'static str);

/// The benchmark's own stage name for the first heartbeat it saw.
const HEARTBEAT_STAGE: &str = "heartbeat";

/// The VM process's stages, from its start to its first KVM_RUN: what
/// every path through a restore shares.
const VM_STAGES: [Milestone; 7] = [
    (
        Role::Vm,
        "kvm-opened",
        "VM process start: the definition read, /dev/kvm opened",
    ),
    (
        Role::Vm,
        "snapshot-read",
        "the snapshot's state file read and checked",
    ),
    (
        Role::Vm,
        "memory-mapped",
        "guest memory mapped from the snapshot file, the KVM VM made, its clock set",
    ),
    (
        Role::Vm,
        "devices-made",
        "devices made and restored on their buses",
    ),
    (
        Role::Vm,
        "vcpus-set",
        "vCPUs made and their state set (the state ioctls)",
    ),
    (Role::Vm, "vcpus-started", "vCPU threads started"),
    (
        Role::Vm,
        "kvm-run",
        "a vCPU thread: its seccomp filter installed, to the first KVM_RUN",
    ),
];

/// The stub's first heartbeat after the restore, which the benchmark sees.
const HEARTBEAT: [Milestone; 1] = [(
    Role::Bench,
    HEARTBEAT_STAGE,
    "the first heartbeat seen (the stub waits up to one 1.6 ms period for it; then its console's way out)",
)];

/// `kiln snapshot restore`'s stages up to the VM process's start.
const INSTANCE_HEAD: [Milestone; 6] = [
    (
        Role::Command,
        "main",
        "exec of `kiln snapshot restore`, loading, argument parsing",
    ),
    (
        Role::Command,
        "vmm-spawn",
        "the command: the snapshot read, the instance recorded, its root volume copied",
    ),
    (
        Role::Vmm,
        "main",
        "the VMM process spawned: exec, loading, argument parsing",
    ),
    (
        Role::Vmm,
        "supervisor",
        "VMM process start: the instance's record and lock",
    ),
    (
        Role::Vmm,
        "vm-spawn",
        "the supervisor: console log, API socket, VM definition written",
    ),
    (
        Role::Vm,
        "main",
        "the VM process spawned: its jail entered (namespaces, root, cgroup, uid), exec, loading, argument parsing",
    ),
];

/// The VM process's own restore's stage up to its start.
const VM_HEAD: [Milestone; 1] = [(
    Role::Vm,
    "main",
    "exec of `kiln __vm`, loading, argument parsing",
)];

/// A function's clone invoke (`kiln fn invoke`, a `runtime-api`
/// function) up to its VM process's start.
const CLONE_HEAD: [Milestone; 4] = [
    (
        Role::Command,
        "main",
        "exec of `kiln fn invoke`, loading, argument parsing",
    ),
    (
        Role::Command,
        "clone",
        "the function and its template found",
    ),
    (
        Role::Command,
        "vm-spawn",
        "the clone's directory, root overlay copy and definition made, its jail prepared",
    ),
    (
        Role::Vm,
        "main",
        "the VM process spawned: its jail entered (namespaces, root, cgroup, uid), exec, loading, argument parsing",
    ),
];

/// A clone invoke's stages after the first KVM_RUN, which `kiln fn
/// invoke` marks.
const CLONE_TAIL: [Milestone; 3] = [
    (
        Role::Command,
        "guest-connected",
        "the restored guest running until guest-init answers on vsock",
    ),
    (
        Role::Command,
        "guest-restored",
        "the runtime released from restore/next: RNG reseeded, hostname set, its after-restore hooks run",
    ),
    (
        Role::Command,
        "answered",
        "the event through invocation/next, the handler, the response back",
    ),
];

/// `kiln snapshot restore`'s stages.
pub fn instance_path() -> Vec<Milestone> {
    [&INSTANCE_HEAD[..], &VM_STAGES, &HEARTBEAT].concat()
}

/// The VM process's own restore's stages.
pub fn vm_path() -> Vec<Milestone> {
    [&VM_HEAD[..], &VM_STAGES, &HEARTBEAT].concat()
}

/// A function's clone invoke's stages, to its answer.
pub fn clone_invoke_path() -> Vec<Milestone> {
    [&CLONE_HEAD[..], &VM_STAGES, &CLONE_TAIL].concat()
}

/// One restore's trace: each line's stage, role and time since the spawn.
#[derive(Clone, Debug, Default)]
pub struct Run {
    events: Vec<(Role, String, u64)>,
}

impl Run {
    /// Reads the trace file `file` of a run spawned at `spawned_ns` whose
    /// first heartbeat was seen at `beat_ns`, and removes it.
    pub fn read(file: &Path, spawned_ns: u64, beat_ns: u64) -> Result<Run, BenchError> {
        let text = std::fs::read_to_string(file).map_err(io_err(file))?;
        std::fs::remove_file(file).map_err(io_err(file))?;
        Ok(Run::parse(&text, spawned_ns, beat_ns))
    }

    /// Lines `STAGE PID NS`; a line that does not parse is left out.
    fn parse(text: &str, spawned_ns: u64, beat_ns: u64) -> Run {
        let lines: Vec<(&str, u32, u64)> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split(' ');
                Some((
                    words.next()?,
                    words.next()?.parse().ok()?,
                    words.next()?.parse().ok()?,
                ))
            })
            .collect();
        let pid_of = |stage: &str| lines.iter().find(|l| l.0 == stage).map(|l| l.1);
        let (vm, vmm) = (pid_of("vm"), pid_of("supervisor"));
        let role = |pid: u32| match Some(pid) {
            p if p == vm => Role::Vm,
            p if p == vmm => Role::Vmm,
            _ => Role::Command,
        };
        let mut events: Vec<(Role, String, u64)> = lines
            .iter()
            .map(|&(stage, pid, ns)| (role(pid), stage.to_string(), ns.saturating_sub(spawned_ns)))
            .collect();
        events.push((
            Role::Bench,
            HEARTBEAT_STAGE.into(),
            beat_ns.saturating_sub(spawned_ns),
        ));
        Run { events }
    }

    /// When (ns since the spawn) `role` first passed `stage`.
    fn at(&self, role: Role, stage: &str) -> Option<u64> {
        self.events
            .iter()
            .find(|(r, s, _)| *r == role && s == stage)
            .map(|e| e.2)
    }
}

/// The stages of `path` over `runs`: each one's length and end, p50 over
/// the runs that passed it (a stage a run lacks is counted in the next).
pub fn stages(path: &[Milestone], runs: &[Run]) -> Vec<Stage> {
    let mut lengths = vec![Vec::new(); path.len()];
    let mut ends = vec![Vec::new(); path.len()];
    for run in runs {
        let mut before = 0;
        for (i, &(role, stage, _)) in path.iter().enumerate() {
            if let Some(at) = run.at(role, stage) {
                lengths[i].push(ms(at.saturating_sub(before)));
                ends[i].push(ms(at));
                before = at;
            }
        }
    }
    let p50 = |v: &[f64]| nearest_rank(&sorted(v), 0.5);
    path.iter()
        .enumerate()
        .filter_map(|(i, &(role, _, what))| {
            Some(Stage {
                stage: what.to_string(),
                process: role.name().to_string(),
                ms_p50: p50(&lengths[i])?,
                at_ms_p50: p50(&ends[i])?,
            })
        })
        .collect()
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "main 10 1001000000\n\
                         main 20 1003000000\n\
                         supervisor 20 1003500000\n\
                         vm-spawn 20 1004000000\n\
                         main 30 1005000000\n\
                         vm 30 1005000100\n\
                         kvm-opened 30 1005500000\n\
                         snapshot-read 30 1005600000\n\
                         memory-mapped 30 1006000000\n\
                         devices-made 30 1006100000\n\
                         vcpus-set 30 1006200000\n\
                         vcpus-started 30 1006300000\n\
                         kvm-run 30 1006400000\n\
                         garbage\n";

    #[test]
    fn each_process_is_known_by_its_own_trace_point() {
        let run = Run::parse(TRACE, 1_000_000_000, 1_007_000_000);
        assert_eq!(run.at(Role::Command, "main"), Some(1_000_000));
        assert_eq!(run.at(Role::Vmm, "main"), Some(3_000_000));
        assert_eq!(run.at(Role::Vm, "main"), Some(5_000_000));
        assert_eq!(run.at(Role::Bench, "heartbeat"), Some(7_000_000));
    }

    #[test]
    fn the_stages_add_up_to_the_whole_restore() {
        let runs = [
            Run::parse(TRACE, 1_000_000_000, 1_007_000_000),
            Run::parse(TRACE, 1_000_000_000, 1_009_000_000),
        ];
        let instance = stages(&instance_path(), &runs);
        assert_eq!(instance.len(), 13);
        assert_eq!(instance[0].ms_p50, 1.0);
        assert_eq!(instance[1].process, "VMM process");
        assert_eq!(instance[1].ms_p50, 2.0);
        let last = instance.last().unwrap();
        assert_eq!((last.ms_p50, last.at_ms_p50), (0.6, 7.0));
        let total: f64 = instance.iter().map(|s| s.ms_p50).sum();
        assert!((total - 7.0).abs() < 1e-9, "{total}");
        // The VM process's path starts at its own start.
        let vm = stages(&vm_path(), &runs);
        assert_eq!(vm[0].ms_p50, 5.0);
    }

    #[test]
    fn a_clone_invoke_is_cut_at_its_jailed_vm_process_marks_too() {
        // The VM process's lines of TRACE, as a jailed one writes them:
        // PID 1, in its own namespace.
        let vm_process: String = (TRACE.lines().skip(4).take(9))
            .map(|line| line.replace(" 30 ", " 1 ") + "\n")
            .collect();
        let trace = format!(
            "main 40 1000500000\nclone 40 1001000000\nvm-spawn 40 1001500000\n{vm_process}\
             guest-connected 40 1010000000\nguest-restored 40 1012000000\n\
             answered 40 1020000000\n"
        );
        let run = Run::parse(&trace, 1_000_000_000, 1_020_100_000);
        let path = clone_invoke_path();
        let clone = stages(&path, &[run]);
        assert_eq!(clone.len(), path.len(), "every stage traced");
        assert_eq!(clone[3].process, "VM process");
        assert_eq!(clone[3].ms_p50, 3.5);
        let last = clone.last().unwrap();
        assert_eq!(
            (last.process.as_str(), last.at_ms_p50),
            ("kiln command", 20.0)
        );
    }
}
