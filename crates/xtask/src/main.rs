//! Developer tasks, run through the cargo aliases in `.cargo/config.toml`.
//!
//! `cargo sqlx-prepare` regenerates `.sqlx/`, what sqlx's checked macros (`query!`, `query_as!`,
//! `query_scalar!`) know of each statement when they compile offline (the default): it starts a
//! private PostgreSQL (`local-postgres`, as the tests do), applies `migrations/`, builds the crates
//! that use the macros with the macros online against that database, writing what they learn to
//! a scratch directory, and replaces `.sqlx/` with it. `cargo sqlx-prepare --check` writes nothing
//! and fails when `.sqlx/` differs: an entry missing, stale (a migration changed what a statement
//! returns) or left over (no statement has that text any more).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// The packages whose code uses the checked macros (outside `#[cfg(test)]`), and the features
/// that compile all of it.
const MACRO_PACKAGES: &[&str] = &["repository"];
const MACRO_FEATURES: &str = "repository/testing";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["sqlx-prepare"] => sqlx_prepare(false),
        ["sqlx-prepare", "--check"] => sqlx_prepare(true),
        _ => Err("usage: cargo sqlx-prepare [--check]".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

fn sqlx_prepare(check: bool) -> Result<(), String> {
    let started = Instant::now();
    let root = workspace_root();

    // A private cluster, thrown away when this process exits (its watchdog removes it).
    let dir = tempfile::Builder::new()
        .prefix("sqlx-prepare-pg-")
        .tempdir()
        .map_err(|e| format!("a directory for PostgreSQL: {e}"))?
        .keep();
    let postgres = local_postgres::LocalPostgres::start(local_postgres::Options::throwaway(dir))
        .map_err(|e| format!("cannot start a private PostgreSQL: {e}"))?;
    let url = postgres.url();
    migrate(&url, &root.join("migrations"))?;

    let scratch = tempfile::Builder::new()
        .prefix("sqlx-prepare-")
        .tempdir()
        .map_err(|e| format!("a scratch directory: {e}"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(&root).arg("build").args(["-p", "xtask"]);
    for package in MACRO_PACKAGES {
        build.args(["-p", package]);
    }
    // Online for this build only; a new SQLX_OFFLINE_DIR each time makes the packages compile
    // again (their build scripts watch it), so that every macro writes its statement's data.
    build
        .args(["--features", MACRO_FEATURES])
        .env("SQLX_OFFLINE", "false")
        .env("SQLX_OFFLINE_DIR", scratch.path())
        .env("DATABASE_URL", &url);
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "the build against the migrated database failed ({status}): see its errors above"
        ));
    }

    let fresh = query_files(scratch.path())?;
    if fresh.is_empty() {
        return Err("the build wrote no query data: did the packages compile again?".into());
    }
    let committed_dir = root.join(".sqlx");
    let committed = if committed_dir.exists() {
        query_files(&committed_dir)?
    } else {
        BTreeMap::new()
    };

    if check {
        let mut problems = Vec::new();
        for (name, text) in &fresh {
            match committed.get(name) {
                None => problems.push(format!("missing: .sqlx/{name}")),
                Some(old) if old != text => problems.push(format!("stale: .sqlx/{name}")),
                Some(_) => {}
            }
        }
        for name in committed.keys().filter(|name| !fresh.contains_key(*name)) {
            problems.push(format!(
                "left over (no statement has its text): .sqlx/{name}"
            ));
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}\n.sqlx/ is not current: run `cargo sqlx-prepare` and commit .sqlx/ (docs/development.md)",
                problems.join("\n")
            ));
        }
        eprintln!(
            "sqlx-prepare: .sqlx/ is current ({} statements, {:.0?})",
            fresh.len(),
            started.elapsed()
        );
    } else {
        std::fs::create_dir_all(&committed_dir)
            .map_err(|e| format!("create {}: {e}", committed_dir.display()))?;
        for name in committed.keys().filter(|name| !fresh.contains_key(*name)) {
            let path = committed_dir.join(name);
            std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
        }
        for (name, text) in &fresh {
            let path = committed_dir.join(name);
            std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
        }
        eprintln!(
            "sqlx-prepare: wrote .sqlx/ ({} statements, {:.0?})",
            fresh.len(),
            started.elapsed()
        );
    }
    drop(postgres);
    Ok(())
}

/// Applies the migrations in `dir`, as `engine migrate` does (the same files, sqlx's migrator).
fn migrate(url: &str, dir: &Path) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime: {e}"))?;
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(url)
            .await
            .map_err(|e| format!("connect to the private PostgreSQL: {e}"))?;
        let migrator = sqlx::migrate::Migrator::new(dir)
            .await
            .map_err(|e| format!("read {}: {e}", dir.display()))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| format!("migrate: {e}"))?;
        pool.close().await;
        Ok(())
    })
}

/// The `query-<hash>.json` files in `dir`, by name.
fn query_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("read {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("query-") && name.ends_with(".json") {
            let text = std::fs::read(entry.path())
                .map_err(|e| format!("read {}: {e}", entry.path().display()))?;
            files.insert(name, text);
        }
    }
    Ok(files)
}
