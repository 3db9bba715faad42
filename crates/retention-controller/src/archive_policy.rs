//! A tenant's archive policy as the operator writes it (`engine tenant archive set`, the admin
//! API): which final statuses are archived before their runs are deleted, and how long the
//! archives are kept.

use std::time::Duration;

use repository::tenants::FinalStatus;

/// The shortest time archives may be kept.
pub const MIN_ARCHIVE_RETENTION: Duration = Duration::from_secs(86_400);
/// The longest written as a duration (longer: `forever`).
pub const MAX_ARCHIVE_RETENTION: Duration = Duration::from_secs(100 * 365 * 86_400);
/// How long archives are kept unless the tenant says otherwise.
pub const DEFAULT_ARCHIVE_RETENTION: Duration = Duration::from_secs(365 * 86_400);

/// What may be written for the statuses.
pub const ALLOWED_STATUSES: &str =
    "off, on (every final status), or final statuses separated by commas (succeeded, failed, cancelled), e.g. failed or failed,cancelled";
/// What may be written for the retention.
pub const ALLOWED_RETENTION: &str =
    "a duration from 1day to 100years (\"1year\", \"90days\") or forever";

/// A value refused, saying what was wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}; allowed: {allowed}")]
pub struct PolicyError {
    pub what: &'static str,
    pub value: String,
    pub reason: String,
    pub allowed: &'static str,
}

/// The statuses archived: empty is `off`. In the order of [`FinalStatus::ALL`], each once.
pub fn parse_statuses(value: &str) -> Result<Vec<FinalStatus>, PolicyError> {
    let invalid = |reason: String| PolicyError {
        what: "archive",
        value: value.to_string(),
        reason,
        allowed: ALLOWED_STATUSES,
    };
    let text = value.trim();
    match text.to_ascii_lowercase().as_str() {
        "" => return Err(invalid("it is empty".into())),
        "off" => return Ok(Vec::new()),
        "on" => return Ok(FinalStatus::ALL.to_vec()),
        _ => {}
    }
    let mut chosen = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let status = FinalStatus::parse(&part.to_ascii_lowercase()).ok_or_else(|| {
            invalid(if part.is_empty() {
                "a status between the commas is empty".to_string()
            } else {
                format!("{part:?} is not a final status")
            })
        })?;
        if chosen.contains(&status) {
            return Err(invalid(format!("{part:?} is named twice")));
        }
        chosen.push(status);
    }
    Ok(FinalStatus::ALL
        .into_iter()
        .filter(|status| chosen.contains(status))
        .collect())
}

/// The statuses as the engine shows them: `off`, `on`, or the list.
pub fn describe_statuses(statuses: &[FinalStatus]) -> String {
    if statuses.is_empty() {
        "off".to_string()
    } else if statuses.len() == FinalStatus::ALL.len() {
        "on".to_string()
    } else {
        statuses
            .iter()
            .map(|status| status.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How long archives are kept: `None` is forever.
pub fn parse_retention(value: &str) -> Result<Option<Duration>, PolicyError> {
    let invalid = |reason: &str| PolicyError {
        what: "archive retention",
        value: value.to_string(),
        reason: reason.to_string(),
        allowed: ALLOWED_RETENTION,
    };
    let text = value.trim();
    if text.eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    if text.starts_with('-') {
        return Err(invalid("it is negative"));
    }
    let duration =
        humantime::parse_duration(text).map_err(|e| invalid(&format!("not a duration ({e})")))?;
    if duration < MIN_ARCHIVE_RETENTION {
        Err(invalid("it is below 1 day"))
    } else if duration > MAX_ARCHIVE_RETENTION {
        Err(invalid("it is above 100 years"))
    } else {
        Ok(Some(duration))
    }
}

/// Whether a deleted tenant's runs are archived (`archive_deleted`): `on` or `off`.
pub fn parse_on_off(value: &str) -> Result<bool, PolicyError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(PolicyError {
            what: "archive of deleted tenants",
            value: value.to_string(),
            reason: "it is neither on nor off".to_string(),
            allowed: "on or off",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FinalStatus::*;

    #[test]
    fn deleted_is_on_or_off() {
        assert!(parse_on_off("on").unwrap());
        assert!(!parse_on_off("OFF").unwrap());
        let refused = parse_on_off("yes").unwrap_err().to_string();
        assert!(
            refused.contains("\"yes\"") && refused.contains("on or off"),
            "{refused}"
        );
    }

    #[test]
    fn statuses_are_off_on_or_a_list_of_final_ones() {
        assert_eq!(parse_statuses("off").unwrap(), vec![]);
        assert_eq!(
            parse_statuses(" ON ").unwrap(),
            vec![Succeeded, Failed, Cancelled]
        );
        assert_eq!(parse_statuses("failed").unwrap(), vec![Failed]);
        assert_eq!(
            parse_statuses("cancelled, failed").unwrap(),
            vec![Failed, Cancelled]
        );
        for (bad, reason) in [
            ("", "it is empty"),
            ("running", "\"running\" is not a final status"),
            ("failed,,cancelled", "a status between the commas is empty"),
            ("failed,failed", "\"failed\" is named twice"),
        ] {
            let error = parse_statuses(bad).unwrap_err().to_string();
            assert!(error.contains(reason), "{bad:?}: {error}");
            assert!(error.contains(ALLOWED_STATUSES), "{bad:?}: {error}");
        }
    }

    #[test]
    fn statuses_show_as_they_are_written() {
        for text in [
            "off",
            "on",
            "failed",
            "failed,cancelled",
            "succeeded,cancelled",
        ] {
            assert_eq!(describe_statuses(&parse_statuses(text).unwrap()), text);
        }
    }

    #[test]
    fn retention_is_a_day_to_a_century_or_forever() {
        assert_eq!(parse_retention("forever").unwrap(), None);
        assert_eq!(
            parse_retention("1year").unwrap(),
            Some(Duration::from_secs(31_557_600))
        );
        assert_eq!(
            parse_retention("1day").unwrap(),
            Some(MIN_ARCHIVE_RETENTION)
        );
        for (bad, reason) in [
            ("23h", "below 1 day"),
            ("101years", "above 100 years"),
            ("-1day", "negative"),
            ("soon", "not a duration"),
            ("", "empty"),
        ] {
            let error = parse_retention(bad).unwrap_err().to_string();
            assert!(error.contains(reason), "{bad:?}: {error}");
            assert!(error.contains(ALLOWED_RETENTION), "{bad:?}: {error}");
        }
    }
}
