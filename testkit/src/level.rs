//! Where the whole-system tests' Linux guests run. Linux guests need VMX/SVM; scripts/test.sh
//! runs the process-sandbox rows on the host and, where the host has no VMX/SVM, the vm-sandbox
//! rows inside the nested level (scripts/nested.sh: an L1 Linux with emulated SVM), telling
//! each level what to run in `FNVM_TEST_SANDBOXES`.

/// The variable scripts/test.sh sets per level: `process`, `vm` or `process,vm`.
pub const SANDBOXES_VAR: &str = "FNVM_TEST_SANDBOXES";

/// True where /proc/cpuinfo shows VMX (Intel VT-x) or SVM (AMD-V) on any CPU.
pub fn host_has_vmx_or_svm() -> bool {
    cpu_has_flag("vmx") || cpu_has_flag("svm")
}

/// True where /proc/cpuinfo lists `flag` for any CPU (`hypervisor`: this host is a VM itself).
pub fn cpu_has_flag(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == flag))
        })
        .unwrap_or(false)
}

/// One line straight to the process's stderr (`eprintln!` is captured by the test harness, and
/// a skip must never look like a silent pass).
pub fn loud(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The sandboxes asked for in FNVM_TEST_SANDBOXES, None when it is unset. A vm sandbox asked
/// for where it cannot run fails the test: a level that was meant to run Linux guests must not
/// pass without them.
fn asked_for() -> Option<Vec<&'static str>> {
    let value = std::env::var(SANDBOXES_VAR).ok()?;
    let mut chosen = Vec::new();
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "process" => chosen.push("process"),
            "vm" => chosen.push("vm"),
            other => panic!("{SANDBOXES_VAR}={value}: unknown sandbox {other:?} (process, vm)"),
        }
    }
    if chosen.contains(&"vm") {
        assert!(
            host_has_vmx_or_svm(),
            "{SANDBOXES_VAR}={value} asks for the vm sandbox, but this host has no VMX/SVM \
             (/proc/cpuinfo): Linux guests cannot run here (run scripts/test.sh, which runs them \
             at the nested level)"
        );
    }
    Some(chosen)
}

/// The sandboxes a test runs its rows in: FNVM_TEST_SANDBOXES when set; else `process`, and
/// `vm` where the host has VMX/SVM (elsewhere one loud SKIPPED line).
pub fn sandboxes(test: &str) -> Vec<&'static str> {
    if let Some(chosen) = asked_for() {
        return chosen;
    }
    if host_has_vmx_or_svm() {
        vec!["process", "vm"]
    } else {
        loud(&format!(
            "SKIPPED: {test} in the vm sandbox: this host has no VMX/SVM (/proc/cpuinfo); tested in \
             the process sandbox only (scripts/test.sh runs it at the nested level)"
        ));
        vec!["process"]
    }
}

/// Whether a test that only runs Linux guests runs here. False after one loud SKIPPED line
/// where the host has no VMX/SVM; with FNVM_TEST_SANDBOXES set, exactly whether it names `vm`.
pub fn linux_guests_run_here(test: &str) -> bool {
    if let Some(chosen) = asked_for() {
        return chosen.contains(&"vm");
    }
    if host_has_vmx_or_svm() {
        return true;
    }
    loud(&format!(
        "SKIPPED (no VMX/SVM on this host: /dev/kvm is not hardware KVM; scripts/test.sh runs it \
         at the nested level): {test}"
    ));
    false
}
