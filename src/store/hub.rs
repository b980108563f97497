//! Hugging Face hub ids (`owner/name`) read from the local Hugging Face cache. evomerge never
//! downloads: a reference that is not an existing path but looks like a hub id (no leading `.`
//! or `/`, exactly one `/`, no `+`) is looked up in the cache that `huggingface_hub` fills —
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` — as the snapshot of the
//! default branch: `models--{owner}--{name}/refs/main` holds a commit hash, the model is
//! `models--{owner}--{name}/snapshots/<hash>/`. An id that is not there is an error that names
//! it and where it looked ([`locate`]).
//!
//! The way back, [`hub_id_of`], turns a snapshot directory into its id again, so recipes the
//! search writes name a cached model as the user did (`owner/name`), not by a cache path.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether `s` reads as a hub id `owner/name`: exactly one `/`, no leading `.` or `/`, both sides
/// non-empty and made of ASCII letters, digits, `-`, `_` and `.`.
pub fn looks_like_hub_id(s: &str) -> bool {
    let Some((owner, name)) = s.split_once('/') else {
        return false;
    };
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(owner) && ok(name)
}

/// The hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (`None` without any of them set and no home directory).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(c) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(c));
    }
    if let Some(h) = var("HF_HOME") {
        return Some(PathBuf::from(h).join("hub"));
    }
    var("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("huggingface")
            .join("hub")
    })
}

/// The cache folder of `owner/name`: `models--owner--name`.
fn repo_folder(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

/// The snapshot of `id`'s default branch in the cache, or an error that names the id, says that
/// models must be local directories or already in the Hugging Face cache, and where it looked.
pub fn resolve(id: &str) -> Result<PathBuf> {
    resolve_for(id, Path::new(id))
}

/// [`resolve`], the error naming `path` (where the id was looked for as a directory).
fn resolve_for(id: &str, path: &Path) -> Result<PathBuf> {
    let not_found = |why: String| Error::Config {
        path: path.to_path_buf(),
        msg: format!(
            "no such model directory; `{id}` looks like a Hugging Face hub id, which evomerge \
             does not download: models must be local directories or already in the Hugging \
             Face cache ({why}; the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else \
             ~/.cache/huggingface/hub; `huggingface-cli download {id}` fills it)"
        ),
    };
    let Some(cache) = cache_dir() else {
        return Err(not_found(
            "no cache directory: HF_HUB_CACHE, HF_HOME and HOME are unset".into(),
        ));
    };
    let repo = cache.join(repo_folder(id));
    let refs = repo.join("refs").join("main");
    let hash = match std::fs::read_to_string(&refs) {
        Ok(h) => h.trim().to_string(),
        Err(_) => return Err(not_found(format!("looked for {}", refs.display()))),
    };
    if hash.is_empty() || !hash.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(not_found(format!(
            "{} holds no commit hash",
            refs.display()
        )));
    }
    let snapshot = repo.join("snapshots").join(&hash);
    if !snapshot.is_dir() {
        return Err(not_found(format!(
            "{} names {hash}, but {} is missing",
            refs.display(),
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// `path` itself when it exists or is not a relative hub id; a relative hub id that does not
/// exist as a path: its cached snapshot ([`resolve`]), or the error saying why not.
pub fn locate(path: &Path) -> Result<PathBuf> {
    if path.exists() || !path.is_relative() {
        return Ok(path.to_path_buf());
    }
    match path.to_str() {
        Some(s) if looks_like_hub_id(s) => resolve(s),
        _ => Ok(path.to_path_buf()),
    }
}

/// For a model directory `path` that does not exist and ends in a hub id (`.../owner/name`, as a
/// recipe's `owner/name` resolves under the recipe's folder): the error saying that it is no
/// directory and that the id is not in the cache either. `None` otherwise.
pub fn missing(path: &Path) -> Option<Error> {
    if path.exists() {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    let owner = path.parent()?.file_name()?.to_str()?;
    let id = format!("{owner}/{name}");
    if !looks_like_hub_id(&id) {
        return None;
    }
    resolve_for(&id, path).err()
}

/// The hub id of a cached snapshot directory (`.../models--owner--name/snapshots/<hash>`), if
/// `path` is one.
pub fn hub_id_of(path: &Path) -> Option<String> {
    let hash = path.file_name()?.to_str()?;
    let snapshots = path.parent()?;
    if snapshots.file_name()? != "snapshots" || hash.is_empty() {
        return None;
    }
    let folder = snapshots.parent()?.file_name()?.to_str()?;
    let (owner, name) = folder.strip_prefix("models--")?.split_once("--")?;
    let id = format!("{owner}/{name}");
    looks_like_hub_id(&id).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_apart_from_paths() {
        for id in ["org/name", "Qwen/Qwen2.5-0.5B", "a_b/c.d-e"] {
            assert!(looks_like_hub_id(id), "{id}");
        }
        for p in [
            "name",
            "./org/name",
            "/org/name",
            "a/b/c",
            "../x",
            "org/",
            "/x",
            "a+b/c",
        ] {
            assert!(!looks_like_hub_id(p), "{p}");
        }
        let snap = Path::new("/c/hub/models--org--my-model/snapshots/abc123");
        assert_eq!(hub_id_of(snap).as_deref(), Some("org/my-model"));
        assert_eq!(hub_id_of(Path::new("/c/hub/org/name")), None);
    }
}
