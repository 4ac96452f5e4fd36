//! Planning a run of steps whose shapes vary (training batches of several sizes, embedding batches of
//! several lengths) as one arena: the steps are recorded on the [`RecordingBackend`] at the run's largest
//! shape, their buffers placed by their lifetimes, and the placement is checked to serve the smaller
//! shapes too ([`StepLifetimes::admits`]). Any model's run goes through here: IsoFormer's training and
//! prediction steps, and the encoders' embedding forwards.

use super::record::{RecordingBackend, StepLifetimes};
use super::{Backend, ScratchUse};
use crate::runtime::ArenaPlan;
use crate::Result;

/// A run's memory plan: the arena its steps take their buffers from, and what its ops use of a
/// backend's own scratch.
#[derive(Clone, Debug)]
pub struct RunPlan {
    pub arena: ArenaPlan,
    pub scratch: Vec<ScratchUse>,
}

impl RunPlan {
    /// Gives `b` the plan, before the run's [`Backend::begin_steps`]: its own scratch grown now to the
    /// most any op of the run needs, and the arena for the steps' buffers. No step allocates after.
    pub fn apply<B: Backend>(self, b: &B) -> Result<()> {
        let scratch = self.scratch.iter().map(|op| b.scratch_bytes(op)).max();
        b.reserve_scratch(scratch.unwrap_or(0))?;
        b.use_arena(self.arena)
    }
}

/// A run's plan, or why the run allocates its step buffers one by one instead.
pub type RunArena = std::result::Result<RunPlan, String>;

/// The lifetimes of the buffers of a run's steps: everything `b` holds so far (parameters, say) is
/// outside the steps; `step` then runs twice, the first time making its buffers and the second as
/// every later step runs.
pub fn record_steps(
    b: &RecordingBackend,
    mut step: impl FnMut() -> Result<()>,
) -> Result<StepLifetimes> {
    b.mark_step_buffers();
    step()?;
    b.step_boundary();
    step()?;
    Ok(b.end_window())
}

/// Plans a run whose steps come at several shapes: its buffers placed by the lifetimes `record` gives
/// at `largest`, provided that placement serves each of `smaller` as well. A step that grows a buffer
/// within itself is refused: at a smaller shape it would not grow it, and its allocations would no
/// longer line up with the plan's.
pub fn plan_run<S: std::fmt::Display>(
    largest: &S,
    smaller: &[S],
    mut record: impl FnMut(&S) -> Result<StepLifetimes>,
) -> Result<RunArena> {
    let worst = record(largest)?;
    if worst.regrown > 0 {
        return Ok(Err(format!(
            "{} step buffers are grown within a step",
            worst.regrown
        )));
    }
    for shape in smaller {
        if let Err(why) = worst.admits(&record(shape)?) {
            return Ok(Err(format!(
                "the plan for {largest} does not serve {shape}: {why}"
            )));
        }
    }
    Ok(Ok(RunPlan {
        arena: worst.arena_plan(),
        scratch: worst.scratch,
    }))
}

/// Starts a run of steps on `b` from `plan` when there is one (else its buffers are allocated one by
/// one), and says which, for the user.
pub fn begin_run<B: Backend>(b: &B, plan: RunArena) -> Result<String> {
    let line = match plan {
        Ok(plan) => {
            let line = format!(
                "one arena of {:.1} MiB for {} buffers, placed by their lifetimes",
                plan.arena.bytes as f64 / f64::from(1 << 20),
                plan.arena.sizes.len()
            );
            plan.apply(b)?;
            line
        }
        Err(why) => format!("allocated one by one ({why})"),
    };
    b.begin_steps()?;
    Ok(line)
}
