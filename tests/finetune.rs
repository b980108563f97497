//! `evomerge finetune` as a process: a tiny random model (character tokenizer) and a tiny task;
//! the PEFT adapter directory's layout and config, and a refused target module.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use evomerge::model::LlamaConfig;
use evomerge::tensor::TensorBuf;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

/// A random 2-layer Llama checkpoint with the character tokenizer, in `dir/base`.
fn random_base(dir: &Path, seed: u64) -> PathBuf {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "evomerge_tokenizer": "char", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 87,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "torch_dtype": "float32"
    });
    let cfg = LlamaConfig::from_json(&config).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let tensors = cfg
        .tensor_shapes(false)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let norm = name.ends_with("norm.weight");
            let data = (0..n)
                .map(|_| {
                    let u = rng.random::<f32>() - 0.5;
                    if norm { 1.0 + 0.2 * u } else { 0.6 * u }
                })
                .collect();
            (name, TensorBuf::new(shape, data))
        })
        .collect();
    let base = dir.join("base");
    fs::create_dir_all(&base).unwrap();
    fs::write(
        base.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    evomerge::model::mlp::save_tensors(&base.join("model.safetensors"), &tensors).unwrap();
    base
}

/// A tasks file with one exact-match task whose train split is a few sums.
fn tiny_tasks(dir: &Path) -> PathBuf {
    let task = dir.join("tasks/add");
    fs::create_dir_all(&task).unwrap();
    let lines: Vec<String> = (0..6)
        .map(|i| {
            json!({"prompt": format!("{i}+{}=", i + 1), "target": format!("{}", 2 * i + 1)})
                .to_string()
        })
        .collect();
    fs::write(task.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    let file = dir.join("tasks.toml");
    fs::write(
        &file,
        "[[tasks]]\nname = \"add\"\npath = \"tasks/add\"\nmetric = \"exact_match\"\nmax_new_tokens = 3\n",
    )
    .unwrap();
    file
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn finetune_writes_a_peft_adapter_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let base = random_base(tmp.path(), 3);
    let tasks = tiny_tasks(tmp.path());
    let out = tmp.path().join("adapters/add-lora");
    let run = Command::new(bin())
        .args(["--threads", "1", "finetune"])
        .args([&base, &tasks, &out])
        .args([
            "--task",
            "add",
            "--lora-rank",
            "4",
            "--lora-alpha",
            "8",
            "--rslora",
        ])
        .args([
            "--target-modules",
            "q_proj,v_proj,down_proj",
            "--steps",
            "4",
        ])
        .args([
            "--batch-size",
            "3",
            "--lr",
            "1e-2",
            "--warmup",
            "1",
            "--log-every",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("s/step"), "{stderr}");
    assert!(stderr.contains("loss"), "{stderr}");
    assert_eq!(
        entries(&out),
        vec![
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors"
        ]
    );
    assert_eq!(entries(&tmp.path().join("adapters")), vec!["add-lora"]);
    let cfg: Value =
        serde_json::from_str(&fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["lora_dropout"], 0.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["init_lora_weights"], true);
    assert_eq!(cfg["inference_mode"], true);
    assert_eq!(
        cfg["target_modules"],
        json!(["q_proj", "v_proj", "down_proj"])
    );
    let base_name = cfg["base_model_name_or_path"].as_str().unwrap();
    assert_eq!(Path::new(base_name), base.as_path(), "BASE as given");
    let tensors =
        evomerge::model::mlp::load_tensors(&out.join("adapter_model.safetensors")).unwrap();
    assert_eq!(tensors.len(), 2 * 3 * 2);
    for l in 0..2 {
        for (module, out_dim, in_dim) in [
            ("self_attn.q_proj", 16, 16),
            ("self_attn.v_proj", 8, 16),
            ("mlp.down_proj", 16, 24),
        ] {
            let key =
                |ab: &str| format!("base_model.model.model.layers.{l}.{module}.lora_{ab}.weight");
            assert_eq!(tensors[&key("A")].shape, vec![4, in_dim], "{}", key("A"));
            assert_eq!(tensors[&key("B")].shape, vec![out_dim, 4], "{}", key("B"));
            assert!(tensors[&key("B")].values().iter().any(|v| *v != 0.0));
        }
    }
    let readme = fs::read_to_string(out.join("README.md")).unwrap();
    assert!(readme.contains("steps 4, batch size 3"), "{readme}");
    // The adapter folds into the base like any PEFT adapter, and reloads unchanged.
    let adapter = evomerge::model::lora::LoraAdapter::load_peft(&out).unwrap();
    assert_eq!(adapter.config.rank, 4);
    assert_eq!(adapter.weights.len(), 6);
    // An existing output is refused.
    let again = Command::new(bin())
        .arg("finetune")
        .args([&base, &tasks, &out])
        .args(["--steps", "1"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn finetune_refuses_an_unknown_target_module() {
    let tmp = tempfile::tempdir().unwrap();
    let base = random_base(tmp.path(), 4);
    let tasks = tiny_tasks(tmp.path());
    let out = tmp.path().join("lora");
    let run = Command::new(bin())
        .arg("finetune")
        .args([&base, &tasks.parent().unwrap().join("tasks/add"), &out])
        .args(["--target-modules", "q_proj,qkv_proj", "--steps", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("unknown LoRA target module `qkv_proj`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        "{stderr}"
    );
    assert!(!out.exists());
    assert!(
        !entries(tmp.path()).iter().any(|e| e.contains("tmp")),
        "{:?}",
        entries(tmp.path())
    );
}
