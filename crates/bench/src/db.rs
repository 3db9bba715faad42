//! The benchmark's database: `DATABASE_URL`, or a private, durable PostgreSQL (fsync and
//! full-page writes on, shared_buffers 1GB, as in the field notes) in a temporary directory.

use std::time::Instant;

use local_postgres::{LocalPostgres, Options};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

pub struct BenchDb {
    pub pool: PgPool,
    /// The connection URL of the bench's own database.
    pub url: String,
    local: Option<LocalPostgres>,
    /// A streaming standby of the private server, when asked for ([`BenchDb::start_standby`]).
    standby: Option<LocalPostgres>,
}

impl BenchDb {
    /// Starts a streaming standby of the bench's private server (`pg_basebackup`, on a slot),
    /// beside it on this machine; the primary reports its replay in `pg_stat_replication`.
    pub async fn start_standby(&mut self) -> anyhow::Result<()> {
        let Some(primary) = &self.local else {
            anyhow::bail!("--standby needs the bench's own server: unset DATABASE_URL");
        };
        let from = primary.data_dir().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("engine-bench-standby-")
            .tempdir()?
            .keep();
        // Reachable by the unprivileged user the server runs as when the bench runs as root.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let standby = tokio::task::spawn_blocking(move || {
            LocalPostgres::start(Options::standby(dir.join("pg"), &from))
        })
        .await??;
        self.standby = Some(standby);
        Ok(())
    }

    pub fn has_standby(&self) -> bool {
        self.standby.is_some()
    }

    /// The URL of another database on the same server.
    pub fn url_for(&self, database: &str) -> String {
        with_database(&self.url, database)
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_end..]
        .find('/')
        .map_or(base.len(), |i| authority_end + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

pub async fn open() -> anyhow::Result<BenchDb> {
    let (url, local) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let dir = tempfile::Builder::new()
                .prefix("engine-bench-pg-")
                .tempdir()?
                .keep();
            let mut options = Options::throwaway(dir);
            options.durable = true;
            options.settings = vec![
                ("shared_buffers".into(), "1GB".into()),
                ("max_wal_size".into(), "8GB".into()),
                ("checkpoint_timeout".into(), "30min".into()),
                // For the longest statement a run issues.
                (
                    "shared_preload_libraries".into(),
                    "pg_stat_statements".into(),
                ),
                ("pg_stat_statements.track".into(), "all".into()),
                ("pg_stat_statements.track_planning".into(), "on".into()),
            ];
            let local =
                tokio::task::spawn_blocking(move || LocalPostgres::start(options)).await??;
            (local.url(), Some(local))
        }
    };
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .statement_cache_capacity(2000);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    repository::MIGRATOR.run(&pool).await?;
    Ok(BenchDb {
        pool,
        url,
        local,
        standby: None,
    })
}

/// A new, migrated database on the bench's server.
pub async fn fresh_database(bench: &BenchDb, name: &str) -> anyhow::Result<PgPool> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&bench.pool)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&bench.pool)
        .await?;
    let pool = connect(&bench.url_for(name), 4).await?;
    repository::MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// An identical copy of `template`, as `name`. A template must have no connections: those the
/// bench closed may take a moment to leave, and autovacuum may have entered it, so any left are
/// ended first.
pub async fn copy_database(bench: &BenchDb, template: &str, name: &str) -> anyhow::Result<PgPool> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&bench.pool)
        .await?;
    let mut attempts = 0;
    loop {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
            .bind(template)
            .execute(&bench.pool)
            .await?;
        let created = sqlx::query(&format!(
            "CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY"
        ))
        .execute(&bench.pool)
        .await;
        match created {
            Err(sqlx::Error::Database(error))
                if error.code().as_deref() == Some("55006") && attempts < 5 =>
            {
                attempts += 1
            }
            other => break other.map(drop)?,
        }
    }
    connect(&bench.url_for(name), 4).await
}

/// Drops a section's database, unless `BENCH_KEEP` is set (to look into it afterwards, with
/// `DATABASE_URL` naming a server that outlives the bench).
pub async fn drop_database(bench: &BenchDb, name: &str) -> anyhow::Result<()> {
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("  kept database {name} (BENCH_KEEP)");
        return Ok(());
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&bench.pool)
        .await?;
    Ok(())
}

pub async fn connect(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    let options = url
        .parse::<sqlx::postgres::PgConnectOptions>()?
        .statement_cache_capacity(2000);
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(options)
        .await?)
}

/// Runs `sql`, printing how long it took.
pub async fn step(pool: &PgPool, what: &str, sql: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    sqlx::query(sql).execute(pool).await?;
    eprintln!("  {what}: {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn mb(bytes: i64) -> f64 {
    bytes as f64 / 1_048_576.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn another_database_on_the_same_server() {
        assert_eq!(
            super::with_database("postgres://u@localhost:5432/engine?host=/tmp/x", "copy"),
            "postgres://u@localhost:5432/copy?host=/tmp/x"
        );
        assert_eq!(
            super::with_database("postgres://u:p@db/engine", "copy"),
            "postgres://u:p@db/copy"
        );
        assert_eq!(
            super::with_database("postgres://db", "copy"),
            "postgres://db/copy"
        );
    }
}
