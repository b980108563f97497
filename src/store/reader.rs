//! Opening a model directory: config.json, one `model.safetensors` or the shards named by
//! `model.safetensors.index.json`, memory-mapped. Every header is validated here, explicitly,
//! before any tensor is read, and every error names the file (and the tensor, where one is at
//! fault).
//!
//! A safetensors file is: 8 bytes little-endian `u64` header length `N`, `N` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`, offsets
//! relative to the data region), then the data region.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use super::TensorInfo;
use super::codec;
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorBuf};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The config file name.
pub const CONFIG_FILE: &str = "config.json";

/// Largest header we accept (the safetensors reference implementation uses the same bound).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Where a tensor's bytes live.
#[derive(Clone, Copy, Debug)]
struct Location {
    shard: usize,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

/// One mapped safetensors file. Headers and [`Model::raw`] use the map; [`Model::read_into`]
/// reads through `file` with positioned reads, so decoding a tensor neither page-faults the map
/// in nor leaves the file's pages counted in this process's resident memory.
struct Shard {
    path: PathBuf,
    file: File,
    map: Mmap,
}

/// Bytes read per positioned read when decoding a non-f32 tensor (the scratch buffer's size).
const READ_CHUNK: usize = 4 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An opened model directory. Tensors are memory-mapped and decoded to `f32` on demand.
pub struct Model {
    dir: PathBuf,
    config: Value,
    /// Sorted by name.
    tensors: Vec<TensorInfo>,
    /// Parallel to `tensors`.
    locations: Vec<Location>,
    shards: Vec<Shard>,
}

/// One tensor entry of a validated header; offsets are absolute in the file.
#[derive(Debug)]
pub(crate) struct HeaderEntry {
    pub info: TensorInfo,
    pub start: usize,
    pub end: usize,
}

fn st_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn bad(path: &Path, tensor: &str, msg: impl Into<String>) -> Error {
    Error::BadTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        msg: msg.into(),
    }
}

fn config_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parse and validate the header of the safetensors file `bytes` (the whole file, read from
/// `path`). Returns the entries sorted by name. Checks: the header length is sane and inside the
/// file; the header is a JSON object; every tensor has a supported dtype, a shape, and
/// `data_offsets` inside the data region whose length equals dtype size × element count; the
/// tensors tile the data region exactly (no gap, overlap or trailing bytes), as the reference
/// `safetensors` crate requires.
pub(crate) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<HeaderEntry>> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(st_err(
            path,
            format!("file is {file_len} bytes, too short for the 8-byte header length"),
        ));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_LEN {
        return Err(st_err(
            path,
            format!("header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit"),
        ));
    }
    if header_len > file_len - 8 {
        return Err(st_err(
            path,
            format!("header length {header_len} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let header = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| st_err(path, format!("header is not UTF-8: {e}")))?;
    let json: Value = serde_json::from_str(header)
        .map_err(|e| st_err(path, format!("header is not valid JSON: {e}")))?;
    if !json.is_object() {
        return Err(st_err(path, "header is not a JSON object"));
    }
    // Parsed again as a list of pairs: a JSON object silently keeps the last of duplicate keys,
    // and a tensor listed twice is corruption we want to report.
    let HeaderPairs(pairs) = serde_json::from_str(header)
        .map_err(|e| st_err(path, format!("header is not valid JSON: {e}")))?;
    let mut seen = std::collections::HashSet::with_capacity(pairs.len());
    for (name, _) in &pairs {
        if !seen.insert(name.as_str()) {
            return Err(bad(path, name, "listed twice in the header"));
        }
    }
    let mut pairs = pairs;
    pairs.sort_by(|a, b| a.0.cmp(&b.0));

    let mut entries = Vec::with_capacity(pairs.len());
    for (name, entry) in &pairs {
        if name == "__metadata__" {
            if !entry.is_object() {
                return Err(st_err(path, "`__metadata__` is not a JSON object"));
            }
            continue;
        }
        let obj = entry
            .as_object()
            .ok_or_else(|| bad(path, name, "header entry is not a JSON object"))?;
        let dtype_name = obj
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(path, name, "missing or non-string `dtype`"))?;
        let dtype = match dtype_name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(bad(
                    path,
                    name,
                    format!("unsupported dtype `{other}` (supported: F32, F16, BF16)"),
                ));
            }
        };
        let shape = obj
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(path, name, "missing or non-array `shape`"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad(path, name, "`shape` holds a non-integer or negative entry"))?;
        let offsets = obj
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad(path, name, "`data_offsets` is not a pair of integers"))?;
        let (begin, end) = offsets;
        if begin > end {
            return Err(bad(
                path,
                name,
                format!("data_offsets [{begin}, {end}] are reversed"),
            ));
        }
        if end > data_len as u64 {
            return Err(bad(
                path,
                name,
                format!(
                    "data_offsets [{begin}, {end}] run past the end of the data region \
                     ({data_len} bytes; file truncated?)"
                ),
            ));
        }
        let expected = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(path, name, format!("shape {shape:?} overflows")))?;
        if (end - begin) as usize != expected {
            return Err(bad(
                path,
                name,
                format!(
                    "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of \
                     {dtype_name} needs {expected}",
                    end - begin
                ),
            ));
        }
        entries.push(HeaderEntry {
            info: TensorInfo {
                name: name.clone(),
                dtype,
                shape,
            },
            start: data_start + begin as usize,
            end: data_start + end as usize,
        });
    }

    // Tiling check, as the reference `safetensors` crate requires: in offset order the first
    // tensor begins at 0, each begins where the previous one ends, and the last ends at the end
    // of the data region. A gap, an overlap or trailing bytes mean the header and the data do
    // not agree (e.g. a header length off by a few bytes, which would read every tensor shifted).
    let mut by_offset: Vec<&HeaderEntry> = entries.iter().collect();
    by_offset.sort_by_key(|e| (e.start, e.end));
    let mut pos = data_start;
    let mut prev: Option<&HeaderEntry> = None;
    for e in &by_offset {
        let range = format!(
            "data_offsets [{}, {}]",
            e.start - data_start,
            e.end - data_start
        );
        if e.start < pos {
            let p = prev.expect("only a previous tensor can end after the data start");
            return Err(bad(
                path,
                &e.info.name,
                format!(
                    "{range} overlap tensor `{}` at [{}, {}]",
                    p.info.name,
                    p.start - data_start,
                    p.end - data_start
                ),
            ));
        }
        if e.start > pos {
            let after = match prev {
                Some(p) => format!(
                    "after tensor `{}`, which ends at {}",
                    p.info.name,
                    p.end - data_start
                ),
                None => "at the start of the data region".to_string(),
            };
            return Err(bad(
                path,
                &e.info.name,
                format!(
                    "{range} leave a gap of {} bytes {after} (tensors must cover the data \
                     region exactly)",
                    e.start - pos
                ),
            ));
        }
        pos = e.end;
        prev = Some(e);
    }
    if pos != bytes.len() {
        let trailing = bytes.len() - pos;
        return Err(match prev {
            Some(p) => bad(
                path,
                &p.info.name,
                format!(
                    "data_offsets [{}, {}] end the last tensor, but the data region holds \
                     {data_len} bytes: {trailing} trailing bytes (tensors must cover the data \
                     region exactly; header length wrong?)",
                    p.start - data_start,
                    p.end - data_start
                ),
            ),
            None => st_err(
                path,
                format!(
                    "the header lists no tensors but {trailing} data bytes follow it (tensors \
                     must cover the data region exactly; header length wrong?)"
                ),
            ),
        });
    }

    Ok(entries)
}

/// A JSON object read as its (key, value) pairs in file order, duplicates kept.
#[derive(Default)]
pub(crate) struct HeaderPairs(pub(crate) Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for HeaderPairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = HeaderPairs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderPairs, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, Value>()? {
                    pairs.push(pair);
                }
                Ok(HeaderPairs(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// `model-00002-of-00005.safetensors` → (2, 5).
fn shard_number(file: &str) -> Option<(u32, u32)> {
    let rest = file.strip_prefix("model-")?.strip_suffix(".safetensors")?;
    let (i, n) = rest.split_once("-of-")?;
    let digits = |s: &str| s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(i) || !digits(n) {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// When the weight map names its shards in the Hugging Face pattern
/// (`model-0000i-of-0000n.safetensors`, one `n` for all), every shard 1..=n must be named: a
/// shard the index never names holds tensors the model would silently lack (an entry deleted
/// from a hand-edited index).
fn check_shard_numbering<'a>(
    index_path: &Path,
    files: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let mut numbers = BTreeSet::new();
    let mut total = None;
    for file in files {
        let Some((i, n)) = shard_number(file) else {
            return Ok(());
        };
        if total.is_some_and(|t| t != n) {
            return Ok(());
        }
        total = Some(n);
        numbers.insert(i);
    }
    let Some(n) = total else { return Ok(()) };
    if n > 100_000 {
        return Ok(());
    }
    if let Some(missing) = (1..=n).find(|i| !numbers.contains(i)) {
        return Err(config_err(
            index_path,
            format!(
                "`weight_map` names no tensor in shard {missing} of {n}                  (model-{missing:05}-of-{n:05}.safetensors): its tensors would be missing"
            ),
        ));
    }
    Ok(())
}

/// Open and map a file read-only.
fn map_file(path: &Path) -> Result<(File, Mmap)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < 8 {
        // Mapping an empty file fails on some platforms; report the real problem instead.
        return Err(st_err(
            path,
            format!("file is {len} bytes, too short for the 8-byte header length"),
        ));
    }
    // SAFETY: the map is read-only and lives inside `Model`. Like every mmap-based reader
    // (safetensors, candle), we rely on the file not being truncated or rewritten while the
    // model is open; model directories are treated as immutable inputs.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok((file, map))
}

/// Read and parse a JSON file, as an error naming the file.
fn read_json(path: &Path, what: &str) -> Result<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(config_err(path, format!("missing {what}")));
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text).map_err(|e| config_err(path, format!("invalid JSON: {e}")))
}

impl Model {
    /// Open `dir`: read config.json, map `model.safetensors` or the shards listed in
    /// `model.safetensors.index.json`, and validate every header.
    pub fn open(dir: impl AsRef<Path>) -> Result<Model> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join(CONFIG_FILE);
        let config = read_json(&config_path, "config.json")?;
        if !config.is_object() {
            return Err(config_err(&config_path, "config.json is not a JSON object"));
        }
        crate::arch::check_config(&config).map_err(|msg| config_err(&config_path, msg))?;

        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let (shards, placed) = if single.is_file() {
            let (file, map) = map_file(&single)?;
            let entries = parse_header(&single, &map)?;
            let placed: Vec<(HeaderEntry, usize)> = entries.into_iter().map(|e| (e, 0)).collect();
            (
                vec![Shard {
                    path: single,
                    file,
                    map,
                }],
                placed,
            )
        } else if index_path.is_file() {
            Self::open_sharded(&index_path)?
        } else {
            return Err(config_err(
                &dir,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in the model directory"),
            ));
        };

        let mut placed = placed;
        placed.sort_by(|a, b| a.0.info.name.cmp(&b.0.info.name));
        let mut tensors = Vec::with_capacity(placed.len());
        let mut locations = Vec::with_capacity(placed.len());
        for (entry, shard) in placed {
            locations.push(Location {
                shard,
                start: entry.start,
                end: entry.end,
            });
            tensors.push(entry.info);
        }
        Ok(Model {
            dir,
            config,
            tensors,
            locations,
            shards,
        })
    }

    /// Read the index, map every shard it names, and keep the tensors the weight map lists.
    #[allow(clippy::type_complexity)]
    fn open_sharded(index_path: &Path) -> Result<(Vec<Shard>, Vec<(HeaderEntry, usize)>)> {
        let index = read_json(index_path, "index")?;
        let weight_map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| config_err(index_path, "no `weight_map` object"))?;
        // tensor -> shard file name, and the shard files in name order.
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, file) in weight_map {
            let file = file.as_str().ok_or_else(|| {
                config_err(
                    index_path,
                    format!("weight_map entry for `{tensor}` is not a file name"),
                )
            })?;
            let plain = Path::new(file)
                .file_name()
                .is_some_and(|n| n == std::ffi::OsStr::new(file));
            if !plain || file == ".." {
                return Err(config_err(
                    index_path,
                    format!(
                        "weight_map entry for `{tensor}` names `{file}`, which is not a plain \
                         file name in the model directory"
                    ),
                ));
            }
            wanted.entry(file).or_default().push(tensor);
        }
        if wanted.is_empty() {
            return Err(config_err(index_path, "`weight_map` lists no tensors"));
        }
        check_shard_numbering(index_path, wanted.keys().copied())?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shards = Vec::with_capacity(wanted.len());
        let mut placed = Vec::with_capacity(weight_map.len());
        for (file, names) in &wanted {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(config_err(
                    index_path,
                    format!(
                        "shard `{file}` (holding `{}` per weight_map) does not exist",
                        names[0]
                    ),
                ));
            }
            let (file, map) = map_file(&path)?;
            let entries = parse_header(&path, &map)?;
            let names: BTreeSet<&str> = names.iter().copied().collect();
            let found: BTreeSet<&str> = entries.iter().map(|e| e.info.name.as_str()).collect();
            if let Some(missing) = names.difference(&found).next() {
                return Err(bad(
                    &path,
                    missing,
                    format!(
                        "listed in {} for this shard, but the shard has no such tensor",
                        index_path.display()
                    ),
                ));
            }
            // A tensor the shard holds but the weight map does not place here: a stale or
            // hand-edited index. Dropping it would give a model that silently lacks a tensor
            // (or holds it twice), so it is refused.
            if let Some(extra) = found.difference(&names).next() {
                let elsewhere = weight_map.get(*extra).and_then(Value::as_str);
                return Err(bad(
                    &path,
                    extra,
                    match elsewhere {
                        Some(other) => format!(
                            "held by this shard, but {} places it in shard `{other}`",
                            index_path.display()
                        ),
                        None => format!(
                            "held by this shard, but {} does not list it",
                            index_path.display()
                        ),
                    },
                ));
            }
            let shard = shards.len();
            placed.extend(entries.into_iter().map(|e| (e, shard)));
            shards.push(Shard { path, file, map });
        }
        Ok((shards, placed))
    }

    /// The directory this model was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed config.json.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The safetensors files this model was read from, in shard order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
    }

    /// One tensor's info, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.position(name).map(|i| &self.tensors[i])
    }

    /// A tensor's stored bytes (zero-copy view into the map) with its info.
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let i = self.position(name).ok_or_else(|| Error::MissingTensor {
            model: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let loc = self.locations[i];
        Ok((
            &self.tensors[i],
            &self.shards[loc.shard].map[loc.start..loc.end],
        ))
    }

    /// Decode a tensor to `f32` into `out` (length = element count). Reads with positioned
    /// reads (f32 straight into `out`, other dtypes through a small per-thread buffer), so the
    /// bytes pass through memory once and the file's pages are not counted in our RSS.
    pub fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            model: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        if out.len() != info.numel() {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "output buffer holds {} values, tensor has {} (shape {:?})",
                    out.len(),
                    info.numel(),
                    info.shape
                ),
            });
        }
        self.read_range_into(name, 0, out)
    }

    /// Decode elements `start .. start + out.len()` of a tensor (flattened, row-major) to `f32`
    /// into `out`, with positioned reads as [`Model::read_into`].
    pub fn read_range_into(&self, name: &str, start: usize, out: &mut [f32]) -> Result<()> {
        use std::os::unix::fs::FileExt;

        let i = self.position(name).ok_or_else(|| Error::MissingTensor {
            model: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let info = &self.tensors[i];
        if start + out.len() > info.numel() {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "elements {start}..{} requested, tensor has {} (shape {:?})",
                    start + out.len(),
                    info.numel(),
                    info.shape
                ),
            });
        }
        let loc = self.locations[i];
        let shard = &self.shards[loc.shard];
        let io = |e| bad(&shard.path, name, format!("read failed: {e}"));
        let size = info.dtype.size();
        let first = loc.start + start * size;
        if info.dtype == DType::F32 && cfg!(target_endian = "little") {
            let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
            return shard.file.read_exact_at(dst, first as u64).map_err(io);
        }
        let per_chunk = READ_CHUNK / size;
        SCRATCH.with(|buf| {
            let mut buf = buf.borrow_mut();
            for (c, dst) in out.chunks_mut(per_chunk).enumerate() {
                let bytes = dst.len() * size;
                buf.resize(bytes, 0);
                let at = first + c * per_chunk * size;
                shard
                    .file
                    .read_exact_at(&mut buf[..bytes], at as u64)
                    .map_err(io)?;
                codec::decode(info.dtype, &buf[..bytes], dst);
            }
            Ok(())
        })
    }

    /// Decode a tensor to a new `f32` buffer.
    pub fn read(&self, name: &str) -> Result<TensorBuf> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            model: self.dir.clone(),
            tensor: name.to_string(),
        })?;
        let mut data = vec![0f32; info.numel()];
        let shape = info.shape.clone();
        self.read_into(name, &mut data)?;
        Ok(TensorBuf::new(shape, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file from a header string and `data_len` zero bytes.
    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("x.safetensors"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn valid_header_parses_with_absolute_offsets() {
        let h = r#"{"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#;
        let bytes = file(h, 14);
        let entries = parse_header(Path::new("x"), &bytes).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].info.name, "a");
        assert_eq!(entries[0].start, 8 + h.len());
        assert_eq!(entries[1].info.dtype, DType::BF16);
        assert_eq!(entries[1].end - entries[1].start, 6);
    }

    #[test]
    fn header_errors_name_file_and_tensor() {
        assert!(err(&[1, 2, 3]).contains("too short"));
        let mut big = file("{}", 0);
        big[..8].copy_from_slice(&50u64.to_le_bytes());
        assert!(err(&big).contains("past the end of the file"));
        assert!(err(&file("{not json", 0)).contains("not valid JSON"));
        let e = err(&file(
            r#"{"t":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(
            e.contains("`t`") && e.contains("unsupported dtype `I64`"),
            "{e}"
        );
        let e = err(&file(
            r#"{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        ));
        assert!(e.contains("`t`") && e.contains("past the end"), "{e}");
        let e = err(&file(
            r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ));
        assert!(e.contains("needs 12"), "{e}");
        let e = err(&file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        ));
        assert!(e.contains("`b`") && e.contains("overlap tensor `a`"), "{e}");
        assert!(e.starts_with("x.safetensors"), "{e}");
        let e = err(&file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        ));
        assert!(e.contains("`a`: listed twice"), "{e}");
    }
}
