//! The scripts folder: names to files, compiled once per content, reloaded when a file changes.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::{
    compile::{compile, compile_import, content_id, CompiledScript, ImportAs},
    error::LoadError,
    vars::VarsError,
};

/// Size limits a library enforces on uploads.
#[derive(Debug, Clone, Copy)]
pub struct LibraryLimits {
    pub max_script_bytes: usize,
    pub max_scripts: usize,
}

impl Default for LibraryLimits {
    fn default() -> Self {
        LibraryLimits {
            max_script_bytes: 1024 * 1024,
            max_scripts: 10_000,
        }
    }
}

/// A vars file's modification time and content (`None`: there is no such file), and when the
/// file was last looked at.
struct CachedVars {
    modified: Option<SystemTime>,
    vars: Option<Arc<serde_json::Value>>,
    checked: Instant,
}

struct Cached {
    modified: Option<SystemTime>,
    len: u64,
    script: Arc<CompiledScript>,
    /// When the file was last stat'ed.
    checked: Instant,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScriptInfo {
    pub name: String,
    pub bytes: u64,
    pub id: Option<String>,
}

/// Scripts in a folder, `NAME.js` each. Lookups stat the file, so edits are picked up on the
/// next run without a restart; compilation is cached by content hash.
pub struct ScriptLibrary {
    dir: PathBuf,
    limits: LibraryLimits,
    by_name: Mutex<HashMap<String, Cached>>,
    by_content: Mutex<HashMap<String, Arc<CompiledScript>>>,
    vars: Mutex<HashMap<String, CachedVars>>,
    /// Scripts compiled for other scripts' `import`/`require`, by how and by name.
    imports: Mutex<HashMap<(ImportAs, String), Cached>>,
}

/// Names are file stems: no path separators, no leading dot, nothing that escapes the folder.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ScriptLibrary {
    pub fn new(dir: impl Into<PathBuf>, limits: LibraryLimits) -> Self {
        ScriptLibrary {
            dir: dir.into(),
            limits,
            by_name: Mutex::new(HashMap::new()),
            by_content: Mutex::new(HashMap::new()),
            vars: Mutex::new(HashMap::new()),
            imports: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the folder has a script `name` (for telling a script import from a module name).
    pub fn has(&self, name: &str) -> bool {
        self.path_of(name).is_ok_and(|p| p.is_file())
    }

    /// Script `name` compiled for an importing script (see [`ImportAs`]), under `module_name`
    /// (what the importer's `import` resolved to). Compiled once per content and recompiled
    /// when the file changes, like [`get`](Self::get).
    pub fn get_import(
        &self,
        name: &str,
        module_name: &str,
        kind: ImportAs,
    ) -> Result<Arc<CompiledScript>, LoadError> {
        let path = self.path_of(name)?;
        let name = name.strip_suffix(".js").unwrap_or(name);
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Err(LoadError::NotFound(name.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LoadError::NotFound(name.to_string()))
            }
            Err(source) => {
                return Err(LoadError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let modified = meta.modified().ok();
        let key = (kind, module_name.to_string());
        let mut imports = self.imports.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = imports.get_mut(&key) {
            if hit.modified == modified && hit.len == meta.len() {
                hit.checked = Instant::now();
                return Ok(hit.script.clone());
            }
        }
        let source = read_source(&path)?;
        let script = Arc::new(compile_import(module_name, &source, kind)?);
        if imports.len() >= self.limits.max_scripts * 2 {
            imports.clear();
        }
        imports.insert(
            key,
            Cached {
                modified,
                len: meta.len(),
                script: script.clone(),
                checked: Instant::now(),
            },
        );
        Ok(script)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, LoadError> {
        let name = name.strip_suffix(".js").unwrap_or(name);
        if !valid_name(name) {
            return Err(LoadError::BadName(name.to_string()));
        }
        Ok(self.dir.join(format!("{name}.js")))
    }

    /// The compiled script `name`, recompiled if its file changed since the last lookup.
    pub fn get(&self, name: &str) -> Result<Arc<CompiledScript>, LoadError> {
        let path = self.path_of(name)?;
        let name = name.strip_suffix(".js").unwrap_or(name);
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Err(LoadError::NotFound(name.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.lock_names().remove(name);
                return Err(LoadError::NotFound(name.to_string()));
            }
            Err(source) => {
                return Err(LoadError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let modified = meta.modified().ok();
        if let Some(hit) = self.lock_names().get_mut(name) {
            if hit.modified == modified && hit.len == meta.len() {
                hit.checked = Instant::now();
                return Ok(hit.script.clone());
            }
        }
        let source = read_source(&path)?;
        let script = self.compile_cached(name, &source)?;
        self.lock_names().insert(
            name.to_string(),
            Cached {
                modified,
                len: meta.len(),
                script: script.clone(),
                checked: Instant::now(),
            },
        );
        Ok(script)
    }

    /// [`get`](Self::get), trusting a lookup made less than `fresh` ago instead of looking at
    /// the file again. For callers that run a script thousands of times a second (class4 over
    /// SIP), where the file system check itself would be a real share of each run's cost; an
    /// edit is then picked up within `fresh`.
    pub fn get_recent(
        &self,
        name: &str,
        fresh: Duration,
    ) -> Result<Arc<CompiledScript>, LoadError> {
        let key = name.strip_suffix(".js").unwrap_or(name);
        if let Some(hit) = self.lock_names().get(key) {
            if hit.checked.elapsed() < fresh {
                return Ok(hit.script.clone());
            }
        }
        self.get(name)
    }

    fn lock_names(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.by_name.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compile_cached(&self, name: &str, source: &str) -> Result<Arc<CompiledScript>, LoadError> {
        let key = format!("{name}\u{0}{}", content_id(source));
        let mut cache = self.by_content.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache.get(&key) {
            return Ok(hit.clone());
        }
        let script = Arc::new(compile(name, source)?);
        if cache.len() >= self.limits.max_scripts * 2 {
            cache.clear();
        }
        cache.insert(key, script.clone());
        Ok(script)
    }

    pub fn list(&self) -> Result<Vec<ScriptInfo>, LoadError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(LoadError::Io {
                    path: self.dir.display().to_string(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".js")) else {
                continue;
            };
            if !valid_name(name) {
                continue;
            }
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let id = self.lock_names().get(name).map(|c| c.script.id.clone());
            out.push(ScriptInfo {
                name: name.to_string(),
                bytes,
                id,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The vars file beside a script (`NAME.toml`), if there is one: merged into `data`.
    pub fn vars(&self, name: &str) -> Result<Option<Arc<serde_json::Value>>, VarsError> {
        let name = name.strip_suffix(".js").unwrap_or(name);
        if !valid_name(name) {
            return Ok(None);
        }
        let path = self.dir.join(format!("{name}.toml"));
        let Ok(meta) = std::fs::metadata(&path) else {
            self.lock_vars().insert(
                name.to_string(),
                CachedVars {
                    modified: None,
                    vars: None,
                    checked: Instant::now(),
                },
            );
            return Ok(None);
        };
        let modified = meta.modified().ok();
        let mut cache = self.lock_vars();
        if let Some(hit) = cache.get_mut(name) {
            if let (true, Some(vars)) = (hit.modified == modified, &hit.vars) {
                hit.checked = Instant::now();
                return Ok(Some(vars.clone()));
            }
        }
        let vars = Arc::new(super::vars::load(&path)?);
        cache.insert(
            name.to_string(),
            CachedVars {
                modified,
                vars: Some(vars.clone()),
                checked: Instant::now(),
            },
        );
        Ok(Some(vars))
    }

    /// [`vars`](Self::vars), trusting a lookup made less than `fresh` ago (see
    /// [`get_recent`](Self::get_recent)).
    pub fn vars_recent(
        &self,
        name: &str,
        fresh: Duration,
    ) -> Result<Option<Arc<serde_json::Value>>, VarsError> {
        let key = name.strip_suffix(".js").unwrap_or(name);
        if let Some(hit) = self.lock_vars().get(key) {
            if hit.checked.elapsed() < fresh {
                return Ok(hit.vars.clone());
            }
        }
        self.vars(name)
    }

    fn lock_vars(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedVars>> {
        self.vars.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Source of `name`, for `GET /v1/scripts/{name}`.
    pub fn source(&self, name: &str) -> Result<String, LoadError> {
        let path = self.path_of(name)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => read_source(&path),
            _ => Err(LoadError::NotFound(name.to_string())),
        }
    }

    /// Compile `source` and, only if it compiles, replace `name` atomically (temp file + rename):
    /// a crash never leaves half a script, and a broken upload leaves the old version serving.
    pub fn put(&self, name: &str, source: &str) -> Result<Arc<CompiledScript>, LoadError> {
        let path = self.path_of(name)?;
        let name = name.strip_suffix(".js").unwrap_or(name);
        if source.len() > self.limits.max_script_bytes {
            return Err(LoadError::TooLarge {
                size: source.len(),
                limit: self.limits.max_script_bytes,
            });
        }
        if !path.exists() && self.list()?.len() >= self.limits.max_scripts {
            return Err(LoadError::TooMany(self.limits.max_scripts));
        }
        let script = self.compile_cached(name, source)?;
        let io = |source| LoadError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io)?;
        tmp.write_all(source.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        self.lock_names().remove(name);
        Ok(script)
    }

    /// Remove `name`; false when there was no such script.
    pub fn delete(&self, name: &str) -> Result<bool, LoadError> {
        let path = self.path_of(name)?;
        let name = name.strip_suffix(".js").unwrap_or(name);
        self.lock_names().remove(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(LoadError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// Read and compile a script file by path (the `run` and `check` commands).
pub fn load_file(path: &Path) -> Result<CompiledScript, LoadError> {
    let source = read_source(path)?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("script")
        .to_string();
    Ok(compile(&name, &source)?)
}

fn read_source(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.display().to_string(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| LoadError::NotUtf8(path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_folder() {
        assert!(valid_name("routing"));
        assert!(valid_name("ivr-main_2.v1"));
        assert!(!valid_name("../etc/passwd"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(""));
    }

    #[test]
    fn edits_are_picked_up_and_broken_uploads_keep_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let lib = ScriptLibrary::new(dir.path(), LibraryLimits::default());
        let first = lib.put("r", "function main(){ return 1 }").unwrap();
        assert_eq!(lib.get("r").unwrap().id, first.id);
        let err = lib.put("r", "function main( { ").unwrap_err();
        assert!(matches!(err, LoadError::Compile(_)), "{err}");
        assert_eq!(lib.get("r").unwrap().id, first.id);
        std::fs::write(dir.path().join("r.js"), "function main(){ return 22 }").unwrap();
        assert_ne!(lib.get("r").unwrap().id, first.id);
        assert!(lib.delete("r").unwrap());
        assert!(matches!(lib.get("r"), Err(LoadError::NotFound(_))));
        assert!(!lib.delete("r").unwrap());
    }

    #[test]
    fn recent_lookups_trust_the_last_check_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let lib = ScriptLibrary::new(dir.path(), LibraryLimits::default());
        let fresh = Duration::from_secs(3600);
        let first = lib.put("r", "function main(){ return 1 }").unwrap();
        assert_eq!(lib.get_recent("r", fresh).unwrap().id, first.id);
        assert_eq!(lib.vars_recent("r", fresh).unwrap(), None);
        std::fs::write(dir.path().join("r.js"), "function main(){ return 22 }").unwrap();
        std::fs::write(dir.path().join("r.toml"), "x = 1").unwrap();
        // Within `fresh`: the last check stands.
        assert_eq!(lib.get_recent("r", fresh).unwrap().id, first.id);
        assert_eq!(lib.vars_recent("r", fresh).unwrap(), None);
        // Past it (and for plain lookups): the edit is seen.
        let edited = lib.get_recent("r", Duration::ZERO).unwrap();
        assert_ne!(edited.id, first.id);
        assert_eq!(
            lib.vars_recent("r", Duration::ZERO).unwrap().unwrap()["x"],
            1
        );
        assert_eq!(lib.get_recent("r", fresh).unwrap().id, edited.id);
        // An upload through the library is seen at once.
        let uploaded = lib.put("r", "function main(){ return 3 }").unwrap();
        assert_eq!(lib.get_recent("r", fresh).unwrap().id, uploaded.id);
    }

    #[test]
    fn oversize_and_too_many_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lib = ScriptLibrary::new(
            dir.path(),
            LibraryLimits {
                max_script_bytes: 40,
                max_scripts: 1,
            },
        );
        assert!(matches!(
            lib.put("big", &"x".repeat(41)),
            Err(LoadError::TooLarge { .. })
        ));
        lib.put("a", "function main(){}").unwrap();
        assert!(matches!(
            lib.put("b", "function main(){}"),
            Err(LoadError::TooMany(1))
        ));
    }
}
