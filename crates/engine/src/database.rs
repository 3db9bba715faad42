//! The engine's database: `DATABASE_URL`, else `database.url`, else a private PostgreSQL the
//! engine starts under its data directory and stops when it exits.

use anyhow::Context;
use local_postgres::LocalPostgres;
use retention_controller::RunOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::output;
use crate::settings::Settings;

pub struct Database {
    pub pool: PgPool,
    /// Connections of their own for the lease keepers (at most [`LEASE_CONNECTIONS`], opened
    /// when first needed), beside `database.max_connections` for everything else: a renewal
    /// never waits behind batches holding every connection of `pool`.
    pub lease_pool: PgPool,
    /// The admin server's own connections (`http.max_connections`, opened when first needed),
    /// each statement bounded by `http.request_timeout`: page loads and API calls never take a
    /// connection a retention run waits for.
    pub http_pool: PgPool,
    /// One connection for `/readyz` alone: a page or API call stuck on the database cannot make
    /// a replica unready.
    pub readiness_pool: PgPool,
    embedded: Option<LocalPostgres>,
}

/// The lease keepers' connections: a renewal takes a few milliseconds every third of
/// `retention.lease_ttl`, so two serve every task's keeper.
pub const LEASE_CONNECTIONS: u32 = 2;
/// The engine's connections' `application_name` when the database URL gives none.
pub const APPLICATION_NAME: &str = "retention-engine";
/// Appended to the engine's `application_name` on the admin server's connections
/// (`retention-engine/http`), so that pg_stat_activity tells page loads from runs. The pacing
/// probe counts neither as the foreground's (it leaves out its own name and `<name>/...`).
pub const HTTP_APPLICATION_SUFFIX: &str = "/http";

/// What every connection of the engine is opened with, over what the URL says.
pub fn session_options(options: PgConnectOptions) -> PgConnectOptions {
    // Room for each day partition's prepared statements, so their plans stay cached.
    let options = options.statement_cache_capacity(2000);
    // No JIT: every statement the engine issues is bounded, and a backend's first plan over
    // `jit_above_cost` (the estimate of a backlog, say) loaded LLVM first, ~40 ms of each new
    // connection. Batches also set it per transaction; this covers everything else.
    let options = options.options([("jit", "off")]);
    // Named in pg_stat_activity, unless the URL names them: the pacing probe tells the
    // engine's own backends from the foreground's by it.
    match options.get_application_name() {
        Some(_) => options,
        None => options.application_name(APPLICATION_NAME),
    }
}

impl Database {
    /// Connects (starting the embedded server when nothing is configured) and applies migrations
    /// when `migrate` is set.
    pub async fn open(settings: &Settings, migrate: bool) -> anyhow::Result<Database> {
        let (url, embedded) = match configured_url(settings) {
            Some(url) => (url, None),
            None => {
                let local = start_embedded(settings).await?;
                (local.url(), Some(local))
            }
        };
        let options = url
            .parse::<PgConnectOptions>()
            .with_context(|| format!("parsing the database URL {}", redact(&url)))?;
        Database::connect(settings, options, &redact(&url), embedded, migrate).await
    }

    /// A database of its own, `database`, made afresh (an earlier one is dropped) on the server
    /// at `server_url`, or on the embedded server when that is `None`; migrated.
    pub async fn open_fresh(
        settings: &Settings,
        server_url: Option<&str>,
        database: &str,
    ) -> anyhow::Result<Database> {
        let (server, embedded) = match server_url {
            Some(url) => (url.to_string(), None),
            None => {
                let local = start_embedded(settings).await?;
                (local.url(), Some(local))
            }
        };
        let options = server
            .parse::<PgConnectOptions>()
            .with_context(|| format!("parsing the database URL {}", redact(&server)))?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.database.connect_timeout)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("connecting to the database at {}", redact(&server)))?;
        let made = async {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                .execute(&admin)
                .await?;
            sqlx::query(&format!("CREATE DATABASE {database}"))
                .execute(&admin)
                .await
        }
        .await;
        admin.close().await;
        made.with_context(|| format!("making the database {database} (the role needs CREATEDB)"))?;
        Database::connect(
            settings,
            options.database(database),
            &format!("{} (database {database})", redact(&server)),
            embedded,
            true,
        )
        .await
    }

    async fn connect(
        settings: &Settings,
        options: PgConnectOptions,
        shown: &str,
        embedded: Option<LocalPostgres>,
        migrate: bool,
    ) -> anyhow::Result<Database> {
        let options = session_options(options);
        let pool = PgPoolOptions::new()
            .max_connections(settings.database.max_connections)
            .acquire_timeout(settings.database.connect_timeout)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("connecting to the database at {shown}"))?;
        let lease_pool = PgPoolOptions::new()
            .max_connections(LEASE_CONNECTIONS)
            .acquire_timeout(settings.database.connect_timeout)
            .connect_lazy_with(options.clone());
        let readiness_pool = admin_pool(settings, options.clone(), 1);
        let http_pool = admin_pool(settings, options, settings.http.max_connections);
        if migrate {
            repository::MIGRATOR
                .run(&pool)
                .await
                .context("applying database migrations")?;
        }
        Ok(Database {
            pool,
            lease_pool,
            http_pool,
            readiness_pool,
            embedded,
        })
    }

    /// `options` with lease renewals on the keepers' own connections.
    pub fn run_options(&self, options: RunOptions) -> RunOptions {
        RunOptions {
            lease_pool: Some(self.lease_pool.clone()),
            ..options
        }
    }

    /// Closes the pools, then leaves the embedded server if there is one: it stops unless other
    /// engine processes still use it.
    pub async fn close(self) {
        self.pool.close().await;
        self.lease_pool.close().await;
        // A request abandoned at its deadline may still wait on its statement (up to
        // http.request_timeout): the process does not wait for it to stop.
        for pool in [&self.http_pool, &self.readiness_pool] {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), pool.close()).await;
        }
        if let Some(local) = self.embedded {
            let span = tracing::Span::current();
            match tokio::task::spawn_blocking(move || span.in_scope(|| local.stop())).await {
                Ok(Ok(local_postgres::Left::Stopped)) => {
                    tracing::info!("stopped the embedded PostgreSQL")
                }
                Ok(Ok(local_postgres::Left::StillInUse)) => {
                    tracing::info!("left the embedded PostgreSQL running for the other engine processes using it")
                }
                Ok(Err(error)) => tracing::warn!(%error, "stopping the embedded PostgreSQL"),
                Err(error) => tracing::warn!(%error, "stopping the embedded PostgreSQL"),
            }
        }
    }
}

/// An admin server's pool (`http.max_connections` connections for the page and the API, one for
/// `/readyz`): opened lazily, named
/// `<application_name>/http`, whose statements
/// PostgreSQL itself stops at `http.request_timeout` (a request that gave up leaves a query behind
/// for at most that long). The server's limit lets only that many requests at the database at once.
fn admin_pool(settings: &Settings, options: PgConnectOptions, connections: u32) -> PgPool {
    let timeout = settings.http.request_timeout;
    let name = format!(
        "{}{HTTP_APPLICATION_SUFFIX}",
        options.get_application_name().unwrap_or(APPLICATION_NAME)
    );
    let options = options
        .application_name(&name)
        .options([("statement_timeout", format!("{}ms", timeout.as_millis()))]);
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(timeout.min(settings.database.connect_timeout))
        .connect_lazy_with(options)
}

/// The database the settings name: `DATABASE_URL`, else `database.url`.
pub fn configured_url(settings: &Settings) -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .or(settings.database.url.clone())
}

/// Starts (or joins) the private PostgreSQL under `data_dir`.
async fn start_embedded(settings: &Settings) -> anyhow::Result<LocalPostgres> {
    let data_dir = settings.data_dir().join("postgres");
    tracing::info!(data_dir = %data_dir.display(), "no database configured; starting a private PostgreSQL");
    let options = local_postgres::Options::persistent(data_dir);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| LocalPostgres::start(options)))
        .await?
        .context("starting the embedded PostgreSQL (no DATABASE_URL or database.url is set)")
}

/// `engine migrate`.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let db = Database::open(settings, false).await?;
    let result = repository::MIGRATOR
        .run(&db.pool)
        .await
        .context("applying database migrations");
    let applied: Option<i64> = match result {
        Ok(()) => sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&db.pool)
            .await
            .ok(),
        Err(_) => None,
    };
    db.close().await;
    result?;
    output::line(format_args!(
        "migrations: {} applied, database is up to date",
        applied.unwrap_or(0)
    ))?;
    Ok(())
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::TestDatabase;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            super::redact("postgres:///db?host=/tmp"),
            "postgres:///db?host=/tmp"
        );
    }

    async fn settings_seen(options: PgConnectOptions) -> (String, String, String) {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(session_options(options))
            .await
            .unwrap();
        let seen = sqlx::query_as("SELECT current_setting('jit'), current_setting('application_name'), current_setting('work_mem')")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        seen
    }

    #[tokio::test]
    async fn the_engines_connections_have_no_jit_and_its_name_unless_the_url_names_them() {
        let db = TestDatabase::new().await;
        let url: PgConnectOptions = db.url.parse().unwrap();
        let (jit, name, _) = settings_seen(url).await;
        assert_eq!((jit.as_str(), name.as_str()), ("off", APPLICATION_NAME));

        // The URL's own name and startup options are kept beside the engine's.
        let separator = if db.url.contains('?') { '&' } else { '?' };
        let named: PgConnectOptions = format!(
            "{}{separator}application_name=billing&options=-c%20work_mem%3D7MB",
            db.url
        )
        .parse()
        .unwrap();
        let (jit, name, work_mem) = settings_seen(named).await;
        assert_eq!(
            (jit.as_str(), name.as_str(), work_mem.as_str()),
            ("off", "billing", "7MB")
        );
    }
}
