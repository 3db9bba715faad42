//! The maintenance tasks. Adding one: a module here implementing
//! [`MaintenanceTask`](crate::MaintenanceTask), its settings in [`crate::settings`], and a line
//! in [`all`].

use std::sync::Arc;

use crate::settings::RetentionSettings;
use crate::storage::{Storage, StorageSettings};
use crate::task::MaintenanceTask;

pub mod blobs;
pub mod partitions;
pub mod queue_items;
pub mod sessions;
pub mod task_history;

/// Every task, built from the settings, in the order `engine retention run` runs them. `blobs`
/// needs the object store (`storage`: it and its settings): without one it is left out (tests
/// of the database alone).
pub fn all(
    settings: &RetentionSettings,
    storage: Option<(Arc<Storage>, &StorageSettings)>,
) -> Vec<Arc<dyn MaintenanceTask>> {
    let mut history = task_history::TaskHistoryTask::new(settings.task_history.clone())
        .with_compaction_lock_timeout(settings.partitions.lock_timeout)
        .with_orphan_sweep_interval(settings.queue_items.sweep_interval)
        .with_log_window(settings.task_logs.max_age);
    if let Some((storage, _)) = &storage {
        history = history.with_archive_storage(storage.clone());
    }
    let mut tasks: Vec<Arc<dyn MaintenanceTask>> = vec![
        Arc::new(partitions::PartitionsTask::new(
            settings.partitions.clone(),
            settings.task_history.deleted_tenant_grace,
        )),
        Arc::new(history),
        Arc::new(queue_items::QueueItemsTask::new(
            settings.queue_items.clone(),
        )),
        Arc::new(sessions::SessionsTask::new(settings.sessions.clone())),
    ];
    if let Some((storage, storage_settings)) = storage {
        tasks.push(Arc::new(
            blobs::BlobsTask::new(settings.blobs.clone(), storage).with_sweep(
                storage_settings.orphan_grace,
                storage_settings.sweep_dry_run,
            ),
        ));
    }
    tasks
}

/// Every task's name, in the order of [`all`]: what `engine retention run --task` accepts.
pub const NAMES: &[&str] = &[
    partitions::NAME,
    task_history::NAME,
    queue_items::NAME,
    sessions::NAME,
    blobs::NAME,
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_list_every_task_in_order() {
        let names: Vec<&str> = super::all(
            &Default::default(),
            Some((
                std::sync::Arc::new(
                    crate::storage::Storage::open(
                        &Default::default(),
                        &std::env::temp_dir().join("engine-names-test"),
                    )
                    .unwrap(),
                ),
                &Default::default(),
            )),
        )
        .iter()
        .map(|task| task.name())
        .collect();
        assert_eq!(names, super::NAMES);
    }
}
