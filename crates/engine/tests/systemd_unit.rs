//! deploy/engine.service, checked by systemd's own tool: `systemd-analyze verify` (the unit as
//! systemd would load it: no warning at all) and `systemd-analyze security` (its sandboxing: an
//! exposure of at most 2.0 on systemd's 0-10 scale, "OK"). `verify` also checks that ExecStart's
//! binary exists, so the unit is checked as installed: a copy whose ExecStart names the engine
//! this test was built with, in place of /usr/local/bin/engine. (`systemd-analyze` comes with
//! Debian's `systemd`; `.ci/run` installs it when missing.)

use std::path::Path;
use std::process::Command;

const INSTALLED_AT: &str = "/usr/local/bin/engine";
/// Highest overall exposure allowed, in tenths (`--threshold`): 2.0.
const MAX_EXPOSURE_TENTHS: u32 = 20;

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let tool = testkit::tools::find(
        "systemd-analyze",
        "it comes with Debian's `systemd` package: `apt-get install --no-install-recommends systemd`",
    );
    let output = Command::new(&tool)
        .args(args)
        .env("SYSTEMD_PAGER", "")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", tool.display()));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_and_security() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/engine.service"),
    )
    .unwrap();
    let exec_start = format!("ExecStart={INSTALLED_AT} serve");
    assert!(unit.contains(&exec_start), "the unit runs `{exec_start}`");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("engine.service");
    std::fs::write(
        &copy,
        unit.replace(
            &exec_start,
            &format!("ExecStart={} serve", env!("CARGO_BIN_EXE_engine")),
        ),
    )
    .unwrap();
    let copy = copy.to_str().unwrap();

    let (ok, printed) = systemd_analyze(&["verify", "--man=no", copy]);
    assert!(ok, "systemd-analyze verify failed:\n{printed}");
    assert!(
        printed.trim().is_empty(),
        "systemd-analyze verify warned:\n{printed}"
    );

    // The check can fail: the same unit with its binary missing does.
    let missing = dir.path().join("missing.service");
    std::fs::write(&missing, &unit).unwrap();
    if !Path::new(INSTALLED_AT).exists() {
        let (_, printed) = systemd_analyze(&["verify", "--man=no", missing.to_str().unwrap()]);
        assert!(printed.contains(INSTALLED_AT), "{printed}");
    }

    let threshold = format!("--threshold={MAX_EXPOSURE_TENTHS}");
    let (ok, printed) =
        systemd_analyze(&["security", "--offline=true", "--no-pager", &threshold, copy]);
    let overall = printed
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no overall exposure level");
    assert!(
        ok,
        "systemd-analyze security: {overall}, above {}.{}:\n{printed}",
        MAX_EXPOSURE_TENTHS / 10,
        MAX_EXPOSURE_TENTHS % 10
    );
    eprintln!("{overall}");
}
