//! Writing a model directory in Hugging Face layout.
//!
//! [`ModelWriter::create`] fixes the whole layout from the tensor list: tensors sorted by name are
//! cut into shards of at most `max_shard_size` data bytes; each shard's header is written at
//! once and the file sized, so every tensor has a known offset. [`ModelWriter::write`] then
//! encodes one tensor and writes it at its offset (`pwrite`), from any thread, in any order —
//! peak memory is the tensors in flight. [`ModelWriter::finish`] checks completeness, adds
//! the index (when sharded), config.json, donor tokenizer/generation files and README.md, and
//! renames the temporary directory (named by [`temp_path`] beside the target) into place.
//! Dropping an unfinished writer removes the temporary directory, so a failed merge leaves
//! nothing under the target name.
//!
//! **Temporary names and crash safety.** Everything evomerge writes under a final name goes
//! through a temporary name beside it first: [`temp_path`] gives
//! `.evomerge-tmp.PID.N.HOST.NAME` (the writing process's pid and short host name, a counter,
//! the final name last so the extension is kept). [`write_atomic`] writes a file that way
//! (temp, fsync, rename), so a reader, or a process killed at any moment, only ever sees the
//! old file or the complete new one. A process killed with SIGKILL cannot remove its
//! temporaries; [`remove_stale_temps`] removes the ones of a directory whose process is gone
//! (same host, pid no longer running) and touches nothing else. [`ModelWriter::create`] runs it
//! on the target's parent before every merge, and a search on its output directory when it
//! starts.
//!
//! Files stay readable by the reference safetensors implementation: tensors are contiguous in
//! the data region (no gaps), the header is padded with spaces so the data starts 8-byte
//! aligned, and within a shard 4-byte tensors come before 2-byte ones so every tensor is
//! aligned for its dtype.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value, json};

use super::TensorInfo;
use super::codec;
use super::reader::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Files copied from the donor model directory when present.
pub const DONOR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Options for writing a model directory.
#[derive(Clone, Debug)]
pub struct WriteConfig {
    /// Largest shard in bytes (tensor data); more than one shard adds model.safetensors.index.json.
    pub max_shard_size: u64,
}

impl Default for WriteConfig {
    /// 5 GB shards, as transformers and mergekit default to.
    fn default() -> Self {
        WriteConfig {
            max_shard_size: 5_000_000_000,
        }
    }
}

/// One tensor's place in the output.
struct Slot {
    info: TensorInfo,
    shard: usize,
    /// Absolute offset in the shard file.
    offset: u64,
    /// Elements written so far.
    written: AtomicUsize,
}

struct ShardFile {
    name: String,
    file: File,
}

/// Writes a model directory: the layout (which tensor goes to which shard, at which offset) is
/// fixed up front from the tensor list, so each tensor can be written the moment it is ready,
/// from any thread. Everything goes to a temporary directory beside the target, renamed into place
/// by [`ModelWriter::finish`]; dropping an unfinished writer removes it.
pub struct ModelWriter {
    target: PathBuf,
    tmp: PathBuf,
    /// Sorted by name.
    slots: Vec<Slot>,
    shards: Vec<ShardFile>,
    /// Sum of all tensors' data bytes.
    total_size: u64,
    done: bool,
}

static TMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

/// The shard file names for `n` shards (`model.safetensors`, or
/// `model-0000i-of-0000N.safetensors`).
pub fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    }
}

/// Split tensors (sorted by name) into shards of at most `max` data bytes; a tensor larger than
/// `max` gets a shard of its own. Returns the shard index of each tensor.
fn assign_shards(tensors: &[TensorInfo], max: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(tensors.len());
    let (mut shard, mut used) = (0usize, 0u64);
    for t in tensors {
        let size = (t.numel() * t.dtype.size()) as u64;
        if used > 0 && used + size > max {
            shard += 1;
            used = 0;
        }
        used += size;
        out.push(shard);
    }
    out
}

impl ModelWriter {
    /// Lay out `tensors` (with their output dtypes) into shards under a temporary directory next
    /// to `target`. Fails if `target` already exists.
    pub fn create(target: &Path, tensors: &[TensorInfo], config: &WriteConfig) -> Result<Self> {
        if target.exists() {
            return Err(Error::io(
                target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output directory already exists",
                ),
            ));
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::msg(format!("{}: not a directory name", target.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;

        let mut sorted = tensors.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = sorted.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::Tensor {
                tensor: w[0].name.clone(),
                msg: "listed twice in the output tensor list".into(),
            });
        }
        let shard_of = assign_shards(&sorted, config.max_shard_size.max(1));
        let n_shards = shard_of.last().map_or(1, |s| s + 1);
        let names = shard_names(n_shards);

        // Temporaries of merges into this parent that were killed before they could remove
        // their own.
        remove_stale_temps(&parent);
        // Temporary directory ([`temp_path`]), created exclusively.
        let tmp = loop {
            let candidate = temp_path(&parent.join(&name));
            match std::fs::create_dir(&candidate) {
                Ok(()) => break candidate,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&candidate, e)),
            }
        };
        // From here on, a failure drops `writer`, which removes `tmp`.
        let mut writer = ModelWriter {
            target: target.to_path_buf(),
            tmp,
            slots: Vec::with_capacity(sorted.len()),
            shards: Vec::with_capacity(n_shards),
            total_size: 0,
            done: false,
        };

        // Per shard: data order = 4-byte dtypes first, then 2-byte (each by name), contiguous.
        let mut offsets = vec![0u64; sorted.len()];
        for (s, shard_name) in names.iter().enumerate() {
            let mut members: Vec<usize> = (0..sorted.len()).filter(|&i| shard_of[i] == s).collect();
            members.sort_by_key(|&i| std::cmp::Reverse(sorted[i].dtype.size()));
            let mut header = Map::new();
            header.insert("__metadata__".into(), json!({"format": "pt"}));
            let mut pos = 0u64;
            for &i in &members {
                let t = &sorted[i];
                let len = (t.numel() * t.dtype.size()) as u64;
                header.insert(
                    t.name.clone(),
                    json!({
                        "dtype": t.dtype.safetensors_name(),
                        "shape": t.shape,
                        "data_offsets": [pos, pos + len],
                    }),
                );
                offsets[i] = pos;
                pos += len;
            }
            let mut text = serde_json::to_string(&Value::Object(header))
                .map_err(|e| Error::msg(format!("encoding a safetensors header: {e}")))?;
            while !(8 + text.len()).is_multiple_of(8) {
                text.push(' ');
            }
            let data_start = 8 + text.len() as u64;
            for &i in &members {
                offsets[i] += data_start;
            }
            let path = writer.tmp.join(shard_name);
            let file = File::create_new(&path).map_err(io(&path))?;
            let mut head = (text.len() as u64).to_le_bytes().to_vec();
            head.extend_from_slice(text.as_bytes());
            write_all_at(&file, &head, 0).map_err(io(&path))?;
            file.set_len(data_start + pos).map_err(io(&path))?;
            preallocate(&file, data_start + pos);
            writer.total_size += pos;
            writer.shards.push(ShardFile {
                name: shard_name.clone(),
                file,
            });
        }
        for (i, info) in sorted.into_iter().enumerate() {
            writer.slots.push(Slot {
                info,
                shard: shard_of[i],
                offset: offsets[i],
                written: AtomicUsize::new(0),
            });
        }
        Ok(writer)
    }

    /// The tensors this writer expects, sorted by name, with their output dtypes.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.slots.iter().map(|s| &s.info)
    }

    /// The target directory.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Number of shard files.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Encode and write one tensor (any thread, any order). `values.len()` must match its shape.
    pub fn write(&self, name: &str, values: &[f32]) -> Result<()> {
        let slot = self.slot(name)?;
        if values.len() != slot.info.numel() {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "got {} values for shape {:?} ({} elements)",
                    values.len(),
                    slot.info.shape,
                    slot.info.numel()
                ),
            });
        }
        self.write_range(name, 0, values)
    }

    /// Encode and write elements `start .. start + values.len()` of one tensor (flattened; any
    /// thread, any order). A tensor is complete once all its elements were written.
    pub fn write_range(&self, name: &str, start: usize, values: &[f32]) -> Result<()> {
        let slot = self.slot(name)?;
        let numel = slot.info.numel();
        if start + values.len() > numel {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "elements {start}..{} written, shape {:?} has {numel}",
                    start + values.len(),
                    slot.info.shape
                ),
            });
        }
        let shard = &self.shards[slot.shard];
        let path = self.tmp.join(&shard.name);
        let at = slot.offset + (start * slot.info.dtype.size()) as u64;
        if slot.info.dtype == DType::F32 && cfg!(target_endian = "little") {
            write_all_at(&shard.file, bytemuck::cast_slice(values), at).map_err(io(&path))?;
        } else {
            let bytes = codec::encode_vec(slot.info.dtype, values);
            write_all_at(&shard.file, bytes.as_slice(), at).map_err(io(&path))?;
        }
        if slot.written.fetch_add(values.len(), Ordering::AcqRel) + values.len() > numel {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: "written twice".into(),
            });
        }
        Ok(())
    }

    fn slot(&self, name: &str) -> Result<&Slot> {
        self.slots
            .binary_search_by(|s| s.info.name.as_str().cmp(name))
            .map(|i| &self.slots[i])
            .map_err(|_| Error::Tensor {
                tensor: name.to_string(),
                msg: format!("not in the output layout of {}", self.target.display()),
            })
    }

    /// Check every tensor was written, write config.json (`config` as given), copy tokenizer /
    /// generation / chat-template files from `donor`, write README.md (`model_card`), then rename
    /// the temporary directory to the target. Returns the target path.
    pub fn finish(
        mut self,
        config: &serde_json::Value,
        donor: Option<&Path>,
        model_card: &str,
    ) -> Result<PathBuf> {
        let incomplete: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.written.load(Ordering::Acquire) != s.info.numel())
            .collect();
        if let Some(first) = incomplete.first() {
            let more = if incomplete.len() > 1 {
                format!(" (and {} more)", incomplete.len() - 1)
            } else {
                String::new()
            };
            let (written, numel) = (first.written.load(Ordering::Acquire), first.info.numel());
            let what = match written {
                0 => "never written".to_string(),
                w if w < numel => format!("incompletely written ({w} of {numel} elements)"),
                _ => "written more than once".to_string(),
            };
            return Err(Error::Tensor {
                tensor: first.info.name.clone(),
                msg: format!(
                    "{what} to {}{more}; output discarded",
                    self.target.display()
                ),
            });
        }
        // No fsync: the rename makes the output appear only after every byte was handed to
        // the OS, which covers failed and killed merges (not power loss), as mergekit does.
        if self.shards.len() > 1 {
            let weight_map: Map<String, Value> = self
                .slots
                .iter()
                .map(|s| (s.info.name.clone(), json!(self.shards[s.shard].name)))
                .collect();
            let index = json!({
                "metadata": {"total_size": self.total_size},
                "weight_map": weight_map,
            });
            write_json(&self.tmp.join(INDEX_FILE), &index)?;
        }
        write_json(&self.tmp.join(CONFIG_FILE), config)?;
        if let Some(donor) = donor {
            for file in DONOR_FILES {
                let from = donor.join(file);
                if from.is_file() {
                    let to = self.tmp.join(file);
                    std::fs::copy(&from, &to).map_err(io(&from))?;
                }
            }
        }
        let readme = self.tmp.join("README.md");
        std::fs::write(&readme, model_card).map_err(io(&readme))?;

        if self.target.exists() {
            return Err(Error::io(
                &self.target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output directory appeared while writing",
                ),
            ));
        }
        std::fs::rename(&self.tmp, &self.target).map_err(io(&self.target))?;
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for ModelWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::msg(format!("{}: encoding JSON: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(io(path))
}

/// The prefix of every temporary name ([`temp_path`]).
pub const TEMP_PREFIX: &str = ".evomerge-tmp.";

/// This machine's short host name (up to the first dot), reduced to `[A-Za-z0-9_-]`; `host`
/// when it cannot be read. Part of temporary names, so a process on another node of a shared
/// filesystem never takes a live temporary of ours for a stale one.
fn host_name() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let raw = read_host_name().unwrap_or_default();
        let short: String = raw
            .split('.')
            .next()
            .unwrap_or_default()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if short.is_empty() {
            "host".to_string()
        } else {
            short
        }
    })
}

#[cfg(unix)]
fn read_host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is a valid writable buffer of the length passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(not(unix))]
fn read_host_name() -> Option<String> {
    std::env::var("COMPUTERNAME").ok()
}

/// A fresh temporary name beside `target`: `.evomerge-tmp.PID.N.HOST.NAME` in the same
/// directory (so a rename moves it into place), where `NAME` is the target's file name, `PID`
/// this process and `N` a counter unique within it. Nothing is created.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_string());
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let file = format!(
        "{TEMP_PREFIX}{}.{n}.{}.{name}",
        std::process::id(),
        host_name()
    );
    match target.parent() {
        Some(p) => p.join(file),
        None => PathBuf::from(file),
    }
}

/// The pid and host of a name made by [`temp_path`]; `None` for any other name.
pub fn temp_owner(file_name: &str) -> Option<(u32, &str)> {
    let rest = file_name.strip_prefix(TEMP_PREFIX)?;
    let mut parts = rest.splitn(4, '.');
    let pid = parts.next()?;
    let n = parts.next()?;
    let host = parts.next()?;
    let name = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) || host.is_empty() || name.is_empty() {
        return None;
    }
    Some((pid.parse().ok()?, host))
}

/// Whether process `pid` exists on this machine (`kill(pid, 0)`; a process of another user
/// counts as existing). Off Unix every pid counts as existing, so nothing is ever taken for
/// stale.
pub fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if pid <= 0 {
            return true;
        }
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Remove the temporaries in `dir` ([`temp_path`] names, files or directories) left by a
/// process of this host that no longer runs (killed before it could rename or remove them).
/// Anything else, and the temporaries of live processes or of other hosts, is left alone.
/// Best effort: an unreadable directory or a failed removal is skipped. Returns the paths
/// removed.
pub fn remove_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((pid, host)) = temp_owner(name) else {
            continue;
        };
        if host != host_name() || pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(e) => Err(e),
        };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Write `bytes` to `path` atomically: into a [`temp_path`] beside it, fsync'ed, then renamed
/// over `path` (and the directory fsync'ed, best effort). A reader, or a process killed at any
/// moment, sees the old file or the complete new one, never a part. The temporary is removed
/// if any step fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = temp_path(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(path.parent());
    Ok(())
}

/// fsync a directory, so a rename in it is durable (Unix; best effort).
fn sync_dir(dir: Option<&Path>) {
    #[cfg(unix)]
    {
        let dir = match dir {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(f) = File::open(dir) {
            let _ = f.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// The config.json for an output model: `donor_config` with the layer count (when given) and the
/// dtype (`torch_dtype`, and `dtype` where present) updated. The layer-count key is whichever
/// of `num_hidden_layers` / `n_layer` / `num_layers` / `n_layers` the donor uses
/// (`num_hidden_layers` if none).
pub fn output_config(donor_config: &Value, num_layers: Option<usize>, dtype: DType) -> Value {
    let mut config = donor_config.clone();
    if !config.is_object() {
        config = Value::Object(Map::new());
    }
    let obj = config.as_object_mut().expect("object");
    if let Some(n) = num_layers {
        let key = crate::arch::layer_count_key(donor_config).unwrap_or("num_hidden_layers");
        obj.insert(key.to_string(), json!(n));
    }
    obj.insert("torch_dtype".into(), json!(dtype.torch_name()));
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), json!(dtype.torch_name()));
    }
    config
}

/// Reserve the file's blocks up front (Linux `fallocate`), so the parallel positioned writes
/// that follow do not allocate blocks one at a time under the inode lock. Best effort: a
/// filesystem without support just allocates as it writes.
fn preallocate(file: &File, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open file descriptor we own; failure is ignored.
        let _ = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: DType, shape: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn shards_split_by_size_and_keep_big_tensors_whole() {
        let ts = [
            t("a", DType::F32, &[4]),  // 16 bytes
            t("b", DType::F32, &[4]),  // 16
            t("c", DType::F32, &[10]), // 40 > max: own shard
            t("d", DType::BF16, &[2]), // 4
        ];
        assert_eq!(assign_shards(&ts, 32), vec![0, 0, 1, 2]);
        assert_eq!(assign_shards(&ts, 1000), vec![0, 0, 0, 0]);
        assert_eq!(shard_names(1), vec!["model.safetensors"]);
        assert_eq!(shard_names(2)[1], "model-00002-of-00002.safetensors");
    }

    /// The pid of a process that has exited (and been reaped).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn temp_names_carry_their_owner_and_keep_the_extension() {
        let p = temp_path(Path::new("/x/plots/fitness.png"));
        assert_eq!(p.parent(), Some(Path::new("/x/plots")));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(TEMP_PREFIX) && name.ends_with(".fitness.png"),
            "{name}"
        );
        assert_eq!(p.extension().unwrap(), "png");
        let (pid, host) = temp_owner(name).unwrap();
        assert_eq!((pid, host), (std::process::id(), host_name()));
        assert_ne!(temp_path(Path::new("a")), temp_path(Path::new("a")));
        for other in [
            ".model.tmp-12-0",
            ".evomerge-tmp.x.0.h.model",
            ".evomerge-tmp.12.0.h.",
            ".evomerge-tmp.12.0",
            "evomerge-tmp.12.0.h.model",
        ] {
            assert_eq!(temp_owner(other), None, "{other}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn stale_temps_of_dead_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dead = dead_pid();
        assert!(!pid_alive(dead));
        assert!(pid_alive(std::process::id()) && pid_alive(1));
        let host = host_name();
        let stale_dir = d.join(format!("{TEMP_PREFIX}{dead}.0.{host}.model"));
        let stale_file = d.join(format!("{TEMP_PREFIX}{dead}.1.{host}.search.toml"));
        let live = d.join(format!("{TEMP_PREFIX}1.0.{host}.model"));
        let mine = temp_path(&d.join("model"));
        let elsewhere = d.join(format!("{TEMP_PREFIX}{dead}.0.{host}x.model"));
        let foreign = d.join(format!(".model.tmp-{dead}-0"));
        for p in [&stale_dir, &live, &mine, &elsewhere, &foreign] {
            std::fs::create_dir(p).unwrap();
            std::fs::write(p.join("f"), b"x").unwrap();
        }
        std::fs::write(&stale_file, b"half").unwrap();
        let mut removed = remove_stale_temps(d);
        removed.sort();
        let mut want = vec![stale_dir.clone(), stale_file.clone()];
        want.sort();
        assert_eq!(removed, want);
        for p in [&live, &mine, &elsewhere, &foreign] {
            assert!(p.exists(), "{} was removed", p.display());
        }
        // A merge into the same parent cleans up what a killed merge left.
        std::fs::create_dir(&stale_dir).unwrap();
        let w = ModelWriter::create(
            &d.join("out"),
            &[t("a", DType::F32, &[2])],
            &WriteConfig::default(),
        )
        .unwrap();
        assert!(!stale_dir.exists());
        drop(w);
        assert!(!d.join("out").exists());
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("search.toml");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("search.toml")]);
        let err = write_atomic(&dir.path().join("no/such/dir/f"), b"x").unwrap_err();
        assert!(err.to_string().contains("no/such/dir/f"), "{err}");
    }

    #[test]
    fn output_config_updates_layer_key_and_dtype() {
        let gpt2 = json!({"n_layer": 12, "model_type": "gpt2"});
        let out = output_config(&gpt2, Some(6), DType::BF16);
        assert_eq!(out["n_layer"], 6);
        assert_eq!(out["torch_dtype"], "bfloat16");
        assert!(out.get("num_hidden_layers").is_none());
        let llama = json!({"num_hidden_layers": 2, "torch_dtype": "float32", "dtype": "float32"});
        let out = output_config(&llama, None, DType::F16);
        assert_eq!(out["num_hidden_layers"], 2);
        assert_eq!(out["dtype"], "float16");
    }
}
