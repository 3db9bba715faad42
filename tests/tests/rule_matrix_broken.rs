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
        if wrong.is_empty() {
            unbroken.push(*path);
        } else {
            assert!(matrix::Matrix::only_held_rows_deleted(&wrong), "{path}: with the hold check broken, rows other than held ones met the wrong fate: {wrong:#?}");
        }
    }
    repository::rule::testing::break_the_hold_check(false);
    assert!(unbroken.is_empty(), "paths that kept held rows without the rule's hold check (they check holds elsewhere): {unbroken:?}");
}
