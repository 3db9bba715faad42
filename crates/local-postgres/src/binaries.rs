//! Where the PostgreSQL server binaries are.

use std::path::{Path, PathBuf};

/// The directory holding `initdb`, `pg_ctl` and `postgres`: `ENGINE_PG_BIN_DIR` when set, else
/// the first `PATH` entry that has them, else the newest `/usr/lib/postgresql/<version>/bin`
/// (where Debian and Ubuntu install them, off `PATH`).
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ENGINE_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return has_server_binaries(&dir).then_some(dir);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find(|dir| has_server_binaries(dir))
        // PATH may hold links to a few of the binaries (as /usr/local/bin does on some images):
        // use the directory they point into, which has the rest (createdb among them).
        .map(|dir| match std::fs::canonicalize(dir.join("pg_ctl")) {
            Ok(real) => real.parent().map_or(dir.clone(), Path::to_path_buf),
            Err(_) => dir,
        });
    on_path.or_else(newest_debian_bin_dir)
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|name| dir.join(name).is_file())
}

fn newest_debian_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
