//! The process's log, on stderr: `log.format = "text"` (the default) for people, `"json"` for
//! log pipelines: one object per line, the event's fields at the top level beside `timestamp`,
//! `level`, `target` and `message`, and `spans`, from the outermost in, with theirs: `engine`
//! (`replica`), `retention_task` (`task`), `retention_run` (`task`, `run_id`) and `pair`
//! (`tenant`, `range`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Installs the subscriber; `RUST_LOG` wins over `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}
