//! The test harness: every test gets a fresh, migrated database on a real PostgreSQL.
//!
//! The server is the one `DATABASE_URL` names (the role needs CREATEDB), or, when it is unset, a
//! private cluster this process starts once with [`local_postgres`], the same mechanism as the
//! engine's embedded default. That cluster is thrown away when the test process exits, however it
//! exits.
//!
//! [`seaweed`] starts a real S3-compatible object store (SeaweedFS) for the tests of object
//! storage; [`tools`] finds the other programs tests run (`promtool`, `kubernetes-validate`, ...).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, PgPool};

pub use local_postgres;

pub mod duckdb;
pub mod seaweed;
pub mod tools;

struct Server {
    /// URL of a database to connect to for `CREATE DATABASE`.
    admin_url: String,
    /// Kept for the life of the process; its watchdog stops it at exit.
    _local: Option<local_postgres::LocalPostgres>,
    /// True when this process owns the server, so databases need no dropping.
    private: bool,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server {
            admin_url: url,
            _local: None,
            private: false,
        },
        _ => {
            // The cluster lives in the directory itself (handed to the cluster's owner), and the
            // watchdog removes it when the process exits.
            let dir = tempfile::Builder::new()
                .prefix("engine-test-pg-")
                .tempdir()
                .expect("create a temporary directory for the test cluster")
                .keep();
            let local =
                local_postgres::LocalPostgres::start(local_postgres::Options::throwaway(dir))
                    .unwrap_or_else(|e| {
                        panic!("cannot start a private PostgreSQL for the tests: {e}")
                    });
            Server {
                admin_url: local.url(),
                _local: Some(local),
                private: true,
            }
        }
    })
}

/// A fresh database with every migration applied, dropped (on an external server) when the value
/// is dropped.
pub struct TestDatabase {
    pub pool: PgPool,
    pub url: String,
    name: String,
}

impl TestDatabase {
    /// Creates the database. Each test calls this once.
    pub async fn new() -> TestDatabase {
        TestDatabase::migrated_by(&repository::MIGRATOR).await
    }

    /// Creates the database with only the migrations older than `version` applied: a database
    /// of an earlier release, for a test of an upgrade (which then runs `repository::MIGRATOR`).
    pub async fn before_migration(version: i64) -> TestDatabase {
        let older: Vec<sqlx::migrate::Migration> = repository::MIGRATOR
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect();
        let migrator = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(older),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        TestDatabase::migrated_by(&migrator).await
    }

    async fn migrated_by(migrator: &sqlx::migrate::Migrator) -> TestDatabase {
        let server = tokio::task::spawn_blocking(server)
            .await
            .expect("start the test server");
        let name = format!(
            "engine_test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin: PgConnectOptions = server
            .admin_url
            .parse()
            .expect("DATABASE_URL is a PostgreSQL URL");
        let mut conn = admin.connect().await.expect("connect to the test server");
        conn.execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
            .await
            .expect("drop stale test database");
        conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .expect("create test database");
        conn.close().await.ok();

        let options = admin.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .expect("connect to the test database");
        migrator
            .run(&pool)
            .await
            .expect("migrate the test database");
        let url = url_with_database(&server.admin_url, &name);
        TestDatabase { pool, url, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let server = server();
        if server.private {
            return; // the whole cluster goes when the process exits
        }
        let (url, name) = (server.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; a thread of its own may block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url).await.ok()?;
                conn.execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// `url` with its database (path) replaced by `name`, query string kept.
fn url_with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{}", &base[..path_start], name);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// libfaketime as Debian installs it (package `faketime`), for a PostgreSQL or an engine whose
/// clock a test sets: `threaded` is the variant for multi-threaded programs.
pub fn libfaketime(threaded: bool) -> std::path::PathBuf {
    let name = if threaded {
        "libfaketimeMT.so.1"
    } else {
        "libfaketime.so.1"
    };
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("faketime").join(name))
        .chain([std::path::PathBuf::from("/usr/lib/faketime").join(name)])
        .find(|path| path.exists());
    found.unwrap_or_else(|| {
        panic!("{name} not found: install libfaketime (Debian package `faketime`); .ci/run does")
    })
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn replaces_only_the_database() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5/db?sslmode=disable", "x"),
            "postgres://u:p@h:5/x?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://u@localhost:5432/engine?host=/tmp/a", "t1"),
            "postgres://u@localhost:5432/t1?host=/tmp/a"
        );
        assert_eq!(url_with_database("postgres://h", "t"), "postgres://h/t");
    }
}
