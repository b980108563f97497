//! `import-gguf`: tiny synthetic GGUF files written the way llama.cpp's converter writes them
//! (llama.cpp names, q / k rows permuted for `llama`, a byte-level BPE vocabulary), imported and
//! compared with the Hugging Face originals.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType as CDType, Device, Tensor};
use evomerge::candidate::MemModel;
use evomerge::model::transformer::Transformer;
use evomerge::store::gguf::{ImportConfig, import_gguf};
use evomerge::store::{Model, TensorSource};
use evomerge::synth::{LlamaSpec, mem_family};
use evomerge::tensor::{DType, TensorBuf};
use evomerge::tokenizer::load_tokenizer;
use serde_json::Value;

/// Byte-level BPE vocabulary: 3 control tokens, 11 characters, 10 merges.
const TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "h",
    "e",
    "l",
    "o",
    "Ġ",
    "w",
    "r",
    "d",
    "!",
    "1",
    "2",
    "he",
    "ll",
    "hell",
    "hello",
    "Ġw",
    "or",
    "Ġwor",
    "Ġworl",
    "Ġworld",
    "12",
];
const MERGES: &[&str] = &[
    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2",
];
const CHAT_TEMPLATE: &str =
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}";

fn spec() -> LlamaSpec {
    LlamaSpec {
        vocab: TOKENS.len(),
        ..LlamaSpec::tiny()
    }
}

/// The llama.cpp name of a Hugging Face tensor.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (part, kind) = rest.rsplit_once('.').unwrap();
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        other => panic!("no llama.cpp name for {other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

/// `convert_hf_to_gguf.py`'s `permute`: `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)`.
fn permute(t: &TensorBuf, n_head: usize) -> TensorBuf {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    let (d, half) = (rows / n_head, rows / n_head / 2);
    let data = t.values();
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + j * half + i;
                out.extend_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    TensorBuf::new(t.shape.clone(), out)
}

/// How to write a synthetic GGUF.
struct Gguf {
    arch: &'static str,
    pre: &'static str,
    tokenizer_model: &'static str,
    /// Permute q / k rows as llama.cpp does for `llama`.
    permute: bool,
    /// Store `token_embd.weight` as F16 instead of F32.
    f16_embed: bool,
    /// Extra (name, value) metadata, replacing entries of the same name.
    extra: Vec<(&'static str, G)>,
    /// Tensors added under these llama.cpp names.
    extra_tensors: Vec<(&'static str, TensorBuf)>,
}

impl Gguf {
    fn llama() -> Self {
        Gguf {
            arch: "llama",
            pre: "smollm",
            tokenizer_model: "gpt2",
            permute: true,
            f16_embed: false,
            extra: Vec::new(),
            extra_tensors: Vec::new(),
        }
    }

    /// Write `model` (Hugging Face names) to `path`.
    fn write(&self, model: &MemModel, path: &Path) {
        let s = spec();
        let a = self.arch;
        let strings = |v: &[&str]| G::Array(v.iter().map(|t| G::String(t.to_string())).collect());
        let types: Vec<G> = (0..TOKENS.len())
            .map(|i| G::I32(if i < 3 { 3 } else { 1 }))
            .collect();
        let mut meta: BTreeMap<String, G> = [
            ("general.architecture".to_string(), G::String(a.into())),
            (format!("{a}.block_count"), G::U32(s.layers as u32)),
            (format!("{a}.context_length"), G::U32(2048)),
            (format!("{a}.embedding_length"), G::U32(s.hidden as u32)),
            (
                format!("{a}.feed_forward_length"),
                G::U32(s.intermediate as u32),
            ),
            (format!("{a}.attention.head_count"), G::U32(s.heads as u32)),
            (
                format!("{a}.attention.head_count_kv"),
                G::U32(s.kv_heads as u32),
            ),
            (format!("{a}.rope.freq_base"), G::F32(10000.0)),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                G::F32(1e-5),
            ),
            (
                "tokenizer.ggml.model".into(),
                G::String(self.tokenizer_model.into()),
            ),
            ("tokenizer.ggml.pre".into(), G::String(self.pre.into())),
            ("tokenizer.ggml.tokens".into(), strings(TOKENS)),
            ("tokenizer.ggml.token_type".into(), G::Array(types)),
            ("tokenizer.ggml.merges".into(), strings(MERGES)),
            ("tokenizer.ggml.bos_token_id".into(), G::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), G::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), G::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                G::String(CHAT_TEMPLATE.into()),
            ),
        ]
        .into_iter()
        .collect();
        for (k, v) in &self.extra {
            meta.insert(k.to_string(), v.clone());
        }

        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut add = |name: String, t: &TensorBuf, dtype: GgmlDType| {
            let x = Tensor::from_vec(t.to_f32_vec(), t.shape.as_slice(), &Device::Cpu).unwrap();
            tensors.push((name, QTensor::quantize(&x, dtype).unwrap()));
        };
        for (hf, t) in &model.tensors {
            let t = match (self.permute, hf.as_str()) {
                (true, n) if n.contains("q_proj") => permute(t, s.heads),
                (true, n) if n.contains("k_proj") => permute(t, s.kv_heads),
                _ => t.clone(),
            };
            let dtype = if self.f16_embed && hf == "model.embed_tokens.weight" {
                GgmlDType::F16
            } else {
                GgmlDType::F32
            };
            add(gguf_name(hf), &t, dtype);
        }
        for (name, t) in &self.extra_tensors {
            add(name.to_string(), t, GgmlDType::F32);
        }

        let meta_refs: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    }
}

fn base_model(tied: bool) -> MemModel {
    let spec = LlamaSpec {
        tie_embeddings: tied,
        ..spec()
    };
    mem_family(&spec, 0, 7).remove(0)
}

fn f32_import() -> ImportConfig {
    ImportConfig { dtype: DType::F32 }
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_tensors_equal(model: &MemModel, dir: &Path) {
    let opened = Model::open(dir).unwrap();
    let names: Vec<String> = opened.tensor_infos().into_iter().map(|i| i.name).collect();
    let want: Vec<String> = model.tensors.keys().cloned().collect();
    assert_eq!(names, want);
    for (name, t) in &model.tensors {
        let got = opened.read(name).unwrap();
        assert_eq!(got.shape, t.shape, "{name}");
        assert_eq!(got.values(), t.values(), "{name}");
    }
}

fn logits(t: &Transformer) -> Vec<Vec<f32>> {
    let ids = Tensor::new(&[[1u32, 17, 22, 11, 12, 13, 5]], &Device::Cpu).unwrap();
    t.logits(&ids)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn llama_import_undoes_the_permutation_and_writes_config_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = base_model(false);
    let file = tmp.path().join("tiny.gguf");
    Gguf::llama().write(&model, &file);
    let out = tmp.path().join("imported");
    let summary = import_gguf(&file, &out, &f32_import()).unwrap();
    assert_eq!(summary.arch, "llama");
    assert_eq!(summary.tensors, model.tensors.len());
    assert_eq!(summary.vocab, TOKENS.len());

    // Tensors equal the un-permuted originals, and so does the forward.
    assert_tensors_equal(&model, &out);
    let ours =
        Transformer::from_source(&Model::open(&out).unwrap(), &Device::Cpu, CDType::F32).unwrap();
    let original = Transformer::from_mem(&model, &Device::Cpu, CDType::F32).unwrap();
    assert_eq!(logits(&ours), logits(&original));

    let c = config(&out);
    let s = spec();
    for (key, want) in [
        ("num_hidden_layers", s.layers),
        ("hidden_size", s.hidden),
        ("intermediate_size", s.intermediate),
        ("num_attention_heads", s.heads),
        ("num_key_value_heads", s.kv_heads),
        ("vocab_size", TOKENS.len()),
        ("max_position_embeddings", 2048),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ] {
        assert_eq!(c[key].as_u64(), Some(want as u64), "config.json `{key}`");
    }
    assert_eq!(c["rope_theta"], 10000.0);
    assert!((c["rms_norm_eps"].as_f64().unwrap() - 1e-5).abs() < 1e-10);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["torch_dtype"], "float32");
    assert!(c.get("head_dim").is_none());

    let tc: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["chat_template"], CHAT_TEMPLATE);
    assert_eq!(tc["bos_token"], "<|im_start|>");
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["add_bos_token"], false);

    // The tokenizer: BPE merges, digits split one by one (`smollm`), control tokens whole.
    let tok = load_tokenizer(&out).unwrap();
    assert_eq!(tok.encode("hello world!").unwrap(), vec![17, 22, 11]);
    assert_eq!(tok.decode(&[17, 22, 11]).unwrap(), "hello world!");
    assert_eq!(tok.encode("hello 12").unwrap(), vec![17, 7, 12, 13]);
    assert_eq!(
        tok.encode("<|im_start|>hello<|im_end|>").unwrap(),
        vec![1, 17, 2]
    );
    assert_eq!(tok.decode(&[1, 17, 2]).unwrap(), "hello");
    assert_eq!(tok.eos_id(), Some(2));
    let mut listed = listing(&out);
    listed.retain(|n| n != "README.md");
    assert_eq!(
        listed,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // Nothing left beside the output.
    assert_eq!(listing(tmp.path()), ["imported", "tiny.gguf"]);
}

#[test]
fn tied_model_in_bf16_with_gpt2_pre_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = base_model(true);
    let file = tmp.path().join("tied.gguf");
    Gguf {
        pre: "gpt2",
        f16_embed: true,
        ..Gguf::llama()
    }
    .write(&model, &file);
    let out = tmp.path().join("bf16");
    import_gguf(&file, &out, &ImportConfig::default()).unwrap();
    let c = config(&out);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["torch_dtype"], "bfloat16");
    let opened = Model::open(&out).unwrap();
    assert!(opened.info("lm_head.weight").is_none());
    let embed = opened.info("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.dtype, DType::BF16);
    // F16 in the file, then bf16: within bf16's rounding of the original.
    let got = opened.read("model.embed_tokens.weight").unwrap();
    let want = model.tensors["model.embed_tokens.weight"].to_f32_vec();
    for (g, w) in got.to_f32_vec().iter().zip(&want) {
        assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "{g} vs {w}");
    }
    // GPT-2's split keeps digit runs together, so the `12` merge applies.
    let tok = load_tokenizer(&out).unwrap();
    assert_eq!(tok.encode("hello 12").unwrap(), vec![17, 7, 23]);
}

#[test]
fn qwen2_is_not_permuted_and_keeps_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = base_model(false);
    let s = spec();
    let hd = s.hidden / s.heads;
    for l in 0..s.layers {
        for (proj, n) in [
            ("q", s.heads * hd),
            ("k", s.kv_heads * hd),
            ("v", s.kv_heads * hd),
        ] {
            let data = (0..n).map(|i| (i as f32 - 3.0) * 0.01 + l as f32).collect();
            model.tensors.insert(
                format!("model.layers.{l}.self_attn.{proj}_proj.bias"),
                TensorBuf::new(vec![n], data),
            );
        }
    }
    let file = tmp.path().join("qwen.gguf");
    Gguf {
        arch: "qwen2",
        pre: "qwen2",
        permute: false,
        ..Gguf::llama()
    }
    .write(&model, &file);
    let out = tmp.path().join("qwen");
    import_gguf(&file, &out, &f32_import()).unwrap();
    assert_tensors_equal(&model, &out);
    let c = config(&out);
    assert_eq!(c["model_type"], "qwen2");
    assert_eq!(c["architectures"], serde_json::json!(["Qwen2ForCausalLM"]));
    let tok = load_tokenizer(&out).unwrap();
    assert_eq!(tok.encode("hello world!").unwrap(), vec![17, 22, 11]);
}

#[test]
fn the_command_line_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let model = base_model(false);
    let file = tmp.path().join("tiny.gguf");
    Gguf::llama().write(&model, &file);
    let out = tmp.path().join("f16");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_evomerge"))
        .args(["import-gguf".as_ref(), file.as_os_str(), out.as_os_str()])
        .args(["--dtype", "f16"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    assert_eq!(config(&out)["torch_dtype"], "float16");
}

/// Import `gguf` into a fresh directory expecting failure; checks that the message names the file
/// and that nothing was left beside it. Returns the message.
fn import_fails(tmp: &Path, gguf: &Gguf, model: &MemModel) -> String {
    let file = tmp.join("bad.gguf");
    gguf.write(model, &file);
    failing_file(tmp, &file)
}

fn failing_file(tmp: &Path, file: &Path) -> String {
    let before = listing(tmp);
    let out = tmp.join("out");
    let err = import_gguf(file, &out, &f32_import())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(!out.exists());
    assert_eq!(listing(tmp), before, "left files behind after: {err}");
    err
}

#[test]
fn bad_files_are_errors_that_name_them() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let model = base_model(false);

    let garbage = tmp.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let err = failing_file(tmp, &garbage);
    assert!(err.contains("GGUF"), "{err}");

    let arch = Gguf {
        arch: "gemma",
        ..Gguf::llama()
    };
    let err = import_fails(tmp, &arch, &model);
    assert!(err.contains("`gemma` is not supported"), "{err}");

    let spm = Gguf {
        tokenizer_model: "llama",
        ..Gguf::llama()
    };
    let err = import_fails(tmp, &spm, &model);
    assert!(
        err.contains("tokenizer.ggml.model") && err.contains("SentencePiece"),
        "{err}"
    );

    let pre = Gguf {
        pre: "mystery",
        ..Gguf::llama()
    };
    let err = import_fails(tmp, &pre, &model);
    assert!(err.contains("`mystery`"), "{err}");

    let heads = Gguf {
        extra: vec![("llama.attention.head_count_kv", G::U32(4))],
        ..Gguf::llama()
    };
    let err = import_fails(tmp, &heads, &model);
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("shape"),
        "{err}"
    );

    let missing = Gguf {
        extra: vec![("llama.embedding_length", G::String("16".into()))],
        ..Gguf::llama()
    };
    let err = import_fails(tmp, &missing, &model);
    assert!(err.contains("llama.embedding_length"), "{err}");

    let unknown = Gguf {
        extra_tensors: vec![(
            "blk.0.mystery.weight",
            TensorBuf::new(vec![2], vec![1.0, 2.0]),
        )],
        ..Gguf::llama()
    };
    let err = import_fails(tmp, &unknown, &model);
    assert!(err.contains("blk.0.mystery.weight"), "{err}");
}
