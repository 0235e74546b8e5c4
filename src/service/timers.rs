//! Timer triggers: a function's cron schedules, each firing an event invocation with
//! `X-Scf-Trigger-Src: Timer` and the cloud's timer event as body.
//!
//! Expressions have 5 fields (minute hour day month weekday) or 6 with seconds first, in UTC,
//! parsed by `croner`. Each function with schedules has one task that sleeps until the next
//! firing of any of them; a firing runs on its own task, so a slow invocation never delays the
//! next one (the pool's limits still apply, and an Overloaded firing is logged and dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use croner::Cron;

use super::model::FunctionKey;
use super::pool::Pool;

/// A schedule that does not parse, with the reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schedule {expression:?} is not a valid cron expression: {reason}")]
pub struct ScheduleError {
    pub expression: String,
    pub reason: String,
}

/// Parses one cron expression (5 fields, or 6 with seconds first).
pub fn parse_schedule(expression: &str) -> Result<Cron, ScheduleError> {
    Cron::new(expression)
        .with_seconds_optional()
        .parse()
        .map_err(|e| ScheduleError {
            expression: expression.to_string(),
            reason: e.to_string(),
        })
}

/// Checks every schedule (for the API, before a function is stored).
pub fn validate_schedules(schedules: &[String]) -> Result<(), ScheduleError> {
    schedules
        .iter()
        .try_for_each(|s| parse_schedule(s).map(|_| ()))
}

/// The earliest firing of any of `crons` strictly after `after`.
fn next_firing(crons: &[Cron], after: &DateTime<Utc>) -> Option<DateTime<Utc>> {
    crons
        .iter()
        .filter_map(|c| c.find_next_occurrence(after, false).ok())
        .min()
}

/// The event body of one firing (the cloud's timer event shape).
fn timer_event(key: &FunctionKey, at: &DateTime<Utc>) -> Bytes {
    let body = serde_json::json!({
        "Type": "Timer",
        "TriggerName": format!("{}-timer", key.name),
        "Time": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "Message": "",
    });
    Bytes::from(serde_json::to_vec(&body).expect("a JSON value serializes"))
}

/// The timer triggers of the service.
pub struct Timers {
    pool: Arc<Pool>,
    tasks: Mutex<HashMap<FunctionKey, tokio::task::JoinHandle<()>>>,
}

impl Timers {
    /// Call inside a tokio runtime.
    pub fn start(pool: Arc<Pool>) -> Arc<Self> {
        Arc::new(Self {
            pool,
            tasks: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the function's schedules (an empty list removes its timers).
    pub fn set(&self, key: &FunctionKey, schedules: &[String]) -> Result<(), ScheduleError> {
        let crons = schedules
            .iter()
            .map(|s| parse_schedule(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = tasks.remove(key) {
            old.abort();
        }
        if crons.is_empty() {
            return Ok(());
        }
        let pool = Arc::clone(&self.pool);
        let key = key.clone();
        let task = tokio::spawn({
            let key = key.clone();
            async move { fire_forever(pool, key, crons).await }
        });
        tasks.insert(key, task);
        Ok(())
    }

    /// Removes the function's timers.
    pub fn remove(&self, key: &FunctionKey) {
        let _ = self.set(key, &[]);
    }

    /// Stops every timer.
    pub fn shutdown(&self) {
        for (_, task) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            task.abort();
        }
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn fire_forever(pool: Arc<Pool>, key: FunctionKey, crons: Vec<Cron>) {
    let mut after = Utc::now();
    loop {
        let Some(at) = next_firing(&crons, &after) else {
            tracing::warn!(function = %key, "its schedules never fire again");
            return;
        };
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        after = at;
        let pool = Arc::clone(&pool);
        let key = key.clone();
        tokio::spawn(async move {
            let request_id = uuid::Uuid::new_v4().to_string();
            match pool
                .invoke_event(&key, &request_id, timer_event(&key, &at), true)
                .await
            {
                Ok(resp) => {
                    tracing::info!(function = %key, request_id, status = %resp.status(), "timer fired")
                }
                Err(e) => {
                    tracing::warn!(function = %key, request_id, error = %e, "a timer invocation failed")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_with_or_without_seconds_and_bad_ones_are_named() {
        assert!(validate_schedules(&["*/5 * * * *".into(), "*/2 * * * * *".into()]).is_ok());
        let err = validate_schedules(&["* * * * *".into(), "every minute".into()]).unwrap_err();
        assert_eq!(err.expression, "every minute");
        assert!(err.to_string().contains("every minute"), "{err}");
    }

    #[test]
    fn the_next_firing_is_the_earliest_of_all_schedules() {
        let crons = vec![
            parse_schedule("0 0 * * *").unwrap(),
            parse_schedule("30 */2 * * * *").unwrap(),
        ];
        let after: DateTime<Utc> = "2026-01-01T10:00:40Z".parse().unwrap();
        let next = next_firing(&crons, &after).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-01-01T10:02:30+00:00");
        let body = timer_event(&FunctionKey::new("default", "tick"), &next);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Type"], "Timer");
        assert_eq!(v["Time"], "2026-01-01T10:02:30Z");
    }
}
