//! Integration tests: eval — task files on disk, the LM evaluator on a bigram double, the command
//! evaluator's protocol and each of its failure modes (with `sh -c` scripts), the eval table.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evomerge::candidate::{Candidate, CandidateBody, MemModel};
use evomerge::eval::command::{CommandEvaluator, CommandSpec};
use evomerge::eval::double::{BigramLm, CharVocab, bigram_builder};
use evomerge::eval::lm::{LmConfig, LmEvaluator};
use evomerge::eval::tasks::{Example, Metric, Task, TaskSpec};
use evomerge::eval::{EvalError, Evaluator, Split};

fn merged(model: MemModel, recipe: Option<&str>) -> Candidate {
    Candidate {
        body: CandidateBody::Merged(Arc::new(model)),
        recipe: recipe.map(str::to_string),
    }
}

/// Vocabulary `[EOS, a, b, c, \n]`; the chain model maps a → b → c → \n → EOS.
fn chain_model() -> MemModel {
    let v = 5;
    let mut t = vec![0.0f32; v * v];
    for (from, to) in [(1, 2), (2, 3), (3, 4), (4, 0)] {
        t[from * v + to] = 5.0;
    }
    BigramLm::mem_model(v, t)
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn lm_evaluator_scores_task_files_per_split() {
    let dir = tempfile::tempdir().unwrap();
    let gen_dir = dir.path().join("chain");
    write(
        &gen_dir.join("dev.jsonl"),
        "{\"prompt\":\"a\",\"target\":\"bc\"}\n{\"prompt\":\"b\",\"target\":\"a\"}\n",
    );
    write(
        &gen_dir.join("test.jsonl"),
        "{\"prompt\":\"b\",\"target\":\"c\"}\n",
    );
    write(&gen_dir.join("train.jsonl"), "not even json\n");
    let mc_dir = dir.path().join("mc");
    write(
        &mc_dir.join("dev.jsonl"),
        "{\"prompt\":\"a\",\"choices\":[\"c\",\"b\"],\"answer\":1}\n",
    );
    write(
        &mc_dir.join("test.jsonl"),
        "{\"prompt\":\"b\",\"choices\":[\"c\",\"a\"],\"answer\":1}\n",
    );
    let mut mc = TaskSpec::new("mc", "mc", Metric::MultipleChoice);
    mc.weight = 3.0;
    let tasks = [TaskSpec::new("chain", "chain", Metric::ExactMatch), mc]
        .iter()
        .map(|s| Task::load(&s.relative_to(dir.path())))
        .collect::<evomerge::Result<Vec<_>>>()
        .unwrap();
    let eval = LmEvaluator::try_new(
        tasks,
        Arc::new(CharVocab::new("abc\n")),
        LmConfig::default(),
    )
    .unwrap()
    .with_builder(bigram_builder());
    assert_eq!(
        eval.metric_keys(),
        ["chain/exact_match", "mc/multiple_choice"]
    );
    let c = merged(chain_model(), None);
    let dev = eval.evaluate(&c, Split::Dev).unwrap();
    // chain: 1 of 2; mc: 1 of 1 → (0.5 + 3) / 4.
    assert_eq!(dev.metrics["chain/exact_match"], 0.5);
    assert_eq!(dev.metrics["mc/multiple_choice"], 1.0);
    assert_eq!(dev.primary, 0.875);
    let test = eval.evaluate(&c, Split::Test).unwrap();
    // chain: "b" → "c" ✓; mc: after "b", "c" is the successor → picks 0, answer 1 ✗.
    assert_eq!(test.primary, 0.25);
}

#[test]
fn missing_split_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("t/dev.jsonl"), "{\"text\":\"ab\"}\n");
    let spec = TaskSpec::new("t", dir.path().join("t"), Metric::Perplexity);
    let e = Task::load(&spec).unwrap_err().to_string();
    assert!(e.contains("t/test.jsonl"), "{e}");
}

fn sh(script: &str) -> CommandSpec {
    CommandSpec::new(["sh", "-c", script, "sh", "{split}"])
}

#[test]
fn command_success_passes_recipe_split_and_model() {
    let spec = sh(r#"
        test "$(cat "$EVOMERGE_RECIPE")" = "merge_method: linear" || exit 7
        test "$1" = dev || exit 8
        test -f "$EVOMERGE_MODEL_DIR/config.json" || exit 9
        test "$EVOMERGE_SPLIT" = dev || exit 10
        echo "some log line"
        echo '{"primary": 0.75, "acc": 0.5}'
    "#);
    let eval = CommandEvaluator::try_new(spec).unwrap();
    let c = merged(chain_model(), Some("merge_method: linear"));
    let s = eval.evaluate(&c, Split::Dev).unwrap();
    assert_eq!(s.primary, 0.75);
    assert_eq!(s.metrics["acc"], 0.5);
}

#[test]
fn command_metric_key_and_scratch_dir_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = sh(r#"echo "$EVOMERGE_WORK_DIR" > "$OUT"; echo '{"acc": 0.25}'"#);
    spec.metric = Some("acc".into());
    spec.write_model = false;
    spec.scratch_dir = Some(dir.path().to_path_buf());
    spec.env
        .insert("OUT".into(), dir.path().join("where").display().to_string());
    let eval = CommandEvaluator::try_new(spec).unwrap();
    let s = eval
        .evaluate(&merged(chain_model(), None), Split::Test)
        .unwrap();
    assert_eq!(s.primary, 0.25);
    let work = std::fs::read_to_string(dir.path().join("where")).unwrap();
    assert!(work.trim().starts_with(&dir.path().display().to_string()));
    assert!(!Path::new(work.trim()).exists(), "scratch dir left behind");
}

#[test]
fn command_nonzero_exit_carries_stderr() {
    let eval = CommandEvaluator::try_new(sh("echo boom >&2; exit 3")).unwrap();
    match eval.evaluate(&merged(chain_model(), None), Split::Dev) {
        Err(EvalError::Exit { status, stderr }) => {
            assert!(status.contains('3'), "{status}");
            assert_eq!(stderr, "boom\n");
        }
        other => panic!("expected Exit, got {other:?}"),
    }
}

#[test]
fn command_timeout_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let mut spec = sh(&format!(
        "sleep 30 & echo $! > {}; echo started >&2; wait",
        pidfile.display()
    ));
    spec.timeout_s = 0.5;
    spec.write_model = false;
    let eval = CommandEvaluator::try_new(spec).unwrap();
    let start = Instant::now();
    let r = eval.evaluate(&merged(chain_model(), None), Split::Dev);
    let took = start.elapsed();
    match r {
        Err(EvalError::Timeout { seconds, stderr }) => {
            assert_eq!(seconds, 0.5);
            assert_eq!(stderr, "started\n");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The background `sleep` (a grandchild) died with its group.
    #[cfg(target_os = "linux")]
    {
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        // Alive = /proc/<pid>/stat exists and its state is not zombie (Z) or dead (X): a killed
        // orphan may wait a moment for init to reap it.
        let stat = Path::new("/proc").join(pid.trim()).join("stat");
        let alive = || {
            std::fs::read_to_string(&stat).is_ok_and(|s| {
                let state = s.rsplit(") ").next().and_then(|r| r.chars().next());
                !matches!(state, Some('Z' | 'X'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "grandchild {} still alive", pid.trim());
    }
}

#[test]
fn command_garbage_output_is_bad_output() {
    let eval = CommandEvaluator::try_new(sh("echo oops >&2; echo 'accuracy: 0.5'")).unwrap();
    match eval.evaluate(&merged(chain_model(), None), Split::Dev) {
        Err(EvalError::BadOutput {
            reason,
            stdout,
            stderr,
        }) => {
            assert!(reason.contains("not JSON"), "{reason}");
            assert_eq!(stdout, "accuracy: 0.5\n");
            assert_eq!(stderr, "oops\n");
        }
        other => panic!("expected BadOutput, got {other:?}"),
    }
    let eval = CommandEvaluator::try_new(sh(r#"echo '{"primary": "high"}'"#)).unwrap();
    assert!(matches!(
        eval.evaluate(&merged(chain_model(), None), Split::Dev),
        Err(EvalError::BadOutput { reason, .. }) if reason.contains("not a number")
    ));
}

#[test]
fn command_nan_metric_is_not_finite() {
    let eval = CommandEvaluator::try_new(sh(r#"echo '{"primary": NaN}'"#)).unwrap();
    match eval.evaluate(&merged(chain_model(), None), Split::Dev) {
        Err(EvalError::NotFinite { metric, value }) => {
            assert_eq!(metric, "primary");
            assert!(value.is_nan());
        }
        other => panic!("expected NotFinite, got {other:?}"),
    }
}

#[test]
fn command_stderr_is_bounded_to_its_tail() {
    let mut spec = sh("i=0; while [ $i -lt 2000 ]; do echo line$i >&2; i=$((i+1)); done; exit 1");
    spec.max_stderr_bytes = 100;
    spec.write_model = false;
    let eval = CommandEvaluator::try_new(spec).unwrap();
    match eval.evaluate(&merged(chain_model(), None), Split::Dev) {
        Err(EvalError::Exit { stderr, .. }) => {
            assert!(stderr.starts_with("[… "), "{stderr}");
            assert!(stderr.ends_with("line1999\n"), "{stderr}");
            assert!(stderr.len() < 140, "{}", stderr.len());
        }
        other => panic!("expected Exit, got {other:?}"),
    }
}

#[test]
fn command_without_recipe_cannot_fill_the_placeholder() {
    let mut spec = CommandSpec::new(["cat", "{recipe}"]);
    spec.write_model = false;
    let eval = CommandEvaluator::try_new(spec).unwrap();
    assert!(matches!(
        eval.evaluate(&merged(chain_model(), None), Split::Dev),
        Err(EvalError::Candidate(m)) if m.contains("{recipe}")
    ));
}

/// The LM evaluator on our transformer (random weights, spread out so greedy choices are not
/// near-ties): right-padded batches give the same generations and log-likelihoods as one
/// sequence at a time, and the merged candidate is scored from memory.
#[test]
fn lm_evaluator_on_the_transformer_is_batch_invariant() {
    use evomerge::model::LlamaConfig;
    use evomerge::tokenizer::CharTokenizer;
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": CharTokenizer::VOCAB_SIZE, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    let cfg = LlamaConfig::from_json(&config).unwrap();
    let mut tensors = evomerge::model::train::init_weights(&cfg, 7);
    for t in tensors.values_mut() {
        if t.shape.len() == 2 {
            t.f32_mut().iter_mut().for_each(|x| *x *= 25.0);
        }
    }
    let candidate = merged(MemModel { config, tensors }, None);
    let prompts = [
        "1+1=",
        "37+45=",
        "a",
        "hello world",
        "9",
        "(12)",
        "x=y?",
        "0000000",
    ];
    let gens: Vec<Example> = prompts
        .iter()
        .map(|p| Example::Generation {
            prompt: p.to_string(),
            target: "7".into(),
        })
        .collect();
    let texts: Vec<Example> = prompts
        .iter()
        .map(|p| Example::Text {
            text: format!("{p} and more"),
        })
        .collect();
    let tasks = vec![
        Task::from_examples(
            TaskSpec::new("gen", "-", Metric::ExactMatch),
            gens.clone(),
            gens,
        )
        .unwrap(),
        Task::from_examples(
            TaskSpec::new("text", "-", Metric::Perplexity),
            texts.clone(),
            texts,
        )
        .unwrap(),
    ];
    let make = |batch_size| {
        LmEvaluator::try_new(
            tasks.clone(),
            Arc::new(CharTokenizer::new()),
            LmConfig {
                batch_size,
                ..LmConfig::default()
            },
        )
        .unwrap()
    };
    let (one, many) = (make(1), make(16));
    let model = evomerge::model::build(
        &candidate,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let g1 = one.generate(model.as_ref(), &prompts, 6, "").unwrap();
    let g16 = many.generate(model.as_ref(), &prompts, 6, "").unwrap();
    assert_eq!(g1, g16);
    assert!(g1.iter().any(|g| !g.is_empty()), "{g1:?}");
    let pairs: Vec<(&str, &str)> = prompts.iter().map(|p| (*p, " and more")).collect();
    let l1 = one.log_likelihood(model.as_ref(), &pairs).unwrap();
    let l16 = many.log_likelihood(model.as_ref(), &pairs).unwrap();
    for (a, b) in l1.iter().zip(&l16) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
    let s1 = one.evaluate(&candidate, Split::Dev).unwrap();
    let s16 = many.evaluate(&candidate, Split::Dev).unwrap();
    let (p1, p16) = (
        s1.metrics["text/perplexity"],
        s16.metrics["text/perplexity"],
    );
    assert!((p1 - p16).abs() <= 1e-4 * p1, "{p1} vs {p16}");
    assert_eq!(
        s1.metrics["gen/exact_match"],
        s16.metrics["gen/exact_match"]
    );
}

/// The README's worked example, verbatim: a recipe-only command.
#[test]
fn readme_worked_example_scores_ties_recipes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("score.sh"),
        "#!/bin/sh\n# score.sh RECIPE SPLIT\necho \"scoring $1 on $2\" >&2\n\
         if grep -q ties \"$1\"; then echo '{\"primary\": 1.0}'; else echo '{\"primary\": 0.0}'; fi\n",
    );
    let spec: CommandSpec = toml::from_str(
        "command = [\"sh\", \"score.sh\", \"{recipe}\", \"{split}\"]\nwrite_model = false\ntimeout_s = 10\n",
    )
    .unwrap();
    let mut spec = spec;
    spec.cwd = Some(dir.path().to_path_buf());
    let eval = CommandEvaluator::try_new(spec).unwrap();
    let score = |recipe| {
        eval.evaluate(&merged(chain_model(), Some(recipe)), Split::Dev)
            .unwrap()
            .primary
    };
    assert_eq!(score("merge_method: ties\n"), 1.0);
    assert_eq!(score("merge_method: linear\n"), 0.0);
}

/// Bytes this thread has passed to write(2) and friends (files, pipes, terminals).
#[cfg(target_os = "linux")]
fn thread_wchar() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Scoring a merged candidate with the LM evaluator writes nothing: the evaluation runs on this
/// thread only (a one-thread rayon pool that uses the current thread), and the thread's write
/// counter does not move — while writing the same tensors to a model directory moves it by at
/// least their size (the control).
#[cfg(target_os = "linux")]
#[test]
fn scoring_a_merged_candidate_writes_nothing() {
    use evomerge::model::LlamaConfig;
    use evomerge::store::{ModelWriter, TensorInfo, WriteConfig};
    use evomerge::tensor::DType;
    use evomerge::tokenizer::CharTokenizer;
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": CharTokenizer::VOCAB_SIZE, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    let cfg = LlamaConfig::from_json(&config).unwrap();
    let tensors = evomerge::model::train::init_weights(&cfg, 3);
    let bytes: usize = tensors.values().map(|t| t.len() * 4).sum();
    let model = MemModel { config, tensors };
    let candidate = merged(model.clone(), Some("merge_method: linear"));
    let ex = |p: &str| Example::Generation {
        prompt: p.into(),
        target: "2".into(),
    };
    let texts = vec![Example::Text {
        text: "1+1=2".into(),
    }];
    let tasks = vec![
        Task::from_examples(
            TaskSpec::new("add", "-", Metric::ExactMatch),
            vec![ex("1+1="), ex("12+3=")],
            vec![ex("1+1=")],
        )
        .unwrap(),
        Task::from_examples(
            TaskSpec::new("text", "-", Metric::Perplexity),
            texts.clone(),
            texts,
        )
        .unwrap(),
    ];
    let eval =
        LmEvaluator::try_new(tasks, Arc::new(CharTokenizer::new()), LmConfig::default()).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .use_current_thread()
        .build()
        .unwrap();
    let (written, score) = pool.install(|| {
        let before = thread_wchar();
        let score = eval.evaluate(&candidate, Split::Dev);
        (thread_wchar() - before, score)
    });
    drop(pool);
    let score = score.unwrap();
    assert!(score.metrics["text/perplexity"] > 1.0, "{score:?}");
    assert_eq!(written, 0, "the evaluation wrote {written} bytes");

    // Control: writing the tensors to disk on this thread moves the counter.
    let dir = tempfile::tempdir().unwrap();
    let infos: Vec<TensorInfo> = model
        .tensors
        .iter()
        .map(|(name, t)| TensorInfo {
            name: name.clone(),
            dtype: DType::F32,
            shape: t.shape.clone(),
        })
        .collect();
    let before = thread_wchar();
    let writer = ModelWriter::create(
        &dir.path().join("m"),
        &infos,
        &WriteConfig {
            max_shard_size: u64::MAX,
        },
    )
    .unwrap();
    for (name, t) in &model.tensors {
        writer.write(name, &t.values()).unwrap();
    }
    writer.finish(&model.config, None, "").unwrap();
    let control = thread_wchar() - before;
    assert!(control >= bytes as u64, "control wrote {control} < {bytes}");
}

/// GPT-2's byte → char map of byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).unwrap();
    }
    out
}

/// A byte-level BPE tokenizer without merges (token id = byte value) plus the special tokens
/// `<s>` 256, `</s>` 257, `<|im_start|>` 258, `<|im_end|>` 259, written to `dir` with
/// `post_processor` and the given JSON files (`None` = absent).
fn byte_tokenizer_dir(
    dir: &Path,
    post_processor: serde_json::Value,
    config: serde_json::Value,
    tokenizer_config: Option<serde_json::Value>,
    generation_config: Option<serde_json::Value>,
) {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .iter()
        .enumerate()
        .map(|(b, c)| (c.to_string(), serde_json::json!(b)))
        .collect();
    let added: Vec<serde_json::Value> = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": true},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    write(&dir.join("tokenizer.json"), &tokenizer.to_string());
    write(&dir.join("config.json"), &config.to_string());
    for (name, value) in [
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
    ] {
        let path = dir.join(name);
        match value {
            Some(v) => write(&path, &v.to_string()),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn template_bos() -> serde_json::Value {
    serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}
    })
}

/// The context ids the LM evaluator scores for `prompt` with the tokenizer in `dir`.
fn context_of(dir: &Path, spec: TaskSpec, train: &[Example], prompt: &str) -> Vec<u32> {
    let ex = Example::Generation {
        prompt: prompt.into(),
        target: "x".into(),
    };
    let name = spec.name.clone();
    let task = Task::from_examples_with_train(spec, train, vec![ex.clone()], vec![ex]).unwrap();
    let tok = evomerge::tokenizer::load_tokenizer(dir).unwrap();
    let eval = LmEvaluator::try_new(vec![task], Arc::from(tok), LmConfig::default()).unwrap();
    eval.context_ids(&name, Split::Dev, 0).unwrap().to_vec()
}

/// BOS is added exactly when the model's tokenizer adds it — the post-processor, overridden by
/// tokenizer_config.json's `add_bos_token` — never because config.json names a
/// `bos_token_id` (SmolLM2's is `<|im_start|>`). EOS ids come from all three files.
#[test]
fn hf_special_tokens_follow_the_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = || TaskSpec::new("t", "-", Metric::ExactMatch);
    let config = serde_json::json!({"bos_token_id": 258, "eos_token_id": 257});
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    byte_tokenizer_dir(d, byte_level, config.clone(), None, None);
    assert_eq!(context_of(d, spec(), &[], "hi"), [104, 105]);
    // Nothing to encode and no BOS: the context is EOS (lm-evaluation-harness's rule).
    assert_eq!(context_of(d, spec(), &[], ""), [257]);

    byte_tokenizer_dir(d, template_bos(), config.clone(), None, None);
    assert_eq!(context_of(d, spec(), &[], "hi"), [256, 104, 105]);
    let tok = evomerge::tokenizer::load_tokenizer(d).unwrap();
    assert_eq!(tok.bos_id(), Some(256));
    assert_eq!(tok.eos_ids(), [257]);
    // Special tokens written in a text are their ids; decoding skips them.
    assert_eq!(tok.encode("<|im_start|>a").unwrap(), [258, 97]);
    assert_eq!(tok.decode(&[258, 97, 259]).unwrap(), "a");

    byte_tokenizer_dir(
        d,
        template_bos(),
        config.clone(),
        Some(serde_json::json!({"add_bos_token": false,
            "eos_token": {"content": "<|im_end|>", "special": true}})),
        Some(serde_json::json!({"eos_token_id": [257, 259]})),
    );
    assert_eq!(context_of(d, spec(), &[], "hi"), [104, 105]);
    let tok = evomerge::tokenizer::load_tokenizer(d).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (None, Some(259)));
    assert_eq!(tok.eos_ids(), [259, 257]);

    byte_tokenizer_dir(
        d,
        serde_json::Value::Null,
        config,
        Some(serde_json::json!({"add_bos_token": true, "bos_token": "<s>"})),
        None,
    );
    assert_eq!(context_of(d, spec(), &[], "hi"), [256, 104, 105]);
}

/// SmolLM2-Instruct's chat template through minijinja, few-shot as turns, and the rendered
/// `<|im_start|>` / `<|im_end|>` encoded as their ids.
#[test]
fn hf_chat_template_renders_and_encodes_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    byte_tokenizer_dir(
        d,
        template_bos(),
        serde_json::json!({"eos_token_id": 259}),
        Some(
            serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>",
            "bos_token": "<|im_start|>"}),
        ),
        None,
    );
    let mut spec = TaskSpec::new("chat", "-", Metric::ExactMatch);
    spec.chat_template = true;
    spec.fewshot = 1;
    let shot = Example::Generation {
        prompt: "1+1=".into(),
        target: "2".into(),
    };
    let ids = context_of(d, spec, &[shot], "2+2=");
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<_>>();
    let mut want = vec![258];
    want.extend(bytes("system\nBe brief."));
    want.extend([259, 10, 258]);
    want.extend(bytes("user\n1+1="));
    want.extend([259, 10, 258]);
    want.extend(bytes("assistant\n2"));
    want.extend([259, 10, 258]);
    want.extend(bytes("user\n2+2="));
    want.extend([259, 10, 258]);
    want.extend(bytes("assistant\n"));
    // No BOS from the post-processor: the template writes what the model expects.
    assert_eq!(ids, want);

    // No chat template in the model's files: a clear error when a task asks for one.
    byte_tokenizer_dir(d, template_bos(), serde_json::json!({}), None, None);
    let mut spec = TaskSpec::new("chat", "-", Metric::ExactMatch);
    spec.chat_template = true;
    let ex = vec![Example::Generation {
        prompt: "q".into(),
        target: "a".into(),
    }];
    let task = Task::from_examples(spec, ex.clone(), ex).unwrap();
    let tok = evomerge::tokenizer::load_tokenizer(d).unwrap();
    let e = LmEvaluator::try_new(vec![task], Arc::from(tok), LmConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no chat template"), "{e}");
}

/// A tasks file with the lm-evaluation-harness-style options, loaded from disk: few-shot from
/// train.jsonl, answer_regex, acc_norm; and the context guard naming the file and line.
#[test]
fn task_file_options_and_context_guard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("tasks.toml"),
        r#"
[[tasks]]
name = "gsm"
path = "gsm"
metric = "exact_match"
fewshot = 2
fewshot_separator = "\n"
answer_regex = '#### (\-?[0-9\.\,]+)'
max_new_tokens = 4
batch_size = 2

[[tasks]]
name = "mc"
path = "mc"
metric = "multiple_choice"
mc_score = "acc_norm"
"#,
    );
    write(
        &d.join("gsm/train.jsonl"),
        "{\"prompt\":\"a\",\"target\":\"b\"}\n{\"prompt\":\"b\",\"target\":\"c\"}\n\
         {\"prompt\":\"c\",\"target\":\"a\"}\n",
    );
    write(
        &d.join("gsm/dev.jsonl"),
        "{\"prompt\":\"a\",\"target\":\"1\"}\n\n{\"prompt\":\"bbbbbbbbbbbbbbbbbb\",\"target\":\"1\"}\n",
    );
    write(
        &d.join("gsm/test.jsonl"),
        "{\"prompt\":\"a\",\"target\":\"1\"}\n",
    );
    let mc = "{\"prompt\":\"a\",\"choices\":[\"b\",\"c\"],\"answer\":0}\n";
    write(&d.join("mc/dev.jsonl"), mc);
    write(&d.join("mc/test.jsonl"), mc);
    let tasks = evomerge::eval::tasks::load_task_file(&d.join("tasks.toml")).unwrap();
    assert_eq!(tasks[0].shots.len(), 2);
    assert_eq!(tasks[0].spec.batch_size, Some(2));
    let vocab = || Arc::new(CharVocab::new("abc\n"));
    let eval = LmEvaluator::try_new(tasks.clone(), vocab(), LmConfig::default()).unwrap();
    let shots: String = tasks[0]
        .shots
        .iter()
        .map(|s| format!("{}{}\n", s.prompt, s.target))
        .collect();
    let want = CharVocab::new("abc\n").encode(&format!("{shots}a"));
    use evomerge::tokenizer::TextTokenizer;
    assert_eq!(
        eval.context_ids("gsm", Split::Dev, 0).unwrap(),
        want.unwrap()
    );
    let s = eval
        .with_builder(bigram_builder())
        .evaluate(&merged(chain_model(), None), Split::Dev)
        .unwrap();
    // The chain model never writes "#### 1"; the mc choice "b" follows "a".
    assert_eq!(s.metrics["gsm/exact_match"], 0.0);
    assert_eq!(s.metrics["mc/acc_norm"], 1.0);
    assert_eq!(s.metrics["mc/multiple_choice"], 1.0);

    // Dev line 3 (after a blank line) is too long for max_length 20 with 4 new tokens.
    let cfg = LmConfig {
        max_length: Some(20),
        ..LmConfig::default()
    };
    let e = LmEvaluator::try_new(tasks, vocab(), cfg)
        .err()
        .unwrap()
        .to_string();
    let file = d.join("gsm").join("dev.jsonl");
    assert!(
        e.contains(&format!("task `gsm`, {}: line 3: needs", file.display())),
        "{e}"
    );
    assert!(
        e.contains("4 max_new_tokens), more than max_length 20"),
        "{e}"
    );
}
