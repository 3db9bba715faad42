//! `engine payload put|get`: a task's payload stored and read back as the application would,
//! inline or in object storage (the object put first, then the row that names it: a crash in
//! between leaves an object no row names, which the `blobs` sweep deletes after its grace, never
//! a row pointing at nothing).

use std::io::{Read, Write};
use std::process::ExitCode;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use repository::payloads::{self, Content, Kind};
use retention_controller::storage::payload_key;
use serde_json::json;
use uuid::Uuid;

use crate::cli::PayloadCommand;
use crate::database::Database;
use crate::settings::Settings;

pub async fn payload(settings: &Settings, command: PayloadCommand) -> anyhow::Result<ExitCode> {
    match command {
        PayloadCommand::Put {
            tenant,
            task,
            task_inserted_at,
            kind,
            external,
            file,
        } => {
            // Refuse bad input before touching anything.
            let Ok(task_id) = Uuid::parse_str(&task) else {
                eprintln!("error: --task {task:?} is not a task id (a UUID)");
                return Ok(ExitCode::from(2));
            };
            let Ok(inserted_at) = DateTime::parse_from_rfc3339(&task_inserted_at) else {
                eprintln!("error: --task-inserted-at {task_inserted_at:?} is not an RFC 3339 instant (2026-12-01T10:00:00Z)");
                return Ok(ExitCode::from(2));
            };
            let inserted_at = inserted_at.with_timezone(&Utc);
            let kind = Kind::parse(&kind).expect("clap allows input and output only");
            let mut bytes = Vec::new();
            if file == "-" {
                std::io::stdin().read_to_end(&mut bytes)?;
            } else {
                bytes = std::fs::read(&file)
                    .map_err(|error| anyhow::anyhow!("reading {file}: {error}"))?;
            }
            let db = Database::open(settings, settings.database.migrate).await?;
            let result = async {
                let Some(tenant) = repository::tenants::find(&db.pool, &tenant).await? else {
                    anyhow::bail!("no tenant {tenant:?} (an id or a slug)");
                };
                let id = payloads::reserve_id(&db.pool).await?;
                let size = bytes.len() as i64;
                let content = if external {
                    let storage = settings.open_storage()?;
                    let key = payload_key(tenant.id, inserted_at.date_naive(), id);
                    storage
                        .put(&key, Bytes::from(bytes))
                        .await
                        .map_err(|error| anyhow::anyhow!("storing {key}: {error}"))?;
                    Content::External { key, size }
                } else {
                    Content::Inline(bytes)
                };
                payloads::insert(&db.pool, id, tenant.id, (task_id, inserted_at), kind, &content)
                    .await?;
                let (location, key) = match &content {
                    Content::Inline(_) => ("inline", None),
                    Content::External { key, .. } => ("external", Some(key.clone())),
                };
                println!(
                    "{}",
                    json!({"id": id, "tenant_id": tenant.id, "task_id": task_id, "task_inserted_at": inserted_at,
                           "kind": kind.as_str(), "location": location, "external_key": key, "size_bytes": size})
                );
                Ok(ExitCode::SUCCESS)
            }
            .await;
            db.close().await;
            result
        }
        PayloadCommand::Get { id, out } => {
            let db = Database::open(settings, settings.database.migrate).await?;
            let found = payloads::get(&db.pool, id).await;
            db.close().await;
            let Some(payload) = found? else {
                eprintln!("error: no payload {id}");
                return Ok(ExitCode::from(1));
            };
            let bytes: Vec<u8> = match (payload.inline_content, payload.external_key) {
                (Some(bytes), _) => bytes,
                (None, Some(key)) => settings
                    .open_storage()?
                    .get(&key)
                    .await
                    .map_err(|error| anyhow::anyhow!("reading {key}: {error}"))?
                    .ok_or_else(|| {
                        anyhow::anyhow!("payload {id}: its object {key} is missing from the store")
                    })?
                    .to_vec(),
                (None, None) => anyhow::bail!("payload {id} has neither bytes nor a key"),
            };
            match out {
                Some(path) => std::fs::write(&path, &bytes)
                    .map_err(|error| anyhow::anyhow!("writing {path}: {error}"))?,
                None => std::io::stdout().write_all(&bytes)?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
