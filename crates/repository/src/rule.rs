//! The retention rule for run history: which tasks, orphan events and queue items are due. This
//! is the one place it is written. Every statement that deletes run history, or decides what a
//! rewrite's copy keeps, takes it from here as SQL fragments whose values ([`Rule::now`], the
//! grace, the holds) are bound as parameters; no statement spells any part of it.
//!
//! * **Tasks** ([`Rule::task_due`]): a task of a deleted tenant is due once `deleted_at` is more
//!   than the grace (`retention.task_history.deleted_tenant_grace`) before `now`; a task of a live
//!   tenant once it is final (`succeeded`, `failed`, `cancelled`) and its `finished_at` (else
//!   `inserted_at`) is before `now` minus the window of its status (the status's own window, else
//!   `data_retention_period`; NULL or 1000 years and more: forever). A task whose tenant has no
//!   row is never due. A task goes with its events and queue items.
//! * **Orphan events** ([`Rule::orphan_due`]): an event whose task does not exist, created more
//!   than [`ORPHAN_AGE`] before `now` (its task may not be committed yet).
//! * **Queue items** ([`Rule::queue_item_due`]): an item whose tenant has `deleted_at` set, or
//!   whose task does not exist or is final.
//! * **Archives** ([`Rule::archive_pending`]): a task of a tenant that archives its status is
//!   due only once a written archive holds it as it is; its log lines stay with it
//!   ([`Rule::log_kept_for_archive`]).
//! * **Holds** ([`Rule::held`]) override all three: nothing of a tenant a hold covers, and nothing
//!   of a task with an id a hold names, while the hold is in force (not removed, `until` not
//!   passed at `now`).
//!
//! `now` is the run's checked clock (`retention_controller::clock_guard`), not the database's:
//! a statement never reads `now()` to decide.
//!
//! Tested: `tests/tests/rule_matrix.rs` runs one matrix of rows on both sides of every cutoff
//! against every path that deletes or copies, and against every path again with the hold check
//! broken here ([`testing::break_the_hold_check`]), where each must fail. Documented: the
//! "The rule" section of docs/architecture.md.
//!
//! Changes to what is due (a tenant's windows or `deleted_at`, a hold) bind every delete that
//! commits after them: see [`confirm`] for the protocol.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::PgInterval;
use uuid::Uuid;

use crate::sql::Fragment;
use crate::tenants::FinalStatus;

/// Orphan events (whose task does not exist) are kept this long: their task may not be committed yet.
pub const ORPHAN_AGE: Duration = Duration::from_secs(3600);

/// The final statuses, as an SQL list.
pub const FINAL: &str = "('succeeded', 'failed', 'cancelled')";
/// The active statuses, as an SQL list.
pub const ACTIVE: &str = "('queued', 'running')";

/// Which holds are in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holds {
    /// Those in `retention_holds` that are in force at the rule's `now`, read by each statement.
    Live,
    /// A recorded set: whole tenants, and task ids (a rewrite counts what it dropped by the holds
    /// in force when it swapped).
    Recorded {
        tenants: Vec<Uuid>,
        tasks: Vec<Uuid>,
    },
}

/// The holds in force at `now` (a fragment: a bound instant, or a column): the tenants held
/// whole and the tasks held, as two `uuid[]` expressions. The one place where a hold's being in
/// force is spelled: the live hold check ([`Rule::held`]) and the holds a rewrite records at its
/// instant for its count both take it from here.
pub fn holds_in_force(now: impl Fn() -> Fragment) -> [Fragment; 2] {
    if testing::hold_check_broken() {
        return [(), ()].map(|()| Fragment::text("ARRAY[]::uuid[]"));
    }
    [("tenant_id", "IS NULL"), ("task_id", "IS NOT NULL")].map(|(held, scope)| {
        Fragment::text(format!(
            "ARRAY (SELECT h.{held} FROM retention_holds h
                    WHERE h.task_id {scope} AND h.removed_at IS NULL AND (h.until IS NULL OR h.until > "
        ))
        .then(now())
        .push("))")
    })
}

/// The rule as of one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The instant the rule is evaluated at.
    pub now: DateTime<Utc>,
    /// How long a deleted tenant's history stays after its `deleted_at`.
    pub grace: Duration,
    pub holds: Holds,
}

/// An exact interval of `duration` (microseconds: no calendar arithmetic).
pub fn interval(duration: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: duration.as_micros().min(i64::MAX as u128) as i64,
    }
}

/// What an orphan row is: an event, a payload or a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependent {
    Events,
    Payloads,
    Logs,
}

impl Dependent {
    /// The column of `retention_archived_tasks` with the highest id of this kind archived.
    fn max_id_column(self) -> &'static str {
        match self {
            Dependent::Events => "max_event_id",
            Dependent::Payloads => "max_payload_id",
            Dependent::Logs => "max_log_id",
        }
    }
}

/// The tenants that archive (an uncorrelated subquery: an init plan, run once per statement).
pub(crate) const ARCHIVING_TENANTS: &str = "ARRAY (SELECT atn.id FROM tenants atn
                                      WHERE atn.archive_statuses <> '{}'
                                        AND (atn.deleted_at IS NULL OR atn.archive_deleted))";
/// Their (tenant, status) pairs archived, as `tenant/status` (an init plan too).
const ARCHIVING_PAIRS: &str = "ARRAY (SELECT atn.id::text || '/' || ats.status
                                    FROM tenants atn, unnest(atn.archive_statuses) AS ats(status)
                                    WHERE atn.deleted_at IS NULL OR atn.archive_deleted)";

impl Rule {
    pub fn new(now: DateTime<Utc>, grace: Duration) -> Rule {
        Rule {
            now,
            grace,
            holds: Holds::Live,
        }
    }

    /// Whether task `t` is due. `t` needs `id`, `tenant_id`, `status`, `finished_at` and
    /// `inserted_at`; `tn` is its tenant's row (NULL columns when it has none: LEFT JOIN) with
    /// `id`, `deleted_at` and the windows (`data_retention_period`, `succeeded_retention_period`,
    /// `failed_retention_period`, `cancelled_retention_period`): the `tenants` table, or anything
    /// with its columns (a preview's proposed windows, a rewrite's recorded ones). Never NULL.
    pub fn task_due(&self, t: &str, tn: &str) -> Fragment {
        Fragment::text("(")
            .then(self.task_due_unless_archiving(t, tn))
            .push(" AND NOT ")
            .then(self.archive_pending(t))
            .push(")")
    }

    /// [`Rule::task_due`] for tasks inserted within `[lower, upper)`, with `t`'s archive record
    /// joined by the caller as `ra` (see [`Rule::archive_pending_of`]): for statements over a
    /// chunk of a range, whose records the planner joins at once instead of looking them up
    /// task by task.
    pub fn task_due_with_record(
        &self,
        t: &str,
        tn: &str,
        ra: &str,
        lower: DateTime<Utc>,
        upper: DateTime<Utc>,
    ) -> Fragment {
        Fragment::text("(")
            .then(self.task_due_unless_archiving(t, tn))
            .push(" AND NOT ")
            .then(self.archive_pending_of(t, ra, lower, upper))
            .push(")")
    }

    /// Whether task `t`, of a rewrite's source range `[lower, upper)` (detached by its swap,
    /// its events in the detached table `events`), was dropped by the rewrite: due by the rule,
    /// and for a task its tenant archives by status, recorded as archived (`ra`, its record
    /// joined by the caller as in [`Rule::archive_pending_of`]) with the status and finish it
    /// has and as many events as the source holds (a run the copy or its replays kept for an
    /// event written after its archive differs), and absent from the live tables. What a
    /// rewrite's count counts. Decided from the record and the detached source only: the
    /// payloads and log lines of a dropped run may go by other rules before the count gets to it
    /// (orphans, the log window), and that must not change what it counts. Not told apart: a
    /// run the copy kept only for a payload or log line written after its archive, and that the
    /// application deleted between the swap and the count, is counted. The live lookup names the
    /// range, so it reads the one partition (pruned once per statement, not once per task).
    pub fn task_dropped(
        &self,
        t: &str,
        tn: &str,
        ra: &str,
        events: &str,
        lower: DateTime<Utc>,
        upper: DateTime<Utc>,
    ) -> Fragment {
        Fragment::text("(")
            .then(self.task_due_unless_archiving(t, tn))
            .push(format!(
                " AND NOT coalesce(CASE WHEN {t}.tenant_id = ANY ({tenants})
                                   THEN ({t}.tenant_id::text || '/' || {t}.status) = ANY ({pairs})
                                        AND NOT (CASE WHEN {ra}.task_id IS NULL OR {ra}.status <> {t}.status
                                                           OR {ra}.finished_at IS DISTINCT FROM {t}.finished_at THEN false
                                                      ELSE {ra}.events = (SELECT count(*) FROM {events} de
                                                                          WHERE de.task_id = {t}.id AND de.task_inserted_at = {t}.inserted_at)
                                                           AND NOT EXISTS (SELECT 1 FROM tasks lt
                                                                           WHERE lt.id = {t}.id AND lt.inserted_at = {t}.inserted_at
                                                                             AND lt.inserted_at >= ",
                tenants = ARCHIVING_TENANTS,
                pairs = ARCHIVING_PAIRS,
            ))
            .bind(lower)
            .push(" AND lt.inserted_at < ")
            .bind(upper)
            .push(
                ") END)
                                   ELSE false END, true))",
            )
    }

    /// Whether task `t`'s tenant archives tasks of its status now (`tenants.archive_statuses`;
    /// a deleted tenant only with `archive_deleted`). Never NULL.
    pub fn archives_status(&self, t: &str) -> Fragment {
        Fragment::text(format!(
            "coalesce(({t}.tenant_id::text || '/' || {t}.status) = ANY ({ARCHIVING_PAIRS}), false)"
        ))
    }

    /// [`Rule::task_due`] but for the archive check: what the archiving writes (a task due by its
    /// window, not held), before its archive lets it go.
    pub fn task_due_unless_archiving(&self, t: &str, tn: &str) -> Fragment {
        Fragment::text(format!(
            "(coalesce(CASE WHEN {tn}.id IS NULL THEN false
                           WHEN {tn}.deleted_at IS NOT NULL THEN {tn}.deleted_at < "
        ))
        .bind(self.now)
        .push(" - ")
        .bind(interval(self.grace))
        .push(format!(
            "
                           ELSE {t}.status IN {FINAL} AND coalesce({t}.finished_at, {t}.inserted_at) < "
        ))
        .then(self.cutoff(&format!("{t}.status"), tn))
        .push(" END, false) AND NOT ")
        .then(self.held(&format!("{t}.tenant_id"), &format!("{t}.id")))
        .push(")")
    }

    /// Whether task `t` (with `id`, `tenant_id`, `status`, `inserted_at`, `finished_at`) waits
    /// for its archive: its tenant archives tasks of its status (`tenants.archive_statuses`; a
    /// deleted tenant only with `archive_deleted`) and no written archive holds it as it is now
    /// (`retention_archived_tasks`: same status and finish, as many events, payloads and log
    /// lines; one changed since waits for a new archive). Until then the task is not due, on
    /// every path.
    ///
    /// Read from the live `tenants` whatever the windows' source is (a preview's or a rewrite's
    /// recorded windows have no archive columns); an archive committed does not move the rules' version
    /// (it only makes rows due: whatever read the rules before it deletes less, never more).
    /// The archiving tenants, and their (tenant, status) pairs, are uncorrelated init plans:
    /// another tenant's row pays one array lookup, and only a task recorded as archived pays the
    /// three counts. Never NULL (an unknown answer is "waits").
    pub fn archive_pending(&self, t: &str) -> Fragment {
        Self::pending_unless(
            t,
            Fragment::text(format!(
                "EXISTS (SELECT 1 FROM retention_archived_tasks ra
                         WHERE ra.task_inserted_at = {t}.inserted_at AND ra.task_id = {t}.id AND "
            ))
            .then(Self::record_holds(t, "ra", None))
            .push(")"),
        )
    }

    /// [`Rule::archive_pending`] with `t`'s record in `retention_archived_tasks` joined by the
    /// caller as `ra` (`LEFT JOIN retention_archived_tasks ra ON ra.task_inserted_at =
    /// t.inserted_at AND ra.task_id = t.id`, NULL columns when it has none), for tasks inserted
    /// within `[lower, upper)` (the counts then read one partition of each table, pruned once
    /// per statement). Only a task whose record has its status and finish pays the counts.
    pub fn archive_pending_of(
        &self,
        t: &str,
        ra: &str,
        lower: DateTime<Utc>,
        upper: DateTime<Utc>,
    ) -> Fragment {
        Self::pending_unless(t, Self::record_holds(t, ra, Some((lower, upper))))
    }

    /// Whether task `t` waits for its archive, `archived` saying whether a written archive holds
    /// it as it is: [`Rule::archive_pending`] and [`Rule::archive_pending_of`] differ only in
    /// how they find the record.
    fn pending_unless(t: &str, archived: Fragment) -> Fragment {
        if testing::archive_check_broken() {
            return Fragment::text("false");
        }
        Fragment::text(format!(
            "coalesce(CASE WHEN {t}.tenant_id = ANY ({ARCHIVING_TENANTS})
                          THEN ({t}.tenant_id::text || '/' || {t}.status) = ANY ({ARCHIVING_PAIRS})
                               AND NOT "
        ))
        .then(archived)
        .push(
            "
                          ELSE false END, true)",
        )
    }

    /// Whether record `ra` (NULL columns: none) holds task `t` as it is now: the same status and
    /// finish, and as many events, payloads and log lines (counted within `range`, the task's
    /// `inserted_at` bounds when the caller knows them: one partition read). Only a record with
    /// the task's status and finish pays the counts. Never NULL.
    fn record_holds(t: &str, ra: &str, range: Option<(DateTime<Utc>, DateTime<Utc>)>) -> Fragment {
        let mut f = Fragment::text(format!(
            "(CASE WHEN {ra}.task_id IS NULL OR {ra}.status <> {t}.status
                        OR {ra}.finished_at IS DISTINCT FROM {t}.finished_at THEN false
                   ELSE true"
        ));
        for (table, alias, column) in [
            ("task_events", "ae", "events"),
            ("task_payloads", "ap", "payloads"),
            ("task_logs", "al", "logs"),
        ] {
            f = f.push(format!(
                "
                        AND {ra}.{column} = (SELECT count(*) FROM {table} {alias}
                                             WHERE {alias}.task_id = {t}.id AND {alias}.task_inserted_at = {t}.inserted_at"
            ));
            if let Some((lower, upper)) = range {
                f = f
                    .push(format!(" AND {alias}.task_inserted_at >= "))
                    .bind(lower)
                    .push(format!(" AND {alias}.task_inserted_at < "))
                    .bind(upper);
            }
            f = f.push(")");
        }
        f.push(" END)")
    }

    /// Whether orphan `o` (a row of `kind` with `id`, `tenant_id`, `task_id`,
    /// `task_inserted_at`) belongs to a run its archiving tenant had archived, and is not in the
    /// archive (its id is above the highest the file holds): written as the run's delete ran,
    /// after its snapshot. Such rows are kept, by every orphan rule, and counted
    /// (`archives::late_rows`): nothing leaves without its archive. A row the archive holds (its
    /// run deleted by the application) goes as any orphan.
    pub fn orphan_of_archived(&self, o: &str, kind: Dependent) -> Fragment {
        if testing::archive_check_broken() {
            return Fragment::text("false");
        }
        let max = kind.max_id_column();
        Fragment::text(format!(
            "coalesce({o}.tenant_id = ANY ({ARCHIVING_TENANTS})
                      AND EXISTS (SELECT 1 FROM retention_archived_tasks ra
                                  WHERE ra.task_inserted_at = {o}.task_inserted_at AND ra.task_id = {o}.task_id
                                    AND {o}.id > coalesce(ra.{max}, 0)), true)"
        ))
    }

    /// Whether log line `l` (with `id`, `tenant_id`, `task_id`, `task_inserted_at`) belongs to a
    /// task its tenant archives by status: such lines stay until their task goes (they are in its
    /// archive), whatever the log window; and so does a line written to an archived run as it
    /// was deleted (in no archive: see [`Rule::orphan_of_archived`]). Lines of a task still
    /// running go by the log window.
    pub fn log_kept_for_archive(&self, l: &str) -> Fragment {
        if testing::archive_check_broken() {
            return Fragment::text("false");
        }
        Fragment::text(format!(
            "coalesce(CASE WHEN {l}.tenant_id = ANY ({ARCHIVING_TENANTS})
                          THEN EXISTS (SELECT 1 FROM tasks alt
                                       WHERE alt.id = {l}.task_id AND alt.inserted_at = {l}.task_inserted_at
                                         AND (alt.tenant_id::text || '/' || alt.status) = ANY ({ARCHIVING_PAIRS}))
                               OR EXISTS (SELECT 1 FROM retention_archived_tasks alr
                                          WHERE alr.task_inserted_at = {l}.task_inserted_at AND alr.task_id = {l}.task_id
                                            AND {l}.id > coalesce(alr.max_log_id, 0)
                                            AND NOT EXISTS (SELECT 1 FROM tasks alg
                                                            WHERE alg.id = {l}.task_id AND alg.inserted_at = {l}.task_inserted_at))
                          ELSE false END, true)"
        ))
    }

    /// Whether tenant `tn` was deleted longer ago than the grace (every task of it is then due,
    /// but what a hold covers): what plans and probes look for. NULL when `tn` has no row or is
    /// live.
    pub fn tenant_purged(&self, tn: &str) -> Fragment {
        Fragment::text(format!("({tn}.deleted_at < "))
            .bind(self.now)
            .push(" - ")
            .bind(interval(self.grace))
            .push(")")
    }

    /// Whether task `t` is kept: `NOT` [`Rule::task_due`].
    pub fn task_kept(&self, t: &str, tn: &str) -> Fragment {
        Fragment::text("NOT ").then(self.task_due(t, tn))
    }

    /// The instant before which a final task whose status is the SQL expression `status` is due
    /// under tenant `tn`'s windows ('-infinity': kept forever).
    pub fn cutoff(&self, status: &str, tn: &str) -> Fragment {
        let window = window(status, tn);
        Fragment::text(format!("(CASE WHEN {window} IS NULL OR {window} >= interval '1000 years' THEN '-infinity'::timestamptz ELSE "))
            .bind(self.now)
            .push(format!(" - {window} END)"))
    }

    /// [`Rule::cutoff`] for one status.
    pub fn status_cutoff(&self, status: FinalStatus, tn: &str) -> Fragment {
        self.cutoff(&format!("'{}'", status.as_str()), tn)
    }

    /// Whether event `e` is an orphan, its task absent from `tasks` (a table or partition of tasks
    /// holding every task of the event's instant), old enough to go and not held.
    pub fn orphan_due(&self, e: &str, tasks: &str) -> Fragment {
        self.orphan_due_of(Dependent::Events, e, tasks)
    }

    /// [`Rule::orphan_due`] for a row of `kind` (payloads and log lines have the same rule).
    pub fn orphan_due_of(&self, kind: Dependent, e: &str, tasks: &str) -> Fragment {
        Fragment::text(orphan(e, tasks))
            .push(" AND ")
            .then(self.orphan_expired(e, kind))
    }

    /// Whether event `e`, an orphan, is kept: too young, or held.
    pub fn orphan_kept(&self, e: &str, tasks: &str) -> Fragment {
        Fragment::text(orphan(e, tasks))
            .push(" AND NOT ")
            .then(self.orphan_expired(e, Dependent::Events))
    }

    /// Whether event `e` is too young to be an orphan by the rule: its task may not be committed
    /// yet. (An orphan walk never passes such an event; one that is held, it passes.)
    pub fn orphan_young(&self, e: &str) -> Fragment {
        Fragment::text(format!("({e}.created_at >= "))
            .bind(self.now)
            .push(" - ")
            .bind(interval(ORPHAN_AGE))
            .push(")")
    }

    /// The cutoff of tenant `tn`'s shortest window: no final task finished at or after it is due
    /// ('-infinity' when every window keeps forever). An index bound for walks.
    pub fn shortest_cutoff(&self, tn: &str) -> Fragment {
        let shortest = format!("{tn}.shortest_retention_period");
        Fragment::text(format!("(CASE WHEN {shortest} IS NULL OR {shortest} >= interval '1000 years' THEN '-infinity'::timestamptz ELSE "))
            .bind(self.now)
            .push(format!(" - {shortest} END)"))
    }

    /// The orphan rule's age and hold, for an event known to be an orphan.
    fn orphan_expired(&self, e: &str, kind: Dependent) -> Fragment {
        Fragment::text(format!("({e}.created_at < "))
            .bind(self.now)
            .push(" - ")
            .bind(interval(ORPHAN_AGE))
            .push(" AND NOT ")
            .then(self.held(&format!("{e}.tenant_id"), &format!("{e}.task_id")))
            .push(" AND NOT ")
            .then(self.orphan_of_archived(e, kind))
            .push(")")
    }

    /// Whether queue item `q` is due: its tenant is deleted, or its task is gone or final; and no
    /// hold covers it.
    pub fn queue_item_due(&self, q: &str) -> Fragment {
        Fragment::text(format!(
            "((EXISTS (SELECT 1 FROM tenants qtn WHERE qtn.id = {q}.tenant_id AND qtn.deleted_at IS NOT NULL)
               OR NOT EXISTS (SELECT 1 FROM tasks qt WHERE qt.id = {q}.task_id AND qt.inserted_at = {q}.task_inserted_at
                                AND qt.status NOT IN {FINAL}))
              AND NOT "
        ))
        .then(self.held(&format!("{q}.tenant_id"), &format!("{q}.task_id")))
        .push(")")
    }

    /// Whether log line `l` (with `created_at`, `tenant_id`, `task_id`) is due by the log window:
    /// older than tenant `tn`'s `log_retention_period`, else `default_window`
    /// (`retention.task_logs.max_age`), and no hold covers its task. Log lines also leave with
    /// their task, whatever their age.
    pub fn log_due(&self, l: &str, tn: &str, default_window: Duration) -> Fragment {
        Fragment::text(format!("({l}.created_at < "))
            .then(self.log_cutoff(tn, default_window))
            .push(" AND NOT ")
            .then(self.held(&format!("{l}.tenant_id"), &format!("{l}.task_id")))
            .push(" AND NOT ")
            .then(self.log_kept_for_archive(l))
            .push(")")
    }

    /// The instant before which tenant `tn`'s log lines are due by the log window.
    pub fn log_cutoff(&self, tn: &str, default_window: Duration) -> Fragment {
        Fragment::text("(")
            .bind(self.now)
            .push(format!(" - coalesce({tn}.log_retention_period, "))
            .bind(interval(default_window))
            .push("))")
    }

    /// Whether a hold covers the task `task` of tenant `tenant` (SQL expressions; `task` NULL: the
    /// whole tenant) at `now`. The one hold check: every part of the rule, and the planning that
    /// leaves held tenants alone, go through it. The holds in force are read once per use (two
    /// arrays, uncorrelated subqueries the planner runs once: init plans); each row then costs
    /// two array lookups, and with no holds nothing. (A correlated EXISTS cost a subplan call per
    /// row: 1.1M rows copied by a rewrite took 40% longer. A SQL function with a subquery is not
    /// inlined.) Never NULL.
    pub fn held(&self, tenant: &str, task: &str) -> Fragment {
        let (tenants, tasks) = match &self.holds {
            Holds::Live => {
                let [tenants, tasks] = holds_in_force(|| Fragment::value(self.now));
                (tenants, tasks)
            }
            Holds::Recorded { tenants, tasks } => (
                Fragment::value(tenants.clone()).push("::uuid[]"),
                Fragment::value(tasks.clone()).push("::uuid[]"),
            ),
        };
        Fragment::text(format!("coalesce({tenant} = ANY ("))
            .then(tenants)
            .push(format!(") OR {task} = ANY ("))
            .then(tasks)
            .push("), false)")
    }

    /// Whether a hold covers the whole of tenant `tenant` at `now`.
    pub fn tenant_held(&self, tenant: &str) -> Fragment {
        self.held(tenant, "NULL::uuid")
    }

    /// When the facts of tenant `tn` (a `tenants` row) in a range first say something may be due,
    /// given the oldest final task of each status there (SQL expressions `oldest_succeeded`,
    /// `oldest_failed`, `oldest_cancelled`): the earliest of each status's oldest plus its window;
    /// while a hold covers the whole tenant, not before it ends (NULL, never by time, while one
    /// without an end does). NULL for a deleted tenant (found by its `deleted_at`) or one keeping
    /// everything forever. Never later than the rule first holds for one of those tasks.
    pub fn next_due(&self, tn: &str, oldest: [&str; 3]) -> Fragment {
        let by_window = FinalStatus::ALL
            .iter()
            .zip(oldest)
            .map(|(status, oldest)| {
                let window = window(&format!("'{}'", status.as_str()), tn);
                format!("CASE WHEN {window} < interval '1000 years' THEN {oldest} + {window} END")
            })
            .collect::<Vec<_>>()
            .join(", ");
        Fragment::text(format!("(CASE WHEN {tn}.id IS NULL OR {tn}.deleted_at IS NOT NULL THEN NULL WHEN "))
            .then(self.tenant_held(&format!("{tn}.id")))
            .push(format!(
                " THEN CASE WHEN EXISTS (SELECT 1 FROM retention_holds h WHERE h.tenant_id = {tn}.id AND h.task_id IS NULL
                                           AND h.removed_at IS NULL AND h.until IS NULL) THEN NULL
                            ELSE greatest(least({by_window}),
                                          (SELECT max(h.until) FROM retention_holds h WHERE h.tenant_id = {tn}.id
                                             AND h.task_id IS NULL AND h.removed_at IS NULL))
                       END
                   ELSE least({by_window}) END)"
            ))
    }
}

/// Whether event `e`'s task is absent from `tasks`.
fn orphan(e: &str, tasks: &str) -> String {
    format!("NOT EXISTS (SELECT 1 FROM {tasks} ot WHERE ot.id = {e}.task_id AND ot.inserted_at = {e}.task_inserted_at)")
}

/// The window of a task whose status is the SQL expression `status`, under tenant `tn`'s settings
/// (NULL: forever; so is 1000 years or more).
fn window(status: &str, tn: &str) -> String {
    format!(
        "(CASE {status} WHEN 'succeeded' THEN coalesce({tn}.succeeded_retention_period, {tn}.data_retention_period)
                        WHEN 'failed' THEN coalesce({tn}.failed_retention_period, {tn}.data_retention_period)
                        WHEN 'cancelled' THEN coalesce({tn}.cancelled_retention_period, {tn}.data_retention_period) END)"
    )
}

/// The rules' version as the statement that reads it sees it: every deleting statement returns
/// it, and its transaction commits only through [`confirm`].
pub const VERSION: &str = "(SELECT version FROM retention_rules)";

/// The commit side of the rules' lock protocol, in the deleting transaction, right before its
/// commit: fails with SQLSTATE 40001 (serialization failure: roll back and run the batch again)
/// unless the rules are still at `seen` (the version the deleting statements read in their own
/// snapshot) and no change of them is in progress; otherwise it holds the rules' lock (shared)
/// until the commit.
///
/// Every change of what is due (a tenant's windows or `deleted_at`, a tenant added or removed, a
/// hold added or removed) takes the rules' lock exclusively, in a trigger, and moves the version,
/// both in its own transaction. So a change either committed before this check (the version
/// moved: the batch is run again and sees it), is in progress (it holds the lock: ditto), or
/// waits for the batch's commit: once a change has committed, no delete that commits after it
/// ignores it. The check never waits for anything, so it cannot close a cycle of waits with a
/// change in progress.
pub async fn confirm(conn: &mut sqlx::PgConnection, seen: i64) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT retention_rules_unchanged($1)", seen)
        .execute(conn)
        .await?;
    Ok(())
}

/// Switches for tests that prove the rule is used everywhere.
pub mod testing {
    #[cfg(feature = "testing")]
    static HOLD_CHECK_BROKEN: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    /// Makes [`super::holds_in_force`] find no hold in force (every statement built from then
    /// on), so that [`super::Rule::held`] says "not held" for everything, live or as a rewrite
    /// recorded it at its swap: to show that each path's hold check is that one. With it broken,
    /// each path deletes what holds cover. Only in builds with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn break_the_hold_check(broken: bool) {
        HOLD_CHECK_BROKEN.store(broken, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(feature = "testing")]
    static ARCHIVE_CHECK_BROKEN: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    /// Makes [`super::Rule::archive_pending`] say "archived" for everything, to show that each
    /// path's archive check is that one. Only in builds with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn break_the_archive_check(broken: bool) {
        ARCHIVE_CHECK_BROKEN.store(broken, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn archive_check_broken() -> bool {
        #[cfg(feature = "testing")]
        {
            ARCHIVE_CHECK_BROKEN.load(std::sync::atomic::Ordering::SeqCst)
        }
        #[cfg(not(feature = "testing"))]
        {
            false
        }
    }

    pub(super) fn hold_check_broken() -> bool {
        #[cfg(feature = "testing")]
        {
            HOLD_CHECK_BROKEN.load(std::sync::atomic::Ordering::SeqCst)
        }
        #[cfg(not(feature = "testing"))]
        {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_of_the_rule_is_bound_never_spliced() {
        let rule = Rule::new(Utc::now(), Duration::from_secs(86_400));
        let text = format!("{:?}", rule.task_due("t", "tn"));
        assert!(!text.contains("now()"), "{text}");
        assert!(
            text.contains("t.tenant_id = ANY") && text.contains("h.until > $?"),
            "{text}"
        );
    }
}
