//! The released-checkpoint name mapping against a tiny IsoFormer built in PyTorch with the released names
//! (`tools/make_isoformer_fixture.py`): the engine's predictions within 1e-4 of PyTorch's on the CPU
//! (max-abs error over max-abs value), and a checkpoint that does not fit the config is an error listing the
//! tensors.

use std::path::Path;

use isoformer_engine::backend::cpu::CpuBackend;
use isoformer_engine::backend::kernel::KernelBackend;
use isoformer_engine::backend::Backend;
use isoformer_engine::gpu::emulator::EmuDevice;
use isoformer_engine::models::isoformer::release::load_released;
use isoformer_engine::models::isoformer::{
    Isoformer, IsoformerActivations, IsoformerConfig, SampleSeqs,
};
use isoformer_engine::runtime::safetensors_file::load_f32;
use isoformer_engine::training::params::IsoformerParams;
use isoformer_engine::training::step::predict;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/isoformer")
}

fn config(edit: impl FnOnce(&mut serde_json::Value)) -> IsoformerConfig {
    let path = fixture().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    IsoformerConfig::parse(&v.to_string(), &path).unwrap()
}

fn run<B: Backend>(b: &B) -> (Vec<f32>, Vec<f32>) {
    let model = Isoformer::new(config(|_| {})).unwrap();
    let host = load_released(&model, &fixture().join("model.safetensors")).unwrap();
    let reference = load_f32(&fixture().join("reference.safetensors")).unwrap();
    let lines = |k: &str| -> Vec<String> {
        reference.metadata[k]
            .split('\n')
            .map(String::from)
            .collect()
    };
    let (dna, rna, protein) = (lines("dna"), lines("rna"), lines("protein"));
    let seqs: Vec<SampleSeqs<'_>> = (0..dna.len())
        .map(|i| SampleSeqs {
            dna: dna[i].as_bytes(),
            rna: &rna[i],
            protein: (!protein[i].is_empty()).then_some(protein[i].as_str()),
        })
        .collect();
    let params = IsoformerParams::upload(b, &model, &host).unwrap();
    let inputs = model.prepare_inputs(&seqs).unwrap();
    let got = predict(
        b,
        &model,
        &params,
        &inputs,
        &mut IsoformerActivations::default(),
    )
    .unwrap();
    (got, reference.tensors["predictions"].1.clone())
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs() as f64))
        / scale
}

#[test]
fn released_checkpoint_predictions_match_pytorch_on_the_cpu() {
    let (got, want) = run(&CpuBackend::new());
    let err = rel_err(&got, &want);
    println!("cpu vs PyTorch: {err:.2e} over {} predictions", want.len());
    assert!(err < 1e-4, "{got:?} vs {want:?}");
}

#[test]
fn released_checkpoint_predictions_on_the_emu_match_pytorch() {
    let (got, want) = run(&KernelBackend::new(EmuDevice::default()));
    let err = rel_err(&got, &want);
    println!("emu vs PyTorch: {err:.2e}");
    assert!(err < 1.0 / 64.0, "{got:?} vs {want:?}");
}

#[test]
fn a_checkpoint_that_does_not_fit_the_config_lists_the_tensors() {
    // One linear layer as the head: head.0 has the wrong shape and head.1 is read by nothing.
    let model = Isoformer::new(config(|v| v["head_hidden"] = serde_json::json!([]))).unwrap();
    let err = load_released(&model, &fixture().join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head.1.weight") && err.contains("head.1.bias"),
        "{err}"
    );
    // Without the protein modality, its encoder and cross-attention are extra tensors.
    let model = Isoformer::new(config(|v| {
        v["modalities"] = serde_json::json!(["dna", "rna"])
    }))
    .unwrap();
    let err = load_released(&model, &fixture().join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cross_attention_layer_protein.query.weight"),
        "{err}"
    );
    assert!(
        err.contains("esm_model.esm.embeddings.word_embeddings.weight"),
        "{err}"
    );
}
