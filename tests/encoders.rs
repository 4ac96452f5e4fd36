//! Parity of the encoders with the PyTorch references (`tools/make_fixtures.py`): tokenization, last hidden
//! states (non-pad positions, 1e-4 max-abs over max-abs) and the gradients of a fixed scalar loss with
//! respect to every parameter (1e-3).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isoformer_engine::backend::cpu::CpuBackend;
use isoformer_engine::backend::{Backend, Role, Tensor};
use isoformer_engine::models::config::EsmConfig;
use isoformer_engine::models::tokenizers::Tokenizer;
use isoformer_engine::models::transformer::{
    EncoderActivations, TransformerConfig, TransformerEncoder,
};
use isoformer_engine::models::weights::{ModelParams, Prefixes, WeightFile};
use isoformer_engine::runtime::Arena;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// The reference file: tensors as f32 (ids converted), shapes, and the input sequences.
struct Reference {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    sequences: Vec<String>,
}

fn load_reference(dir: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let sequences = meta.metadata().as_ref().unwrap()["sequences"]
        .split('\n')
        .map(String::from)
        .collect();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Reference { tensors, sequences }
}

/// max |got − want| / max |want| over the selected elements.
fn rel_err(got: &[f32], want: &[f32], keep: impl Fn(usize) -> bool) -> f64 {
    let (mut err, mut scale) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if keep(i) {
            err = err.max((*g as f64 - *w as f64).abs());
            scale = scale.max((*w as f64).abs());
        }
    }
    err / scale.max(1e-30)
}

fn check_esm_like(
    name: &str,
    tokenizer: Tokenizer,
    make: fn(&EsmConfig) -> TransformerConfig,
) -> (f64, f64) {
    let dir = fixture(name);
    let cfg = EsmConfig::from_file(&dir.join("config.json")).unwrap();
    let enc = TransformerEncoder::new(make(&cfg)).unwrap();
    let file = Arc::new(WeightFile::open(&dir.join("model.safetensors")).unwrap());
    let params = ModelParams::load(
        enc.layout().clone(),
        file,
        &Prefixes(vec!["esm.".into(), "".into()]),
        false,
    )
    .unwrap();
    assert!(params.is_mapped(), "f32 weights are used in place");
    // Dropping mapped pages (as a backend does once it holds its own copy) loses no value: they are read
    // from the file again.
    let entries = params.layout().entries().len();
    let before: Vec<Vec<f32>> = (0..entries).map(|i| params.get(i).to_vec()).collect();
    (0..entries).for_each(|i| params.release_entry_pages(i));
    params.release_mapped_pages();
    assert!(
        (0..entries).all(|i| params.get(i) == &before[i][..]),
        "{name}: values after releasing the mapped pages"
    );
    let r = load_reference(&dir);
    let (ids_shape, ids_ref) = &r.tensors["input_ids"];
    let (batch, len) = (ids_shape[0], ids_shape[1]);
    // Our tokenizer gives the reference ids, padding included.
    let encoded: Vec<Vec<u32>> = r
        .sequences
        .iter()
        .map(|s| tokenizer.encode(s, 4096))
        .collect();
    let (ids, lens, padded) = tokenizer.pad_batch(&encoded);
    assert_eq!(padded, len);
    assert_eq!(
        ids.iter().map(|&i| i as f32).collect::<Vec<_>>(),
        *ids_ref,
        "{name}: token ids"
    );
    let mask = &r.tensors["attention_mask"].1;
    assert_eq!(
        lens,
        (0..batch)
            .map(|b| mask[b * len..(b + 1) * len].iter().sum::<f32>() as usize)
            .collect::<Vec<_>>()
    );

    let cpu = CpuBackend::new();
    let views: Vec<_> = (0..enc.layout().entries().len())
        .map(|i| CpuBackend::host_view(params.get(i)))
        .collect();
    let mut acts = EncoderActivations::default();
    enc.forward(&cpu, &views, &ids, &lens, len, &mut acts, true)
        .unwrap();
    let h = enc.cfg.hidden;
    let real = |i: usize| mask[i / h] == 1.0;
    let hidden = cpu.read_f32(acts.hidden().unwrap()).unwrap();
    let hidden_err = rel_err(&hidden, &r.tensors["last_hidden_state"].1, real);
    assert!(
        hidden_err <= 1e-4,
        "{name}: hidden state error {hidden_err:.2e}"
    );

    let weight = &r.tensors["loss_weight"].1;
    let dhidden: Vec<f32> = weight
        .iter()
        .enumerate()
        .map(|(i, w)| if real(i) { *w } else { 0.0 })
        .collect();
    let dhidden = Tensor::from_f32(&cpu, Role::Activation, &dhidden).unwrap();
    let mut grads = Arena::zeros(enc.layout().clone());
    {
        let mut grad_views: Vec<_> = grads
            .entries_f32_mut()
            .into_iter()
            .map(CpuBackend::host_view_mut)
            .collect();
        enc.backward(&cpu, &views, &mut acts, dhidden.view(), &mut grad_views)
            .unwrap();
    }
    let mut worst = 0.0f64;
    for (i, e) in enc.layout().entries().iter().enumerate() {
        let (_, want) = r
            .tensors
            .get(&format!("grad.{}", e.spec.name))
            .unwrap_or_else(|| panic!("no reference gradient for {}", e.spec.name));
        let err = rel_err(grads.entry_f32(i), want, |_| true);
        assert!(
            err <= 1e-3,
            "{name}: gradient of {} off by {err:.2e}",
            e.spec.name
        );
        worst = worst.max(err);
    }
    println!("{name}: hidden max rel error {hidden_err:.2e}, worst gradient {worst:.2e}");
    (hidden_err, worst)
}

#[test]
fn esm2_matches_pytorch() {
    check_esm_like("esm2", Tokenizer::esm2(), TransformerConfig::esm2);
}

#[test]
fn nt_v2_matches_pytorch() {
    check_esm_like(
        "nt_v2",
        Tokenizer::nucleotide_transformer_v2(),
        TransformerConfig::nucleotide_transformer_v2,
    );
}

#[test]
fn enformer_matches_pytorch() {
    use isoformer_engine::models::config::EnformerConfig;
    use isoformer_engine::models::enformer::{
        positional_features, BatchNormMode, EnformerActivations, EnformerNames, EnformerTrunk,
    };
    use isoformer_engine::models::tokenizers::dna_one_hot;

    let dir = fixture("enformer");
    let cfg = EnformerConfig::from_file(&dir.join("config.json")).unwrap();
    let trunk = EnformerTrunk::new(cfg.clone()).unwrap();
    let file = Arc::new(WeightFile::open(&dir.join("model.safetensors")).unwrap());
    let params = ModelParams::load(
        trunk.layout().clone(),
        file,
        &EnformerNames {
            prefixes: vec!["".into()],
        },
        false,
    )
    .unwrap();
    let r = load_reference(&dir);

    // Positional features, compared on their own (f64 here, f32 in torch).
    let (pshape, pref) = &r.tensors["positional_features"];
    let n = pshape[0].div_ceil(2);
    let ours = positional_features(n, cfg.dim / cfg.heads);
    let pos_err = ours
        .iter()
        .zip(pref)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // torch computes them in f32: a few ulps of values up to 1.
    assert!(
        pos_err <= 5e-5,
        "positional features differ by {pos_err:.2e}"
    );

    let mut one_hot = Vec::new();
    let mut all = Vec::new();
    for s in &r.sequences {
        dna_one_hot(s.as_bytes(), &mut one_hot);
        all.extend_from_slice(&one_hot);
    }
    assert_eq!(all, r.tensors["one_hot"].1, "one-hot encoding");
    let (batch, seq_len) = (r.sequences.len(), r.sequences[0].len());
    let cpu = CpuBackend::new();
    let views: Vec<_> = (0..trunk.layout().entries().len())
        .map(|i| CpuBackend::host_view(params.get(i)))
        .collect();
    let mut acts = EnformerActivations::default();
    trunk
        .forward(
            &cpu,
            &views,
            &all,
            batch,
            seq_len,
            &mut acts,
            true,
            BatchNormMode::Eval,
        )
        .unwrap();
    let embeddings = cpu.read_f32(acts.embeddings().unwrap()).unwrap();
    let human = cpu.read_f32(acts.head("human").unwrap()).unwrap();
    let emb_err = rel_err(&embeddings, &r.tensors["embeddings"].1, |_| true);
    let head_err = rel_err(&human, &r.tensors["human"].1, |_| true);
    assert!(
        emb_err <= 1e-4 && head_err <= 1e-4,
        "embeddings {emb_err:.2e}, head {head_err:.2e}"
    );
    // Inference (nothing kept: the convolutional levels run tile by tile), in tiles of a few positions.
    let mut tiled_trunk = trunk.clone();
    tiled_trunk.set_tile_elements(48 * 10);
    let mut inference = EnformerActivations::default();
    tiled_trunk
        .forward(
            &cpu,
            &views,
            &all,
            batch,
            seq_len,
            &mut inference,
            false,
            BatchNormMode::Eval,
        )
        .unwrap();
    let tiled = cpu.read_f32(inference.embeddings().unwrap()).unwrap();
    let tiled_err = rel_err(&tiled, &r.tensors["embeddings"].1, |_| true);
    assert!(
        tiled_err <= 1e-4,
        "tiled inference embeddings {tiled_err:.2e}"
    );

    // d loss / d emb = loss_weight + (head_loss_weight · softplus') through the head (done by hand here:
    // the head is part of the reference loss).
    let w_head = params.get(trunk.layout().position("_heads.human.0.weight").unwrap());
    let b_head = params.get(trunk.layout().position("_heads.human.0.bias").unwrap());
    let (rows, width, d2) = (embeddings.len() / (2 * cfg.dim), 5, 2 * cfg.dim);
    let mut d_emb = r.tensors["loss_weight"].1.clone();
    let hw = &r.tensors["head_loss_weight"].1;
    let mut grads = Arena::zeros(trunk.layout().clone());
    {
        let mut g = grads.entries_f32_mut();
        let (wi, bi) = (
            trunk.layout().position("_heads.human.0.weight").unwrap(),
            trunk.layout().position("_heads.human.0.bias").unwrap(),
        );
        for row in 0..rows {
            let e = &embeddings[row * d2..(row + 1) * d2];
            for o in 0..width {
                let pre: f32 = b_head[o]
                    + e.iter()
                        .zip(&w_head[o * d2..(o + 1) * d2])
                        .map(|(a, b)| a * b)
                        .sum::<f32>();
                let dpre = hw[row * width + o] / (1.0 + (-pre).exp());
                g[bi][o] += dpre;
                for c in 0..d2 {
                    g[wi][o * d2 + c] += dpre * e[c];
                    d_emb[row * d2 + c] += dpre * w_head[o * d2 + c];
                }
            }
        }
        let d_emb = Tensor::from_f32(&cpu, Role::Activation, &d_emb).unwrap();
        let mut grad_views: Vec<_> = g.into_iter().map(CpuBackend::host_view_mut).collect();
        trunk
            .backward(&cpu, &views, &mut acts, d_emb.view(), &mut grad_views)
            .unwrap();
    }
    let mut worst = 0.0f64;
    for (i, e) in trunk.layout().entries().iter().enumerate() {
        if trunk.is_buffer(i) {
            continue;
        }
        let (_, want) = r
            .tensors
            .get(&format!("grad.{}", e.spec.name))
            .unwrap_or_else(|| panic!("no reference gradient for {}", e.spec.name));
        let err = rel_err(grads.entry_f32(i), want, |_| true);
        assert!(
            err <= 1e-3,
            "enformer: gradient of {} off by {err:.2e}",
            e.spec.name
        );
        worst = worst.max(err);
    }
    println!("enformer: positional {pos_err:.2e}, embeddings {emb_err:.2e}, head {head_err:.2e}, worst gradient {worst:.2e}");
}

#[test]
fn missing_or_misshaped_tensors_are_named() {
    let dir = fixture("esm2");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tmp = std::env::temp_dir().join(format!("isoformer-weights-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let rewrite = |drop: &str, reshape: Option<&str>| -> PathBuf {
        let mut views = Vec::new();
        for (name, v) in st.tensors() {
            if name == drop {
                continue;
            }
            let shape = if Some(name.as_str()) == reshape {
                vec![v.shape().iter().product()]
            } else {
                v.shape().to_vec()
            };
            views.push((
                name.clone(),
                safetensors::tensor::TensorView::new(v.dtype(), shape, v.data()).unwrap(),
            ));
        }
        let path = tmp.join(format!(
            "{}.safetensors",
            drop.len() + reshape.map_or(0, str::len)
        ));
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        path
    };
    let cfg = EsmConfig::from_file(&dir.join("config.json")).unwrap();
    let enc = TransformerEncoder::new(TransformerConfig::esm2(&cfg)).unwrap();
    let load = |p: PathBuf| {
        let file = Arc::new(WeightFile::open(&p).unwrap());
        ModelParams::load(
            enc.layout().clone(),
            file,
            &Prefixes(vec!["esm.".into(), "".into()]),
            false,
        )
        .err()
        .expect("must fail")
        .to_string()
    };
    let e = load(rewrite("esm.encoder.layer.1.attention.self.key.bias", None));
    assert!(
        e.contains("encoder.layer.1.attention.self.key.bias")
            && e.contains("[64]")
            && e.contains("esm.encoder.layer.1.attention.self.key.weight"),
        "{e}"
    );
    let e = load(rewrite(
        "",
        Some("esm.encoder.layer.0.intermediate.dense.weight"),
    ));
    assert!(
        e.contains("esm.encoder.layer.0.intermediate.dense.weight")
            && e.contains("[8192]")
            && e.contains("[128, 64]"),
        "{e}"
    );
}

#[test]
fn tf_gamma_tables_replace_only_the_gamma_features() {
    use isoformer_engine::models::config::EnformerConfig;
    use isoformer_engine::models::enformer::{positional_features, EnformerTrunk};
    let dir = fixture("enformer");
    let mut cfg = EnformerConfig::from_file(&dir.join("config.json")).unwrap();
    cfg.use_tf_gamma = true;
    let mut trunk = EnformerTrunk::new(cfg.clone()).unwrap();
    assert!(
        trunk.positional_table(32).is_err(),
        "use_tf_gamma without a table is an error"
    );
    let (feat, k, n) = (cfg.dim / cfg.heads, cfg.dim / cfg.heads / 6, 32);
    let gammas: Vec<f32> = (0..(2 * n - 1) * k).map(|i| i as f32 * 1e-3).collect();
    trunk.set_tf_gammas(&gammas).unwrap();
    let table = trunk.positional_table(n).unwrap();
    let plain = positional_features(n, feat);
    for r in 0..2 * n - 1 {
        let (row, base) = (
            &table[r * feat..(r + 1) * feat],
            &plain[r * feat..(r + 1) * feat],
        );
        assert_eq!(
            &row[..2 * k],
            &base[..2 * k],
            "exponential and central mask unchanged"
        );
        assert_eq!(&row[2 * k..3 * k], &gammas[r * k..(r + 1) * k]);
        let sign = (r as f32 - (n - 1) as f32).signum() * if r == n - 1 { 0.0 } else { 1.0 };
        assert!(row[3 * k..]
            .iter()
            .zip(&row[..3 * k])
            .all(|(s, v)| *s == v * sign));
    }
    assert!(trunk.set_tf_gammas(&gammas[1..]).is_err());
}

#[test]
fn enformer_loads_trunk_aliases_as_well_as_module_names() {
    use isoformer_engine::models::config::EnformerConfig;
    use isoformer_engine::models::enformer::{EnformerNames, EnformerTrunk};
    let dir = fixture("enformer");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // Rename to the `_trunk.` aliases only (as a state dict saved from `model._trunk` would have them).
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let renamed = n
                .replacen("stem.", "_trunk.1.", 1)
                .replacen("conv_tower.", "_trunk.2.", 1)
                .replacen("transformer.", "_trunk.4.", 1)
                .replacen("final_pointwise.", "_trunk.6.", 1);
            (renamed, v)
        })
        .collect();
    let path = std::env::temp_dir().join(format!(
        "isoformer-aliases-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let trunk =
        EnformerTrunk::new(EnformerConfig::from_file(&dir.join("config.json")).unwrap()).unwrap();
    let file = Arc::new(WeightFile::open(&path).unwrap());
    let aliased = ModelParams::load(
        trunk.layout().clone(),
        file,
        &EnformerNames {
            prefixes: vec!["".into()],
        },
        false,
    )
    .unwrap();
    let file = Arc::new(WeightFile::open(&dir.join("model.safetensors")).unwrap());
    let named = ModelParams::load(
        trunk.layout().clone(),
        file,
        &EnformerNames {
            prefixes: vec!["".into()],
        },
        false,
    )
    .unwrap();
    for i in 0..trunk.layout().entries().len() {
        assert_eq!(aliased.get(i), named.get(i));
    }
}

/// Inference runs the Enformer's convolutional levels tile by tile (bounded memory); on a longer input,
/// with tiles that do not divide the levels and on every backend, it must give the whole-sequence result,
/// and a warm call allocates nothing.
#[test]
fn enformer_tiled_inference_matches_whole_sequence() {
    use isoformer_engine::backend::kernel::KernelBackend;
    use isoformer_engine::gpu::emulator::EmuDevice;
    use isoformer_engine::models::config::EnformerConfig;
    use isoformer_engine::models::enformer::{
        BatchNormMode, EnformerActivations, EnformerNames, EnformerTrunk,
    };
    use isoformer_engine::models::tokenizers::dna_one_hot;

    let dir = fixture("enformer");
    let cfg = EnformerConfig::from_file(&dir.join("config.json")).unwrap();
    let mut trunk = EnformerTrunk::new(cfg).unwrap();
    let file = Arc::new(WeightFile::open(&dir.join("model.safetensors")).unwrap());
    let names = EnformerNames {
        prefixes: vec!["".into()],
    };
    let params = ModelParams::load(trunk.layout().clone(), file, &names, false).unwrap();
    let (batch, seq_len) = (2usize, 8 * 70);
    let mut all = Vec::new();
    let mut one_hot = Vec::new();
    let mut state = 12345u64;
    for _ in 0..batch {
        let seq: Vec<u8> = (0..seq_len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b"ACGTN"[(state >> 33) as usize % 5]
            })
            .collect();
        dna_one_hot(&seq, &mut one_hot);
        all.extend_from_slice(&one_hot);
    }
    fn run<B: Backend>(
        b: &B,
        trunk: &EnformerTrunk,
        params: &ModelParams,
        all: &[f32],
        batch: usize,
        seq_len: usize,
        keep: bool,
    ) -> (Vec<f32>, usize) {
        let set = isoformer_engine::backend::state::ParamSet::upload(
            b,
            trunk.layout().clone(),
            |i| params.get(i),
            false,
        )
        .unwrap();
        let views = set.views().unwrap();
        let mut acts = EnformerActivations::default();
        let forward = |acts: &mut EnformerActivations<B>| {
            trunk
                .forward(
                    b,
                    &views,
                    all,
                    batch,
                    seq_len,
                    acts,
                    keep,
                    BatchNormMode::Eval,
                )
                .unwrap()
        };
        forward(&mut acts);
        let before = b.allocations();
        forward(&mut acts);
        let warm = b.allocations() - before;
        (b.read_f32(acts.embeddings().unwrap()).unwrap(), warm)
    }
    let cpu = CpuBackend::new();
    let (whole, _) = run(&cpu, &trunk, &params, &all, batch, seq_len, true);
    // Tiles of 34, 44 and 20 positions (stem, tower levels 1 and 2; 24, 24 and 48 channels) and of 10, 20
    // and 8, so tile edges, halos and the sequence ends all occur; and the default (one tile per level).
    for elements in [48 * 24, 48 * 12, usize::MAX / 2] {
        trunk.set_tile_elements(elements);
        let (tiled, warm) = run(&cpu, &trunk, &params, &all, batch, seq_len, false);
        let err = rel_err(&tiled, &whole, |_| true);
        assert!(err <= 1e-6, "cpu tiles of {elements} elements: {err:.2e}");
        assert_eq!(warm, 0, "a warm tiled forward allocates");
    }
    let emu = KernelBackend::new(EmuDevice::default());
    trunk.set_tile_elements(usize::MAX / 2);
    let (emu_whole, _) = run(&emu, &trunk, &params, &all, batch, seq_len, true);
    trunk.set_tile_elements(48 * 12);
    let (emu_tiled, warm) = run(&emu, &trunk, &params, &all, batch, seq_len, false);
    let err = rel_err(&emu_tiled, &emu_whole, |_| true);
    assert!(err <= 1.0 / 128.0, "emu tiled against emu whole: {err:.2e}");
    assert_eq!(warm, 0, "a warm tiled forward allocates on the emulator");
}
