//! Standard 5-field cron schedules (minute hour day-of-month month day-of-week, UTC), enough
//! for the kubelet to start a CronJob's Jobs; `@hourly`-style macros are accepted too.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};

#[derive(Debug, thiserror::Error)]
#[error("cron schedule {schedule:?}: {reason}")]
pub struct CronError {
    schedule: String,
    reason: String,
}

/// A parsed schedule: the allowed values of each field.
#[derive(Debug, Clone)]
pub struct Schedule {
    fields: [Vec<u32>; 5],
}

const RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 6)];

impl Schedule {
    pub fn parse(schedule: &str) -> Result<Self, CronError> {
        let err = |reason: String| CronError {
            schedule: schedule.to_owned(),
            reason,
        };
        let expanded = match schedule.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(err(format!("expected 5 fields, found {}", parts.len())));
        }
        let mut fields: [Vec<u32>; 5] = Default::default();
        for (i, part) in parts.iter().enumerate() {
            let (lo, hi) = RANGES[i];
            let mut values = Vec::new();
            for item in part.split(',') {
                let (range, step) = match item.split_once('/') {
                    Some((r, s)) => (
                        r,
                        s.parse::<u32>()
                            .map_err(|e| err(format!("step {s:?}: {e}")))?,
                    ),
                    None => (item, 1),
                };
                if step == 0 {
                    return Err(err("a step of 0".into()));
                }
                let (a, b) = if range == "*" {
                    (lo, hi)
                } else if let Some((a, b)) = range.split_once('-') {
                    let a = a.parse::<u32>().map_err(|e| err(format!("{a:?}: {e}")))?;
                    let b = b.parse::<u32>().map_err(|e| err(format!("{b:?}: {e}")))?;
                    (a, b)
                } else {
                    let a = range
                        .parse::<u32>()
                        .map_err(|e| err(format!("{range:?}: {e}")))?;
                    (a, if item.contains('/') { hi } else { a })
                };
                if a < lo || b > hi || a > b {
                    return Err(err(format!("{item:?} is outside {lo}-{hi}")));
                }
                values.extend((a..=b).step_by(step as usize));
            }
            fields[i] = values;
        }
        Ok(Self { fields })
    }

    fn matches(&self, t: &DateTime<Utc>) -> bool {
        let v = [
            t.minute(),
            t.hour(),
            t.day(),
            t.month(),
            t.weekday().num_days_from_sunday(),
        ];
        v.iter()
            .zip(&self.fields)
            .all(|(x, allowed)| allowed.contains(x))
    }

    /// The first scheduled minute strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = after.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
        // Four years of minutes bounds the search (covers Feb 29 schedules).
        for _ in 0..(4 * 366 * 24 * 60) {
            if self.matches(&t) {
                return Some(t);
            }
            t += Duration::minutes(1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn next_tick() {
        let s = Schedule::parse("*/15 2 * * *").unwrap();
        let t = DateTime::parse_from_rfc3339("2026-01-01T02:16:30Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            s.next_after(t).unwrap().to_rfc3339(),
            "2026-01-01T02:30:00+00:00"
        );
        assert!(Schedule::parse("* * *").is_err());
        assert!(Schedule::parse("61 * * * *").is_err());
    }
}
