//! DuckDB, a Parquet reader no one here wrote, through its Python package (PyPI `duckdb`,
//! installed by `.ci/run`): what the archive tests read archive files with.

use std::path::Path;
use std::process::Command;

/// Runs `sql` in DuckDB with `dir` as the working directory (so `'archive/**/*.parquet'` globs
/// the archive files under it); each row's values as strings.
pub fn rows(dir: &Path, sql: &str) -> Vec<Vec<String>> {
    let script = format!(
        "import duckdb, json, os\nos.chdir({dir:?})\nrows = duckdb.sql({sql:?}).fetchall()\nprint(json.dumps([[str(v) for v in row] for row in rows]))",
        dir = dir.display().to_string(),
    );
    let output = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "DuckDB failed (pip install duckdb==1.4.2; .ci/run does): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("DuckDB's rows as JSON")
}

/// The task id of every run in the archive files under `dir` (each as often as it is found).
pub fn archived_task_ids(dir: &Path) -> Vec<String> {
    rows(dir, "SELECT task_id FROM 'archive/**/*.parquet'")
        .into_iter()
        .map(|row| row[0].clone())
        .collect()
}
