//! Confines script-supplied file names to a media or recordings root folder.
//!
//! Scripts name files relative to a root (`welcome.wav`, ConnexCS-style `user/x.wav`,
//! `ivr/menu.mp3`). Refused: empty names, absolute paths, any `..` component, NUL bytes,
//! and anything that, once symlinks are resolved, lies outside the root. The check on
//! resolved paths is what stops a symlink planted inside the root from leading out of it.

use std::io;
use std::path::{Component, Path, PathBuf};
use thiserror::Error;

/// Why a name was refused.
#[derive(Debug, Error)]
pub enum PathError {
    /// Empty name.
    #[error("file name is empty")]
    Empty,
    /// Absolute path or drive prefix.
    #[error("{0:?}: absolute paths are not allowed, name a file inside the media folder")]
    Absolute(String),
    /// A `..` component.
    #[error("{0:?}: '..' is not allowed in file names")]
    ParentDir(String),
    /// NUL or other unusable characters.
    #[error("{0:?}: invalid characters in file name")]
    Invalid(String),
    /// The resolved path leaves the root (through a symlink).
    #[error("{0:?} resolves outside the allowed folder")]
    Escapes(String),
    /// The file does not exist.
    #[error("{0:?} not found")]
    NotFound(String),
    /// The root itself is unusable.
    #[error("folder {root:?} is unusable: {source}")]
    Root {
        /// The root folder.
        root: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Another I/O failure while resolving.
    #[error("{name:?}: {source}")]
    Io {
        /// The name given.
        name: String,
        /// Why.
        source: io::Error,
    },
}

/// Checks the name's syntax and returns it as a relative path of normal components.
fn relative(name: &str) -> Result<PathBuf, PathError> {
    if name.trim().is_empty() {
        return Err(PathError::Empty);
    }
    if name.contains('\0') {
        return Err(PathError::Invalid(name.into()));
    }
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => return Err(PathError::ParentDir(name.into())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Absolute(name.into()))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(PathError::Empty);
    }
    Ok(out)
}

fn canonical_root(root: &Path) -> Result<PathBuf, PathError> {
    root.canonicalize().map_err(|source| PathError::Root {
        root: root.to_path_buf(),
        source,
    })
}

/// Resolves an existing file inside `root`; the result is canonical (symlinks resolved).
pub fn resolve_existing(root: &Path, name: &str) -> Result<PathBuf, PathError> {
    let rel = relative(name)?;
    let root = canonical_root(root)?;
    let full = root.join(rel).canonicalize().map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            PathError::NotFound(name.into())
        } else {
            PathError::Io {
                name: name.into(),
                source,
            }
        }
    })?;
    if !full.starts_with(&root) {
        return Err(PathError::Escapes(name.into()));
    }
    Ok(full)
}

/// Resolves a file to be created inside `root`, creating missing parent folders.
///
/// An existing file or symlink at the name is refused as [`PathError::Escapes`] when it
/// leads outside; an existing regular file inside the root is allowed (it will be replaced).
pub fn resolve_new(root: &Path, name: &str) -> Result<PathBuf, PathError> {
    let rel = relative(name)?;
    let root = canonical_root(root)?;
    let io_err = |source| PathError::Io {
        name: name.into(),
        source,
    };
    let file_name = rel
        .file_name()
        .ok_or_else(|| PathError::Invalid(name.into()))?;
    // Check the deepest existing ancestor before creating anything beneath it.
    let parent_rel = rel.parent().unwrap_or(Path::new(""));
    let mut existing = root.join(parent_rel);
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p.to_path_buf(),
            None => break,
        }
    }
    let existing = existing.canonicalize().map_err(io_err)?;
    if !existing.starts_with(&root) {
        return Err(PathError::Escapes(name.into()));
    }
    let parent = root.join(parent_rel);
    std::fs::create_dir_all(&parent).map_err(io_err)?;
    let parent = parent.canonicalize().map_err(io_err)?;
    if !parent.starts_with(&root) {
        return Err(PathError::Escapes(name.into()));
    }
    let full = parent.join(file_name);
    if let Ok(meta) = std::fs::symlink_metadata(&full) {
        if meta.file_type().is_symlink() || !meta.is_file() {
            return Err(PathError::Escapes(name.into()));
        }
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_subfolders_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("user")).unwrap();
        std::fs::write(root.join("user/x.wav"), b"x").unwrap();
        std::fs::write(root.join("a.wav"), b"x").unwrap();
        assert!(resolve_existing(root, "user/x.wav")
            .unwrap()
            .ends_with("user/x.wav"));
        assert!(resolve_existing(root, "./a.wav").is_ok());
        assert!(matches!(
            resolve_existing(root, "../etc/passwd"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            resolve_existing(root, "user/../../x"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            resolve_existing(root, "/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(resolve_existing(root, ""), Err(PathError::Empty)));
        assert!(matches!(resolve_existing(root, "."), Err(PathError::Empty)));
        assert!(matches!(
            resolve_existing(root, "a\0b"),
            Err(PathError::Invalid(_))
        ));
        assert!(matches!(
            resolve_existing(root, "nope.wav"),
            Err(PathError::NotFound(_))
        ));
        let msg = resolve_existing(root, "../etc/passwd")
            .unwrap_err()
            .to_string();
        assert!(msg.contains(".."), "{msg}");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.wav"), b"x").unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink(outside.path().join("secret.wav"), root.join("link.wav"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        std::fs::write(root.join("in.wav"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("in.wav"), root.join("ok.wav")).unwrap();
        assert!(matches!(
            resolve_existing(root, "link.wav"),
            Err(PathError::Escapes(_))
        ));
        assert!(matches!(
            resolve_existing(root, "out/secret.wav"),
            Err(PathError::Escapes(_))
        ));
        assert!(
            resolve_existing(root, "ok.wav").is_ok(),
            "links inside the root are fine"
        );
        assert!(matches!(
            resolve_new(root, "out/new.wav"),
            Err(PathError::Escapes(_))
        ));
        assert!(matches!(
            resolve_new(root, "out/sub/new.wav"),
            Err(PathError::Escapes(_))
        ));
        assert!(
            !outside.path().join("sub").exists(),
            "nothing created outside"
        );
        assert!(matches!(
            resolve_new(root, "link.wav"),
            Err(PathError::Escapes(_))
        ));
    }

    #[test]
    fn new_files_get_their_folders() {
        let dir = tempfile::tempdir().unwrap();
        let p = resolve_new(dir.path(), "calls/2026/a.wav").unwrap();
        assert!(p.parent().unwrap().is_dir());
        assert!(matches!(
            resolve_new(dir.path(), "/tmp/a.wav"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            resolve_new(dir.path(), "../a.wav"),
            Err(PathError::ParentDir(_))
        ));
    }
}
