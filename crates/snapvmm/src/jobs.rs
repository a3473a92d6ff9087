//! QEMU-style jobs (qapi/job.json) for the internal-snapshot commands:
//! their state machine, `query-jobs`, `job-dismiss`, `job-cancel`, and the
//! `JOB_STATUS_CHANGE` events — in QEMU's order: created → running →
//! waiting → pending → concluded, then null once dismissed (a failed or
//! cancelled job goes running → aborting → concluded with `error` set).

use qmp::CommandError;
use serde_json::{json, Value};

/// What a job does (`type` in query-jobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Save,
    Load,
    Delete,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Save => "snapshot-save",
            Kind::Load => "snapshot-load",
            Kind::Delete => "snapshot-delete",
        }
    }
}

/// QEMU's JobStatus values we go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub kind: Kind,
    pub status: Status,
    pub progress: u64,
    pub total: u64,
    pub error: Option<String>,
    /// snapvmm's own figures (`x-` keys), merged into query-jobs.
    pub extra: Option<Value>,
}

/// The job list. Status changes are returned as events for the caller to emit.
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Vec<Job>,
}

/// Prefix of internal job ids (not a character QEMU allows in ids).
pub const INTERNAL: &str = "#";

/// Whether an event (or job) is the VMM's own.
pub fn is_internal(ev: &Value) -> bool {
    ev["id"].as_str().is_some_and(|i| i.starts_with(INTERNAL))
}

/// A `JOB_STATUS_CHANGE` event's data.
pub fn event(id: &str, status: Status) -> Value {
    json!({"id": id, "status": status.name()})
}

impl Jobs {
    /// Registers a new job; its id must be unused and well formed (QEMU's
    /// rule: a letter, then letters, digits, `-`, `.` or `_`). Ids starting
    /// with [`INTERNAL`] are the VMM's own (HMP) jobs: not listed, no events.
    pub fn create(&mut self, id: &str, kind: Kind) -> Result<Value, CommandError> {
        self.create_as(id, kind, false)
    }

    /// Registers one of the VMM's own jobs (`INTERNAL` + `name`).
    pub fn create_internal(&mut self, name: &str, kind: Kind) -> Result<Value, CommandError> {
        self.create_as(&format!("{INTERNAL}{name}"), kind, true)
    }

    fn create_as(&mut self, id: &str, kind: Kind, internal: bool) -> Result<Value, CommandError> {
        let body = if internal {
            id.strip_prefix(INTERNAL).unwrap_or(id)
        } else {
            id
        };
        let well_formed = body.starts_with(|c: char| c.is_ascii_alphabetic())
            && body
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !well_formed {
            return Err(CommandError::generic(format!("Invalid job ID '{id}'")));
        }
        if self.jobs.iter().any(|j| j.id == id) {
            return Err(CommandError::generic(format!(
                "Job ID '{id}' already in use"
            )));
        }
        self.jobs.push(Job {
            id: id.to_string(),
            kind,
            status: Status::Created,
            progress: 0,
            total: 1,
            error: None,
            extra: None,
        });
        Ok(event(id, Status::Created))
    }

    pub fn get(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    /// Moves a job to `status`; returns the event to emit.
    pub fn set(&mut self, id: &str, status: Status) -> Option<Value> {
        let j = self.get_mut(id)?;
        j.status = status;
        Some(event(id, status))
    }

    pub fn set_extra(&mut self, id: &str, extra: Value) {
        if let Some(j) = self.get_mut(id) {
            j.extra = Some(extra);
        }
    }

    pub fn set_progress(&mut self, id: &str, progress: u64, total: u64) {
        if let Some(j) = self.get_mut(id) {
            j.progress = progress;
            j.total = total.max(1);
        }
    }

    /// A successful end: waiting → pending → concluded (events in order).
    pub fn succeed(&mut self, id: &str) -> Vec<Value> {
        if let Some(j) = self.get_mut(id) {
            j.progress = j.total;
        }
        [Status::Waiting, Status::Pending, Status::Concluded]
            .into_iter()
            .filter_map(|s| self.set(id, s))
            .collect()
    }

    /// A failed end: aborting → concluded with `error`.
    pub fn fail(&mut self, id: &str, error: String) -> Vec<Value> {
        if let Some(j) = self.get_mut(id) {
            j.error = Some(error);
        }
        [Status::Aborting, Status::Concluded]
            .into_iter()
            .filter_map(|s| self.set(id, s))
            .collect()
    }

    /// Drops the VMM's own concluded jobs.
    pub fn dismiss_internal(&mut self) {
        self.jobs
            .retain(|j| !(j.id.starts_with(INTERNAL) && j.status == Status::Concluded));
    }

    /// `job-dismiss`: only a concluded job can go; returns the `null` event.
    pub fn dismiss(&mut self, id: &str) -> Result<Value, CommandError> {
        let j = self
            .get(id)
            .ok_or_else(|| CommandError::generic(format!("Job not found: '{id}'")))?;
        if j.status != Status::Concluded {
            return Err(CommandError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
                j.status.name()
            )));
        }
        self.jobs.retain(|j| j.id != id);
        Ok(event(id, Status::Null))
    }

    /// Checks that `job-cancel` applies to `id` (a running job).
    pub fn check_cancel(&self, id: &str) -> Result<&Job, CommandError> {
        let j = self
            .get(id)
            .ok_or_else(|| CommandError::generic(format!("Job not found: '{id}'")))?;
        if !matches!(j.status, Status::Created | Status::Running) {
            return Err(CommandError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb 'cancel'",
                j.status.name()
            )));
        }
        Ok(j)
    }

    /// `query-jobs`.
    pub fn query(&self) -> Value {
        Value::Array(
            self.jobs
                .iter()
                .filter(|j| !j.id.starts_with(INTERNAL))
                .map(|j| {
                    let mut v = json!({
                        "id": j.id,
                        "type": j.kind.name(),
                        "status": j.status.name(),
                        "current-progress": j.progress,
                        "total-progress": j.total,
                    });
                    if let Some(e) = &j.error {
                        v["error"] = json!(e);
                    }
                    if let Some(Value::Object(x)) = &j.extra {
                        for (k, val) in x {
                            v[k] = val.clone();
                        }
                    }
                    v
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_events_in_qemus_order() {
        let mut jobs = Jobs::default();
        let mut evs = vec![jobs.create("s1", Kind::Save).unwrap()];
        assert!(jobs.create("s1", Kind::Load).is_err(), "ids are unique");
        evs.extend(jobs.set("s1", Status::Running));
        assert!(
            jobs.dismiss("s1").is_err(),
            "a running job cannot be dismissed"
        );
        assert!(jobs.check_cancel("s1").is_ok());
        evs.extend(jobs.succeed("s1"));
        let names: Vec<_> = evs.iter().map(|e| e["status"].clone()).collect();
        assert_eq!(
            names,
            vec![
                json!("created"),
                json!("running"),
                json!("waiting"),
                json!("pending"),
                json!("concluded")
            ]
        );
        let q = jobs.query();
        assert_eq!(q[0]["type"], "snapshot-save");
        assert_eq!(q[0]["current-progress"], q[0]["total-progress"]);
        assert!(q[0].get("error").is_none());
        assert!(jobs.check_cancel("s1").is_err());
        assert_eq!(jobs.dismiss("s1").unwrap()["status"], "null");
        assert_eq!(jobs.query(), json!([]));
        assert!(jobs.dismiss("s1").is_err());
    }

    #[test]
    fn ids_are_checked_and_internal_jobs_hidden() {
        let mut jobs = Jobs::default();
        for bad in ["", "1abc", "a b", "a#b", "#"] {
            assert!(jobs.create(bad, Kind::Save).is_err(), "{bad:?}");
        }
        assert!(
            jobs.create("#hmp-x", Kind::Save).is_err(),
            "QMP cannot make hidden jobs"
        );
        let ev = jobs.create_internal("hmp-x", Kind::Save).unwrap();
        assert!(is_internal(&ev));
        assert_eq!(jobs.query(), json!([]));
        assert!(!is_internal(
            &jobs.create("snap-1.a_b", Kind::Save).unwrap()
        ));
    }

    #[test]
    fn failures_conclude_with_an_error() {
        let mut jobs = Jobs::default();
        jobs.create("x", Kind::Delete).unwrap();
        jobs.set("x", Status::Running);
        let evs = jobs.fail("x", "Snapshot 'a' not found".into());
        assert_eq!(evs.last().unwrap()["status"], "concluded");
        assert_eq!(jobs.query()[0]["error"], "Snapshot 'a' not found");
    }
}
