use super::*;

/// A k1.nano spec of `hello:1.0.0` with no network, for tests here and
/// in the modules that work on instances.
pub(crate) fn spec(name: Option<&str>) -> Spec {
    Spec {
        name: name.map(String::from),
        image: "hello:1.0.0".into(),
        instance_type: "k1.nano".into(),
        vcpus: 1,
        memory_mib: 128,
        cmdline: String::new(),
        network: Network::None,
        private_ip: None,
        ports: Vec::new(),
    }
}

const USER_DATA: &[u8] = b"#!/bin/sh\necho hi\n";

#[test]
fn instances_are_found_by_id_and_by_live_name() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (web, _web_vmm) = registry
        .create(spec(Some("web")), Some(USER_DATA), None)
        .unwrap();
    let id = web.record.id.clone();
    assert!(id.starts_with("i-") && id.len() == 2 + 2 * ID_BYTES, "{id}");
    assert_eq!(registry.find(&id).unwrap().record, web.record);
    assert_eq!(registry.find("web").unwrap().record.id, id);
    assert_eq!(web.record.state, State::Pending);
    assert!(web.user_data().is_some());
    let err = registry
        .create(spec(Some("web")), Some(USER_DATA), None)
        .unwrap_err();
    assert!(matches!(err, InstanceError::NameTaken { .. }), "{err}");
    let (anonymous, _anonymous_vmm) = registry.create(spec(None), Some(USER_DATA), None).unwrap();
    assert_eq!(anonymous.label(), anonymous.record.id);
    let ids: Vec<_> = registry
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.record.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(matches!(
        registry.find("db"),
        Err(InstanceError::NotFound(_))
    ));

    // A terminated instance frees its name.
    let mut web = registry.find("web").unwrap();
    web.update(|r| {
        r.state = State::Terminated;
        Ok(())
    })
    .unwrap();
    registry
        .create(spec(Some("web")), Some(USER_DATA), None)
        .unwrap();
}

#[test]
fn a_killed_creations_directory_goes_with_the_next_creation() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    registry.create(spec(None), None, None).unwrap();
    // What a `kiln run` killed before its rename leaves: a scratch
    // directory no live command holds.
    let killed = registry.root.join(".new.partial-a1B2c3");
    fs::create_dir(&killed).unwrap();
    fs::write(killed.join(RECORD_FILE), b"{").unwrap();
    registry.create(spec(None), None, None).unwrap();
    assert!(!killed.exists());
    let entries: Vec<_> = fs::read_dir(&registry.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("i-"))
        .collect();
    assert!(
        entries.iter().all(|n| !n.contains(".partial-")),
        "{entries:?}"
    );
    assert_eq!(registry.list().unwrap().len(), 2);
}

/// An instance terminated over an hour ago leaves the registry, its
/// directory removed, as EC2 lets a terminated instance go; one
/// terminated just now, and every other, stays.
#[test]
fn instances_terminated_over_an_hour_ago_are_forgotten() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let now = now_ms() / 1000;
    let long_ago = now - TERMINATED_KEPT.as_secs() - 60;
    let terminated = |name: Option<&str>, at: Option<u64>| {
        let (mut instance, _vmm) = registry.create(spec(name), None, None).unwrap();
        instance
            .update(|r| {
                r.state = State::Terminated;
                r.terminated_at = at;
                Ok(())
            })
            .unwrap();
        instance
    };
    let old = terminated(Some("old"), Some(long_ago));
    let recent = terminated(Some("recent"), Some(now));
    // A record from before `terminated_at`: its file's time stands in.
    let legacy = terminated(None, None);
    let record = legacy.dir().join(RECORD_FILE);
    let two_hours_ago = SystemTime::now() - 2 * TERMINATED_KEPT;
    File::options()
        .write(true)
        .open(&record)
        .and_then(|file| file.set_modified(two_hours_ago))
        .unwrap();
    let (live, _vmm) = registry.create(spec(Some("live")), None, None).unwrap();

    let mut listed: Vec<String> = registry
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.record.id)
        .collect();
    listed.sort();
    let mut kept = vec![recent.record.id.clone(), live.record.id.clone()];
    kept.sort();
    assert_eq!(listed, kept);
    assert!(!old.dir().exists() && !legacy.dir().exists());
    assert!(recent.dir().exists());
    assert!(matches!(
        registry.find(&old.record.id),
        Err(InstanceError::NotFound(_))
    ));
}

/// An id is looked up only in its own directory: a key of any other form
/// after `i-` is no instance, never a path out of the registry.
#[test]
fn only_an_id_s_form_is_looked_up_as_an_id() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (instance, _vmm) = registry.create(spec(None), None, None).unwrap();
    let id = &instance.record.id;
    assert_eq!(registry.find(id).unwrap().record.id, *id);
    let outside = format!("i-/../../instances/{id}");
    let upper_hex = format!("i-{}", "AB".repeat(ID_BYTES));
    for key in [outside.as_str(), "i-0", &upper_hex] {
        assert!(
            matches!(registry.find(key), Err(InstanceError::NotFound(_))),
            "{key}"
        );
    }
}

/// A restored instance appears with its copy of the snapshot's root
/// volume writes already in it; a copy that fails leaves no instance.
#[test]
fn a_restored_instance_appears_with_its_root_volume() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let snapshot_overlay = home.path().join("snapshot.overlay");
    fs::write(&snapshot_overlay, b"the guest's writes").unwrap();
    let (instance, _vmm) = registry
        .create(spec(None), None, Some(&snapshot_overlay))
        .unwrap();
    let copy = fs::read(instance.root_overlay()).unwrap();
    assert_eq!(copy, b"the guest's writes");

    let missing = home.path().join("gone.overlay");
    let err = registry
        .create(spec(Some("web")), None, Some(&missing))
        .unwrap_err();
    assert!(err.to_string().contains(ROOT_OVERLAY_FILE), "{err}");
    assert_eq!(
        registry.list().unwrap().len(),
        1,
        "no instance from the failure"
    );
    assert!(matches!(
        registry.find("web"),
        Err(InstanceError::NotFound(_))
    ));
}

#[test]
fn names_that_could_be_ids_or_paths_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    for bad in ["", "..", ".hidden", "a/b", "a b", "i-123", &"x".repeat(65)] {
        let err = registry
            .create(spec(Some(bad)), Some(USER_DATA), None)
            .unwrap_err();
        assert!(matches!(err, InstanceError::BadName(_)), "{bad:?}: {err}");
    }
}

#[test]
fn a_record_whose_vmm_died_reads_as_stopped_with_the_reason() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (mut instance, vmm) = registry
        .create(spec(Some("web")), Some(USER_DATA), None)
        .unwrap();
    instance
        .update(|r| {
            r.state = State::Running;
            r.vmm_pid = Some(1);
            Ok(())
        })
        .unwrap();
    assert!(instance.vmm_alive().unwrap());
    assert_eq!(registry.find("web").unwrap().record.state, State::Running);
    drop(vmm);
    let found = registry.find("web").unwrap();
    assert_eq!(found.record.state, State::Stopped);
    assert_eq!(found.record.vmm_pid, None);
    assert!(found.record.reason.unwrap().contains("VMM process ended"));
}

#[test]
fn verbs_on_one_instance_are_serialized() {
    let home = tempfile::tempdir().unwrap();
    let (instance, _vmm) = Registry::new(home.path())
        .create(spec(None), Some(USER_DATA), None)
        .unwrap();
    let first = instance.lock_for_verb().unwrap();
    let err = instance.lock_for_verb().unwrap_err();
    assert!(matches!(err, InstanceError::Busy { .. }), "{err}");
    drop(first);
    instance.lock_for_verb().unwrap();
}

#[test]
fn terminating_deletes_volumes_and_keeps_the_record() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (instance, _vmm) = registry
        .create(spec(Some("web")), Some(USER_DATA), None)
        .unwrap();
    fs::write(instance.root_overlay(), b"overlay").unwrap();
    fs::write(instance.console_log(), b"log").unwrap();
    fs::write(instance.console_log_rotated(), b"older log").unwrap();
    instance.delete_volumes().unwrap();
    assert!(!instance.root_overlay().exists() && instance.user_data().is_none());
    assert!(!instance.console_log().exists());
    assert!(!instance.console_log_rotated().exists());
    assert!(registry.find(&instance.record.id).is_ok());
}

#[test]
fn a_damaged_record_is_named() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (instance, _vmm) = registry.create(spec(None), Some(USER_DATA), None).unwrap();
    fs::write(instance.dir().join(RECORD_FILE), "{not json").unwrap();
    let err = registry.find(&instance.record.id).unwrap_err().to_string();
    assert!(err.contains("instance.json"), "{err}");
}

#[test]
fn only_a_terminated_instance_is_forgotten_and_then_nothing_is_left() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (mut clone, vmm) = registry.create(spec(None), None, None).unwrap();
    drop(vmm);
    let id = clone.record.id.clone();
    let err = clone.clone().forget().unwrap_err();
    assert!(err.to_string().contains("pending"), "{err}");
    clone
        .update(|r| {
            r.state = State::Terminated;
            Ok(())
        })
        .unwrap();
    clone.forget().unwrap();
    assert!(matches!(
        registry.find(&id),
        Err(InstanceError::NotFound(_))
    ));
    assert!(registry.list().unwrap().is_empty());
}

fn bridged(private_ip: Option<Ipv4Addr>) -> Spec {
    Spec {
        network: Network::Bridge,
        private_ip,
        ..spec(None)
    }
}

#[test]
fn bridged_instances_get_distinct_addresses_until_terminated() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let (unbridged, _a) = registry.create(spec(None), None, None).unwrap();
    assert_eq!(unbridged.record.address, None);
    let (mut first, _b) = registry.create(bridged(None), None, None).unwrap();
    let (second, _c) = registry.create(bridged(None), None, None).unwrap();
    assert_eq!(first.record.address, Some(Ipv4Addr::new(10, 89, 0, 2)));
    assert_eq!(second.record.address, Some(Ipv4Addr::new(10, 89, 0, 3)));
    first
        .update(|r| {
            r.state = State::Terminated;
            Ok(())
        })
        .unwrap();
    let (third, _d) = registry.create(bridged(None), None, None).unwrap();
    assert_eq!(
        third.record.address,
        Some(Ipv4Addr::new(10, 89, 0, 2)),
        "a terminated instance's address is free again"
    );
}

#[test]
fn a_wanted_address_must_be_free_and_in_the_subnet() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let wanted = Ipv4Addr::new(10, 89, 0, 77);
    let (holder, _a) = registry.create(bridged(Some(wanted)), None, None).unwrap();
    assert_eq!(holder.record.address, Some(wanted));
    let err = registry
        .create(bridged(Some(wanted)), None, None)
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("10.89.0.77 is held by instance") && message.contains(&holder.record.id),
        "{message}"
    );
    let outside = registry
        .create(bridged(Some(Ipv4Addr::new(192, 168, 1, 2))), None, None)
        .unwrap_err();
    assert!(
        outside.to_string().contains("outside the subnet"),
        "{outside}"
    );
    // A failed launch leaves nothing behind.
    assert_eq!(registry.list().unwrap().len(), 1);
}

#[test]
fn concurrent_launches_never_share_an_address() {
    let home = tempfile::tempdir().unwrap();
    let registry = Registry::new(home.path());
    let addresses: Vec<Ipv4Addr> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let (instance, _vmm) = registry.create(bridged(None), None, None).unwrap();
                    instance.record.address.unwrap()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let distinct: BTreeSet<_> = addresses.iter().collect();
    assert_eq!(distinct.len(), addresses.len(), "{addresses:?}");
}

#[test]
fn waiting_for_the_vmm_ends_when_its_lock_goes_not_at_a_poll() {
    let home = tempfile::tempdir().unwrap();
    let (instance, vmm) = Registry::new(home.path())
        .create(spec(None), None, None)
        .unwrap();
    assert!(!instance.wait_vmm_gone(Duration::from_millis(50)));
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(vmm);
    });
    let started = std::time::Instant::now();
    assert!(instance.wait_vmm_gone(Duration::from_secs(10)));
    assert!(started.elapsed() < Duration::from_secs(5));
    dropper.join().unwrap();
    // The wait let the lock go again: a new VMM can claim it.
    assert!(instance.claim_vmm().unwrap().is_some());
}
