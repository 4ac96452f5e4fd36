//! The command line as users call it.

use std::process::Command;

fn engine(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_isoformer-engine"))
        .args(args)
        .output()
        .expect("run isoformer-engine")
}

#[test]
fn bench_gemm_prints_the_median_in_gflops() {
    for dtype in ["f32", "bf16"] {
        let out = engine(&[
            "bench",
            "gemm",
            "--m",
            "65",
            "--n",
            "33",
            "--k",
            "17",
            "--threads",
            "2",
            "--dtype",
            dtype,
            "--repeats",
            "3",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let last = stdout.lines().last().expect("output");
        let number = last
            .strip_suffix(" GFLOP/s")
            .unwrap_or_else(|| panic!("last line '{last}'"));
        let value: f64 = number
            .parse()
            .unwrap_or_else(|_| panic!("not a number: '{number}'"));
        assert!(value > 0.0 && value.is_finite());
        assert!(
            stdout.contains(&format!("gemm {dtype} m=65 n=33 k=17")),
            "{stdout}"
        );
    }
}

#[test]
fn unavailable_device_and_bad_arguments_are_clear_errors() {
    let out = engine(&["bench", "gemm", "--m", "8", "--device", "cuda"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CUDA") && err.contains("--device cpu"),
        "{err}"
    );

    let out = engine(&["bench", "gemm", "--dtype", "f64"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid dtype: 'f64'"));

    let out = engine(&["bench", "gemm", "--m", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be positive"));
}
