//! The one rule on every path: the matrix of rows on both sides of every cutoff (each status's
//! window, held or not, deleted tenants within and past their grace, orphan events younger and
//! older than an hour, queue items), run against each path that deletes run history or decides
//! what a rewrite keeps, forced in turn. Every row meets exactly the fate written down for it.
//! (`rule_matrix_broken.rs` breaks the rule's hold check and expects every path to fail.)

#[path = "matrix/cases.rs"]
mod cases;
mod common;
mod matrix;

async fn exact(path: &str) {
    let (wrong, report) = cases::run(path).await;
    assert!(
        wrong.is_empty(),
        "{path}: rows that met the wrong fate: {wrong:#?}\n{report}"
    );
}

#[tokio::test]
async fn the_index_walk_follows_the_rule() {
    exact("index walk").await;
}

#[tokio::test]
async fn the_sweep_follows_the_rule() {
    exact("sweep").await;
}

#[tokio::test]
async fn the_purge_follows_the_rule() {
    exact("purge").await;
}

#[tokio::test]
async fn a_rewrite_follows_the_rule_for_rows_changed_in_its_catch_up() {
    exact("rewrite, rows changed in its catch-up").await;
}

#[tokio::test]
async fn a_rewrite_follows_the_rule_for_rows_changed_in_its_final_replay() {
    exact("rewrite, rows changed in its final replay").await;
}

#[tokio::test]
async fn a_merge_follows_the_rule() {
    exact("merge").await;
}

#[tokio::test]
async fn the_orphan_walk_follows_the_rule() {
    exact("orphan walk").await;
}

#[tokio::test]
async fn the_orphan_sweep_follows_the_rule() {
    exact("orphan sweep").await;
}

#[tokio::test]
async fn queue_item_cleanup_by_its_candidates_follows_the_rule() {
    exact("queue items by candidates").await;
}

#[tokio::test]
async fn queue_item_cleanup_by_its_heap_sweep_follows_the_rule() {
    exact("queue items by heap sweep").await;
}

#[test]
fn every_path_has_a_case() {
    assert_eq!(cases::PATHS.len(), 10);
}
