//! Integration tests: `sce`, `multislerp`, `karcher` and `nearswap` against mergekit 0.1.5, each
//! golden recipe run whole — recipe parser, planner, executor (streamed where the method
//! streams) — as `evomerge merge` runs it.
//!
//! Golden files are in `tests/golden/<case>/` (made by `tests/golden/make_golden.py`). The f32
//! cases must agree to float rounding: per tensor, the largest `|ours − mergekit|` over the
//! tensor's largest `|mergekit|` is at most 1e-5. The bf16 cases read the models rounded to
//! bfloat16 (`tests/golden/models_bf16`) and write bf16, in two forms: `*_bf16_f32math`
//! (`dtype: float32, out_dtype: bfloat16`: mergekit computes in `f32` like evomerge, so the two
//! agree to the bit) and `*_bf16` (`dtype: bfloat16`: mergekit computes in bf16, evomerge in
//! `f32` rounding once, so they are compared in bf16 ulps with limits set from what was
//! measured; see [`BF16_MATH`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use evomerge::merge::executor::merge_in_memory;
use evomerge::recipe::Recipe;
use evomerge::store::ModelSet;
use evomerge::tensor::DType;
use safetensors::{Dtype, SafeTensors};

pub(crate) type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

pub(crate) fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Every tensor of a safetensors file as `f32` (bf16 widened exactly), with its shape (also
/// used by [`crate::methods_bf16`]).
pub(crate) fn load(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                    .collect(),
                other => panic!("{}: {name}: unexpected dtype {other:?}", path.display()),
            };
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Merge a golden case's recipe in memory: its tensors as `f32`, and their dtype.
fn merge_case(case: &str) -> (Tensors, Vec<DType>) {
    let recipe = Recipe::from_path(golden().join(case).join("recipe.yml"))
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let merged =
        merge_in_memory(&recipe, &mut ModelSet::new(), 0).unwrap_or_else(|e| panic!("{case}: {e}"));
    let dtypes = merged.tensors.values().map(|t| t.dtype()).collect();
    let tensors = merged
        .tensors
        .iter()
        .map(|(name, t)| (name.clone(), (t.shape.clone(), t.values().into_owned())))
        .collect();
    (tensors, dtypes)
}

/// The largest per-tensor relative error (`|ours − theirs| / max |theirs|`), and where.
fn worst_relative(case: &str, got: &Tensors, want: &Tensors) -> (f64, String) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: tensor names"
    );
    let mut worst = (0.0f64, String::new());
    for (name, (shape, w)) in want {
        let (gshape, g) = &got[name];
        assert_eq!(gshape, shape, "{case}: {name} shape");
        let scale = w.iter().fold(0.0f32, |a, x| a.max(x.abs())).max(1e-6);
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            let rel = f64::from((a - b).abs() / scale);
            if rel > worst.0 || rel.is_nan() {
                worst = (rel, format!("{name}[{i}]: ours {a}, mergekit {b}"));
            }
        }
    }
    worst
}

const F32_CASES: &[&str] = &[
    "sce",
    "multislerp",
    "multislerp_base",
    "karcher",
    "karcher_default",
    "nearswap",
];

/// The f32 cases equal mergekit's output to float rounding.
#[test]
fn f32_cases_match_mergekit() {
    let mut report = Vec::new();
    for case in F32_CASES {
        let want = load(&golden().join(case).join("merged.safetensors"));
        let (got, dtypes) = merge_case(case);
        assert!(
            dtypes.iter().all(|d| *d == DType::F32),
            "{case}: {dtypes:?}"
        );
        let (worst, at) = worst_relative(case, &got, &want);
        assert!(worst <= 1e-5, "{case}: relative error {worst:.2e} at {at}");
        report.push(format!("{case}: max relative error {worst:.2e}"));
    }
    println!("{}", report.join("\n"));
}

/// One bf16 ulp at `x` (the spacing of bf16 values in `x`'s binade; subnormals share the
/// smallest normal spacing).
fn bf16_ulp(x: f32) -> f32 {
    let exp = (x.abs().to_bits() >> 23) as i32 - 127;
    2f32.powi(exp.max(-126) - 7)
}

/// A case on the bf16 models: the models it reads, the most bf16 ulps an entry may differ by
/// (at the entry's scale for `dtype: bfloat16`, of the value for f32 math), and for SCE the most
/// entries the two may select differently (see [`bf16_cases_match_mergekit_in_bf16_ulps`]).
struct Bf16Case {
    dir: &'static str,
    used: &'static [&'static str],
    ulps: f32,
    selection_mismatches: usize,
}

const ALL: &[&str] = &["base", "ft_a", "ft_b"];

/// `dtype: bfloat16`: mergekit's arithmetic in bf16. Measured (2,232 entries each): nearswap 1
/// ulp, multislerp 3, karcher 69, SCE 2 outside 8 entries selected differently.
const BF16_MATH: &[Bf16Case] = &[
    Bf16Case {
        dir: "nearswap_bf16",
        used: &["base", "ft_a"],
        ulps: 1.0,
        selection_mismatches: 0,
    },
    Bf16Case {
        dir: "multislerp_bf16",
        used: ALL,
        ulps: 3.0,
        selection_mismatches: 0,
    },
    Bf16Case {
        dir: "karcher_bf16",
        used: ALL,
        ulps: 80.0,
        selection_mismatches: 0,
    },
    Bf16Case {
        dir: "sce_bf16",
        used: ALL,
        ulps: 2.0,
        selection_mismatches: 12,
    },
];

/// `dtype: float32, out_dtype: bfloat16`: mergekit's arithmetic in f32, as evomerge's. Measured:
/// every entry equal (0 ulps), but SCE's: 8 entries selected differently, where torch's `topk`
/// kept other entries tied at the cut, and up to 2 ulps in the tensors where that happened (the
/// swapped entries change the task vectors' mean squares, so the weights).
const F32_MATH: &[Bf16Case] = &[
    Bf16Case {
        dir: "nearswap_bf16_f32math",
        used: &["base", "ft_a"],
        ulps: 1.0,
        selection_mismatches: 0,
    },
    Bf16Case {
        dir: "multislerp_bf16_f32math",
        used: ALL,
        ulps: 1.0,
        selection_mismatches: 0,
    },
    Bf16Case {
        dir: "karcher_bf16_f32math",
        used: ALL,
        ulps: 1.0,
        selection_mismatches: 0,
    },
    Bf16Case {
        dir: "sce_bf16_f32math",
        used: ALL,
        ulps: 2.0,
        selection_mismatches: 12,
    },
];

/// Compare one bf16 case; returns its report line. `at_scale`: measure ulps at the entry's
/// scale (largest of mergekit's value and the inputs there) instead of at mergekit's value.
fn compare_bf16(case: &Bf16Case, inputs: &BTreeMap<&str, Tensors>, at_scale: bool) -> String {
    let dir = case.dir;
    let want = load(&golden().join(dir).join("merged.safetensors"));
    let (got, dtypes) = merge_case(dir);
    assert!(
        dtypes.iter().all(|d| *d == DType::BF16),
        "{dir}: {dtypes:?}"
    );
    let (worst_rel, _) = worst_relative(dir, &got, &want);
    let (mut worst, mut over, mut mismatched, mut total) = (0.0f32, 0usize, 0usize, 0usize);
    for (name, (_, w)) in &want {
        let g = &got[name].1;
        let base = &inputs["base"][name].1;
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            total += 1;
            let scale = if at_scale {
                case.used
                    .iter()
                    .map(|m| inputs[m][name].1[i].abs())
                    .fold(b.abs(), f32::max)
            } else {
                b.abs()
            };
            let ulps = (a - b).abs() / bf16_ulp(scale);
            if ulps <= case.ulps {
                worst = worst.max(ulps);
            } else if case.selection_mismatches > 0 && ((*a == base[i]) != (*b == base[i])) {
                // SCE leaves an unselected entry at the base value: one side selected it
                mismatched += 1;
            } else {
                over += 1;
                println!("{dir}: {name}[{i}]: ours {a}, mergekit {b} ({ulps} ulps)");
            }
        }
    }
    assert_eq!(
        over, 0,
        "{dir}: {over} entries differ by more than {} ulps",
        case.ulps
    );
    assert!(
        mismatched <= case.selection_mismatches,
        "{dir}: {mismatched} entries selected differently"
    );
    format!(
        "{dir}: max {worst} bf16 ulps (limit {}), {mismatched} of {total} entries selected \
         differently; max relative error {worst_rel:.2e}",
        case.ulps
    )
}

/// The bf16 cases, written as bf16. With f32 arithmetic on both sides they agree to the bit
/// (SCE: but for entries tied at its cut, which torch's `topk` orders its own way). With
/// mergekit computing in bf16 they differ by its rounding: every intermediate rounds to bf16
/// there, so the error at an entry scales with the magnitudes computed with, not with the
/// result (nearswap's `w·b + (1 − w)·a` can cancel far below `a` and `b`) — measured in ulps at
/// the entry's scale. karcher in bf16 rounds each `<m, u_j>` to bf16 before `arccos` (a step of
/// 2⁻⁸ near 1, so angles of ~0.1 are off by several per cent), hence its large limit; SCE ranks
/// bf16 variances, which tie more, so more entries at its cut are selected differently.
#[test]
fn bf16_cases_match_mergekit_in_bf16_ulps() {
    let inputs: BTreeMap<&str, Tensors> = ALL
        .iter()
        .map(|m| {
            let path = golden()
                .join("models_bf16")
                .join(m)
                .join("model.safetensors");
            (*m, load(&path))
        })
        .collect();
    let mut report = Vec::new();
    for case in F32_MATH {
        report.push(compare_bf16(case, &inputs, false));
    }
    for case in BF16_MATH {
        report.push(compare_bf16(case, &inputs, true));
    }
    println!("{}", report.join("\n"));
}

fn evomerge(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evomerge"))
        .args(args)
        .output()
        .unwrap()
}

/// `evomerge methods` lists the four methods with their parameters, and `evomerge merge` runs
/// their recipes from the command line (streamed to disk) to mergekit's result.
#[test]
fn cli_lists_and_merges_the_methods() {
    let out = evomerge(&["methods"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    for (method, params) in [
        (
            "sce",
            &["`select_topk` = 1 in [0, 1]", "`int8_mask` = false"][..],
        ),
        (
            "multislerp",
            &["`weight` = required", "`normalize_weights` = true", "`eps`"][..],
        ),
        ("karcher", &["`max_iter` = 10 in [0, 50]", "`tol`"][..]),
        ("nearswap", &["`t` = required in [0, 0.01]"][..]),
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| `{method}` |")))
            .unwrap_or_else(|| panic!("{method} not in\n{table}"));
        for p in params {
            assert!(row.contains(p), "{method}: {p} not in {row}");
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    for case in ["multislerp_base", "karcher", "nearswap", "sce"] {
        let out_dir = tmp.path().join(case);
        let recipe = golden().join(case).join("recipe.yml");
        let out = evomerge(&[
            "merge",
            recipe.to_str().unwrap(),
            out_dir.to_str().unwrap(),
            "--quiet",
        ]);
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = load(&out_dir.join("model.safetensors"));
        let want = load(&golden().join(case).join("merged.safetensors"));
        let (worst, at) = worst_relative(case, &got, &want);
        assert!(worst <= 1e-5, "{case} via the CLI: {worst:.2e} at {at}");
    }
}

/// Recipe-level errors name the problem: a missing base model, the wrong number of models, a
/// missing required parameter.
#[test]
fn recipe_errors_for_the_methods() {
    let tmp = tempfile::tempdir().unwrap();
    let models = golden().join("models");
    let m = |x: &str| models.join(x).display().to_string();
    let cases = [
        (
            format!(
                "merge_method: nearswap\nmodels:\n  - model: {}\nparameters:\n  t: 0.01\n",
                m("ft_a")
            ),
            "base_model",
        ),
        (
            format!(
                "merge_method: nearswap\nbase_model: {}\nmodels:\n  - model: {}\n  - model: {}\n\
                 parameters:\n  t: 0.01\n",
                m("base"),
                m("ft_a"),
                m("ft_b")
            ),
            "exactly 1",
        ),
        (
            format!(
                "merge_method: nearswap\nbase_model: {}\nmodels:\n  - model: {}\n",
                m("base"),
                m("ft_a")
            ),
            "`t`",
        ),
        (
            format!(
                "merge_method: sce\nmodels:\n  - model: {}\n  - model: {}\n",
                m("ft_a"),
                m("ft_b")
            ),
            "base_model",
        ),
        (
            format!(
                "merge_method: multislerp\nmodels:\n  - model: {}\n    parameters: {{weight: 1}}\n  \
                 - model: {}\n",
                m("ft_a"),
                m("ft_b")
            ),
            "`weight`",
        ),
        (
            format!(
                "merge_method: karcher\nmodels:\n  - model: {}\nparameters:\n  max_iters: 3\n",
                m("ft_a")
            ),
            "max_iters",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("r{i}.yml"));
        std::fs::write(&path, text).unwrap();
        let err = Recipe::from_path(&path)
            .and_then(|r| merge_in_memory(&r, &mut ModelSet::new(), 0).map(|_| ()))
            .expect_err(text)
            .to_string();
        assert!(err.contains(needle), "{needle} not in: {err}\n{text}");
    }
}

/// Straightforward whole-vector versions of the formulas (f64, no Gram matrices, no chunks),
/// against which the streamed merges are checked on tensors of several stream chunks.
mod reference {
    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// multislerp with a base model, normalised weights.
    pub fn multislerp(base: &[f64], models: &[Vec<f64>], w: &[f64], eps: f64) -> Vec<f64> {
        let total: f64 = w.iter().sum();
        let w: Vec<f64> = w.iter().map(|x| x / total).collect();
        let v: Vec<Vec<f64>> = models
            .iter()
            .map(|m| m.iter().zip(base).map(|(x, b)| x - b).collect())
            .collect();
        let norms: Vec<f64> = v.iter().map(|v| norm(v)).collect();
        let n = base.len();
        let mut mean = vec![0.0; n];
        for ((v, nv), w) in v.iter().zip(&norms).zip(&w) {
            for (m, x) in mean.iter_mut().zip(v) {
                *m += w * x / (nv + eps);
            }
        }
        let mn = norm(&mean);
        let avg: f64 = norms.iter().zip(&w).map(|(n, w)| n * w).sum();
        (0..n).map(|i| base[i] + mean[i] / mn * avg).collect()
    }

    /// karcher over `inputs`, equal weights, no zero inputs.
    pub fn karcher(inputs: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
        let k = inputs.len() as f64;
        let norms: Vec<f64> = inputs.iter().map(|v| norm(v)).collect();
        let units: Vec<Vec<f64>> = inputs
            .iter()
            .zip(&norms)
            .map(|(v, n)| v.iter().map(|x| x / n).collect())
            .collect();
        let n = inputs[0].len();
        let mut mean = vec![0.0; n];
        for u in &units {
            for (m, x) in mean.iter_mut().zip(u) {
                *m += x / k;
            }
        }
        let mn = norm(&mean);
        mean.iter_mut().for_each(|m| *m /= mn);
        for _ in 0..max_iter {
            let mut t = vec![0.0; n];
            for u in &units {
                let d = dot(&mean, u).clamp(-1.0, 1.0);
                let th = d.acos();
                if th < tol {
                    continue;
                }
                for i in 0..n {
                    t[i] += th / th.sin() / k * (u[i] - d * mean[i]);
                }
            }
            let tn = norm(&t);
            if tn < tol {
                break;
            }
            for i in 0..n {
                mean[i] = tn.cos() * mean[i] + tn.sin() * t[i] / tn;
            }
            let un = norm(&mean);
            mean.iter_mut().for_each(|m| *m /= un);
        }
        let scale: f64 = norms.iter().sum::<f64>() / k;
        mean.iter().map(|m| m * scale).collect()
    }

    /// sce with selection `topk` (ties at the cut broken by index).
    pub fn sce(base: &[f64], models: &[Vec<f64>], topk: f64) -> Vec<f64> {
        let n = base.len();
        let k = models.len() as f64;
        let mut tv: Vec<Vec<f64>> = models
            .iter()
            .map(|m| m.iter().zip(base).map(|(x, b)| x - b).collect())
            .collect();
        let var: Vec<f64> = (0..n)
            .map(|i| {
                let mean = tv.iter().map(|t| t[i]).sum::<f64>() / k;
                tv.iter().map(|t| (t[i] - mean).powi(2)).sum::<f64>() / k
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let keep = ((nonzero as f32) * (topk as f32)) as usize;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| var[y].total_cmp(&var[x]).then(x.cmp(&y)));
        let mut kept = vec![false; n];
        for &i in &order[..keep] {
            kept[i] = true;
        }
        for t in &mut tv {
            for (x, &kp) in t.iter_mut().zip(&kept) {
                if !kp {
                    *x = 0.0;
                }
            }
        }
        let ms: Vec<f64> = tv
            .iter()
            .map(|t| t.iter().map(|x| x * x).sum::<f64>() / n as f64)
            .collect();
        let total: f64 = ms.iter().sum();
        let w: Vec<f64> = ms.iter().map(|m| m / total).collect();
        (0..n)
            .map(|i| {
                let s: f64 = tv.iter().map(|t| t[i]).sum();
                let (mut acc, mut div) = (0.0, 0.0);
                for (t, w) in tv.iter().zip(&w) {
                    if (s >= 0.0 && t[i] > 0.0) || (s < 0.0 && t[i] < 0.0) {
                        acc += t[i] * w;
                        div += w;
                    }
                }
                base[i] + acc / f64::max(div, 1e-6)
            })
            .collect()
    }
}

/// On tensors of several stream chunks (the last one short), the streamed merges equal the
/// whole-vector formulas: Gram partials and SCE's mask indices are placed by chunk.
#[test]
fn streamed_merges_equal_the_whole_vector_formulas() {
    use evomerge::merge::stream::STREAM_CHUNK;
    use evomerge::merge::{MergeInput, Params, method};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let n = 3 * STREAM_CHUNK + 17;
    let shape = [n];
    let mut rng = StdRng::seed_from_u64(12);
    let base: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
    let models: Vec<Vec<f32>> = (0..3)
        .map(|j| {
            base.iter()
                .map(|b| b + 0.1 * (rng.random::<f32>() - 0.5) + 0.02 * j as f32)
                .collect()
        })
        .collect();
    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| f64::from(x)).collect() };
    let base64 = wide(&base);
    let models64: Vec<Vec<f64>> = models.iter().map(|m| wide(m)).collect();
    let params = |pairs: &[(&str, f64)]| {
        let mut p = Params::default();
        for (k, v) in pairs {
            p.set(k, *v);
        }
        p
    };
    let run = |name: &str, with_base: bool, mp: Vec<Params>, global: Params| -> Vec<f32> {
        method(name)
            .unwrap()
            .merge(&MergeInput {
                tensor: "big.weight",
                shape: &shape,
                base: with_base.then_some(base.as_slice()),
                models: models.iter().map(Vec::as_slice).collect(),
                model_params: mp,
                global,
                aux: Vec::new(),
                seed: 0,
            })
            .unwrap()
    };
    let close = |what: &str, got: &[f32], want: &[f64]| {
        let scale = want.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let rel = (f64::from(*g) - w).abs() / scale;
            assert!(rel < 1e-6, "{what}[{i}]: {g} vs {w} ({rel:.1e})");
        }
    };

    let weights = [0.5, 0.3, 0.2];
    let got = run(
        "multislerp",
        true,
        weights.iter().map(|w| params(&[("weight", *w)])).collect(),
        params(&[("normalize_weights", 1.0), ("eps", 1e-8)]),
    );
    close(
        "multislerp",
        &got,
        &reference::multislerp(&base64, &models64, &weights, 1e-8),
    );

    let got = run(
        "karcher",
        false,
        vec![Params::default(); 3],
        params(&[("max_iter", 10.0), ("tol", 1e-9)]),
    );
    close("karcher", &got, &reference::karcher(&models64, 10, 1e-9));

    for topk in [1.0, 0.37] {
        let got = run(
            "sce",
            true,
            vec![Params::default(); 3],
            params(&[("select_topk", topk), ("int8_mask", 0.0)]),
        );
        close("sce", &got, &reference::sce(&base64, &models64, topk));
    }
}
