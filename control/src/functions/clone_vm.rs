//! A function's clone on the lean path: one VM process (`kiln __vm`)
//! restoring the template, started by the process that serves the
//! function, with nothing of a detached instance's machinery, which a
//! clone never uses: no registry record, no supervisor process, no
//! console log, no API socket, no `kiln snapshot restore` command.
//!
//! What a clone still has is what the VM needs: its own copy of the
//! template's root volume writes (a throwaway file, not synced: the clone
//! never outlives its VM, and the VM process unlinks it once open), its
//! own vsock socket and CID, every seccomp filter of the VM process, and
//! its jail, as an instance's VM process has ([`crate::jail`]: a uid of
//! its own, its own namespaces and root, a cgroup) unless the jail is
//! switched off.
//! Its guest is made a machine of its own (randomness, hostname) by the
//! caller's `restore` session request before its runtime goes on.
//!
//! A clone's end is a SIGKILL: nothing of it is kept, so nothing needs
//! flushing. The VM process's exit (KVM tearing the VM down, 5 to 20 ms
//! off the CPU) is waited for by a thread of its own, off the path of the
//! answer and of the next restore.
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;

use kiln_builder::store::Store;
use kiln_vmm::config::{Boot, CacheAccess, DiskConfig, DiskSource, VmConfig, VsockConfig};
use kiln_vmm::durable::{self, ScratchDir};
use kiln_vmm::snapshot::working_set::WORKING_SET_FILE;
use kiln_vmm::snapshot::{MEMORY_FILE, ROOT_OVERLAY_FILE};

use super::{FunctionError, io_err, random_seed, working_set};
use crate::definition::{DEFAULT_CACHE_MIB, instance_cid};
use crate::image_test::vm_process;
use crate::instance::snapshots;
use crate::jail::{self, Jail, JailSettings};

/// Where clones' directories are made, under `$KILN_HOME`.
const CLONES_DIR: &str = "clones";
/// A clone's VM definition, in its directory.
const DEFINITION_FILE: &str = "vm.json";
/// A clone's vsock socket, in its directory.
const VSOCK_SOCKET: &str = "vsock.sock";
/// Hex digits of a clone's id after `i-`, as an instance id has: the
/// clone's hostname, which the end-to-end tests expect in that shape.
const ID_HEX_DIGITS: usize = 16;

/// One VM process to start, whether it is jailed, and where its [`Child`]
/// (or the failure) goes.
type SpawnRequest = (Command, bool, mpsc::Sender<io::Result<Child>>);

/// What every clone of one function's template shares, read once: the
/// definition of its VM process and the files it starts from.
pub struct Template {
    /// The template snapshot's directory.
    dir: PathBuf,
    /// The clones' VM definition, but for each one's overlay and vsock.
    vm: VmConfig,
    /// `$KILN_HOME/clones`, where each clone's directory is made.
    clones: PathBuf,
    /// The `kiln` binary, whose `__vm` subcommand is a VM process.
    kiln: PathBuf,
    /// How each clone's VM process is jailed; none when unjailed.
    jail: Option<JailSettings>,
    /// The thread that starts the clones' VM processes.
    spawner: mpsc::Sender<SpawnRequest>,
    /// Whether the template has its memory working set recorded, or this
    /// process has tried to record it.
    working_set_known: AtomicBool,
}

/// A running clone: its VM process and its directory (its definition,
/// vsock socket and, until the VM process has opened it, its overlay).
/// Dropping it kills the VM process.
pub struct CloneVm {
    /// `i-` and hex digits: the clone's name in messages, and its hostname.
    id: String,
    dir: ScratchDir,
    /// Taken by the drop, which hands it to its reaper.
    child: Option<Child>,
    /// Its VM process's jail, which its reaper removes.
    jail: Option<Arc<Jail>>,
    /// Keeps the spawner thread, which the VM process ends with, alive.
    _spawner: mpsc::Sender<SpawnRequest>,
}

impl Template {
    /// The template snapshot in `dir` of a function of `home`
    /// (`$KILN_HOME`), whose clones run the `kiln` binary at `kiln`: its
    /// launch spec and image are looked up, and its state checked whole.
    pub fn open(home: &Path, dir: &Path, kiln: &Path) -> Result<Self, FunctionError> {
        let (spec, _) = snapshots::read(dir, None)?;
        let store = Store::new(home);
        let image = store.find(&spec.image)?.image_path;
        let root = (image, Some(store.cache_dir()));
        let vm = definition(dir, root, (spec.vcpus, spec.memory_mib));
        Ok(Template {
            dir: dir.to_path_buf(),
            vm,
            clones: home.join(CLONES_DIR),
            kiln: kiln.to_path_buf(),
            jail: JailSettings::for_vm_processes()?,
            spawner: spawner(),
            working_set_known: AtomicBool::new(dir.join(WORKING_SET_FILE).exists()),
        })
    }

    /// Records, once per template, the pages of its memory that `clone`
    /// has touched since its restore (call it once the clone has served
    /// an event): the working set every later clone's VM process maps
    /// ahead (`kiln_vmm::snapshot::working_set`). A record that cannot be
    /// made is a warning: clones are as fast as they were without one.
    pub fn learn_working_set(&self, clone: &CloneVm) {
        let (Some(pid), false) = (
            clone.pid(),
            self.working_set_known.swap(true, Ordering::Relaxed),
        ) else {
            return;
        };
        let path = self.dir.join(WORKING_SET_FILE);
        let recorded = working_set::of_process(pid, &self.dir.join(MEMORY_FILE))
            .map_err(|err| format!("cannot read clone {}'s memory map: {err}", clone.id))
            .and_then(|set| {
                set.write(&path)
                    .map_err(|err| kiln_vmm::report::one_line(&err))
            });
        if let Err(why) = recorded {
            log::warn!("{why}; clones restore without mapping their working set ahead");
        }
    }

    /// A new clone: its directory, its copy of the template's root volume
    /// writes and its definition, then its VM process, started. The VM is
    /// restoring when this returns; its vsock socket answers once it runs.
    pub fn restore(&self) -> Result<CloneVm, FunctionError> {
        kiln_vmm::trace::mark("clone");
        let id = clone_id().map_err(io_err(Path::new("/dev/urandom")))?;
        fs::create_dir_all(&self.clones).map_err(io_err(&self.clones))?;
        // What clones of a killed `kiln fn serve` left goes here.
        let dir = durable::scratch_dir(&self.clones, &id)?;
        let overlay = dir.path().join(ROOT_OVERLAY_FILE);
        copy_overlay(&self.dir.join(ROOT_OVERLAY_FILE), &overlay)?;
        let definition = dir.path().join(DEFINITION_FILE);
        let mut vm = self.definition_of(&id, dir.path(), overlay);
        let jail = self.jail(&id, dir.path(), &mut vm)?;
        vm.save(&definition)?;
        if let Some(jail) = &jail {
            jail.hand_over(&definition)
                .map_err(|source| FunctionError::Jail {
                    id: id.clone(),
                    source,
                })?;
        }
        kiln_vmm::trace::mark("vm-spawn");
        let child =
            self.spawn(&definition, jail.as_ref())
                .map_err(|source| FunctionError::Spawn {
                    id: id.clone(),
                    source,
                })?;
        Ok(CloneVm {
            id,
            dir,
            child: Some(child),
            jail,
            _spawner: self.spawner.clone(),
        })
    }

    /// The jail of clone `id`, whose files are in `dir`, for `vm` (which
    /// it adapts: [`Jail::prepare`]); none when clones are unjailed.
    fn jail(
        &self,
        id: &str,
        dir: &Path,
        vm: &mut VmConfig,
    ) -> Result<Option<Arc<Jail>>, FunctionError> {
        let Some(settings) = &self.jail else {
            return Ok(None);
        };
        let jail = Jail::create(settings, id, dir, vm).map_err(|source| FunctionError::Jail {
            id: id.to_string(),
            source,
        })?;
        Ok(Some(Arc::new(jail)))
    }

    /// The definition of clone `id`, whose files are in `dir`.
    fn definition_of(&self, id: &str, dir: &Path, own_overlay: PathBuf) -> VmConfig {
        let mut vm = self.vm.clone();
        if let Some(DiskSource::Volume { overlay, .. }) =
            vm.disks.first_mut().map(|d| &mut d.source)
        {
            *overlay = Some(own_overlay);
        }
        vm.vsock = Some(VsockConfig {
            cid: instance_cid(id),
            socket: dir.join(VSOCK_SOCKET),
        });
        vm
    }

    /// Starts `kiln __vm --config DEFINITION` from the spawner thread,
    /// with this process as its supervisor: its guest's console goes
    /// nowhere (a runtime's log comes back with each event), its own
    /// complaints go to this process's stderr. It enters `jail` if given.
    fn spawn(&self, definition: &Path, jail: Option<&Arc<Jail>>) -> io::Result<Child> {
        let mut command = vm_process(&self.kiln, definition);
        command.stdout(Stdio::null()).stderr(Stdio::inherit());
        if let Some(jail) = jail {
            jail.confine(&mut command);
        }
        let (reply, answer) = mpsc::channel();
        let gone = || io::Error::other("the clones' spawner thread has ended");
        let request = (command, jail.is_some(), reply);
        self.spawner.send(request).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

/// The thread that starts clones' VM processes, as long as a [`Template`]
/// or [`CloneVm`] holds its sender. A VM process ends with the thread that
/// started it (`PR_SET_PDEATHSIG`, `kiln_vmm::supervised`), and clones are
/// restored from threads that end sooner than the clones (`kiln fn
/// serve`'s connection threads), so none of those may start one.
fn spawner() -> mpsc::Sender<SpawnRequest> {
    let (requests, incoming) = mpsc::channel::<SpawnRequest>();
    thread::spawn(move || {
        for (mut command, jailed, reply) in incoming {
            let child = jail::spawn(&mut command, jailed);
            // The command holds the jail (its pre_exec): let it go before
            // the clone may end, so that its reaper removes the jail.
            drop(command);
            // A caller that has gone no longer wants the child: dropping
            // it leaves the VM process to end with this thread.
            let _ = reply.send(child);
        }
    });
    requests
}

/// The clones' VM definition, but for each one's overlay and vsock:
/// the snapshot in `dir`, restored with its root volume (the image and
/// the hydration caches' directory of `root`), `size` (vCPUs, MiB) as
/// the template had, no NIC (function templates have none:
/// `Functions::create`), every seccomp filter.
fn definition(
    dir: &Path,
    (image, hydration): (PathBuf, Option<PathBuf>),
    size: (u8, u32),
) -> VmConfig {
    VmConfig {
        boot: Boot::Snapshot {
            dir: dir.to_path_buf(),
            consume: false,
        },
        disks: vec![DiskConfig {
            source: DiskSource::Volume {
                image,
                // Each clone's own, set by `Template::restore`.
                overlay: None,
                cache_bytes: DEFAULT_CACHE_MIB << 20,
                hydration,
                // A jailed clone's is made `Read` by its jail.
                hydration_access: CacheAccess::Fill,
            },
            read_only: false,
            // The VM process unlinks the overlay once open: a killed
            // clone leaves no disk behind.
            ephemeral: true,
        }],
        vcpus: size.0,
        memory_mib: size.1,
        // A restored guest keeps the command line it booted with.
        extra_cmdline: String::new(),
        seccomp: true,
        // Each clone's own, set by `Template::restore`.
        vsock: None,
        net: None,
        announce_boot: false,
    }
}

/// A fresh clone id: `i-` and [`ID_HEX_DIGITS`] random hex digits.
fn clone_id() -> io::Result<String> {
    let hex = random_seed()?;
    Ok(format!("i-{}", &hex[..ID_HEX_DIGITS]))
}

/// Copies the template's root volume writes to a clone's `overlay`,
/// unsynced: the file lives no longer than the clone.
fn copy_overlay(template: &Path, overlay: &Path) -> Result<(), FunctionError> {
    let from = File::open(template).map_err(io_err(template))?;
    let to = File::create_new(overlay).map_err(io_err(overlay))?;
    durable::copy_sparse(&from, &to).map_err(io_err(overlay))?;
    Ok(())
}

impl CloneVm {
    /// The clone's id: `i-` and hex digits, its hostname too.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The process id of its VM process, while it runs.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The unix socket through which host processes reach its guest's
    /// vsock ports.
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.path().join(VSOCK_SOCKET)
    }
}

impl Drop for CloneVm {
    /// Kills the VM process and leaves its exit to be waited for by a
    /// thread of its own, so that the caller does not wait for KVM to
    /// tear the VM down.
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Not yet waited for, the child's pid is still its own: the
        // signal reaches it or nothing.
        let _ = child.kill();
        let jail = self.jail.take();
        thread::spawn(move || {
            let _ = child.wait();
            if let Some(jail) = jail.and_then(Arc::into_inner) {
                jail.remove();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::snapshot::working_set::WorkingSet;

    #[test]
    fn clone_ids_are_random_and_shaped_like_instance_ids() {
        let (a, b) = (clone_id().unwrap(), clone_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 + ID_HEX_DIGITS);
        assert!(a.starts_with("i-"), "{a}");
        assert!(a[2..].chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }

    #[test]
    fn an_overlay_copy_is_the_templates_bytes_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("template");
        let file = File::create(&template).unwrap();
        file.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"written", 4 << 20).unwrap();
        let copy = dir.path().join("copy");
        copy_overlay(&template, &copy).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), fs::read(&template).unwrap());
        // A second clone never shares (or overwrites) the first's file.
        let err = copy_overlay(&template, &copy).unwrap_err();
        assert!(matches!(err, FunctionError::Io { .. }), "{err}");
    }

    #[test]
    fn a_missing_template_is_named() {
        let home = tempfile::tempdir().unwrap();
        let missing = home.path().join("functions/echo/template");
        let Err(err) = Template::open(home.path(), &missing, Path::new("kiln")) else {
            panic!("a template from nothing");
        };
        let line = kiln_vmm::report::one_line(&err);
        assert!(line.contains("functions/echo/template"), "{line}");
    }

    /// A clone whose "kiln" is a script standing in for `kiln __vm`: it
    /// checks its arguments and definition, then waits to be killed.
    #[test]
    fn a_clone_is_a_vm_process_of_its_own_killed_when_dropped_and_left_ones_go() {
        let home = tempfile::tempdir().unwrap();
        let script = home.path().join("kiln");
        let marks = home.path().join("marks");
        crate::test_support::write_script(
            &script,
            format!(
                "#!/bin/sh\n\
                 [ \"$1 $2 $4 $5\" = \"__vm --config --supervisor $PPID\" ] || exit 97\n\
                 grep -Eq '\"ephemeral\": ?true' \"$3\" || exit 98\n\
                 echo started >> {marks}\n\
                 exec sleep 60\n",
                marks = marks.display()
            ),
        );
        let template_dir = home.path().join("template");
        fs::create_dir(&template_dir).unwrap();
        fs::write(template_dir.join(ROOT_OVERLAY_FILE), b"writes").unwrap();
        let template = test_template(home.path(), &template_dir, &script);
        // A clone's directory that a killed `kiln fn serve` left.
        let left = home.path().join(CLONES_DIR).join(".i-dead.partial-abc123");
        fs::create_dir_all(left.join("jail")).unwrap();
        let clone = template.restore().unwrap();
        assert!(!left.exists(), "a killed serve's clone directory stays");
        let (id, dir) = (clone.id().to_string(), clone.dir.path().to_path_buf());
        assert!(
            clone
                .vsock_socket()
                .starts_with(home.path().join(CLONES_DIR))
        );
        let vm: VmConfig =
            serde_json::from_slice(&fs::read(dir.join(DEFINITION_FILE)).unwrap()).unwrap();
        assert_eq!(vm.vsock.as_ref().unwrap().cid, instance_cid(&id));
        assert_eq!(fs::read(dir.join(ROOT_OVERLAY_FILE)).unwrap(), b"writes");
        let pid = clone.child.as_ref().unwrap().id();
        let started = std::time::Instant::now();
        while !fs::read_to_string(&marks).is_ok_and(|m| m.contains("started")) {
            assert!(
                started.elapsed().as_secs() < 10,
                "the VM process never started"
            );
            thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(clone);
        assert!(!dir.exists(), "the clone's directory stays");
        // Killed, then reaped by its reaper thread: its pid goes.
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(started.elapsed().as_secs() < 10, "the VM process lives on");
            thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A template of no store: a stand-in VM process needs none.
    fn test_template(home: &Path, dir: &Path, kiln: &Path) -> Template {
        Template {
            dir: dir.to_path_buf(),
            vm: definition(dir, (dir.join("image"), None), (1, 128)),
            clones: home.join(CLONES_DIR),
            kiln: kiln.to_path_buf(),
            jail: None,
            spawner: spawner(),
            working_set_known: AtomicBool::new(false),
        }
    }

    /// A clone whose VM process (Python standing in) maps the template's
    /// memory file privately, as `kiln __vm` does, reads one page and
    /// writes another: after its event, the template records those two
    /// as its working set, once.
    #[test]
    fn a_clones_touched_pages_become_the_templates_working_set_once() {
        let home = tempfile::tempdir().unwrap();
        let template_dir = home.path().join("template");
        fs::create_dir(&template_dir).unwrap();
        fs::write(template_dir.join(ROOT_OVERLAY_FILE), b"").unwrap();
        let memory = template_dir.join(MEMORY_FILE);
        let file = File::create(&memory).unwrap();
        file.set_len(16 * 4096).unwrap();
        // The only page in the page cache: a read maps no neighbours.
        std::os::unix::fs::FileExt::write_all_at(&file, &[1; 4096], 3 * 4096).unwrap();
        let marks = home.path().join("marks");
        let program = home.path().join("vm.py");
        let python = [
            "import mmap, sys, time",
            "f = open(sys.argv[1], 'rb')",
            "m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)",
            "assert m[3 * 4096] == 1",
            "m[5 * 4096] = 7",
            "open(sys.argv[2], 'w').write('touched')",
            "time.sleep(60)",
        ];
        fs::write(&program, python.join("\n")).unwrap();
        let script = home.path().join("kiln");
        let command = format!(
            "#!/bin/sh\nexec python3 {} {} {}\n",
            program.display(),
            memory.display(),
            marks.display()
        );
        crate::test_support::write_script(&script, command);
        let template = test_template(home.path(), &template_dir, &script);
        let clone = template.restore().unwrap();
        let started = std::time::Instant::now();
        while !marks.exists() {
            assert!(started.elapsed().as_secs() < 10, "the stand-in never ran");
            thread::sleep(std::time::Duration::from_millis(10));
        }
        template.learn_working_set(&clone);
        let record = template_dir.join(WORKING_SET_FILE);
        let set = WorkingSet::read(&record, 16).unwrap().unwrap();
        assert_eq!(set.runs().collect::<Vec<_>>(), [3..4, 5..6]);
        fs::remove_file(&record).unwrap();
        template.learn_working_set(&clone);
        assert!(!record.exists(), "recorded twice");
    }
}
