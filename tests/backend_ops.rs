//! Every op of the backend trait on every available backend, checked against the CPU backend by one
//! table-driven harness (the manner of ggml's `test-backend-ops`). A case is an op with its shapes and
//! options; the harness makes seeded inputs (bf16-exact, so every backend reads the same numbers), runs the
//! case on the CPU reference and on the backend under test, and compares every output.
//!
//! Tolerance follows the output's dtype:
//! - bf16 outputs: FlashAttention's criterion, the error is at most twice that of the bf16-rounded
//!   reference, where that reference is the larger of the f32 result rounded to bf16 and the CPU run with
//!   bf16 activation storage (ops that round an intermediate, as the kernels do);
//! - f32 outputs (statistics, log-sum-exp, parameter gradients, losses): a relative bound per case, or twice
//!   the bf16-storage reference's error where an f32 output is computed from a rounded intermediate;
//! - f32 activations (the CPU with bf16 weights): the case's bound, at least 1e-5 of the scale (sums in
//!   another order); attention's outputs there have bf16 product operands, so the bf16 criterion, and so
//!   do outputs stored in bf16 there (the inputs of linear layers, `Role::LinearInput`).
//!
//! Outputs that an op adds into start from random values, so "adds" is tested too. The CPU backend itself
//! is checked against naive f64 code and finite differences in `src/ops`. A last check asserts that the
//! cases launched every kernel of `kernels/*.cu` (the emulator's self-test kernels are covered by
//! `tests/emu_device.rs`).

use half::bf16;
use isoformer_engine::backend::cpu::CpuBackend;
use isoformer_engine::backend::kernel::KernelBackend;
use isoformer_engine::backend::{
    Act, AdamWStep, AttentionDims, Backend, BatchNormStats, Conv1dDims, Epilogue, LinearDims,
    PoolDims, Role, Tensor, View, ViewMut,
};
use isoformer_engine::gpu::cuda::CudaDevice;
use isoformer_engine::gpu::emulator::EmuDevice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
enum Op {
    Linear {
        dims: LinearDims,
        bias: bool,
    },
    /// `y = residual + linear(x)`: the product's scratch, which a fused backend leaves unwritten, is not
    /// compared.
    LinearResidual {
        dims: LinearDims,
        bias: bool,
    },
    /// `keep_pre` as for [`Op::LinearSwiglu`].
    LinearAct {
        dims: LinearDims,
        act: Act,
        keep_pre: bool,
    },
    LinearBackward {
        dims: LinearDims,
        dx: bool,
        bias: bool,
    },
    /// `keep_pre` false: only `out` is defined afterwards (a fused backend leaves `pre` unwritten), so
    /// `pre` is a scratch of the run rather than a compared output, empty where the backend skips it.
    LinearSwiglu {
        dims: LinearDims,
        keep_pre: bool,
    },
    Add {
        n: usize,
    },
    AddRowBias {
        rows: usize,
        cols: usize,
    },
    ScaleRows {
        rows: usize,
        cols: usize,
    },
    Activation {
        n: usize,
        act: Act,
    },
    ActivationBackward {
        n: usize,
        act: Act,
    },
    Swiglu {
        rows: usize,
        width: usize,
    },
    SwigluBackward {
        rows: usize,
        width: usize,
    },
    Layernorm {
        rows: usize,
        dim: usize,
    },
    ResidualLayernorm {
        rows: usize,
        dim: usize,
    },
    LayernormBackward {
        rows: usize,
        dim: usize,
    },
    Rotary {
        batch: usize,
        len: usize,
        heads: usize,
        hd: usize,
        backward: bool,
    },
    Embedding {
        tokens: usize,
        vocab: usize,
        dim: usize,
    },
    EmbeddingBackward {
        tokens: usize,
        vocab: usize,
        dim: usize,
    },
    Attention {
        dims: AttentionDims,
        lens: Option<Vec<usize>>,
        bias: Option<bool>,
    },
    AttentionBackward {
        dims: AttentionDims,
        lens: Option<Vec<usize>>,
        bias: Option<bool>,
    },
    /// Self-attention of rotary-embedded queries and keys (no bias): the rotated copies are a scratch of
    /// the run, which a fused backend leaves unwritten, rather than compared outputs.
    RotaryAttention {
        dims: AttentionDims,
        lens: Vec<usize>,
    },
    Mse {
        n: usize,
    },
    MseBackward {
        n: usize,
    },
    SumSquares {
        n: usize,
    },
    AdamW {
        n: usize,
    },
    Copy {
        n: usize,
        from: Role,
        to: Role,
    },
    Zero {
        n: usize,
    },
    SumRows {
        rows: usize,
        cols: usize,
    },
    Softmax {
        rows: usize,
        dim: usize,
    },
    SoftmaxBackward {
        rows: usize,
        dim: usize,
    },
    Conv1d {
        dims: Conv1dDims,
    },
    Conv1dBackward {
        dims: Conv1dDims,
        dx: bool,
    },
    Batchnorm {
        rows: usize,
        c: usize,
        train: bool,
    },
    BatchnormBackward {
        rows: usize,
        c: usize,
        train: bool,
    },
    RunningUpdate {
        rows: usize,
        c: usize,
    },
    Pool {
        dims: PoolDims,
    },
    PoolBackward {
        dims: PoolDims,
    },
    Relative {
        batch: usize,
        heads: usize,
        n: usize,
        dk: usize,
    },
    RelativeBackward {
        batch: usize,
        heads: usize,
        n: usize,
        dk: usize,
    },
}

/// An input: its role (dtype class) and host values.
struct Input {
    role: Role,
    data: Vec<f32>,
}

/// An output: role, and the values it starts from (zeros for plain outputs, random where the op adds).
struct Output {
    name: &'static str,
    role: Role,
    init: Vec<f32>,
}

struct Case {
    name: String,
    op: Op,
    inputs: Vec<Input>,
    outputs: Vec<Output>,
    /// Relative bound of f32 outputs.
    f32_tol: f64,
}

fn bf(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

struct Gen(StdRng);

impl Gen {
    fn vals(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| bf(self.0.random_range(lo..hi))).collect()
    }
    fn act(&mut self, n: usize) -> Input {
        Input {
            role: Role::Activation,
            data: self.vals(n, -2.0, 2.0),
        }
    }
    fn weight(&mut self, n: usize, fan_in: usize) -> Input {
        let s = 1.5 / (fan_in.max(1) as f32).sqrt();
        Input {
            role: Role::Weight,
            data: self.vals(n, -s, s),
        }
    }
    fn exact(&mut self, n: usize, lo: f32, hi: f32) -> Input {
        Input {
            role: Role::Exact,
            data: self.vals(n, lo, hi),
        }
    }
    fn index(&mut self, values: Vec<usize>) -> Input {
        Input {
            role: Role::Index,
            data: values.into_iter().map(|v| v as f32).collect(),
        }
    }
    fn out(&mut self, name: &'static str, role: Role, n: usize) -> Output {
        Output {
            name,
            role,
            init: vec![0.0; n],
        }
    }
    /// An output the op adds into.
    fn acc(&mut self, name: &'static str, role: Role, n: usize) -> Output {
        Output {
            name,
            role,
            init: self.vals(n, -1.0, 1.0),
        }
    }
}

const A: Role = Role::Activation;
const E: Role = Role::Exact;

fn case(name: impl Into<String>, op: Op, seed: u64) -> Case {
    let mut g = Gen(StdRng::seed_from_u64(seed));
    let (inputs, outputs, f32_tol): (Vec<Input>, Vec<Output>, f64) = match &op {
        Op::Linear { dims: d, bias } => {
            let mut ins = vec![g.act(d.rows * d.d_in), g.weight(d.d_out * d.d_in, d.d_in)];
            if *bias {
                ins.push(g.act(d.d_out));
            }
            (ins, vec![g.out("y", A, d.rows * d.d_out)], 1e-5)
        }
        Op::LinearResidual { dims: d, bias } => {
            let mut ins = vec![
                g.act(d.rows * d.d_in),
                g.weight(d.d_out * d.d_in, d.d_in),
                g.act(d.rows * d.d_out),
            ];
            if *bias {
                ins.push(g.act(d.d_out));
            }
            (ins, vec![g.out("y", A, d.rows * d.d_out)], 1e-5)
        }
        Op::LinearAct {
            dims: d, keep_pre, ..
        } => (
            vec![
                g.act(d.rows * d.d_in),
                g.weight(d.d_out * d.d_in, d.d_in),
                g.act(d.d_out),
            ],
            if *keep_pre {
                vec![
                    g.out("pre", A, d.rows * d.d_out),
                    g.out("out", A, d.rows * d.d_out),
                ]
            } else {
                // As an inference forward runs it: `out` feeds the next linear layer.
                vec![g.out("out", Role::LinearInput, d.rows * d.d_out)]
            },
            1e-5,
        ),
        Op::LinearSwiglu { dims: d, keep_pre } => {
            // `out` feeds the next linear layer, as in the models: bf16 where weights are.
            let out = g.out("out", Role::LinearInput, d.rows * d.d_out / 2);
            let outs = if *keep_pre {
                vec![g.out("pre", A, d.rows * d.d_out), out]
            } else {
                vec![out]
            };
            (
                vec![g.act(d.rows * d.d_in), g.weight(d.d_out * d.d_in, d.d_in)],
                outs,
                1e-5,
            )
        }
        Op::LinearBackward { dims: d, dx, bias } => {
            let mut outs = vec![];
            if *dx {
                outs.push(g.acc("dx", A, d.rows * d.d_in));
            }
            outs.push(g.acc("dw", E, d.d_out * d.d_in));
            if *bias {
                outs.push(g.acc("dbias", E, d.d_out));
            }
            (
                vec![
                    g.act(d.rows * d.d_out),
                    g.act(d.rows * d.d_in),
                    g.weight(d.d_out * d.d_in, d.d_in),
                ],
                outs,
                1e-5,
            )
        }
        Op::Add { n } => (vec![g.act(*n), g.act(*n)], vec![g.out("out", A, *n)], 0.0),
        Op::AddRowBias { rows, cols } => {
            (vec![g.act(*cols)], vec![g.acc("x", A, rows * cols)], 0.0)
        }
        Op::ScaleRows { rows, cols } => (
            vec![g.exact(*rows, -2.0, 2.0)],
            vec![g.acc("x", A, rows * cols)],
            0.0,
        ),
        Op::Activation { n, .. } => (vec![g.act(*n)], vec![g.out("out", A, *n)], 0.0),
        Op::ActivationBackward { n, .. } => {
            (vec![g.act(*n), g.act(*n)], vec![g.acc("dx", A, *n)], 0.0)
        }
        Op::Swiglu { rows, width } => (
            vec![g.act(rows * 2 * width)],
            vec![g.out("out", A, rows * width)],
            0.0,
        ),
        Op::SwigluBackward { rows, width } => (
            vec![g.act(rows * width), g.act(rows * 2 * width)],
            vec![g.acc("du", A, rows * 2 * width)],
            0.0,
        ),
        Op::Layernorm { rows, dim } => (
            vec![
                g.act(rows * dim),
                g.exact(*dim, 0.5, 1.5).into_act(),
                g.act(*dim),
            ],
            vec![
                g.out("out", A, rows * dim),
                g.out("mean", E, *rows),
                g.out("rstd", E, *rows),
            ],
            1e-5,
        ),
        Op::ResidualLayernorm { rows, dim } => (
            vec![
                g.act(rows * dim),
                g.act(rows * dim),
                g.exact(*dim, 0.5, 1.5).into_act(),
                g.act(*dim),
            ],
            vec![
                g.out("sum", A, rows * dim),
                g.out("out", A, rows * dim),
                g.out("mean", E, *rows),
                g.out("rstd", E, *rows),
            ],
            1e-3,
        ),
        Op::LayernormBackward { rows, dim } => {
            // mean/rstd consistent with x, from the CPU op itself.
            let x = g.act(rows * dim);
            let gamma = g.exact(*dim, 0.5, 1.5).into_act();
            let (mut o, mut m, mut r) = (vec![0.0; rows * dim], vec![0.0; *rows], vec![0.0; *rows]);
            let beta = vec![0.0; *dim];
            isoformer_engine::ops::norm::layernorm(
                &mut o,
                &mut m,
                &mut r,
                &x.data,
                &gamma.data,
                &beta,
                *dim,
                1e-5,
            )
            .unwrap();
            (
                vec![
                    g.act(rows * dim),
                    x,
                    gamma,
                    Input { role: E, data: m },
                    Input { role: E, data: r },
                ],
                vec![
                    g.acc("dx", A, rows * dim),
                    g.acc("dgamma", E, *dim),
                    g.acc("dbeta", E, *dim),
                ],
                1e-4,
            )
        }
        Op::Rotary {
            batch,
            len,
            heads,
            hd,
            backward,
        } => {
            let table =
                isoformer_engine::ops::rotary::RotaryTable::new(len + 3, *hd, 10_000.0).unwrap();
            let n = batch * len * heads * hd;
            let out = if *backward {
                g.acc("dx", A, n)
            } else {
                g.out("out", A, n)
            };
            (
                vec![
                    g.act(n),
                    Input {
                        role: E,
                        data: table.cos().to_vec(),
                    },
                    Input {
                        role: E,
                        data: table.sin().to_vec(),
                    },
                ],
                vec![out],
                0.0,
            )
        }
        Op::Embedding { tokens, vocab, dim } => {
            let ids = (0..*tokens).map(|_| g.0.random_range(0..*vocab)).collect();
            (
                vec![g.index(ids), g.act(vocab * dim)],
                vec![g.out("out", A, tokens * dim)],
                0.0,
            )
        }
        Op::EmbeddingBackward { tokens, vocab, dim } => {
            let ids = (0..*tokens).map(|_| g.0.random_range(0..*vocab)).collect();
            (
                vec![g.act(tokens * dim), g.index(ids)],
                vec![g.acc("dtable", E, vocab * dim)],
                1e-5,
            )
        }
        Op::Attention {
            dims: d,
            lens,
            bias,
        }
        | Op::AttentionBackward {
            dims: d,
            lens,
            bias,
        } => {
            let (qn, kn, vn, on) = (
                d.batch * d.q_len * d.heads * d.head_dim,
                d.batch * d.kv_len * d.heads * d.head_dim,
                d.batch * d.kv_len * d.heads * d.v_head_dim,
                d.batch * d.q_len * d.heads * d.v_head_dim,
            );
            let mut ins = vec![g.act(qn), g.act(kn), g.act(vn)];
            if let Some(l) = lens {
                ins.push(g.index(l.clone()));
            }
            if let Some(per_batch) = bias {
                let bn = if *per_batch { d.batch } else { 1 } * d.heads * d.q_len * d.kv_len;
                ins.push(g.exact(bn, -2.0, 2.0));
            }
            let lse_n = d.batch * d.heads * d.q_len;
            if matches!(op, Op::Attention { .. }) {
                (ins, vec![g.out("out", A, on), g.out("lse", E, lse_n)], 1e-4)
            } else {
                // The forward's out and lse, from the CPU reference on the same inputs, are inputs here.
                ins.push(g.act(on)); // dout
                let mut outs = vec![g.acc("dq", A, qn), g.acc("dk", A, kn), g.acc("dv", A, vn)];
                if let Some(per_batch) = bias {
                    let bn = if *per_batch { d.batch } else { 1 } * d.heads * d.q_len * d.kv_len;
                    outs.push(g.acc("dbias", E, bn));
                }
                // dbias is computed from the bf16 output O (D = rowsum(dO ∘ O)), as in FlashAttention.
                (ins, outs, 1.0 / 256.0)
            }
        }
        Op::RotaryAttention { dims: d, lens } => {
            let table =
                isoformer_engine::ops::rotary::RotaryTable::new(d.q_len + 3, d.head_dim, 1e4)
                    .unwrap();
            let (qn, kn, vn, on) = (
                d.batch * d.q_len * d.heads * d.head_dim,
                d.batch * d.kv_len * d.heads * d.head_dim,
                d.batch * d.kv_len * d.heads * d.v_head_dim,
                d.batch * d.q_len * d.heads * d.v_head_dim,
            );
            let tables = [table.cos(), table.sin()].map(|t| Input {
                role: E,
                data: t.to_vec(),
            });
            let [cos, sin] = tables;
            let ins = vec![
                g.act(qn),
                g.act(kn),
                g.act(vn),
                cos,
                sin,
                g.index(lens.clone()),
            ];
            let lse_n = d.batch * d.heads * d.q_len;
            (ins, vec![g.out("out", A, on), g.out("lse", E, lse_n)], 1e-4)
        }
        Op::Mse { n } => (vec![g.act(*n), g.exact(*n, -2.0, 2.0)], vec![], 1e-5),
        Op::MseBackward { n } => (
            vec![g.act(*n), g.exact(*n, -2.0, 2.0)],
            vec![g.acc("dpred", A, *n)],
            0.0,
        ),
        Op::SumSquares { n } => (vec![g.exact(*n, -2.0, 2.0)], vec![], 1e-5),
        Op::AdamW { n } => (
            vec![g.exact(*n, -0.1, 0.1)],
            vec![
                g.acc("params", E, *n),
                g.out("copy", A, *n),
                g.acc("m", E, *n),
                Output {
                    name: "v",
                    role: E,
                    init: g.vals(*n, 0.0, 0.01),
                },
            ],
            1e-5,
        ),
        Op::Copy { n, from, to } => (
            vec![Input {
                role: *from,
                data: g.vals(*n, -3.0, 3.0),
            }],
            vec![g.out("dst", *to, *n)],
            0.0,
        ),
        Op::Zero { n } => (vec![], vec![g.acc("dst", A, *n)], 0.0),
        Op::SumRows { rows, cols } => {
            (vec![g.act(rows * cols)], vec![g.acc("out", E, *cols)], 1e-5)
        }
        Op::Softmax { rows, dim } => (
            vec![g.act(rows * dim)],
            vec![g.out("out", A, rows * dim)],
            0.0,
        ),
        Op::SoftmaxBackward { rows, dim } => {
            let x = g.act(rows * dim);
            let mut y = vec![0.0; rows * dim];
            isoformer_engine::ops::softmax::softmax(&mut y, &x.data, *dim).unwrap();
            let y = y.into_iter().map(bf).collect();
            (
                vec![g.act(rows * dim), Input { role: A, data: y }],
                vec![g.acc("dx", A, rows * dim)],
                0.0,
            )
        }
        Op::Conv1d { dims: d } => (
            vec![
                g.act(d.batch * d.len * d.c_in),
                g.weight(d.c_out * d.c_in * d.width, d.c_in * d.width),
                g.act(d.c_out),
            ],
            vec![g.out("out", A, d.batch * d.len * d.c_out)],
            0.0,
        ),
        Op::Conv1dBackward { dims: d, dx } => {
            let mut outs = vec![];
            if *dx {
                outs.push(g.acc("dx", A, d.batch * d.len * d.c_in));
            }
            outs.push(g.acc("dw", E, d.c_out * d.c_in * d.width));
            outs.push(g.acc("dbias", E, d.c_out));
            (
                vec![
                    g.act(d.batch * d.len * d.c_out),
                    g.act(d.batch * d.len * d.c_in),
                    g.weight(d.c_out * d.c_in * d.width, d.c_in * d.width),
                ],
                outs,
                1e-5,
            )
        }
        Op::Batchnorm { rows, c, .. } => (
            vec![
                Input {
                    role: A,
                    data: g.vals(rows * c, -1.0, 3.0),
                },
                g.exact(*c, 0.5, 1.5).into_act(),
                g.act(*c),
                g.exact(*c, -0.5, 0.5),
                g.exact(*c, 0.5, 2.0),
            ],
            vec![
                g.out("out", A, rows * c),
                g.out("mean", E, *c),
                g.out("var", E, *c),
            ],
            1e-4,
        ),
        Op::BatchnormBackward { rows, c, .. } => {
            let x = Input {
                role: A,
                data: g.vals(rows * c, -1.0, 3.0),
            };
            let (mut mean, mut var) = (vec![0.0f64; *c], vec![0.0f64; *c]);
            for row in x.data.chunks(*c) {
                mean.iter_mut()
                    .zip(row)
                    .for_each(|(m, v)| *m += *v as f64 / *rows as f64);
            }
            for row in x.data.chunks(*c) {
                var.iter_mut()
                    .zip(row.iter().zip(&mean))
                    .for_each(|(s, (v, m))| *s += (*v as f64 - m).powi(2) / *rows as f64);
            }
            let f = |v: Vec<f64>| Input {
                role: E,
                data: v.into_iter().map(|x| x as f32).collect(),
            };
            (
                vec![
                    g.act(rows * c),
                    x,
                    g.exact(*c, 0.5, 1.5).into_act(),
                    f(mean),
                    f(var),
                ],
                vec![
                    g.acc("dx", A, rows * c),
                    g.acc("dgamma", E, *c),
                    g.acc("dbeta", E, *c),
                ],
                1e-4,
            )
        }
        Op::RunningUpdate { c, .. } => (
            vec![g.exact(*c, -1.0, 1.0), g.exact(*c, 0.1, 2.0)],
            vec![
                g.acc("running_mean", E, *c),
                Output {
                    name: "running_var",
                    role: E,
                    init: g.vals(*c, 0.5, 1.5),
                },
            ],
            1e-6,
        ),
        Op::Pool { dims: d } => {
            let n = d.batch * d.len * d.channels;
            (
                vec![g.act(n), g.weight(d.channels * d.channels, d.channels)],
                vec![
                    g.out("out", A, d.batch * d.out_len() * d.channels),
                    g.out("logits", E, n),
                ],
                1e-4,
            )
        }
        Op::PoolBackward { dims: d } => {
            let n = d.batch * d.len * d.channels;
            let x = g.act(n);
            let w = g.weight(d.channels * d.channels, d.channels);
            let mut logits = vec![0.0; n];
            let ld = LinearDims {
                rows: d.batch * d.len,
                d_in: d.channels,
                d_out: d.channels,
            };
            isoformer_engine::ops::matmul::linear(&mut logits, &x.data, &w.data, None, ld).unwrap();
            (
                vec![
                    g.act(d.batch * d.out_len() * d.channels),
                    x,
                    w,
                    Input {
                        role: E,
                        data: logits,
                    },
                ],
                vec![g.acc("dx", A, n), g.acc("dw", E, d.channels * d.channels)],
                1e-4,
            )
        }
        Op::Relative {
            batch,
            heads,
            n,
            dk,
        } => (
            vec![
                g.act(batch * n * heads * dk),
                g.act((2 * n - 1) * heads * dk),
            ],
            vec![g.out("bias", E, batch * heads * n * n)],
            1e-5,
        ),
        Op::RelativeBackward {
            batch,
            heads,
            n,
            dk,
        } => (
            vec![
                g.exact(batch * heads * n * n, -1.0, 1.0),
                g.act(batch * n * heads * dk),
                g.act((2 * n - 1) * heads * dk),
            ],
            vec![
                g.acc("dq_pos", A, batch * n * heads * dk),
                g.acc("drel_k", A, (2 * n - 1) * heads * dk),
            ],
            0.0,
        ),
    };
    Case {
        name: name.into(),
        op,
        inputs,
        outputs,
        f32_tol,
    }
}

impl Input {
    /// The same values as an activation (norm weights are compute-dtype parameters).
    fn into_act(self) -> Input {
        Input {
            role: Role::Activation,
            data: self.data,
        }
    }
}

/// What a run returns: each output's values, then any scalar results.
struct Run {
    outputs: Vec<Vec<f32>>,
    scalars: Vec<f32>,
}

/// The `pre` of a fused linear op run without keeping it: empty where the backend says it leaves `pre`
/// untouched (as the models pass it), else a scratch of the product's size.
fn pre_scratch<B: Backend>(b: &B, dims: &LinearDims, epilogue: Epilogue) -> Tensor<B> {
    let len = if b.linear_epilogue_skips_pre(epilogue) {
        0
    } else {
        dims.rows * dims.d_out
    };
    Tensor::new(b, A, len).unwrap()
}

fn run<B: Backend>(b: &B, c: &Case, fwd: Option<&Run>) -> Run {
    let mut ins: Vec<Tensor<B>> = c
        .inputs
        .iter()
        .map(|i| Tensor::from_f32(b, i.role, &i.data).unwrap())
        .collect();
    // The attention backward reads the forward's out and lse (from the reference run).
    if let (Op::AttentionBackward { .. }, Some(f)) = (&c.op, fwd) {
        ins.push(
            Tensor::from_f32(
                b,
                A,
                &f.outputs[0].iter().map(|&v| bf(v)).collect::<Vec<_>>(),
            )
            .unwrap(),
        );
        ins.push(Tensor::from_f32(b, E, &f.outputs[1]).unwrap());
    }
    let mut outs: Vec<Tensor<B>> = c
        .outputs
        .iter()
        .map(|o| Tensor::from_f32(b, o.role, &o.init).unwrap())
        .collect();
    let i: Vec<View<'_, B>> = ins.iter().map(|t| t.view()).collect();
    let mut scalars = vec![];
    {
        let mut o: std::collections::VecDeque<ViewMut<'_, B>> =
            outs.iter_mut().map(|t| t.view_mut()).collect();
        let mut next = || o.pop_front().unwrap();
        let r = match &c.op {
            Op::Linear { dims, bias } => b.linear(next(), i[0], i[1], bias.then(|| i[2]), *dims),
            Op::LinearResidual { dims, bias } => {
                let mut scratch = Tensor::<B>::new(b, A, dims.rows * dims.d_out).unwrap();
                let bias = bias.then(|| i[3]);
                b.linear_residual(next(), i[0], i[1], bias, i[2], scratch.view_mut(), *dims)
            }
            Op::LinearAct {
                dims,
                act,
                keep_pre,
            } => {
                let mut scratch = pre_scratch(b, dims, Epilogue::Activation);
                let pre = if *keep_pre {
                    next()
                } else {
                    scratch.view_mut()
                };
                b.linear_act(pre, next(), i[0], i[1], i[2], *act, *dims, *keep_pre)
            }
            Op::LinearSwiglu { dims, keep_pre } => {
                let mut scratch = pre_scratch(b, dims, Epilogue::SwiGlu);
                let pre = if *keep_pre {
                    next()
                } else {
                    scratch.view_mut()
                };
                b.linear_swiglu(pre, next(), i[0], i[1], *dims, *keep_pre)
            }
            Op::LinearBackward { dims, dx, bias } => {
                let dx = dx.then(&mut next);
                let dw = next();
                let db = bias.then(&mut next);
                b.linear_backward(dx, Some(dw), db, i[0], i[1], i[2], *dims)
            }
            Op::Add { .. } => b.add(next(), i[0], i[1]),
            Op::AddRowBias { .. } => b.add_row_bias(next(), i[0]),
            Op::ScaleRows { .. } => b.scale_rows(next(), i[0]),
            Op::Activation { act, .. } => b.activation(next(), i[0], *act),
            Op::ActivationBackward { act, .. } => b.activation_backward(next(), i[0], i[1], *act),
            Op::Swiglu { width, .. } => b.swiglu(next(), i[0], *width),
            Op::SwigluBackward { width, .. } => b.swiglu_backward(next(), i[0], i[1], *width),
            Op::Layernorm { .. } => b.layernorm(next(), next(), next(), i[0], i[1], i[2], 1e-5),
            Op::ResidualLayernorm { .. } => {
                b.residual_layernorm(next(), next(), next(), next(), i[0], i[1], i[2], i[3], 1e-5)
            }
            Op::LayernormBackward { .. } => {
                b.layernorm_backward(next(), next(), next(), i[0], i[1], i[2], i[3], i[4])
            }
            Op::Rotary {
                len,
                heads,
                hd,
                backward,
                ..
            } => {
                if *backward {
                    b.rotary_backward(next(), i[0], i[1], i[2], *len, *heads, *hd)
                } else {
                    b.rotary(next(), i[0], i[1], i[2], *len, *heads, *hd)
                }
            }
            Op::Embedding { .. } => b.embedding(next(), i[0], i[1]),
            Op::EmbeddingBackward { .. } => b.embedding_backward(next(), i[0], i[1]),
            Op::Attention { dims, lens, bias } => {
                let mut k = 3;
                let kv = lens.as_ref().map(|_| {
                    k += 1;
                    i[k - 1]
                });
                let bias = bias.map(|pb| (i[k], pb));
                b.attention(next(), next(), i[0], i[1], i[2], kv, bias, dims)
            }
            Op::AttentionBackward { dims, lens, bias } => {
                let mut k = 3;
                let kv = lens.as_ref().map(|_| {
                    k += 1;
                    i[k - 1]
                });
                let bias_v = bias.map(|pb| {
                    k += 1;
                    (i[k - 1], pb)
                });
                let (dout, out, lse) = (i[k], i[k + 1], i[k + 2]);
                let (dq, dk, dv) = (next(), next(), next());
                let dbias = bias.map(|_| next());
                b.attention_backward(
                    dq, dk, dv, dbias, dout, out, lse, i[0], i[1], i[2], kv, bias_v, dims,
                )
            }
            Op::RotaryAttention { dims, .. } => {
                let rotated = || {
                    Tensor::<B>::new(b, A, dims.batch * dims.q_len * dims.heads * dims.head_dim)
                        .unwrap()
                };
                let (mut q_rot, mut k_rot) = (rotated(), rotated());
                let scratch = (q_rot.view_mut(), k_rot.view_mut());
                let (q, k, v, tables) = (i[0], i[1], i[2], (i[3], i[4]));
                b.rotary_attention(next(), next(), scratch, q, k, v, tables, Some(i[5]), dims)
            }
            Op::Mse { .. } => b.mse(i[0], i[1]).map(|l| scalars.push(l)),
            Op::MseBackward { .. } => b.mse_backward(next(), i[0], i[1], 0.75),
            Op::SumSquares { .. } => b.sum_squares(i[0]).map(|s| scalars.push(s)),
            Op::AdamW { .. } => {
                let (p, copy, m, v) = (next(), next(), next(), next());
                let step = AdamWStep {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    step: 3,
                    grad_scale: 0.5,
                };
                b.adamw(p, Some(copy), m, v, i[0], &step)
            }
            Op::Copy { .. } => b.copy(next(), i[0]),
            Op::Zero { .. } => b.zero(next()),
            Op::SumRows { .. } => b.sum_rows(next(), i[0]),
            Op::Softmax { dim, .. } => b.softmax(next(), i[0], *dim),
            Op::SoftmaxBackward { dim, .. } => b.softmax_backward(next(), i[0], i[1], *dim),
            Op::Conv1d { dims } => b.conv1d(next(), i[0], i[1], Some(i[2]), dims),
            Op::Conv1dBackward { dims, dx } => {
                let dx = dx.then(&mut next);
                let (dw, db) = (next(), next());
                b.conv1d_backward(dx, dw, Some(db), i[0], i[1], i[2], dims)
            }
            Op::Batchnorm { train, .. } => {
                let stats = if *train {
                    BatchNormStats::Batch
                } else {
                    BatchNormStats::Running {
                        mean: i[3],
                        var: i[4],
                    }
                };
                b.batchnorm(next(), next(), next(), i[0], i[1], i[2], stats, 1e-5)
            }
            Op::BatchnormBackward { train, .. } => b.batchnorm_backward(
                next(),
                next(),
                next(),
                i[0],
                i[1],
                i[2],
                i[3],
                i[4],
                1e-5,
                *train,
            ),
            Op::RunningUpdate { rows, .. } => {
                b.batchnorm_running_update(next(), next(), i[0], i[1], *rows, 0.1)
            }
            Op::Pool { dims } => b.attention_pool(next(), next(), i[0], i[1], dims),
            Op::PoolBackward { dims } => {
                b.attention_pool_backward(next(), next(), i[0], i[1], i[2], i[3], dims)
            }
            Op::Relative {
                batch, heads, n, ..
            } => b.relative_logits(next(), i[0], i[1], *batch, *heads, *n),
            Op::RelativeBackward {
                batch, heads, n, ..
            } => b.relative_logits_backward(next(), next(), i[0], i[1], i[2], *batch, *heads, *n),
        };
        r.unwrap_or_else(|e| panic!("{} on {}: {e}", c.name, b.name()));
    }
    Run {
        outputs: outs.iter().map(|t| b.read_f32(t.view()).unwrap()).collect(),
        scalars,
    }
}

fn max_err(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let err = got.iter().zip(want).fold(0.0f64, |m, (g, w)| {
        if g.is_finite() != w.is_finite() {
            f64::INFINITY
        } else if !g.is_finite() {
            m.max(if g == w { 0.0 } else { f64::INFINITY })
        } else {
            m.max((*g as f64 - *w as f64).abs())
        }
    });
    (err, scale)
}

/// Compares `dev` with the CPU reference `cpu` (and its bf16-storage twin `rounded`); returns the
/// worst ratio of error to bound.
fn compare(
    c: &Case,
    dev_name: &str,
    dev_dtype_bf16: bool,
    linear_inputs_bf16: bool,
    cpu: &Run,
    rounded: &Run,
    dev: &Run,
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    for (k, o) in c.outputs.iter().enumerate() {
        let (err, scale) = max_err(&dev.outputs[k], &cpu.outputs[k]);
        let stored_bf16 = (o.role == Role::Activation && dev_dtype_bf16)
            || (o.role == Role::LinearInput && linear_inputs_bf16);
        let bound = if stored_bf16 {
            let rounded_ref: Vec<f32> = cpu.outputs[k].iter().map(|&v| bf(v)).collect();
            let (e1, _) = max_err(&rounded_ref, &cpu.outputs[k]);
            let (e2, _) = max_err(&rounded.outputs[k], &cpu.outputs[k]);
            2.0 * e1.max(e2) + 1e-6 * scale
        } else if dev_dtype_bf16 {
            // f32 outputs computed from a bf16 intermediate (a rounded residual sum, say) may differ as
            // much as the bf16-storage reference does.
            let (e2, _) = max_err(&rounded.outputs[k], &cpu.outputs[k]);
            (c.f32_tol * scale).max(2.0 * e2) + 1e-30
        } else if o.role == Role::Activation {
            // An f32 device whose products run in another order (the CPU's bf16-weight GEMM): f32
            // rounding of sums of a few hundred terms.
            c.f32_tol.max(1e-5) * scale + 1e-30
        } else {
            c.f32_tol * scale + 1e-30
        };
        if err > bound {
            return Err(format!(
                "{} on {dev_name}: output {} error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})",
                c.name, o.name
            ));
        }
        worst = worst.max(if bound > 0.0 { err / bound } else { 0.0 });
    }
    for (k, (d, w)) in dev.scalars.iter().zip(&cpu.scalars).enumerate() {
        let err = ((d - w) / w.abs().max(1e-30)).abs() as f64;
        if err > c.f32_tol.max(1e-5) {
            return Err(format!(
                "{} on {dev_name}: scalar {k}: {d} against {w}",
                c.name
            ));
        }
    }
    Ok(worst)
}

/// The table of cases: every op, odd sizes, masked rows, every head dim the models use.
fn cases() -> Vec<Case> {
    let mut t = Vec::new();
    let mut seed = 0u64;
    let mut add = |name: String, op: Op| {
        seed += 1;
        t.push(case(name, op, seed));
    };
    for (rows, d_in, d_out) in [(1, 1, 1), (7, 33, 19), (37, 64, 96), (13, 100, 3)] {
        let dims = LinearDims { rows, d_in, d_out };
        add(
            format!("linear {rows}x{d_in}→{d_out}"),
            Op::Linear { dims, bias: false },
        );
        add(
            format!("linear+bias {rows}x{d_in}→{d_out}"),
            Op::Linear { dims, bias: true },
        );
        add(
            format!("linear_backward {rows}x{d_in}→{d_out}"),
            Op::LinearBackward {
                dims,
                dx: true,
                bias: true,
            },
        );
        add(
            format!("linear_backward no dx/bias {rows}x{d_in}→{d_out}"),
            Op::LinearBackward {
                dims,
                dx: false,
                bias: false,
            },
        );
    }
    for act in [Act::GeluErf, Act::GeluSigmoid, Act::Relu] {
        for keep_pre in [true, false] {
            let dims = LinearDims {
                rows: 11,
                d_in: 48,
                d_out: 37,
            };
            add(
                format!("linear_act {act:?} keep_pre={keep_pre}"),
                Op::LinearAct {
                    dims,
                    act,
                    keep_pre,
                },
            );
        }
    }
    // Wider and taller than one bf16 GEMM task (the fused epilogue's blocks and runs), odd k.
    add(
        "linear_act GeluErf 50x33→600 keep_pre=false".into(),
        Op::LinearAct {
            dims: LinearDims {
                rows: 50,
                d_in: 33,
                d_out: 600,
            },
            act: Act::GeluErf,
            keep_pre: false,
        },
    );
    // Ragged halves (45 of a 64-column strip pair), and a product wider than one bf16 GEMM task.
    for (rows, d_in, width) in [(7, 48, 45), (50, 33, 300)] {
        for keep_pre in [true, false] {
            add(
                format!("linear_swiglu {rows}x{d_in}→2·{width} keep_pre={keep_pre}"),
                Op::LinearSwiglu {
                    dims: LinearDims {
                        rows,
                        d_in,
                        d_out: 2 * width,
                    },
                    keep_pre,
                },
            );
        }
    }
    for act in [Act::GeluErf, Act::GeluSigmoid, Act::Relu, Act::Softplus] {
        add(
            format!("activation {act:?}"),
            Op::Activation { n: 1001, act },
        );
        add(
            format!("activation_backward {act:?}"),
            Op::ActivationBackward { n: 1001, act },
        );
    }
    add("add".into(), Op::Add { n: 777 });
    add("add_row_bias".into(), Op::AddRowBias { rows: 9, cols: 31 });
    add("scale_rows".into(), Op::ScaleRows { rows: 9, cols: 31 });
    add("swiglu".into(), Op::Swiglu { rows: 7, width: 45 });
    add(
        "swiglu_backward".into(),
        Op::SwigluBackward { rows: 7, width: 45 },
    );
    for (rows, dim) in [(1, 1), (7, 33), (13, 768), (5, 1000)] {
        add(
            format!("layernorm {rows}x{dim}"),
            Op::Layernorm { rows, dim },
        );
        add(
            format!("residual_layernorm {rows}x{dim}"),
            Op::ResidualLayernorm { rows, dim },
        );
        add(
            format!("layernorm_backward {rows}x{dim}"),
            Op::LayernormBackward { rows, dim },
        );
    }
    for hd in [16, 24, 64] {
        for backward in [false, true] {
            add(
                format!("rotary hd {hd} backward {backward}"),
                Op::Rotary {
                    batch: 2,
                    len: 13,
                    heads: 3,
                    hd,
                    backward,
                },
            );
        }
    }
    add(
        "embedding".into(),
        Op::Embedding {
            tokens: 29,
            vocab: 33,
            dim: 40,
        },
    );
    add(
        "embedding_backward".into(),
        Op::EmbeddingBackward {
            tokens: 29,
            vocab: 33,
            dim: 40,
        },
    );
    // Attention: the head dims of ESM-2 35M (24) and 150M (32), NT-v2 (64), Enformer (64 with 192-wide
    // values), the IsoFormer cross-attention (384); odd lengths, cross attention, key padding with a fully
    // masked row, per-batch and broadcast biases.
    let attn = |batch, heads, q_len, kv_len, hd, vd| AttentionDims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: hd,
        v_head_dim: vd,
        scale: (hd as f32).powf(-0.5),
    };
    type AttentionCase = (String, AttentionDims, Option<Vec<usize>>, Option<bool>);
    let attention_cases: Vec<AttentionCase> = vec![
        (
            "hd 24 padded".into(),
            attn(3, 2, 37, 37, 24, 24),
            Some(vec![37, 20, 1]),
            None,
        ),
        (
            "hd 24 keys over chunks".into(),
            attn(2, 2, 40, 260, 24, 24),
            Some(vec![260, 131]),
            None,
        ),
        (
            "hd 32 masked row".into(),
            attn(2, 2, 19, 19, 32, 32),
            Some(vec![19, 0]),
            None,
        ),
        (
            "hd 64 cross".into(),
            attn(2, 3, 21, 70, 64, 64),
            Some(vec![70, 33]),
            None,
        ),
        (
            "hd 64/192 per-batch bias".into(),
            attn(2, 2, 23, 23, 64, 192),
            None,
            Some(true),
        ),
        (
            "hd 48 broadcast bias".into(),
            attn(2, 2, 17, 29, 48, 48),
            Some(vec![29, 11]),
            Some(false),
        ),
        (
            "hd 384 cross".into(),
            attn(1, 2, 9, 40, 384, 384),
            Some(vec![40]),
            None,
        ),
    ];
    for (name, dims, lens, bias) in attention_cases {
        add(
            format!("attention {name}"),
            Op::Attention {
                dims,
                lens: lens.clone(),
                bias,
            },
        );
        add(
            format!("attention_backward {name}"),
            Op::AttentionBackward { dims, lens, bias },
        );
    }
    add("mse".into(), Op::Mse { n: 1234 });
    add("mse_backward".into(), Op::MseBackward { n: 1234 });
    add("sum_squares".into(), Op::SumSquares { n: 100_003 });
    add("adamw".into(), Op::AdamW { n: 3001 });
    add(
        "copy bf16".into(),
        Op::Copy {
            n: 333,
            from: A,
            to: A,
        },
    );
    add(
        "copy f32→compute".into(),
        Op::Copy {
            n: 333,
            from: E,
            to: A,
        },
    );
    add(
        "copy compute→f32".into(),
        Op::Copy {
            n: 333,
            from: A,
            to: E,
        },
    );
    add(
        "copy f32".into(),
        Op::Copy {
            n: 333,
            from: E,
            to: E,
        },
    );
    add("zero".into(), Op::Zero { n: 99 });
    add(
        "sum_rows".into(),
        Op::SumRows {
            rows: 57,
            cols: 130,
        },
    );
    for (rows, dim) in [(3, 1), (9, 70), (4, 1000)] {
        add(format!("softmax {rows}x{dim}"), Op::Softmax { rows, dim });
        add(
            format!("softmax_backward {rows}x{dim}"),
            Op::SoftmaxBackward { rows, dim },
        );
    }
    for (len, c_in, c_out, width) in [(17, 4, 12, 15), (16, 12, 20, 5), (9, 20, 20, 1)] {
        let dims = Conv1dDims {
            batch: 2,
            len,
            c_in,
            c_out,
            width,
        };
        add(format!("conv1d w{width}"), Op::Conv1d { dims });
        add(
            format!("conv1d_backward w{width}"),
            Op::Conv1dBackward { dims, dx: true },
        );
        add(
            format!("conv1d_backward w{width} no dx"),
            Op::Conv1dBackward { dims, dx: false },
        );
    }
    for train in [false, true] {
        add(
            format!("batchnorm train {train}"),
            Op::Batchnorm {
                rows: 37,
                c: 21,
                train,
            },
        );
        add(
            format!("batchnorm_backward train {train}"),
            Op::BatchnormBackward {
                rows: 37,
                c: 21,
                train,
            },
        );
    }
    add(
        "batchnorm_running_update".into(),
        Op::RunningUpdate { rows: 37, c: 21 },
    );
    for len in [8, 9] {
        let dims = PoolDims {
            batch: 2,
            len,
            channels: 12,
        };
        add(format!("attention_pool len {len}"), Op::Pool { dims });
        add(
            format!("attention_pool_backward len {len}"),
            Op::PoolBackward { dims },
        );
    }
    add(
        "relative_logits".into(),
        Op::Relative {
            batch: 2,
            heads: 3,
            n: 11,
            dk: 8,
        },
    );
    add(
        "relative_logits_backward".into(),
        Op::RelativeBackward {
            batch: 2,
            heads: 3,
            n: 11,
            dk: 8,
        },
    );
    // Cases added later go last, so that the earlier cases keep their seeds.
    // Whole 32×32 blocks in one k-block (the bf16 GEMM starts them from the bias), ragged ones, and k
    // past one k-block.
    for (rows, d_in, d_out, bias) in [
        (64, 64, 96, true),
        (7, 9, 5, false),
        (37, 48, 70, true),
        (33, 1100, 40, false),
    ] {
        add(
            format!("linear_residual {rows}x{d_in}→{d_out} bias={bias}"),
            Op::LinearResidual {
                dims: LinearDims { rows, d_in, d_out },
                bias,
            },
        );
    }
    // Rotary self-attention: ESM-2 35M's head dim with padding and a fully masked entry, NT-v2's 64 with
    // keys past one chunk of the bf16 products' online softmax.
    for (name, dims, lens) in [
        ("hd 24 padded", attn(3, 2, 37, 37, 24, 24), vec![37, 20, 0]),
        ("hd 48", attn(2, 2, 45, 45, 48, 48), vec![45, 31]),
        ("hd 64 long", attn(1, 2, 1030, 1030, 64, 64), vec![1030]),
    ] {
        add(
            format!("rotary_attention {name}"),
            Op::RotaryAttention { dims, lens },
        );
    }
    t
}

/// Runs every case on `b` against the CPU; returns the number of cases.
fn check_backend<B: Backend>(b: &B) -> usize {
    let (cpu, rounded) = (CpuBackend::new(), CpuBackend::with_bf16_storage());
    let bf16 = b.compute_dtype() != isoformer_engine::DType::F32;
    let all = cases();
    let mut worst = (0.0f64, String::new());
    for c in &all {
        // The backward of attention reads the reference forward's outputs.
        let fwd = match &c.op {
            Op::AttentionBackward { dims, lens, bias } => {
                let f = case(
                    "fwd",
                    Op::Attention {
                        dims: *dims,
                        lens: lens.clone(),
                        bias: *bias,
                    },
                    0,
                );
                let mut f = f;
                f.inputs = c
                    .inputs
                    .iter()
                    .take(c.inputs.len() - 1)
                    .map(|i| Input {
                        role: i.role,
                        data: i.data.clone(),
                    })
                    .collect();
                Some(run(&cpu, &f, None))
            }
            _ => None,
        };
        let want = run(&cpu, c, fwd.as_ref());
        let ref_rounded = run(&rounded, c, fwd.as_ref());
        let got = run(b, c, fwd.as_ref());
        // With bf16 weights, attention's products take bf16 operands (the probabilities are rounded):
        // its outputs are held to the bf16 criterion.
        let bf16_weights = b.weight_dtype() == isoformer_engine::DType::BF16;
        let bf16_products =
            bf16_weights && matches!(c.op, Op::Attention { .. } | Op::RotaryAttention { .. });
        let ratio = compare(
            c,
            &b.name(),
            bf16 || bf16_products,
            // f32 activations with bf16 weights: the inputs of linear layers alone are stored in bf16.
            bf16_weights && !bf16,
            &want,
            &ref_rounded,
            &got,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if ratio > worst.0 {
            worst = (ratio, c.name.clone());
        }
    }
    println!(
        "{}: {} cases pass; closest to its bound: {} ({:.2} of it)",
        b.name(),
        all.len(),
        worst.1,
        worst.0
    );
    all.len()
}

#[test]
fn emu_every_op_matches_the_cpu_and_every_kernel_is_reached() {
    check_backend(&KernelBackend::new(EmuDevice::default()));
    // Again with each block's threads in the opposite order: a missing barrier shows in one order or
    // the other. On a new thread, whose `__shared__` arrays (thread-locals in the emulator) do not hold
    // what the first pass left in them.
    std::thread::spawn(|| check_backend(&KernelBackend::new(EmuDevice::reversed())))
        .join()
        .expect("the emulator in descending thread order");
    let launched = EmuDevice::launched_kernels();
    let missing: Vec<String> = EmuDevice::kernels()
        .into_iter()
        .filter(|k| !k.starts_with("selftest_") && !launched.contains(k))
        .collect();
    println!(
        "kernels reached: {} of {} (the selftest kernels are the emulator's own tests)",
        launched
            .iter()
            .filter(|k| !k.starts_with("selftest_"))
            .count(),
        EmuDevice::kernels()
            .iter()
            .filter(|k| !k.starts_with("selftest_"))
            .count()
    );
    assert!(missing.is_empty(), "kernels no case reaches: {missing:?}");
}

/// The CPU as `--dtype bf16` runs it: bf16 weights on the bf16 GEMM (linear layers and convolutions),
/// f32 activations. The harness's inputs are bf16-exact, so the products are exact and every output
/// meets the f32 bounds.
#[test]
fn cpu_bf16_weights_every_op_matches_the_cpu() {
    let b = CpuBackend::bf16();
    assert_eq!(b.weight_dtype(), isoformer_engine::DType::BF16);
    assert_eq!(b.compute_dtype(), isoformer_engine::DType::F32);
    check_backend(&b);
}

/// The CPU with bf16 activations and weight copies (the `vdpbf16ps` GEMM where the CPU has it) meets the
/// same bounds as the kernel devices.
#[test]
fn cpu_bf16_activations_every_op_matches_the_cpu() {
    let b = CpuBackend::bf16_activations();
    assert_eq!(b.compute_dtype(), isoformer_engine::DType::BF16);
    check_backend(&b);
}

/// The CPU backend through the harness against itself twice: deterministic, and a broken output is
/// caught (the harness can fail).
#[test]
fn cpu_harness_is_deterministic_and_catches_a_wrong_output() {
    let cpu = CpuBackend::new();
    let c = case(
        "linear",
        Op::Linear {
            dims: LinearDims {
                rows: 7,
                d_in: 9,
                d_out: 5,
            },
            bias: true,
        },
        1,
    );
    let (a, b) = (run(&cpu, &c, None), run(&cpu, &c, None));
    assert_eq!(a.outputs, b.outputs);
    let mut bad = run(&cpu, &c, None);
    bad.outputs[0][3] += 0.1;
    let rounded = run(&CpuBackend::with_bf16_storage(), &c, None);
    assert!(
        compare(&c, "mutated", true, false, &a, &rounded, &bad).is_err(),
        "a wrong output must fail the comparison"
    );
}

#[test]
fn gpu_every_op_when_a_gpu_is_present() {
    match CudaDevice::new(0) {
        Ok(dev) => {
            check_backend(&KernelBackend::new(dev));
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no GPU run ({e})");
        }
    }
}
