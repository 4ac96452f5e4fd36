//! Executing the planner's arena: a run of training steps whose step buffers come from one allocation at
//! the offsets the planner derived from their lifetimes (buffers never needed together share bytes).
//! The losses must be bit-identical to one allocation per buffer, on the CPU and the emulator, for the
//! transformer (GELU and SwiGLU) and the Enformer trunk, with and without per-block recompute; the steps
//! make one allocation (the arena) instead of one per buffer; and the bytes the allocator holds at the
//! peak are exactly the plan's.

use isoformer_engine::backend::cpu::CpuBackend;
use isoformer_engine::backend::kernel::KernelBackend;
use isoformer_engine::backend::Backend;
use isoformer_engine::gpu::emulator::EmuDevice;
use isoformer_engine::models::recompute::Recompute;
use isoformer_engine::training::bench_encoder::{
    plan_encoder_step, run_encoder_step_bench, EncoderStepSpec, StepModel,
};

fn spec(model: StepModel, recompute: Recompute) -> EncoderStepSpec {
    let (dir, batch, len) = match model {
        StepModel::Esm2 => ("esm2", 3, 24),
        StepModel::NucleotideTransformer => ("nt_v2", 2, 20),
        StepModel::Enformer => ("enformer", 2, 256),
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(dir);
    EncoderStepSpec {
        config: dir.join("config.json"),
        weights: dir.join("model.safetensors"),
        model,
        batch,
        len,
        steps: 3,
        recompute,
    }
}

/// Losses (as bits), allocations made and the allocator's peak bytes of a run on a fresh backend.
fn run<B: Backend>(b: B, spec: &EncoderStepSpec) -> (Vec<u32>, usize, usize) {
    let steps = run_encoder_step_bench(&b, spec).unwrap();
    (
        steps.iter().map(|s| s.loss.to_bits()).collect(),
        b.allocations(),
        b.meter().peak(),
    )
}

fn check<B: Backend>(
    make: impl Fn() -> B,
    compute: isoformer_engine::runtime::DType,
    steps: usize,
    tag: &str,
) {
    for model in [
        StepModel::Esm2,
        StepModel::NucleotideTransformer,
        StepModel::Enformer,
    ] {
        for recompute in Recompute::ALL {
            let s = EncoderStepSpec {
                steps,
                ..spec(model, recompute)
            };
            let plan = plan_encoder_step(&s, compute).unwrap();
            let what = format!("{tag} {model:?} {recompute:?}");
            let (losses, allocations, peak) = run(make(), &s);
            assert_eq!(peak, plan.peak, "{what}: bytes held against the plan");
            let b = make();
            b.use_arena(plan.arena.clone()).unwrap();
            let (arena_losses, arena_allocations, arena_peak) = run(b, &s);
            assert_eq!(arena_losses, losses, "{what}: losses with the arena");
            assert_eq!(
                arena_allocations,
                allocations - plan.arena.sizes.len() + 1,
                "{what}: one allocation for the step buffers"
            );
            assert_eq!(
                arena_peak, plan.peak_with_arena,
                "{what}: bytes held against the arena plan"
            );
            assert!(
                plan.peak_with_arena < plan.peak,
                "{what}: the arena saves memory ({} vs {})",
                plan.peak_with_arena,
                plan.peak
            );
        }
    }
}

#[test]
fn cpu_steps_run_bit_identically_from_the_planned_arena() {
    check(
        CpuBackend::new,
        isoformer_engine::runtime::DType::F32,
        3,
        "cpu",
    );
}

#[test]
fn emu_steps_run_bit_identically_from_the_planned_arena() {
    check(
        || KernelBackend::new(EmuDevice::default()),
        isoformer_engine::runtime::DType::BF16,
        2,
        "emu",
    );
}

/// A plan that does not match the steps is an error, never a silent overlap.
#[test]
fn a_plan_for_other_steps_is_refused() {
    let small = spec(StepModel::Esm2, Recompute::None);
    let plan = plan_encoder_step(&small, isoformer_engine::runtime::DType::F32).unwrap();
    let b = CpuBackend::new();
    b.use_arena(plan.arena).unwrap();
    let other = EncoderStepSpec {
        batch: small.batch + 1,
        ..small
    };
    let err = run_encoder_step_bench(&b, &other).unwrap_err().to_string();
    assert!(err.contains("differ from the ones planned"), "{err}");
}
