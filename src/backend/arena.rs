//! Executing an arena plan ([`crate::runtime::ArenaPlan`]): a run of steps of one shape takes its step
//! buffers from one allocation, each at the offset the planner gave it, so buffers never needed at the
//! same time share bytes. The plan comes from the same steps run on the recording backend
//! ([`super::record::RecordingBackend::end_window`]); the k-th allocation of the run takes the plan's k-th
//! place, with the plan's size as its capacity. A plan made for the largest step of a run (the full
//! batch at the longest inputs) serves its smaller steps too: their buffers are prefixes of the planned
//! ones, and the run checks beforehand that their lifetimes meet only where the plan lets them share
//! bytes ([`super::record::StepLifetimes::admits`]). An allocation larger than its place is an error, never
//! a silent overlap. From the warm step on ([`super::Backend::warm_step`]), and past the plan's end,
//! allocations come from the heap as usual.

use std::sync::{Arc, Mutex};

use crate::runtime::ArenaPlan;
use crate::{Error, Result};

/// A backend's arena state: a plan waiting for the next run of steps, then the run's replay.
pub(crate) struct ArenaSlot<A> {
    state: Mutex<(Option<ArenaPlan>, Option<Replay<A>>)>,
}

impl<A> Default for ArenaSlot<A> {
    fn default() -> Self {
        ArenaSlot {
            state: Mutex::new((None, None)),
        }
    }
}

/// Where an allocation goes in the arena.
pub(crate) struct Place<A> {
    pub arena: Arc<A>,
    pub offset: usize,
    /// The planned size (at least the bytes asked for).
    pub capacity: usize,
    /// Whether the plan says its zeros are read.
    pub zero: bool,
}

struct Replay<A> {
    plan: ArenaPlan,
    next: usize,
    arena: Arc<A>,
}

impl<A> ArenaSlot<A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<ArenaPlan>, Option<Replay<A>>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `plan` for the next run of steps.
    pub(crate) fn set_plan(&self, plan: ArenaPlan) -> Result<()> {
        if plan.sizes.len() != plan.offsets.len()
            || plan.sizes.len() != plan.zeroed.len()
            || plan
                .sizes
                .iter()
                .zip(&plan.offsets)
                .any(|(s, o)| s.checked_add(*o).is_none_or(|end| end > plan.bytes))
        {
            return Err(Error::invalid(
                "arena plan",
                "a buffer lies outside the arena",
            ));
        }
        self.lock().0 = Some(plan);
        Ok(())
    }

    /// Starts a run of steps: with a plan waiting, makes its arena (`make(bytes)`) and replays it.
    pub(crate) fn begin(&self, make: impl FnOnce(usize) -> Result<A>) -> Result<()> {
        let mut s = self.lock();
        s.1 = None;
        if let Some(plan) = s.0.take() {
            let arena = Arc::new(make(plan.bytes.max(1))?);
            s.1 = Some(Replay {
                plan,
                next: 0,
                arena,
            });
        }
        Ok(())
    }

    /// Ends the replay: later allocations come from the heap. The arena lives on in the buffers carved
    /// from it.
    pub(crate) fn end(&self) {
        self.lock().1 = None;
    }

    /// The place of the next allocation of `bytes` in the running plan: `(arena, offset, capacity,
    /// whether to zero-fill it)`, or `None` when no plan runs or it is used up. The capacity is the
    /// planned size, at least `bytes`, so the buffer can grow to the planned shape without moving.
    pub(crate) fn take(&self, bytes: usize) -> Result<Option<Place<A>>> {
        let mut s = self.lock();
        let Some(r) = s.1.as_mut() else {
            return Ok(None);
        };
        let k = r.next;
        let Some(&want) = r.plan.sizes.get(k) else {
            return Ok(None);
        };
        if bytes > want {
            return Err(Error::invalid(
                "arena",
                format!(
                    "allocation {k} of the steps is {bytes} bytes where the plan has {want}: the steps \
                     differ from the ones planned"
                ),
            ));
        }
        r.next += 1;
        Ok(Some(Place {
            arena: r.arena.clone(),
            offset: r.plan.offsets[k],
            capacity: want,
            zero: r.plan.zeroed[k],
        }))
    }
}
