//! A live migration's policy on the source, written against [`LiveSource`]
//! (the controller's VM and migration job, or a fake in tests) as the cut is
//! against [`super::cut::Pausable`]:
//!
//! - **start**: with pre-copy asked for (the default) and the write-protect
//!   engine there to record what the guest writes, one pre-copy pass over a
//!   connection made with the guest running, which gives up once the chunks
//!   it sent and the guest wrote again reach 1/[`PRECOPY_BUDGET`] of RAM;
//!   without the engine, or without pre-copy, the cut at once;
//! - **the cut**: the guest is paused for good, its state goes first, then
//!   RAM by post-copy; a cut that fails after pausing a guest that ran gives
//!   it back (it runs here again) and fails the job;
//! - **the sender's events**: the switch (the target runs the guest: from
//!   then on it cannot come back here), a failure before it (the guest runs
//!   here again), a pause (the connection broke after it: the job waits for
//!   `migrate` with `resume`), the end (this VM is `postmigrate`);
//! - **cancel**: during the pass the guest never stopped: the connection
//!   closes; after the cut and before the switch the guest runs here again;
//!   after the switch, refused;
//! - **quit** ([`on_quit`]): at once when no target needs this VM's RAM; once
//!   the migration ends when one does; at once, giving up what the target
//!   still lacks, when the migration is paused and nothing would end it.
//!
//! On the target ([`LiveTarget`]): the guest runs once the source heard it
//! does; a broken connection pauses the job until `migrate-recover` and the
//! source's resume; the job completes once, when every page is here and the
//! source knows it.
//!
//! Every status change goes through `set_status` (the job's one checked
//! transition); nothing here knows the controller.

use livesnap::postcopy::SourceEvent;
use qmp::{CommandError, RunState};

use super::migrate::Status;

/// A pre-copy pass gives up once the chunks it sent and the guest wrote
/// again reach RAM / PRECOPY_BUDGET: about 1/8 of RAM is sent twice, and a
/// guest whose working set is smaller than that still gets a whole pass.
pub const PRECOPY_BUDGET: u64 = 8;

/// What the live-migration policy needs of the source: the job's status and
/// the VM, its pass and its sender.
pub trait LiveSource {
    /// The job's status.
    fn status(&self) -> Option<Status>;
    /// Changes the job's status (the transition is checked there).
    fn set_status(&mut self, to: Status);
    /// Ends the job failed, saying why; the error for the command.
    fn fail(&mut self, why: String) -> CommandError;
    /// Guest RAM in bytes.
    fn ram_bytes(&self) -> u64;
    /// Makes the write-protect engine record from now on which chunks the
    /// guest writes, for a pass; why not (no engine: RAM mapped from an
    /// image, or the engine refused).
    fn mark_for_pass(&mut self) -> Result<(), String>;
    /// Starts the pass over the connection made; it sends again at most
    /// `budget` bytes of chunks the guest rewrote.
    fn start_pass(&mut self, budget: u64) -> Result<(), String>;
    /// Whether a pass runs; [`LiveSource::end_pass`] closes its connection.
    fn pass_running(&self) -> bool;
    fn end_pass(&mut self);
    /// Pauses the guest for good, saves its state and starts sending it,
    /// then RAM (over the pass's connection after one). Ok: whether the
    /// guest ran before. Err: why, and whether the guest it paused ran
    /// before (it is to run again).
    fn cut_and_send(&mut self) -> Result<bool, (String, bool)>;
    /// Stops the sender if the target has not run the guest yet (decided
    /// under the sender's lock); false once it has.
    fn cancel_sender(&mut self) -> bool;
    fn drop_sender(&mut self);
    /// The guest ran when the cut paused it.
    fn guest_ran(&self) -> bool;
    /// The guest runs here again.
    fn resume_guest(&mut self);
    fn set_run_state(&mut self, s: RunState);
    /// Records the downtime (the target runs the guest now).
    fn note_switch(&mut self);
    /// Records the job's total time (it ended).
    fn note_end(&mut self);
    /// Why the migration is paused (`None`: it is not).
    fn note_paused(&mut self, why: Option<String>);
}

/// `migrate` over a connection made with the guest running: a pass, or the
/// cut at once (see the module documentation).
pub fn start(c: &mut impl LiveSource, precopy: bool) -> Result<(), CommandError> {
    if !precopy {
        return cut(c);
    }
    if let Err(why) = c.mark_for_pass() {
        tracing::info!("live migration without pre-copy: {why}");
        return cut(c);
    }
    let budget = c.ram_bytes() / PRECOPY_BUDGET;
    if let Err(why) = c.start_pass(budget) {
        return Err(c.fail(why));
    }
    c.set_status(Status::Active);
    Ok(())
}

/// The pass is over (it sent everything, or the guest wrote faster than
/// its budget, or `migrate-start-postcopy`): the cut.
pub fn pass_over(c: &mut impl LiveSource) {
    // A failed cut has failed the job and said why.
    let _ = cut(c);
}

/// The pass's connection failed: the guest never stopped, it runs on here.
pub fn pass_failed(c: &mut impl LiveSource, why: String) {
    c.end_pass();
    c.note_end();
    tracing::warn!("live migration failed during pre-copy: {why}; the VM runs on here");
    let _ = c.fail(why);
}

/// The cut of a live migration: pause for good, send the state, then RAM.
pub fn cut(c: &mut impl LiveSource) -> Result<(), CommandError> {
    match c.cut_and_send() {
        Err((why, resume)) => {
            if resume {
                c.resume_guest();
            }
            Err(c.fail(why))
        }
        Ok(was_running) => {
            if was_running {
                c.set_run_state(RunState::FinishMigrate);
            }
            if c.status() == Some(Status::Setup) {
                c.set_status(Status::Active);
            }
            Ok(())
        }
    }
}

/// What the sender reports.
pub fn sender_event(c: &mut impl LiveSource, e: SourceEvent) {
    match e {
        SourceEvent::Switched => {
            c.note_switch();
            c.set_status(Status::PostcopyActive);
        }
        SourceEvent::Failed(why) => {
            // Before the switch: the target never ran the guest; it runs here again.
            c.drop_sender();
            c.note_end();
            tracing::warn!("live migration failed before the switch: {why}; the VM runs on here");
            let _ = c.fail(why);
            if c.guest_ran() {
                c.resume_guest();
            }
        }
        SourceEvent::Paused(why) => {
            tracing::warn!("live migration paused: {why}; waiting for migrate with resume=true");
            c.note_paused(Some(why));
            c.set_status(Status::PostcopyPaused);
        }
        SourceEvent::Completed => {
            c.note_end();
            c.note_paused(None);
            // The run state first: a client that sees `completed` and asks
            // query-status at once must read `postmigrate`.
            c.set_run_state(RunState::Postmigrate);
            c.set_status(Status::Completed);
        }
    }
}

/// `migrate_cancel` of an active live migration (see the module
/// documentation).
pub fn cancel(c: &mut impl LiveSource) -> Result<(), CommandError> {
    if c.pass_running() {
        c.end_pass();
        c.note_end();
        c.set_status(Status::Cancelling);
        c.set_status(Status::Cancelled);
        return Ok(());
    }
    if c.status() != Some(Status::Active) || !c.cancel_sender() {
        return Err(CommandError::generic(
            "the guest runs on the target now: a post-copy migration cannot be cancelled",
        ));
    }
    c.drop_sender();
    c.note_end();
    c.set_status(Status::Cancelling);
    c.set_status(Status::Cancelled);
    if c.guest_ran() {
        c.resume_guest();
    }
    Ok(())
}

/// `migrate` with `resume`: only a paused migration carries on, over the
/// connection `reconnect` makes and hands the sender.
pub fn resume<C: LiveSource>(
    c: &mut C,
    reconnect: impl FnOnce(&mut C) -> Result<(), String>,
) -> Result<(), CommandError> {
    if c.status() != Some(Status::PostcopyPaused) {
        return Err(CommandError::generic(
            "migrate with resume=true needs a paused post-copy migration",
        ));
    }
    reconnect(c).map_err(CommandError::generic)?;
    c.note_paused(None);
    c.set_status(Status::PostcopyRecover);
    c.set_status(Status::PostcopyActive);
    Ok(())
}

/// What `quit` does on a source, by where its live migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnQuit {
    /// Nothing needs this VM any more (or never did): quit.
    Now,
    /// The target still needs this VM's RAM: the process ends when the
    /// migration does.
    Wait,
    /// The migration is paused (the target is gone or cut off) and nothing
    /// would end it: quit now, giving up the RAM the target still lacks.
    GiveUp,
}

/// `quit` on a source whose guest went (`migrated_away`: the target may run
/// it) in a job at `status`, `active` or not; asked again after each of the
/// sender's events while a `quit` waits.
pub fn on_quit(status: Option<Status>, migrated_away: bool, active: bool) -> OnQuit {
    match (migrated_away, status) {
        (true, Some(Status::PostcopyPaused)) => OnQuit::GiveUp,
        (true, _) if active => OnQuit::Wait,
        _ => OnQuit::Now,
    }
}

/// What the policy needs of a live migration's target: the job's status
/// and the pages coming from the source.
pub trait LiveTarget {
    fn status(&self) -> Option<Status>;
    /// Changes the job's status (the transition is checked there).
    fn set_status(&mut self, to: Status);
    /// Tells the source the guest runs here (before the vCPUs run).
    fn tell_running(&mut self) -> Result<(), String>;
    /// Why the migration is paused (`None`: it is not).
    fn note_paused(&mut self, why: Option<String>);
    /// Records the job's total time (it ended).
    fn note_end(&mut self);
    /// Every page is here and placed.
    fn all_here(&self) -> bool;
    /// The source was told it may let go (perhaps over a recovered
    /// connection).
    fn source_told(&self) -> bool;
    /// Listens for the source's new connection (`migrate-recover`).
    fn listen_for_recovery(&mut self) -> Result<(), String>;
}

/// The target runs the guest: the source hears it first.
pub fn target_switch(t: &mut impl LiveTarget) -> Result<(), String> {
    t.tell_running()
        .map_err(|e| format!("the source went away before the guest could run here: {e}"))?;
    t.set_status(Status::PostcopyActive);
    Ok(())
}

/// What the target's migration threads report.
pub fn target_event(t: &mut impl LiveTarget, e: livesnap::postcopy::TargetEvent) {
    use livesnap::postcopy::TargetEvent;
    match e {
        TargetEvent::Paused(why) => {
            tracing::warn!(
                "live migration paused: {why}; the guest waits for its RAM (migrate-recover)"
            );
            t.note_paused(Some(why));
            t.set_status(Status::PostcopyPaused);
        }
        TargetEvent::Recovered => {
            t.note_paused(None);
            t.set_status(Status::PostcopyActive);
            // RAM was all here; the recovery only told the source.
            if t.source_told() {
                target_complete(t);
            }
        }
    }
}

/// Every page may be here: completed once the source knows (if the link is
/// down, after a recovery).
pub fn target_done(t: &mut impl LiveTarget) {
    if t.all_here() {
        target_complete(t);
    }
}

fn target_complete(t: &mut impl LiveTarget) {
    if t.status() == Some(Status::Completed) {
        return;
    }
    t.note_end();
    t.set_status(Status::Completed);
}

/// `migrate-recover` (target): only a paused migration listens for the
/// source's resume.
pub fn target_recover(t: &mut impl LiveTarget) -> Result<(), CommandError> {
    if t.status() != Some(Status::PostcopyPaused) {
        return Err(CommandError::generic(
            "migrate-recover needs a paused incoming post-copy migration",
        ));
    }
    t.listen_for_recovery().map_err(CommandError::generic)?;
    t.set_status(Status::PostcopyRecover);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::migrate::legal;

    /// A status change of a fake job: checked legal, and kept in order.
    fn record(status: &mut Option<Status>, statuses: &mut Vec<Status>, to: Status) {
        assert!(legal(*status, to), "{status:?} -> {to:?}");
        *status = Some(to);
        statuses.push(to);
    }

    /// A source that records what the policy did to it.
    #[derive(Default)]
    struct Fake {
        status: Option<Status>,
        /// Every status it went through (each transition checked legal).
        statuses: Vec<Status>,
        run: Vec<RunState>,
        error: Option<String>,
        no_engine: bool,
        pass_fails: bool,
        budget: Option<u64>,
        pass: bool,
        /// `cut_and_send` fails: why, and whether the guest is to run again.
        cut_fails: Option<(String, bool)>,
        cuts: u32,
        sender: bool,
        switched: bool,
        ran: bool,
        resumed: u32,
        paused_why: Option<String>,
        ended: bool,
    }

    impl Fake {
        /// A job just made (`setup`) for a running guest of 1 GiB.
        fn new() -> Fake {
            Fake {
                status: Some(Status::Setup),
                statuses: vec![Status::Setup],
                ran: true,
                ..Fake::default()
            }
        }
    }

    impl LiveSource for Fake {
        fn status(&self) -> Option<Status> {
            self.status
        }
        fn set_status(&mut self, to: Status) {
            record(&mut self.status, &mut self.statuses, to);
        }
        fn fail(&mut self, why: String) -> CommandError {
            self.error = Some(why.clone());
            self.set_status(Status::Failed);
            CommandError::generic(why)
        }
        fn ram_bytes(&self) -> u64 {
            1 << 30
        }
        fn mark_for_pass(&mut self) -> Result<(), String> {
            match self.no_engine {
                true => Err("RAM is mapped from an image".into()),
                false => Ok(()),
            }
        }
        fn start_pass(&mut self, budget: u64) -> Result<(), String> {
            if self.pass_fails {
                return Err("the target closed the connection".into());
            }
            self.budget = Some(budget);
            self.pass = true;
            Ok(())
        }
        fn pass_running(&self) -> bool {
            self.pass
        }
        fn end_pass(&mut self) {
            self.pass = false;
        }
        fn cut_and_send(&mut self) -> Result<bool, (String, bool)> {
            self.cuts += 1;
            self.pass = false;
            if let Some(e) = self.cut_fails.clone() {
                return Err(e);
            }
            self.sender = true;
            Ok(self.ran)
        }
        fn cancel_sender(&mut self) -> bool {
            !self.switched
        }
        fn drop_sender(&mut self) {
            self.sender = false;
        }
        fn guest_ran(&self) -> bool {
            self.ran
        }
        fn resume_guest(&mut self) {
            self.resumed += 1;
            self.run.push(RunState::Running);
        }
        fn set_run_state(&mut self, s: RunState) {
            self.run.push(s);
        }
        fn note_switch(&mut self) {
            self.switched = true;
        }
        fn note_end(&mut self) {
            self.ended = true;
        }
        fn note_paused(&mut self, why: Option<String>) {
            self.paused_why = why;
        }
    }

    #[test]
    fn without_pre_copy_the_guest_is_cut_at_once() {
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        assert_eq!(c.cuts, 1);
        assert!(c.budget.is_none() && c.sender);
        assert_eq!(c.statuses, [Status::Setup, Status::Active]);
        assert_eq!(c.run, [RunState::FinishMigrate]);
    }

    #[test]
    fn without_the_write_protect_engine_pre_copy_falls_back_to_the_cut() {
        let mut c = Fake {
            no_engine: true,
            ..Fake::new()
        };
        start(&mut c, true).unwrap();
        assert_eq!((c.cuts, c.budget), (1, None));
        assert_eq!(c.status, Some(Status::Active));
    }

    #[test]
    fn a_pass_runs_first_with_an_eighth_of_ram_as_its_budget_then_the_cut() {
        let mut c = Fake::new();
        start(&mut c, true).unwrap();
        assert_eq!(c.budget, Some((1 << 30) / 8));
        assert_eq!(c.cuts, 0, "no pause while the pass runs");
        assert!(c.run.is_empty());
        assert_eq!(c.status, Some(Status::Active));
        pass_over(&mut c);
        assert_eq!(c.cuts, 1);
        assert_eq!(c.run, [RunState::FinishMigrate]);
        assert_eq!(c.statuses, [Status::Setup, Status::Active], "active once");
    }

    #[test]
    fn a_pass_that_cannot_start_or_fails_leaves_the_guest_running() {
        let mut c = Fake {
            pass_fails: true,
            ..Fake::new()
        };
        assert!(start(&mut c, true).is_err());
        assert_eq!((c.cuts, c.resumed), (0, 0));
        assert_eq!(c.status, Some(Status::Failed));
        let mut c = Fake::new();
        start(&mut c, true).unwrap();
        pass_failed(&mut c, "the target closed the connection".into());
        assert_eq!((c.cuts, c.resumed, c.pass), (0, 0, false));
        assert_eq!(c.status, Some(Status::Failed));
        assert!(c.ended && c.error.as_deref() == Some("the target closed the connection"));
    }

    #[test]
    fn a_cut_that_fails_gives_a_guest_that_ran_back_and_fails_the_job() {
        for (resume, resumed) in [(true, 1), (false, 0)] {
            let mut c = Fake {
                cut_fails: Some(("cannot send the state".into(), resume)),
                ..Fake::new()
            };
            let e = start(&mut c, false).unwrap_err();
            assert!(e.to_string().contains("cannot send the state"), "{e}");
            assert_eq!(c.resumed, resumed);
            assert_eq!(c.status, Some(Status::Failed));
            assert!(!c.run.contains(&RunState::FinishMigrate));
        }
    }

    #[test]
    fn the_senders_events_move_the_job_through_post_copy_to_the_end() {
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        sender_event(&mut c, SourceEvent::Switched);
        assert!(c.switched);
        sender_event(&mut c, SourceEvent::Paused("link down".into()));
        assert_eq!(c.paused_why.as_deref(), Some("link down"));
        resume(&mut c, |_| Ok(())).unwrap();
        assert_eq!(c.paused_why, None);
        sender_event(&mut c, SourceEvent::Completed);
        use Status::*;
        assert_eq!(
            c.statuses,
            [
                Setup,
                Active,
                PostcopyActive,
                PostcopyPaused,
                PostcopyRecover,
                PostcopyActive,
                Completed
            ]
        );
        assert_eq!(c.run, [RunState::FinishMigrate, RunState::Postmigrate]);
        assert_eq!(
            c.resumed, 0,
            "the guest never runs here again after the switch"
        );
    }

    #[test]
    fn a_sender_that_fails_before_the_switch_gives_the_guest_back() {
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        sender_event(&mut c, SourceEvent::Failed("the target went away".into()));
        assert_eq!((c.resumed, c.sender), (1, false));
        assert_eq!(c.status, Some(Status::Failed));
        // A guest that was paused before the migration stays paused.
        let mut c = Fake {
            ran: false,
            ..Fake::new()
        };
        start(&mut c, false).unwrap();
        assert!(c.run.is_empty());
        sender_event(&mut c, SourceEvent::Failed("the target went away".into()));
        assert_eq!(c.resumed, 0);
    }

    #[test]
    fn cancel_in_every_phase() {
        use Status::*;
        // During the pass: the connection closes, the guest never stopped.
        let mut c = Fake::new();
        start(&mut c, true).unwrap();
        cancel(&mut c).unwrap();
        assert_eq!((c.pass, c.cuts, c.resumed), (false, 0, 0));
        assert_eq!(c.statuses, [Setup, Active, Cancelling, Cancelled]);
        // After the cut, before the switch: the guest runs here again.
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        cancel(&mut c).unwrap();
        assert_eq!((c.sender, c.resumed), (false, 1));
        assert_eq!(c.status, Some(Cancelled));
        // After the switch: refused, nothing changes.
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        sender_event(&mut c, SourceEvent::Switched);
        let e = cancel(&mut c).unwrap_err();
        assert!(e.to_string().contains("cannot be cancelled"), "{e}");
        assert_eq!((c.sender, c.resumed), (true, 0));
        assert_eq!(c.status, Some(PostcopyActive));
        // The target ran the guest just before the cancel was decided (the
        // sender says so under its lock): refused too.
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        c.switched = true;
        assert!(cancel(&mut c).is_err());
        assert_eq!((c.sender, c.resumed, c.status), (true, 0, Some(Active)));
    }

    #[test]
    fn resume_needs_a_paused_migration_and_a_new_connection() {
        let mut c = Fake::new();
        start(&mut c, false).unwrap();
        let mut tried = false;
        let e = resume(&mut c, |_| {
            tried = true;
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("needs a paused"), "{e}");
        assert!(
            !tried,
            "no connection is made for a migration that is not paused"
        );
        sender_event(&mut c, SourceEvent::Switched);
        sender_event(&mut c, SourceEvent::Paused("link down".into()));
        let e = resume(&mut c, |_| Err("cannot connect: refused".into())).unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert_eq!(c.status, Some(Status::PostcopyPaused), "still paused");
        assert_eq!(c.paused_why.as_deref(), Some("link down"));
    }

    /// A target that records what the policy did to it.
    #[derive(Default)]
    struct FakeTarget {
        status: Option<Status>,
        statuses: Vec<Status>,
        source_gone: bool,
        paused_why: Option<String>,
        all_here: bool,
        told: bool,
        ended: u32,
        listening: bool,
        bind_fails: bool,
    }

    impl LiveTarget for FakeTarget {
        fn status(&self) -> Option<Status> {
            self.status
        }
        fn set_status(&mut self, to: Status) {
            record(&mut self.status, &mut self.statuses, to);
        }
        fn tell_running(&mut self) -> Result<(), String> {
            match self.source_gone {
                true => Err("connection reset".into()),
                false => Ok(()),
            }
        }
        fn note_paused(&mut self, why: Option<String>) {
            self.paused_why = why;
        }
        fn note_end(&mut self) {
            self.ended += 1;
        }
        fn all_here(&self) -> bool {
            self.all_here
        }
        fn source_told(&self) -> bool {
            self.told
        }
        fn listen_for_recovery(&mut self) -> Result<(), String> {
            if self.bind_fails {
                return Err("address in use".into());
            }
            self.listening = true;
            Ok(())
        }
    }

    /// An incoming live migration at its switch (`active`).
    fn incoming() -> FakeTarget {
        FakeTarget {
            status: Some(Status::Active),
            statuses: vec![Status::Active],
            ..FakeTarget::default()
        }
    }

    #[test]
    fn a_target_runs_the_guest_only_once_the_source_heard_it() {
        let mut t = incoming();
        target_switch(&mut t).unwrap();
        assert_eq!(t.status, Some(Status::PostcopyActive));
        let mut t = FakeTarget {
            source_gone: true,
            ..incoming()
        };
        let e = target_switch(&mut t).unwrap_err();
        assert!(
            e.contains("the source went away") && e.contains("connection reset"),
            "{e}"
        );
        assert_eq!(
            t.status,
            Some(Status::Active),
            "not post-copy without the source"
        );
    }

    #[test]
    fn a_target_pauses_recovers_and_completes_once() {
        use livesnap::postcopy::TargetEvent;
        use Status::*;
        let mut t = incoming();
        target_switch(&mut t).unwrap();
        // Not every page here yet: not completed.
        target_done(&mut t);
        assert_eq!(t.status, Some(PostcopyActive));
        target_event(&mut t, TargetEvent::Paused("link down".into()));
        assert_eq!(t.paused_why.as_deref(), Some("link down"));
        let e = target_recover(&mut FakeTarget {
            bind_fails: true,
            ..incoming()
        })
        .unwrap_err();
        assert!(e.to_string().contains("needs a paused"), "{e}");
        t.bind_fails = true;
        let e = target_recover(&mut t).unwrap_err();
        assert!(e.to_string().contains("address in use"), "{e}");
        assert_eq!(t.status, Some(PostcopyPaused));
        t.bind_fails = false;
        target_recover(&mut t).unwrap();
        assert!(t.listening);
        // Every page came before the link broke; the recovery told the source.
        t.all_here = true;
        t.told = true;
        target_event(&mut t, TargetEvent::Recovered);
        assert_eq!(t.paused_why, None);
        target_done(&mut t);
        assert_eq!(
            t.statuses,
            [
                Active,
                PostcopyActive,
                PostcopyPaused,
                PostcopyRecover,
                PostcopyActive,
                Completed
            ]
        );
        assert_eq!(t.ended, 1, "completed once");
    }

    #[test]
    fn quit_waits_for_a_target_that_needs_this_ram_and_gives_up_a_paused_one() {
        use Status::*;
        // Nothing migrated away (no migration, a pass, a failed or cancelled one).
        assert_eq!(on_quit(None, false, false), OnQuit::Now);
        assert_eq!(on_quit(Some(Active), false, true), OnQuit::Now);
        // The target runs the guest (or may): wait for the end.
        assert_eq!(on_quit(Some(Active), true, true), OnQuit::Wait);
        assert_eq!(on_quit(Some(PostcopyActive), true, true), OnQuit::Wait);
        assert_eq!(on_quit(Some(PostcopyRecover), true, true), OnQuit::Wait);
        // Paused: nothing would end it.
        assert_eq!(on_quit(Some(PostcopyPaused), true, true), OnQuit::GiveUp);
        // Ended while a quit waited.
        assert_eq!(on_quit(Some(Completed), true, false), OnQuit::Now);
    }
}
