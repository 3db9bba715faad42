//! `engine`: loads the settings, opens the database (the configured one, or a private local
//! PostgreSQL) and runs a command.

mod archive;
mod chart;
mod cli;
mod database;
mod demo;
mod hold;
mod http;
mod http_limits;
mod http_listener;
mod logging;
mod openapi;
mod output;
mod payload;
mod progress;
mod retention;
mod serve;
mod settings;
mod shutdown;
mod status;
mod status_page;
mod tenant;

use std::process::ExitCode;

use clap::Parser;
use retention_controller::telemetry;
use tracing::Instrument;

use crate::cli::{Cli, Command, RetentionCommand, TenantCommand};
use crate::settings::Settings;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            // The settings did not load, so neither did `log.format`; a pipeline that asked for
            // JSON in the environment still gets the reason as one object.
            if std::env::var("ENGINE__LOG__FORMAT").is_ok_and(|format| format == "json") {
                eprintln!(
                    "{}",
                    serde_json::json!({
                        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                        "level": "ERROR",
                        "message": "the settings were refused",
                        "error": error.to_string(),
                    })
                );
            } else {
                eprintln!("error: {error}");
            }
            return ExitCode::from(2);
        }
    };
    // The demo's own output says what happens; its logs only what went wrong.
    let default_filter = if matches!(cli.command, Command::Demo { .. }) {
        "warn,sqlx=error"
    } else {
        "info,sqlx=warn"
    };
    logging::init(settings.log.format, default_filter);
    telemetry::configure(
        settings.metrics.tenant_series as usize,
        settings.metrics.replica.clone(),
    );
    // Every log line of the process carries the replica (a field of this span in JSON logs).
    let process = tracing::info_span!("engine", replica = telemetry::replica_label());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(
        async {
            match cli.command {
                Command::Migrate => database::migrate(&settings)
                    .await
                    .map(|()| ExitCode::SUCCESS),
                Command::Serve => serve::serve(&settings).await.map(|()| ExitCode::SUCCESS),
                Command::Demo {
                    scale,
                    database_url,
                } => demo::demo(&settings, scale, database_url.as_deref()).await,
                Command::Retention(RetentionCommand::Run {
                    tasks,
                    dry_run,
                    pace,
                    json,
                }) => retention::run(&settings, &tasks, dry_run, pace, json).await,
                Command::Retention(RetentionCommand::Pause { task }) => {
                    retention::set_paused(&settings, &task, true).await
                }
                Command::Retention(RetentionCommand::Resume { task }) => {
                    retention::set_paused(&settings, &task, false).await
                }
                Command::Retention(RetentionCommand::Status { json }) => {
                    retention::status(&settings, json).await
                }
                Command::Retention(RetentionCommand::Receipts {
                    tenant,
                    since,
                    limit,
                    json,
                }) => {
                    retention::receipts(&settings, tenant.as_deref(), since.as_deref(), limit, json)
                        .await
                }
                Command::Tenant(TenantCommand::Retention(command)) => {
                    tenant::retention(&settings, command).await
                }
                Command::Hold(command) => hold::hold(&settings, command).await,
                Command::Payload(command) => payload::payload(&settings, command).await,
                Command::Archive(command) => archive::archive(&settings, command).await,
                Command::Tenant(TenantCommand::Archive(command)) => {
                    archive::tenant_archive(&settings, command).await
                }
            }
        }
        .instrument(process.clone()),
    );
    match result {
        Ok(code) => code,
        // `engine retention status | head -1`: the reader took what it wanted.
        Err(error) if output::reader_gone(&error) => ExitCode::SUCCESS,
        // A log pipeline reads JSON objects only: the error that ends the process is one too.
        Err(error) if settings.log.format == settings::LogFormat::Json => {
            process
                .in_scope(|| tracing::error!(error = format!("{error:#}"), "the command failed"));
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
