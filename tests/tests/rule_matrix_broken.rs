//! The rule's hold check is one place: break it there (`repository::rule::testing`), and every
//! path deletes what holds cover. The switch is process-wide, so this file is a test process of its
//! own, and its one test takes the paths in turn.

#[path = "matrix/cases.rs"]
mod cases;
mod common;
mod matrix;

#[tokio::test]
async fn breaking_the_one_hold_check_breaks_every_path() {
    repository::rule::testing::break_the_hold_check(true);
    let mut unbroken = Vec::new();
    for path in cases::PATHS {
        let (wrong, _) = cases::run(path).await;
        // The path's own kind of row must be among those deleted: a task path's run also walks
        // orphans, which would fail it whatever the path itself checked.
        let own_kind = |v: &&String| match *path {
            "orphan walk" | "orphan sweep" => v.contains(": orphan"),
            "queue items by candidates" | "queue items by heap sweep" => v.contains("queue item"),
            _ => !v.contains(": orphan") && !v.contains("queue item of no task"),
        };
        if !wrong.iter().any(|v| own_kind(&v)) {
            unbroken.push(*path);
        } else {
            assert!(matrix::Matrix::only_held_rows_deleted(&wrong), "{path}: with the hold check broken, rows other than held ones met the wrong fate: {wrong:#?}");
        }
    }
    repository::rule::testing::break_the_hold_check(false);
    assert!(unbroken.is_empty(), "paths that kept held rows without the rule's hold check (they check holds elsewhere): {unbroken:?}");
}
