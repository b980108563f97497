//! Integration tests: the transformer forward (src/model/) against a pencil-and-paper case, a
//! naive scalar re-implementation, and PyTorch/transformers reference logits
//! (tests/data/make_reference.py); routes; errors naming tensors.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use evomerge::candidate::{Candidate, CandidateBody, Hop, MemModel, Route, TensorMap};
use evomerge::model::{Transformer, build, forward_route};
use evomerge::tensor::TensorBuf;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn data_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(case)
}

fn logits_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Logits of a tiny HF checkpoint match PyTorch's (≤ 1e-4 relative to the largest logit).
fn check_reference(case: &str) {
    let dir = data_dir(case);
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let want = logits_vec(&reference["logits"]);
    let cand = Candidate {
        body: CandidateBody::Dir(dir),
        recipe: None,
    };
    let model = build(&cand, &Device::Cpu, candle_core::DType::F32).unwrap();
    let got = model.forward(&ids).unwrap();
    assert_eq!(got.dims(), reference["logits"].dims());
    let rel = max_rel_diff(&logits_vec(&got), &want);
    assert!(rel <= 1e-4, "{case}: max relative difference {rel}");
}

#[test]
fn tiny_llama_matches_transformers_reference() {
    check_reference("tiny_llama");
}

#[test]
fn tiny_qwen2_with_bias_and_tied_head_matches_transformers_reference() {
    check_reference("tiny_qwen2");
}

/// Llama 3.1's `llama3` RoPE scaling (all three frequency bands in use) matches transformers;
/// the same weights with plain RoPE do not, so the scaling is what makes the match.
#[test]
fn llama3_rope_scaling_matches_transformers_reference() {
    check_reference("tiny_llama3_rope");
    let dir = data_dir("tiny_llama3_rope");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"]["rope_type"] = json!("default");
    let plain = tempfile::tempdir().unwrap();
    std::fs::write(plain.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        plain.path().join("model.safetensors"),
    )
    .unwrap();
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = reference["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let cand = Candidate {
        body: CandidateBody::Dir(plain.path().to_path_buf()),
        recipe: None,
    };
    let got = build(&cand, &Device::Cpu, candle_core::DType::F32)
        .unwrap()
        .forward(&ids)
        .unwrap();
    let rel = max_rel_diff(&logits_vec(&got), &logits_vec(&reference["logits"]));
    assert!(
        rel > 1e-2,
        "plain RoPE should differ, max relative difference {rel}"
    );
}

/// Unsupported RoPE scaling is an error naming the type, not silently different logits.
#[test]
fn unsupported_rope_scaling_is_an_error() {
    let dir = data_dir("tiny_llama3_rope");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"]["rope_type"] = json!("yarn");
    let err = evomerge::model::LlamaConfig::from_json(&config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("yarn") && err.contains("not supported"),
        "{err}"
    );
}

/// One layer, hidden 2, one head, a single token: RoPE at position 0 is the identity, attention
/// over one position returns v, the MLP is zero. With embedding e = [3, 4], unit norms, eps 0:
/// n = e / rms(e) = e / √12.5; x = e + n is parallel to e, so the final norm gives n again, and
/// the tied head gives logits [e·n, [1, 0]·n] = [25/√12.5, 3/√12.5] = [5√2, 0.6√2].
#[test]
fn one_layer_pencil_and_paper_case() {
    let config = json!({
        "hidden_size": 2, "intermediate_size": 1, "num_hidden_layers": 1,
        "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 2,
        "rms_norm_eps": 0.0, "tie_word_embeddings": true
    });
    let t = |shape: Vec<usize>, data: Vec<f32>| TensorBuf::new(shape, data);
    let eye = || t(vec![2, 2], vec![1., 0., 0., 1.]);
    let mut tensors = TensorMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        t(vec![2, 2], vec![3., 4., 1., 0.]),
    );
    let p = "model.layers.0";
    for n in ["input_layernorm", "post_attention_layernorm"] {
        tensors.insert(format!("{p}.{n}.weight"), t(vec![2], vec![1., 1.]));
    }
    for n in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        tensors.insert(format!("{p}.self_attn.{n}.weight"), eye());
    }
    for n in ["gate_proj", "up_proj"] {
        tensors.insert(format!("{p}.mlp.{n}.weight"), t(vec![1, 2], vec![0., 0.]));
    }
    tensors.insert(
        format!("{p}.mlp.down_proj.weight"),
        t(vec![2, 1], vec![0., 0.]),
    );
    tensors.insert("model.norm.weight".into(), t(vec![2], vec![1., 1.]));
    let model = Transformer::from_mem(
        &MemModel { config, tensors },
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let ids = Tensor::new(&[[0u32]], &Device::Cpu).unwrap();
    let got = logits_vec(&model.logits(&ids).unwrap());
    let want = [5.0 * 2f32.sqrt(), 0.6 * 2f32.sqrt()];
    assert!(
        (got[0] - want[0]).abs() < 1e-5 && (got[1] - want[1]).abs() < 1e-5,
        "{got:?}"
    );
}

/// A small random model (GQA, q/k/v bias, separate head, several positions).
fn random_model(seed: u64, with_bias: bool) -> MemModel {
    let config = json!({
        "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 11,
        "rms_norm_eps": 1e-6, "rope_theta": 100.0, "tie_word_embeddings": false
    });
    let cfg = evomerge::model::LlamaConfig::from_json(&config).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors = cfg
        .tensor_shapes(with_bias)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
            (name, TensorBuf::new(shape, data))
        })
        .collect();
    MemModel { config, tensors }
}

/// A naive scalar (f64) Llama forward, written independently of src/model/, for one sequence.
fn naive_forward(m: &MemModel, ids: &[u32]) -> Vec<f64> {
    let c = &m.config;
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    let (h, nh, nkv, vocab) = (
        get("hidden_size"),
        get("num_attention_heads"),
        get("num_key_value_heads"),
        get("vocab_size"),
    );
    let hd = h / nh;
    let eps = c["rms_norm_eps"].as_f64().unwrap();
    let theta = c["rope_theta"].as_f64().unwrap();
    let w = |name: &str| -> (Vec<usize>, Vec<f64>) {
        let t = &m.tensors[name];
        (
            t.shape.clone(),
            t.values().iter().map(|&v| v as f64).collect(),
        )
    };
    let has = |name: &str| m.tensors.contains_key(name);
    let matvec = |name: &str, x: &[f64]| -> Vec<f64> {
        let (s, d) = w(name);
        let mut y: Vec<f64> = (0..s[0])
            .map(|o| (0..s[1]).map(|i| d[o * s[1] + i] * x[i]).sum())
            .collect();
        let bias = name.replace(".weight", ".bias");
        if has(&bias) {
            let (_, b) = w(&bias);
            for (yo, bo) in y.iter_mut().zip(b) {
                *yo += bo;
            }
        }
        y
    };
    let norm = |name: &str, x: &[f64]| -> Vec<f64> {
        let (_, g) = w(name);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + eps).sqrt();
        x.iter().zip(g).map(|(v, g)| v * r * g).collect()
    };
    let rope = |x: &mut [f64], pos: usize| {
        let half = hd / 2;
        for i in 0..half {
            let ang = pos as f64 * theta.powf(-((2 * i) as f64) / hd as f64);
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * ang.cos() - b * ang.sin();
            x[i + half] = b * ang.cos() + a * ang.sin();
        }
    };
    let (_, emb) = w("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    for l in 0..get("num_hidden_layers") {
        let p = format!("model.layers.{l}");
        let normed: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| norm(&format!("{p}.input_layernorm.weight"), x))
            .collect();
        let proj = |n: &str| -> Vec<Vec<f64>> {
            normed
                .iter()
                .map(|x| matvec(&format!("{p}.self_attn.{n}.weight"), x))
                .collect()
        };
        let (mut q, mut k, v) = (proj("q_proj"), proj("k_proj"), proj("v_proj"));
        for (pos, (qp, kp)) in q.iter_mut().zip(k.iter_mut()).enumerate() {
            for head in qp.chunks_mut(hd) {
                rope(head, pos);
            }
            for head in kp.chunks_mut(hd) {
                rope(head, pos);
            }
        }
        for (i, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0f64; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let qh = &q[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kh = &k[j][kvh * hd..(kvh + 1) * hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += ej / z * v[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec(&format!("{p}.self_attn.o_proj.weight"), &attn);
            for (xv, ov) in x.iter_mut().zip(o) {
                *xv += ov;
            }
            let n2 = norm(&format!("{p}.post_attention_layernorm.weight"), x);
            let g = matvec(&format!("{p}.mlp.gate_proj.weight"), &n2);
            let u = matvec(&format!("{p}.mlp.up_proj.weight"), &n2);
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec(&format!("{p}.mlp.down_proj.weight"), &a);
            for (xv, dv) in x.iter_mut().zip(d) {
                *xv += dv;
            }
        }
    }
    let mut out = Vec::with_capacity(ids.len() * vocab);
    for x in &xs {
        out.extend(matvec("lm_head.weight", &norm("model.norm.weight", x)));
    }
    out
}

#[test]
fn forward_matches_a_naive_scalar_implementation_at_every_position() {
    for with_bias in [false, true] {
        let m = random_model(11, with_bias);
        let model = Transformer::from_mem(&m, &Device::Cpu, candle_core::DType::F32).unwrap();
        let seqs = [[3u32, 1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8]];
        let ids = Tensor::new(&seqs, &Device::Cpu).unwrap();
        let got = logits_vec(&model.logits(&ids).unwrap());
        let want: Vec<f32> = seqs
            .iter()
            .flat_map(|s| naive_forward(&m, s))
            .map(|v| v as f32)
            .collect();
        let rel = max_rel_diff(&got, &want);
        assert!(rel < 1e-5, "bias {with_bias}: {rel}");
    }
}

#[test]
fn routes_compose_layers_of_several_models_with_scales() {
    let dev = Device::Cpu;
    let (a, b) = (random_model(1, false), random_model(2, true));
    let (ta, tb) = (
        Transformer::from_mem(&a, &dev, candle_core::DType::F32).unwrap(),
        Transformer::from_mem(&b, &dev, candle_core::DType::F32).unwrap(),
    );
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &dev).unwrap();
    // The identity route of model b is model b.
    let id_route = Route {
        embed_model: 1,
        hops: (0..2)
            .map(|layer| Hop {
                model: 1,
                layer,
                scale: 1.0,
            })
            .collect(),
    };
    let got = logits_vec(&forward_route(&[&ta, &tb], &id_route, &ids).unwrap());
    assert_eq!(got, logits_vec(&tb.logits(&ids).unwrap()));
    // a's embeddings → b's layer 1 at scale 0.5 → a's layer 0 at scale 2 → a's head.
    let route = Route {
        embed_model: 0,
        hops: vec![
            Hop {
                model: 1,
                layer: 1,
                scale: 0.5,
            },
            Hop {
                model: 0,
                layer: 0,
                scale: 2.0,
            },
        ],
    };
    let x = ta.embed(&ids).unwrap();
    let x = tb.layer(1, &(x * 0.5).unwrap()).unwrap();
    let x = ta.layer(0, &(x * 2.0).unwrap()).unwrap();
    let want = logits_vec(&ta.head(&x).unwrap());
    let got = logits_vec(&forward_route(&[&ta, &tb], &route, &ids).unwrap());
    assert_eq!(got, want);
    // The same through build(): a Routed candidate.
    let cand = Candidate {
        body: CandidateBody::Routed {
            models: vec![Arc::new(a.clone()), Arc::new(b.clone())],
            route: route.clone(),
        },
        recipe: None,
    };
    let built = build(&cand, &dev, candle_core::DType::F32).unwrap();
    assert_eq!(built.vocab_size(), 11);
    assert_eq!(logits_vec(&built.forward(&ids).unwrap()), want);
    // Out-of-range hops are errors, not panics.
    let bad = Route {
        embed_model: 0,
        hops: vec![Hop {
            model: 0,
            layer: 5,
            scale: 1.0,
        }],
    };
    let err = forward_route(&[&ta, &tb], &bad, &ids)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 5"), "{err}");
    let bad = Route {
        embed_model: 2,
        hops: vec![],
    };
    assert!(forward_route(&[&ta, &tb], &bad, &ids).is_err());
}

#[test]
fn missing_or_misshapen_tensors_are_errors_naming_them() {
    let dev = Device::Cpu;
    let mut m = random_model(3, false);
    m.tensors.remove("model.layers.1.mlp.up_proj.weight");
    let err = Transformer::from_mem(&m, &dev, candle_core::DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    let mut m = random_model(3, false);
    m.tensors.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        TensorBuf::new(vec![8, 8], vec![0.0; 64]),
    );
    let err = Transformer::from_mem(&m, &dev, candle_core::DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[4, 8]"),
        "{err}"
    );
    let mut m = random_model(3, false);
    m.config["num_key_value_heads"] = json!(3);
    assert!(Transformer::from_mem(&m, &dev, candle_core::DType::F32).is_err());
    // Token ids beyond the vocabulary are an error too.
    let ok = Transformer::from_mem(&random_model(3, false), &dev, candle_core::DType::F32).unwrap();
    let ids = Tensor::new(&[[1u32, 11]], &dev).unwrap();
    assert!(ok.logits(&ids).is_err());
}

#[test]
fn merged_candidate_builds_and_runs_in_memory() {
    let m = random_model(4, true);
    let direct = Transformer::from_mem(&m, &Device::Cpu, candle_core::DType::F32).unwrap();
    let cand = Candidate {
        body: CandidateBody::Merged(Arc::new(m)),
        recipe: None,
    };
    let built = build(&cand, &Device::Cpu, candle_core::DType::F32).unwrap();
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    assert_eq!(
        logits_vec(&built.forward(&ids).unwrap()),
        logits_vec(&direct.logits(&ids).unwrap())
    );
}

/// Greedy generation with the shipped toy models (assets/toy/), through `load_tokenizer` (the
/// config.json marker selects the char vocabulary) and `build` on the model directory.
fn greedy(dir: &Path, prompt: &str) -> String {
    let tok = evomerge::tokenizer::load_tokenizer(dir).unwrap();
    let model = build(
        &Candidate {
            body: CandidateBody::Dir(dir.to_path_buf()),
            recipe: None,
        },
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
    ids.extend(tok.encode(prompt).unwrap());
    let start = ids.len();
    for _ in 0..8 {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input).unwrap();
        let last: Vec<f32> = logits
            .get(0)
            .unwrap()
            .get(ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        if Some(next) == tok.eos_id() {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[start..]).unwrap()
}

#[test]
fn shipped_toy_experts_answer_their_tasks() {
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    assert_eq!(greedy(&toy.join("add"), "37+45="), "82");
    assert_eq!(greedy(&toy.join("cipher"), "enc:hello="), "khoor");
    // The add expert has not learnt the cipher.
    assert_ne!(greedy(&toy.join("add"), "enc:hello="), "khoor");
}
