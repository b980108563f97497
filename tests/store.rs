//! Integration tests: store (read / write / shard / validate), arch checks on opened models,
//! synthetic families, inspect.

use std::fs;
use std::path::{Path, PathBuf};

use evomerge::Error;
use evomerge::arch;
use evomerge::store::{self, Model, ModelWriter, TensorInfo, TensorSource, WriteConfig};
use evomerge::synth::{self, LlamaSpec};
use evomerge::tensor::DType;
use serde_json::json;

fn info(name: &str, dtype: DType, shape: &[usize]) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// Write a two-tensor model with hand-picked values in `dtype`.
fn write_small(target: &Path, dtype: DType, config: &WriteConfig) -> PathBuf {
    let infos = [
        info("a.weight", dtype, &[2, 2]),
        info("b.bias", dtype, &[3]),
    ];
    let w = ModelWriter::create(target, &infos, config).unwrap();
    w.write("b.bias", &[0.1, -2.5, 65504.0]).unwrap();
    w.write("a.weight", &[1.0, -0.5, std::f32::consts::PI, 0.0])
        .unwrap();
    w.finish(&json!({"model_type": "toy"}), None, "# toy\n")
        .unwrap()
}

/// Every file (and directory) name directly under `dir`.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Write a raw safetensors file from a header and data bytes.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

/// A model directory holding config.json and a hand-made model.safetensors.
fn raw_model(root: &Path, header: &str, data: &[u8]) -> PathBuf {
    let dir = root.join("m");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("config.json"), "{}").unwrap();
    raw_file(&dir.join("model.safetensors"), header, data);
    dir
}

fn open_err(dir: &Path) -> (Error, String) {
    let e = Model::open(dir).err().expect("open should fail");
    let s = e.to_string();
    (e, s)
}

#[test]
fn round_trip_in_each_dtype_rounds_as_the_dtype_does() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (DType::F32, [std::f32::consts::PI, 0.1, 65504.0]),
        // f16: pi → 3.140625, 0.1 → 0.099975586, 65504 exact.
        (DType::F16, [3.140625, 0.099975586, 65504.0]),
        // bf16: pi → 3.140625, 0.1 → 0.10009765625 (0x3dcd), 65504 → 65536.
        (
            DType::BF16,
            [3.140625, f32::from_bits(0x3dcd_0000), 65536.0],
        ),
    ];
    for (dtype, [pi, tenth, big]) in cases {
        let dir = write_small(
            &tmp.path().join(dtype.to_string()),
            dtype,
            &WriteConfig::default(),
        );
        let m = Model::open(&dir).unwrap();
        assert_eq!(m.tensors().len(), 2);
        assert_eq!(m.tensor_info("a.weight").unwrap().dtype, dtype);
        assert_eq!(
            m.read("a.weight").unwrap().to_f32_vec(),
            vec![1.0, -0.5, pi, 0.0]
        );
        assert_eq!(m.read("a.weight").unwrap().shape, vec![2, 2]);
        assert_eq!(
            m.read("b.bias").unwrap().to_f32_vec(),
            vec![tenth, -2.5, big]
        );
        assert_eq!(m.config()["model_type"], "toy");
        assert_eq!(
            listing(&dir),
            ["README.md", "config.json", "model.safetensors"]
        );
        // The reference implementation accepts our files (contiguous data, valid header).
        let bytes = fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("b.bias").unwrap().shape(), &[3]);
        // The data region starts 8-byte aligned.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!((8 + n) % 8, 0);
    }
    // No temporary directories left beside the targets.
    assert_eq!(listing(tmp.path()), ["bf16", "f16", "f32"]);
}

#[test]
fn synthetic_family_on_disk_equals_the_in_memory_family() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let spec = LlamaSpec {
            dtype,
            ..LlamaSpec::tiny()
        };
        let root = tmp.path().join(dtype.to_string());
        let dirs = synth::write_family(&root, &spec, 2, 11).unwrap();
        assert_eq!(listing(&root), ["base", "ft1", "ft2"]);
        let mem = synth::mem_family(&spec, 2, 11);
        for (dir, m) in dirs.iter().zip(&mem) {
            let disk = Model::open(dir).unwrap();
            assert_eq!(disk.config()["num_hidden_layers"], 2);
            assert_eq!(disk.config()["torch_dtype"], dtype.torch_name());
            let names: Vec<_> = disk.tensors().iter().map(|t| t.name.clone()).collect();
            let mem_names: Vec<_> = m.tensors.keys().cloned().collect();
            assert_eq!(names, mem_names);
            for name in &names {
                assert_eq!(disk.read(name).unwrap(), m.tensors[name], "{name}");
            }
        }
        let models: Vec<&dyn TensorSource> = mem.iter().map(|m| m as &dyn TensorSource).collect();
        arch::check_compatible(&models).unwrap();
    }
}

#[test]
fn sharded_output_reads_back_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = LlamaSpec {
        dtype: DType::BF16,
        ..LlamaSpec::tiny()
    };
    let single = synth::write_family(&tmp.path().join("one"), &spec, 0, 3).unwrap();
    // Largest tensor: 32 × 16 bf16 = 1024 bytes; 1500-byte shards force several files.
    let sharded = synth::write_family_with(
        &tmp.path().join("many"),
        &spec,
        0,
        3,
        &WriteConfig {
            max_shard_size: 1500,
        },
    )
    .unwrap();
    let (a, b) = (
        Model::open(&single[0]).unwrap(),
        Model::open(&sharded[0]).unwrap(),
    );
    assert!(b.files().len() > 2, "{} shards", b.files().len());
    let n = b.files().len();
    assert_eq!(
        b.files()[0].file_name().unwrap().to_string_lossy(),
        format!("model-00001-of-{n:05}.safetensors")
    );
    let index: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(sharded[0].join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let data_bytes: u64 = a.tensors().iter().map(|t| t.numel() as u64 * 2).sum();
    assert_eq!(index["metadata"]["total_size"], data_bytes);
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        a.tensors().len()
    );
    assert_eq!(a.tensors(), b.tensors());
    for t in a.tensors() {
        assert_eq!(a.read(&t.name).unwrap(), b.read(&t.name).unwrap());
    }
    for f in b.files() {
        let bytes = fs::read(f).unwrap();
        let data_len = bytes.len() as u64 - 8 - u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert!(
            data_len <= 1500 || safetensors::SafeTensors::deserialize(&bytes).unwrap().len() == 1
        );
    }
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_small(&tmp.path().join("m"), DType::F32, &WriteConfig::default());
    let path = dir.join("model.safetensors");
    let len = fs::metadata(&path).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 4).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::BadTensor { .. }), "{s}");
    assert!(s.contains("model.safetensors"), "{s}");
    // Data order: 4-byte tensors by name, so `b.bias` is last and is the one cut short.
    assert!(s.contains("`b.bias`") && s.contains("past the end"), "{s}");
    // Cut into the header itself.
    f.set_len(20).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Safetensors { .. }), "{s}");
    assert!(
        s.contains("header length") && s.contains("past the end of the file"),
        "{s}"
    );
    f.set_len(5).unwrap();
    let (_, s) = open_err(&dir);
    assert!(
        s.contains("model.safetensors") && s.contains("too short"),
        "{s}"
    );
}

#[test]
fn header_length_past_eof_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw_model(tmp.path(), "{}", &[]);
    let path = dir.join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
    fs::write(&path, bytes).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Safetensors { .. }));
    assert!(s.contains("model.safetensors"), "{s}");
    assert!(
        s.contains("header length 1000 runs past the end of the file (10 bytes)"),
        "{s}"
    );
}

#[test]
fn invalid_json_header_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw_model(tmp.path(), r#"{"a": {"dtype": "F32",,}}"#, &[]);
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Safetensors { .. }));
    assert!(
        s.contains("model.safetensors") && s.contains("not valid JSON"),
        "{s}"
    );
}

#[test]
fn data_offsets_past_the_end_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw_model(
        tmp.path(),
        r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        &[0; 12],
    );
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "w"),
        "{s}"
    );
    assert!(s.contains("model.safetensors: tensor `w`"), "{s}");
    assert!(
        s.contains("data_offsets [0, 16] run past the end of the data region (12 bytes"),
        "{s}"
    );
}

#[test]
fn overlapping_offsets_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw_model(
        tmp.path(),
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[6,14]}}"#,
        &[0; 14],
    );
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "b"),
        "{s}"
    );
    assert!(s.contains("overlap tensor `a` at [0, 8]"), "{s}");
}

/// Issue 13: tensors must tile the data region exactly, as the reference `safetensors` crate
/// requires. A header length lowered by 1 (into the header's space padding) used to be accepted,
/// every tensor then read one byte off; gaps and trailing bytes were accepted too.
#[test]
fn safetensors_tensors_must_tile_the_data_region_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    // A valid file written by the writer (header padded with spaces), header length lowered by 1.
    let dir = write_small(&tmp.path().join("w"), DType::F32, &WriteConfig::default());
    Model::open(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(
        bytes[8 + n as usize - 1],
        b' ',
        "the writer pads its header"
    );
    bytes[..8].copy_from_slice(&(n - 1).to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "b.bias"),
        "{s}"
    );
    assert!(
        s.contains("model.safetensors: tensor `b.bias`: data_offsets [16, 28]")
            && s.contains(
                "end the last tensor, but the data region holds 29 bytes: 1 trailing bytes"
            )
            && s.contains("tensors must cover the data region exactly"),
        "{s}"
    );

    // A gap between two tensors.
    let dir = raw_model(
        &tmp.path().join("gap"),
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
        &[0; 16],
    );
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "b"),
        "{s}"
    );
    assert!(
        s.contains(
            "tensor `b`: data_offsets [12, 16] leave a gap of 4 bytes after tensor `a`, which \
             ends at 8 (tensors must cover the data region exactly)"
        ),
        "{s}"
    );

    // A gap at the start.
    let dir = raw_model(
        &tmp.path().join("lead"),
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    let (_, s) = open_err(&dir);
    assert!(
        s.contains("tensor `a`: data_offsets [4, 8] leave a gap of 4 bytes at the start"),
        "{s}"
    );

    // Trailing bytes after the last tensor.
    let dir = raw_model(
        &tmp.path().join("trail"),
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0; 11],
    );
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "a"),
        "{s}"
    );
    assert!(
        s.contains(
            "tensor `a`: data_offsets [0, 8] end the last tensor, but the data region holds 11 \
             bytes: 3 trailing bytes (tensors must cover the data region exactly; header length \
             wrong?)"
        ),
        "{s}"
    );
    // No tensors at all, but data.
    let dir = raw_model(&tmp.path().join("empty"), "{}", &[0; 4]);
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Safetensors { .. }), "{s}");
    assert!(
        s.contains("lists no tensors but 4 data bytes follow it"),
        "{s}"
    );
}

#[test]
fn byte_length_must_match_shape_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw_model(
        tmp.path(),
        r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "w"),
        "{s}"
    );
    assert!(
        s.contains("hold 8 bytes, but shape [2, 3] of BF16 needs 12"),
        "{s}"
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw_model(
        tmp.path(),
        r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == "ids"),
        "{s}"
    );
    assert!(
        s.contains("model.safetensors: tensor `ids`: unsupported dtype `I64`"),
        "{s}"
    );
}

/// A sharded tiny model: returns its directory.
fn sharded_model(root: &Path) -> PathBuf {
    let dirs = synth::write_family_with(
        root,
        &LlamaSpec::tiny(),
        0,
        5,
        &WriteConfig {
            max_shard_size: 4096,
        },
    )
    .unwrap();
    dirs[0].clone()
}

#[test]
fn index_naming_a_missing_shard_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_model(tmp.path());
    let shards: Vec<String> = listing(&dir)
        .into_iter()
        .filter(|n| n.starts_with("model-"))
        .collect();
    assert!(shards.len() >= 2);
    let gone = &shards[1];
    fs::remove_file(dir.join(gone)).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Config { .. }), "{s}");
    assert!(s.contains("model.safetensors.index.json"), "{s}");
    assert!(
        s.contains(&format!("shard `{gone}`")) && s.contains("does not exist"),
        "{s}"
    );
}

#[test]
fn index_naming_a_tensor_absent_from_its_shard_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_model(tmp.path());
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let moved = "model.norm.weight";
    let home = map[moved].as_str().unwrap().to_string();
    let other = map
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .find(|f| *f != home)
        .unwrap();
    map.insert(moved.into(), json!(other));
    fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if tensor == moved),
        "{s}"
    );
    assert!(
        s.contains(&other) && s.contains("has no such tensor"),
        "{s}"
    );
}

/// Issue 13 (found by tests/fuzz.rs): an index whose weight map drops a tensor was accepted,
/// and the model silently lacked it. A shard holding a tensor the index does not place there,
/// a shard of the `model-i-of-n` series the index never names, and an empty weight map are
/// refused.
#[test]
fn sharded_index_that_omits_a_tensor_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = sharded_model(tmp.path());
    let index_path = dir.join("model.safetensors.index.json");
    let original = fs::read_to_string(&index_path).unwrap();
    let index: serde_json::Value = serde_json::from_str(&original).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let mut per_shard: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (t, f) in map {
        per_shard.entry(f.as_str().unwrap()).or_default().push(t);
    }
    let write = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut index = index.clone();
        edit(index["weight_map"].as_object_mut().unwrap());
        fs::write(&index_path, index.to_string()).unwrap();
    };

    // A tensor dropped from a shard that holds others.
    let (shard, names) = per_shard.iter().find(|(_, n)| n.len() >= 2).unwrap();
    let dropped = names[0].to_string();
    write(&|m| {
        m.remove(&dropped);
    });
    let (e, s) = open_err(&dir);
    assert!(
        matches!(e, Error::BadTensor { ref tensor, .. } if *tensor == dropped),
        "{s}"
    );
    assert!(
        s.contains(shard)
            && s.contains("held by this shard, but")
            && s.contains("does not list it"),
        "{s}"
    );

    // Every tensor of one shard dropped: that shard is never named.
    let (shard, names) = per_shard.iter().nth(1).unwrap();
    write(&|m| {
        for n in names {
            m.remove(*n);
        }
    });
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Config { .. }), "{s}");
    assert!(
        s.contains("names no tensor in shard 2 of") && s.contains(&shard[..]),
        "{s}"
    );

    // An empty weight map.
    write(&|m| m.clear());
    let (_, s) = open_err(&dir);
    assert!(s.contains("`weight_map` lists no tensors"), "{s}");

    fs::write(&index_path, original).unwrap();
    assert_eq!(Model::open(&dir).unwrap().tensors().len(), map.len());
}

#[test]
fn missing_config_and_missing_weights_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_small(&tmp.path().join("m"), DType::F32, &WriteConfig::default());
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Config { .. }), "{s}");
    assert!(
        s.contains("no model.safetensors or model.safetensors.index.json"),
        "{s}"
    );
    fs::remove_file(dir.join("config.json")).unwrap();
    let (e, s) = open_err(&dir);
    assert!(matches!(e, Error::Config { .. }), "{s}");
    assert!(
        s.contains("config.json") && s.contains("missing config.json"),
        "{s}"
    );
    fs::write(dir.join("config.json"), "{oops").unwrap();
    let (_, s) = open_err(&dir);
    assert!(s.contains("config.json: invalid JSON"), "{s}");
}

#[test]
fn dropped_unfinished_writer_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    let infos = [info("x", DType::BF16, &[4])];
    let w = ModelWriter::create(&target, &infos, &WriteConfig::default()).unwrap();
    w.write("x", &[1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(
        listing(tmp.path()).len(),
        1,
        "temporary directory exists while writing"
    );
    assert!(!target.exists());
    drop(w);
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
}

#[test]
fn finish_with_a_missing_tensor_errors_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    let infos = [
        info("x", DType::F32, &[2]),
        info("y", DType::F32, &[2]),
        info("z", DType::F32, &[2]),
    ];
    let w = ModelWriter::create(&target, &infos, &WriteConfig::default()).unwrap();
    w.write("y", &[1.0, 2.0]).unwrap();
    // Wrong length and unknown names are errors too.
    assert!(
        w.write("x", &[1.0])
            .unwrap_err()
            .to_string()
            .contains("got 1 values")
    );
    assert!(w.write("nope", &[1.0]).is_err());
    let e = w.finish(&json!({}), None, "").unwrap_err().to_string();
    assert!(
        e.contains("`x`") && e.contains("never written") && e.contains("1 more"),
        "{e}"
    );
    assert!(!target.exists());
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
}

/// A tensor written in pieces (any order, bf16) reads back whole, and its pieces read back by
/// range; a piece past the end, or more elements than the tensor has, is an error naming it; a
/// tensor missing a piece is never finished.
#[test]
fn tensors_written_in_ranges_read_back_and_must_be_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    let infos = [info("a", DType::BF16, &[2, 3]), info("b", DType::F32, &[4])];
    let w = ModelWriter::create(&target, &infos, &WriteConfig::default()).unwrap();
    w.write_range("a", 4, &[5.0, 6.0]).unwrap();
    w.write_range("a", 0, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let e = w.write_range("a", 5, &[7.0, 8.0]).unwrap_err().to_string();
    assert!(e.contains("`a`") && e.contains("5..7"), "{e}");
    let e = w.write_range("a", 0, &[1.0]).unwrap_err().to_string();
    assert!(e.contains("`a`") && e.contains("written twice"), "{e}");
    w.write_range("b", 0, &[1.0, 2.0]).unwrap();
    let e = w.finish(&json!({}), None, "").unwrap_err().to_string();
    assert!(e.contains("`a`") && e.contains("more than once"), "{e}");
    assert!(e.contains("(and 1 more)"), "{e}");
    assert!(!target.exists());

    let w = ModelWriter::create(&target, &infos, &WriteConfig::default()).unwrap();
    w.write("a", &[0.0; 6]).unwrap();
    w.write_range("b", 1, &[1.0, 2.0]).unwrap();
    let e = w.finish(&json!({}), None, "").unwrap_err().to_string();
    assert!(e.contains("`b`") && e.contains("2 of 4 elements"), "{e}");

    let w = ModelWriter::create(&target, &infos, &WriteConfig::default()).unwrap();
    w.write_range("a", 3, &[4.0, 5.0, 6.0]).unwrap();
    w.write_range("a", 0, &[1.0, 2.0, 3.0]).unwrap();
    w.write_range("b", 2, &[-3.0, -4.0]).unwrap();
    w.write_range("b", 0, &[-1.0, -2.0]).unwrap();
    w.finish(&json!({}), None, "").unwrap();
    let m = Model::open(&target).unwrap();
    assert_eq!(
        m.read("a").unwrap().to_f32_vec(),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    let mut piece = [0.0f32; 2];
    m.read_range_into("b", 1, &mut piece).unwrap();
    assert_eq!(piece, [-2.0, -3.0]);
    let e = m
        .read_range_into("b", 3, &mut piece)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`b`") && e.contains("3..5"), "{e}");
}

#[test]
fn create_on_an_existing_target_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("out");
    fs::create_dir(&target).unwrap();
    let e = ModelWriter::create(
        &target,
        &[info("x", DType::F32, &[1])],
        &WriteConfig::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("out") && e.contains("already exists"), "{e}");
    assert_eq!(listing(tmp.path()), ["out"]);
    assert!(listing(&target).is_empty());
}

#[test]
fn finish_copies_donor_files_and_writes_config_and_card() {
    let tmp = tempfile::tempdir().unwrap();
    let donor = tmp.path().join("donor");
    fs::create_dir(&donor).unwrap();
    for f in [
        "tokenizer.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        fs::write(donor.join(f), format!("contents of {f}")).unwrap();
    }
    fs::write(donor.join("unrelated.bin"), "x").unwrap();
    let target = tmp.path().join("merged");
    let w = ModelWriter::create(
        &target,
        &[info("x", DType::F16, &[1])],
        &WriteConfig::default(),
    )
    .unwrap();
    w.write("x", &[0.5]).unwrap();
    let config = store::output_config(
        &json!({"num_hidden_layers": 4, "torch_dtype": "float32"}),
        Some(6),
        DType::F16,
    );
    w.finish(&config, Some(&donor), "# merged\nrecipe here\n")
        .unwrap();
    assert_eq!(
        listing(&target),
        [
            "README.md",
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json"
        ]
    );
    assert_eq!(
        fs::read_to_string(target.join("tokenizer.json")).unwrap(),
        "contents of tokenizer.json"
    );
    assert_eq!(
        fs::read_to_string(target.join("README.md")).unwrap(),
        "# merged\nrecipe here\n"
    );
    let m = Model::open(&target).unwrap();
    assert_eq!(m.config()["num_hidden_layers"], 6);
    assert_eq!(m.config()["torch_dtype"], "float16");
    assert_eq!(m.read("x").unwrap().to_f32_vec(), vec![0.5]);
}

#[test]
fn writes_from_many_threads_land_at_their_offsets() {
    use rayon::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("par");
    let infos: Vec<TensorInfo> = (0..40)
        .map(|i| {
            info(
                &format!("t{i:02}"),
                if i % 3 == 0 { DType::F32 } else { DType::BF16 },
                &[i + 1],
            )
        })
        .collect();
    let w = ModelWriter::create(
        &target,
        &infos,
        &WriteConfig {
            max_shard_size: 200,
        },
    )
    .unwrap();
    infos.par_iter().rev().for_each(|t| {
        let v: Vec<f32> = (0..t.numel()).map(|j| j as f32 + 0.5).collect();
        w.write(&t.name, &v).unwrap();
    });
    w.finish(&json!({}), None, "").unwrap();
    let m = Model::open(&target).unwrap();
    assert!(m.files().len() > 1);
    for t in &infos {
        let want: Vec<f32> = (0..t.numel()).map(|j| j as f32 + 0.5).collect();
        assert_eq!(m.read(&t.name).unwrap().to_f32_vec(), want, "{}", t.name);
    }
}

#[test]
fn inspect_summarises_a_synthetic_model() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = LlamaSpec {
        dtype: DType::BF16,
        tie_embeddings: true,
        ..LlamaSpec::tiny()
    };
    let dirs = synth::write_family(tmp.path(), &spec, 0, 1).unwrap();
    let s = store::inspect(&dirs[0]).unwrap();
    // embed 32×16 + norm 16 + 2 layers × (2×16 + 16×16 + 2×8×16 + 16×16 + 3×16×32).
    let params = 32 * 16 + 16 + 2 * (2 * 16 + 2 * 256 + 2 * 8 * 16 + 3 * 16 * 32);
    assert_eq!(s.parameters, params as u64);
    assert_eq!(s.architecture, "LlamaForCausalLM");
    assert_eq!(s.layers_config, Some(2));
    assert_eq!(s.layers_tensors, Some(2));
    assert_eq!(s.tensors, 2 + 2 * 9);
    assert_eq!(s.dtypes, vec![(DType::BF16, 20, params as u64)]);
    assert_eq!(s.shards, 1);
    assert!(s.tied_embeddings);
    let file_len = fs::metadata(dirs[0].join("model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(s.bytes_on_disk, file_len);
    assert!(file_len > 2 * params as u64);
    let text = s.to_string();
    assert!(
        text.contains("architecture:  LlamaForCausalLM (model_type llama)"),
        "{text}"
    );
    assert!(text.contains("tied embeddings: yes"), "{text}");
    assert!(text.contains(&format!("parameters:    {params}")), "{text}");
}

#[test]
fn incompatible_models_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = synth::write_family(&tmp.path().join("a"), &LlamaSpec::tiny(), 0, 1).unwrap();
    let wide = LlamaSpec {
        intermediate: 48,
        layers: 3,
        ..LlamaSpec::tiny()
    };
    let b = synth::write_family(&tmp.path().join("b"), &wide, 0, 1).unwrap();
    let (a, b) = (Model::open(&a[0]).unwrap(), Model::open(&b[0]).unwrap());
    let e = arch::check_compatible(&[&a, &b]).unwrap_err();
    assert!(matches!(e, Error::Mismatch(_)));
    let s = e.to_string();
    assert!(
        s.contains("`model.layers.0.mlp.down_proj.weight` has shape [16, 48] in model 2"),
        "{s}"
    );
    assert!(
        s.contains("`model.layers.2.input_layernorm.weight` is in model 2"),
        "{s}"
    );
    assert!(s.contains("more differences"), "{s}");
}

#[test]
fn files_written_by_the_reference_implementation_open() {
    use safetensors::{Dtype, tensor::TensorView};
    let tmp = tempfile::tempdir().unwrap();
    let a: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    // bf16 0x3f80 = 1.0, 0xc040 = -3.0, 0x3e80 = 0.25 (odd length: the next tensor is unaligned).
    let b: Vec<u8> = [0x3f80u16, 0xc040, 0x3e80]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let c: Vec<u8> = [0x3c00u16].iter().flat_map(|v| v.to_le_bytes()).collect(); // f16 1.0
    let bytes = safetensors::serialize(
        [
            ("a", TensorView::new(Dtype::F32, vec![2], &a).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![1, 3], &b).unwrap()),
            ("c", TensorView::new(Dtype::F16, vec![1], &c).unwrap()),
        ],
        None,
    )
    .unwrap();
    let dir = tmp.path().join("ref");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("model.safetensors"), bytes).unwrap();
    fs::write(dir.join("config.json"), r#"{"model_type": "x"}"#).unwrap();
    let m = Model::open(&dir).unwrap();
    assert_eq!(m.read("a").unwrap().to_f32_vec(), vec![1.5, -2.0]);
    assert_eq!(m.read("b").unwrap().to_f32_vec(), vec![1.0, -3.0, 0.25]);
    assert_eq!(m.read("b").unwrap().shape, vec![1, 3]);
    assert_eq!(m.read("c").unwrap().to_f32_vec(), vec![1.0]);
    let mut short = [0f32; 2];
    assert!(m.read_into("b", &mut short).is_err());
    assert!(matches!(
        m.read("zz").unwrap_err(),
        Error::MissingTensor { ref tensor, .. } if tensor == "zz"
    ));
}
