//! The rule's archive check is one place: break it there (`repository::rule::testing`), and
//! every path that deletes tasks deletes one that waits for its archive, and every orphan path
//! a row of an archived run that no archive holds. The switch is
//! process-wide, so this file is a test process of its own, and its one test takes the task
//! paths in turn.

#[path = "matrix/cases.rs"]
mod cases;
mod common;
mod matrix;

#[tokio::test]
async fn breaking_the_one_archive_check_breaks_every_task_path() {
    repository::rule::testing::break_the_archive_check(true);
    let mut unbroken = Vec::new();
    for path in cases::PATHS {
        // Queue items are not archived, and the purge has no live archiving tenant's rows:
        // their paths have nothing to break. The orphan paths keep the rows of an archived run
        // that retention deleted (written as the delete ran, in no archive).
        if path.starts_with("queue items") || *path == "purge" {
            continue;
        }
        let (wrong, _) = cases::run(path).await;
        if wrong.is_empty() {
            unbroken.push(*path);
        } else {
            assert!(
                matrix::Matrix::only_unarchived_rows_deleted(&wrong),
                "{path}: with the archive check broken, rows other than the one waiting for its archive met the wrong fate: {wrong:#?}"
            );
        }
    }
    repository::rule::testing::break_the_archive_check(false);
    assert!(
        unbroken.is_empty(),
        "paths that kept a task waiting for its archive without the rule's archive check: {unbroken:?}"
    );
}
