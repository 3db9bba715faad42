//! External programs the tests run for real (`weed`, `promtool`, `kubernetes-validate`, ...):
//! found where their installers put them, or a panic that names the program and how to install
//! it (`.ci/run` does).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The program `name`: `$NAME` if set (upper case, `-` as `_`: `$KUBERNETES_VALIDATE`), else
/// the one pip installed for `python3` (its scripts directory, where `pip install` puts a
/// package's commands; this skips pyenv's shims), else `name` on `PATH`, else `~/.local/bin`
/// (`pip install --user`), else `/usr/bin`, `/usr/sbin` (Debian's packages, for a `PATH`
/// without them). Panics, saying what it looked for and `how_to_install`, when there is none.
pub fn find(name: &str, how_to_install: &str) -> PathBuf {
    let var = name.to_uppercase().replace('-', "_");
    if let Some(path) = std::env::var_os(&var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{var}={} is not a file", path.display());
        return path;
    }
    candidates(name)
        .into_iter()
        .find(|path| is_executable(path))
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed (looked for ${var}, python3's scripts directory, PATH, \
                 ~/.local/bin, /usr/bin, /usr/sbin): {how_to_install} (.ci/run does)"
            )
        })
}

fn candidates(name: &str) -> Vec<PathBuf> {
    let pip_scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .collect()
        })
        .unwrap_or_default();
    let user =
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/bin").join(name));
    pip_scripts
        .into_iter()
        .chain(on_path)
        .chain(user)
        .chain(["/usr/bin", "/usr/sbin"].map(|dir| Path::new(dir).join(name)))
        .collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
