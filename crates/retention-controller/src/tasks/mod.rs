//! The maintenance tasks. Adding one: a module here implementing
//! [`MaintenanceTask`](crate::MaintenanceTask), its settings in [`crate::settings`], and a line
//! in [`all`].

use std::sync::Arc;

use crate::settings::RetentionSettings;
use crate::task::MaintenanceTask;

pub mod sessions;

/// Every task, built from the settings, in the order `engine retention run` runs them.
pub fn all(settings: &RetentionSettings) -> Vec<Arc<dyn MaintenanceTask>> {
    vec![Arc::new(sessions::SessionsTask::new(settings.sessions.clone()))]
}

/// The names `engine retention run --task` accepts.
pub fn names(settings: &RetentionSettings) -> Vec<&'static str> {
    all(settings).iter().map(|task| task.name()).collect()
}
