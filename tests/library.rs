//! Using the crate as a library (issue 13): one way to open a model, loaders in the store, candle
//! re-exported, distinct `Example` names, training helpers, and a search that never calls into
//! the report.

use std::path::{Path, PathBuf};

use evomerge::candle_core::{Device, Tensor};
use evomerge::model::train::{TrainExample, encode_plain, load_task_examples};
use evomerge::model::{CausalLm, Transformer};
use evomerge::tokenizer::{CharTokenizer, TextTokenizer};
use evomerge::{ComputeDType, eval::tasks};

fn toy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/toy")
        .join(rel)
}

#[test]
fn one_obvious_way_to_open_a_model_directory() {
    let device = evomerge::Device::Cpu;
    let opened = Transformer::open(toy("add"), &device, ComputeDType::F32).unwrap();
    let mem = evomerge::store::load_mem(&toy("add")).unwrap();
    let from_mem = Transformer::from_mem(&mem, &device, ComputeDType::F32).unwrap();
    let ids = Tensor::new(&[[1u32, 7, 8, 67, 9]], &device).unwrap();
    let a: Vec<f32> = opened
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = from_mem
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(opened.vocab_size(), CharTokenizer::VOCAB_SIZE);
    // A missing directory is an error, not a panic.
    assert!(Transformer::open(toy("missing"), &device, ComputeDType::F32).is_err());
}

#[test]
fn loaders_live_with_the_store() {
    let stored = evomerge::store::load_mem(&toy("base")).unwrap();
    let f32s = evomerge::store::load_mem_f32(&toy("base")).unwrap();
    let read_dir = evomerge::candidate::MemModel::read_dir(&toy("base")).unwrap();
    assert_eq!(stored.config, f32s.config);
    assert_eq!(stored.tensors.len(), f32s.tensors.len());
    for (name, t) in &f32s.tensors {
        assert_eq!(t.dtype(), evomerge::tensor::DType::F32);
        assert_eq!(stored.tensors[name].values(), t.values(), "{name}");
        assert_eq!(read_dir.tensors[name].values(), t.values(), "{name}");
    }
}

#[test]
fn candle_types_are_re_exported() {
    // The candle the crate is built with, reachable without a candle dependency of one's own.
    let t = evomerge::candle_core::Tensor::zeros((2, 3), ComputeDType::F32, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[2, 3]);
    let _: &evomerge::Device = &Device::Cpu;
}

#[test]
fn training_and_task_examples_have_distinct_names() {
    let train = TrainExample::prompt_target(&[1, 5], &[6, 2]);
    let task = tasks::Example::Generation {
        prompt: "1+2=".into(),
        target: "3".into(),
    };
    assert_eq!(train.loss_mask, vec![false, false, true, true]);
    assert!(matches!(task, tasks::Example::Generation { .. }));
}

/// What examples/train_toy.rs did by hand: `[BOS] prompt`, then `target [EOS]` (loss).
fn toy_encoding(prompt: &str, target: &str) -> TrainExample {
    let tok = CharTokenizer;
    let mut p = vec![CharTokenizer::BOS];
    p.extend(tok.encode(prompt).unwrap());
    let mut t = tok.encode(target).unwrap();
    t.push(CharTokenizer::EOS);
    TrainExample::prompt_target(&p, &t)
}

#[test]
fn training_helpers_are_library_functions() {
    // Task JSONL read and encoded as the toy world was trained on.
    let dir = toy("tasks/add");
    let (names, data) = load_task_examples(&dir, None, &CharTokenizer, Some(50)).unwrap();
    assert_eq!(names, vec!["add"]);
    let text = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    let raw = tasks::parse_examples(&dir, &text, tasks::Metric::ExactMatch, Some(50)).unwrap();
    assert_eq!(data.len(), 50);
    for (e, r) in data.iter().zip(&raw) {
        let tasks::Example::Generation { prompt, target } = r else {
            panic!("{r:?}")
        };
        assert_eq!(*e, toy_encoding(prompt, target));
    }
    // In-memory pairs: the same encoding.
    assert_eq!(encode_plain(&raw, &CharTokenizer).unwrap(), data);

    // A model directory written from memory is bit-identical to the one train_toy wrote.
    let model = evomerge::store::load_mem_f32(&toy("add")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("add");
    let card = std::fs::read_to_string(toy("add/README.md")).unwrap();
    evomerge::store::save_model_dir(&out, &model.config, &model.tensors, None, &card).unwrap();
    for file in ["model.safetensors", "README.md"] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(toy("add").join(file)).unwrap(),
            "{file}"
        );
    }
    // It refuses to overwrite.
    assert!(
        evomerge::store::save_model_dir(&out, &model.config, &model.tensors, None, "").is_err()
    );
}

#[test]
fn search_never_calls_into_the_report() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/search");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            assert!(
                !code.contains("crate::report") && !code.contains("crate::pipeline"),
                "{}:{}: the search names a later stage: {line}",
                path.display(),
                i + 1
            );
        }
    }
}
