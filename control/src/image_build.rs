//! The build VM (EC2 Image Builder's build instance): a recipe's
//! `in = "vm"` steps run as root inside a VM booted from the image being
//! built, and what they change stays in it.
//!
//! `kiln_builder::build` makes the assembled tree a raw ext4 and hands it
//! to [`BuildVmRunner`] once per step. The VM boots it as its writable
//! root disk (`root=/dev/vda rw`), with the recipe's directory as a
//! read-only second disk (/dev/vdb), the step's script as the entrypoint;
//! guest-init syncs and remounts the root read-only before the VM ends,
//! so the disk is whole when the next step, or the builder, reads it.
//! Like a test's VM ([`crate::image_test`]), it is a `kiln __vm` child
//! process with no NIC (a step has no network), of the recipe's
//! `[build_vm]` size.
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_builder::build::{BuildVm, StepEnd, VmStep};
use kiln_vmm::config::{DiskConfig, DiskSource};

use crate::image_test::TestRunner;

/// Runs build steps in VMs, booted as the tests' are.
#[derive(Clone, Debug)]
pub struct BuildVmRunner {
    /// The `kiln` binary, the guest kernel and the store whose scratch
    /// space holds each VM's definition: the tests' own.
    pub vms: TestRunner,
    /// Shows one line of a step's console output to the user, the
    /// step's label first.
    pub echo: fn(label: &str, line: &str),
}

impl BuildVm for BuildVmRunner {
    fn inputs(&self) -> Vec<PathBuf> {
        vec![self.vms.kernel.clone()]
    }

    fn run_step(
        &self,
        root: &Path,
        recipe_dir: &Path,
        step: &VmStep,
    ) -> Result<StepEnd, Box<dyn Error + Send + Sync>> {
        let scratch = self.vms.store.scratch_dir()?;
        let raw = |path: &Path, read_only| DiskConfig {
            source: DiskSource::Raw(path.to_path_buf()),
            read_only,
            // The builder reads the root back after the VM, and gives
            // every step the recipe's disk.
            ephemeral: false,
        };
        let disks = vec![raw(root, false), raw(recipe_dir, true)];
        let size = (step.size.vcpus, step.size.memory_mib);
        let config = self.vms.define(disks, &step.command, size)?;
        let echo = self.echo;
        let timeout = Duration::from_secs(step.timeout_secs);
        let end = self
            .vms
            .run_vm(scratch.path(), config, timeout, &mut |line| {
                let line = String::from_utf8_lossy(line);
                echo(&step.label, line.trim_end_matches(['\n', '\r']));
            })?;
        Ok(match end.status.and_then(|status| status.code()) {
            _ if end.timed_out => StepEnd::TimedOut(step.timeout_secs),
            Some(code) => StepEnd::Exited(code as u8),
            None => StepEnd::NoStatus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_builder::store::Store;
    use std::sync::Mutex;

    /// What the fake VM printed, as the runner echoed it.
    static ECHOED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// A runner whose "kiln" is a script standing in for `kiln __vm`: it
    /// checks that the definition boots the raw disk writable with the
    /// step's command as the entrypoint, at the step's size, writes into
    /// the disk as the guest would, then ends as the command's last word
    /// says.
    fn fake_runner(dir: &Path) -> BuildVmRunner {
        let kiln = dir.join("kiln");
        crate::test_support::write_script(
            &kiln,
            "#!/bin/sh\n\
             [ \"$1 $2 $4 $5\" = \"__vm --config --supervisor $PPID\" ] || exit 97\n\
             grep -q '\"raw\": \"[^\"]*/root.ext4\"' \"$3\" || exit 98\n\
             grep -q '\"read_only\": false' \"$3\" || exit 98\n\
             grep -q '\"raw\": \"[^\"]*/recipe.ext4\"' \"$3\" || exit 98\n\
             grep -q '\"read_only\": true' \"$3\" || exit 98\n\
             grep -q 'kiln.entrypoint=\\\\\"/bin/sh /steps/' \"$3\" || exit 98\n\
             grep -q '\"vcpus\": 2,' \"$3\" || exit 98\n\
             grep -q '\"memory_mib\": 512,' \"$3\" || exit 98\n\
             printf 'written by the step\\n' >> \"${3%/*}/../../root.ext4\"\n\
             printf 'booted\\r\\nstep says hi\\r\\n'\n\
             grep -q '/steps/hang' \"$3\" && exec sleep 30\n\
             grep -q '/steps/fail' \"$3\" && exit 3\n\
             exit 0\n",
        );
        BuildVmRunner {
            vms: TestRunner {
                kiln,
                kernel: dir.join("vmlinux"),
                store: Store::new(&dir.join("home")),
                // A script cannot run in a jail, which holds only `kiln`.
                jail: None,
            },
            echo: |label, line| ECHOED.lock().unwrap().push(format!("{label}: {line}")),
        }
    }

    fn step(script: &str, timeout_secs: u64) -> VmStep {
        VmStep {
            label: format!("step 1 ({script})"),
            command: format!("/bin/sh /steps/{script}"),
            timeout_secs,
            // The recipe's [build_vm], which the fake checks it gets.
            size: kiln_builder::recipe::BuildVmSize {
                vcpus: 2,
                memory_mib: 512,
            },
        }
    }

    /// A step's VM boots the root disk writable and has the recipe's
    /// read-only, its output is echoed with the
    /// step's label, its status is the step's, and one that hangs is
    /// killed at its timeout; no scratch file outlives a step.
    #[test]
    fn steps_run_in_vm_processes_on_a_writable_disk() {
        let dir = tempfile::tempdir().unwrap();
        let runner = fake_runner(dir.path());
        assert_eq!(runner.inputs(), [dir.path().join("vmlinux")]);
        std::fs::create_dir_all(dir.path().join("home/tmp")).unwrap();
        let root = dir.path().join("home/root.ext4");
        std::fs::write(&root, "").unwrap();

        let recipe = dir.path().join("home/recipe.ext4");
        let ok = runner.run_step(&root, &recipe, &step("ok", 30)).unwrap();
        assert_eq!(ok, StepEnd::Exited(0));
        assert_eq!(
            std::fs::read_to_string(&root).unwrap(),
            "written by the step\n"
        );
        let echoed = ECHOED.lock().unwrap().clone();
        assert!(
            echoed.contains(&"step 1 (ok): step says hi".to_string()),
            "{echoed:?}"
        );

        let failed = runner.run_step(&root, &recipe, &step("fail", 30)).unwrap();
        assert_eq!(failed, StepEnd::Exited(3));
        let started = std::time::Instant::now();
        let hung = runner.run_step(&root, &recipe, &step("hang", 1)).unwrap();
        assert_eq!(hung, StepEnd::TimedOut(1));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed in time"
        );
        let tmp = dir.path().join("home/tmp");
        assert!(
            std::fs::read_dir(tmp).unwrap().next().is_none(),
            "scratch left"
        );
    }
}
