//! Measured costs of removing history (`retention_costs`): seconds per unit of each operation,
//! averaged over what runs observed, so the choice between row deletes and a rewrite follows the
//! database it runs on.

use sqlx::{PgExecutor, PgPool};

/// Every recorded average: (operation, seconds per unit).
pub async fn load(executor: impl PgExecutor<'_>) -> Result<Vec<(String, f64)>, sqlx::Error> {
    let rows = sqlx::query!("SELECT operation, seconds_per_row FROM retention_costs")
        .fetch_all(executor)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.operation, row.seconds_per_row))
        .collect())
}

/// Folds one observation into `operation`'s average: a fifth of its weight, or all of it for the
/// first observation.
pub async fn observe(
    pool: &PgPool,
    operation: &str,
    seconds_per_unit: f64,
) -> Result<(), sqlx::Error> {
    if !seconds_per_unit.is_finite() || seconds_per_unit <= 0.0 {
        return Ok(());
    }
    let mut tx = crate::batch::begin_bookkeeping(pool).await?;
    sqlx::query!(
        "INSERT INTO retention_costs AS c (operation, seconds_per_row, samples) VALUES ($1, $2, 1)
         ON CONFLICT (operation) DO UPDATE
             SET seconds_per_row = 0.8 * c.seconds_per_row + 0.2 * excluded.seconds_per_row, samples = c.samples + 1",
        operation,
        seconds_per_unit
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}
