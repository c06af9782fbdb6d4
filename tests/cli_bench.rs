//! `kiln bench`'s refusals, which come before any VM: bad numbers, and a
//! host without hardware KVM (our machines' PVM, or none) said as such;
//! `kiln bench vmm`'s, which runs on PVM too but needs the stub guest.
use std::process::Command;

fn bench(args: &[&str]) -> (Option<i32>, String) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_HOME", home.path())
        .env_remove("KILN_KERNEL")
        .env_remove("KILN_STUB")
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn zero_runs_or_concurrency_is_refused_naming_the_value() {
    let (code, err) = bench(&["cold", "--runs", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--runs 0: expected at least 1"), "{err}");
    let (code, err) = bench(&["--concurrency", "0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--concurrency 0: expected at least 1"),
        "{err}"
    );
}

#[test]
fn an_unknown_scenario_or_peer_is_a_usage_error() {
    let (code, err) = bench(&["warm"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'warm'"), "{err}");
    let (code, _) = bench(&["--peer", "firecracker"]);
    assert_eq!(code, Some(2));
}

#[test]
fn without_hardware_kvm_it_says_so() {
    let (code, err) = bench(&["--runs", "1"]);
    assert_eq!(code, Some(1));
    if kiln_vmm::host::detect().can_boot_linux() {
        // A host that would run it: the empty home has no kernel.
        assert!(err.contains("the guest kernel"), "{err}");
    } else {
        assert!(err.contains("needs hardware KVM"), "{err}");
        assert!(err.contains("cargo xtask bench startup"), "{err}");
    }
}

#[test]
fn the_vmm_benchmark_refuses_bad_numbers_and_a_missing_stub() {
    let (code, err) = bench(&["vmm", "--runs", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--runs 0: expected at least 1"), "{err}");
    let (code, err) = bench(&["vmm", "--concurrency", "1,0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("--concurrency 0: expected at least 1"),
        "{err}"
    );
    let (code, err) = bench(&["vmm", "--runs", "1"]);
    assert_eq!(code, Some(1));
    match kiln_vmm::host::detect() {
        // The empty home has no stub.
        kiln_vmm::host::HostVirt::HardwareKvm(_) | kiln_vmm::host::HostVirt::Pvm => {
            assert!(err.contains("the stub guest"), "{err}");
            assert!(err.contains("cargo xtask stub"), "{err}");
        }
        kiln_vmm::host::HostVirt::Unavailable { .. } => {
            assert!(err.contains("boots the stub guest on KVM"), "{err}");
        }
    }
}
