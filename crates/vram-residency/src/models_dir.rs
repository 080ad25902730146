//! Model paths confined to one directory (the worker service's `--models-dir`).
//!
//! A caller names a model by a path *relative to* the models directory. [`ModelsDir::open`] refuses,
//! before touching the file system: an empty path, a NUL byte, control or Unicode direction
//! characters, an absolute path and any `..` component.
//!
//! On Linux (5.6 and later) the kernel then resolves the path and opens the file in one step, relative
//! to a descriptor of the models directory held since start: `openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS` and `O_NONBLOCK`. No step of the resolution can leave the directory — not a
//! `..`, not a symbolic link pointing out, not an absolute symbolic link (even one that points back
//! inside: only relative links that stay inside are followed), not a `/proc` magic link — and no
//! rename or link swap between a check and the open can change that, because there is no separate
//! check. Where `openat2` is missing (older kernels, or a seccomp profile that refuses it), the
//! fallback resolves the path (`canonicalize`), refuses a result outside the canonical models
//! directory, opens it with `O_NOFOLLOW | O_NONBLOCK` (a symlink swapped in since is refused) and asks
//! the kernel where the descriptor really points (`/proc/self/fd/N`); [`ModelsDir::resolution`] says
//! which is in use.
//!
//! Either way, `O_NONBLOCK` makes opening a FIFO (or a device) return at once instead of waiting for
//! a writer, and the type is checked on the descriptor (`fstat`) before anything else: only a regular
//! file passes (not a directory, FIFO, socket or device).
//!
//! **Hard links** (`st_nlink > 1`) are accepted: a hard link is the file itself, not a pointer to a
//! path, so what is sealed and measured is exactly the bytes of the inode that was opened, whatever
//! its other names. A caller with write access to the models directory could hard-link a file it
//! can reach from elsewhere on the same file system and learn its fs-verity digest and size through
//! a seal (never its content); Linux's `fs.protected_hardlinks` (on by default) limits that to files
//! the linking user owns or can read and write. Keep the models directory on its own file system to
//! rule it out.
//!
//! Errors name the path as the caller gave it, never the host's absolute path.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::error::{Result, VramError};

/// Longest relative model path accepted, in bytes.
pub const MAX_MODEL_PATH_LEN: usize = 4096;

/// The directory model files are served from, canonicalised (and on Linux opened) at start.
#[derive(Debug, Clone)]
pub struct ModelsDir {
    root: PathBuf,
    /// The directory, opened `O_PATH` at start: model paths are resolved beneath it by the kernel.
    /// `None` where `openat2` is not available.
    #[cfg(target_os = "linux")]
    beneath: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// A model file opened inside the models directory.
#[derive(Debug)]
pub struct OpenModel {
    /// The open file; seal from this handle, not by path again.
    pub file: File,
    /// Its canonical path (inside the models directory).
    pub path: PathBuf,
    /// Its size in bytes when opened.
    pub len: u64,
}

impl ModelsDir {
    /// Canonicalises `root`, which must be an existing directory.
    ///
    /// # Errors
    /// [`VramError::Io`] when it cannot be resolved; [`VramError::InvalidInput`] when it is not a
    /// directory.
    pub fn new(root: &Path) -> Result<Self> {
        let canonical = root.canonicalize().map_err(|source| VramError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        if !canonical.is_dir() {
            return Err(VramError::InvalidInput {
                field: "models directory",
                reason: format!("{} is not a directory", root.display()),
            });
        }
        Ok(Self {
            #[cfg(target_os = "linux")]
            beneath: beneath::open_dir(&canonical).map(std::sync::Arc::new),
            root: canonical,
        })
    }

    /// How model paths are confined: `openat2 RESOLVE_BENEATH` (the kernel resolves beneath the
    /// directory) or the fallback `canonicalize + O_NOFOLLOW` (see the module docs).
    #[must_use]
    pub fn resolution(&self) -> &'static str {
        #[cfg(target_os = "linux")]
        if self.beneath.is_some() {
            return "openat2 RESOLVE_BENEATH";
        }
        "canonicalize + O_NOFOLLOW"
    }

    /// The canonical models directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `relative` to the canonical path of a regular file inside the models directory.
    ///
    /// # Errors
    /// [`VramError::InvalidModelPath`] for a refused path (see the module docs),
    /// [`VramError::ModelNotFound`] when nothing is there.
    pub fn resolve(&self, relative: &str) -> Result<PathBuf> {
        check_relative(relative)?;
        let joined = self.root.join(relative);
        let canonical = joined.canonicalize().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VramError::ModelNotFound {
                    path: shown(relative),
                }
            } else {
                refused(relative, &format!("it cannot be resolved ({})", e.kind()))
            }
        })?;
        if canonical == self.root {
            return Err(refused(relative, "it is the models directory itself"));
        }
        if !canonical.starts_with(&self.root) {
            return Err(refused(
                relative,
                "it resolves outside the models directory (a symlink that points out of it?)",
            ));
        }
        let metadata = std::fs::metadata(&canonical)
            .map_err(|e| refused(relative, &format!("it cannot be read ({})", e.kind())))?;
        if !metadata.is_file() {
            return Err(refused(relative, "it is not a regular file"));
        }
        Ok(canonical)
    }

    /// Resolves and opens `relative` (see the module docs for every check).
    ///
    /// # Errors
    /// As [`resolve`](Self::resolve); [`VramError::InvalidModelPath`] when the opened file is not the
    /// one that was checked.
    pub fn open(&self, relative: &str) -> Result<OpenModel> {
        #[cfg(target_os = "linux")]
        if let Some(dir) = &self.beneath {
            check_relative(relative)?;
            let file = beneath::open(dir, relative)?;
            let metadata = regular_file(&file, relative)?;
            let path = real_path(&file, relative)?;
            if !path.starts_with(&self.root) {
                return Err(refused(
                    relative,
                    "it resolves outside the models directory (a symlink that points out of it?)",
                ));
            }
            return Ok(OpenModel {
                file,
                path,
                len: metadata.len(),
            });
        }
        let path = self.resolve(relative)?;
        let (file, metadata) = open_regular(&path, relative)?;
        #[cfg(target_os = "linux")]
        {
            let real = real_path(&file, relative)?;
            if !real.starts_with(&self.root) {
                return Err(refused(
                    relative,
                    "it changed while being opened and now resolves outside the models directory",
                ));
            }
        }
        Ok(OpenModel {
            file,
            path,
            len: metadata.len(),
        })
    }
}

/// Opens `path` (already resolved: no symbolic link left in it) and checks on the descriptor that it
/// is a regular file.
fn open_regular(path: &Path, relative: &str) -> Result<(File, std::fs::Metadata)> {
    // The resolved path has no symbolic link left in it, so O_NOFOLLOW refuses one swapped in
    // since; O_NONBLOCK makes opening a FIFO (or a device) return at once instead of waiting
    // for a writer, so that the type check below can refuse it. For a regular file it changes
    // nothing.
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NONBLOCK | libc::O_NOFOLLOW,
    );
    let file = options
        .open(path)
        .map_err(|e| refused(relative, &format!("it cannot be opened ({})", e.kind())))?;
    let metadata = regular_file(&file, relative)?;
    Ok((file, metadata))
}

/// Checks on the descriptor (`fstat`), before anything else is done with it, that `file` is a regular
/// file.
fn regular_file(file: &File, relative: &str) -> Result<std::fs::Metadata> {
    let metadata = file
        .metadata()
        .map_err(|e| refused(relative, &format!("it cannot be read ({})", e.kind())))?;
    if !metadata.is_file() {
        return Err(refused(
            relative,
            "it is not a regular file (a directory, FIFO, socket or device)",
        ));
    }
    Ok(metadata)
}

/// Where the kernel says the open descriptor points.
#[cfg(target_os = "linux")]
fn real_path(file: &File, relative: &str) -> Result<PathBuf> {
    use std::os::fd::AsRawFd as _;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| refused(relative, &format!("it cannot be checked ({})", e.kind())))
}

/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` beneath the models directory (Linux ≥ 5.6).
#[cfg(target_os = "linux")]
mod beneath {
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::path::Path;

    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use rustix::io::Errno;

    use super::{VramError, refused, shown};
    use crate::error::Result;

    const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

    /// The directory opened `O_PATH`, or `None` when `openat2` cannot be used here (probed once).
    pub(super) fn open_dir(root: &Path) -> Option<OwnedFd> {
        let dir = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        match rustix::fs::openat2(
            &dir,
            ".",
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(_) => Some(dir),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "openat2 is not available; model paths are confined by canonicalize + O_NOFOLLOW"
                );
                None
            }
        }
    }

    /// Opens `relative` (already checked by `check_relative`) read-only beneath `dir`.
    pub(super) fn open(dir: &OwnedFd, relative: &str) -> Result<File> {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
        match rustix::fs::openat2(dir, relative, flags, Mode::empty(), RESOLVE) {
            Ok(fd) => Ok(File::from(fd)),
            Err(Errno::NOENT) => Err(VramError::ModelNotFound {
                path: shown(relative),
            }),
            Err(Errno::XDEV) => Err(refused(
                relative,
                "it resolves outside the models directory (a symlink that points out of it, or an \
                 absolute symlink: only relative symlinks that stay inside are followed)",
            )),
            Err(Errno::LOOP) => Err(refused(
                relative,
                "too many levels of symbolic links, or a /proc magic link",
            )),
            Err(Errno::NOTDIR) => Err(refused(relative, "a component of it is not a directory")),
            Err(error) => Err(refused(
                relative,
                &format!(
                    "it cannot be opened ({})",
                    std::io::Error::from(error).kind()
                ),
            )),
        }
    }
}

/// The checks that need no file system: non-empty, no NUL, not absolute, no `..`, bounded length.
///
/// # Errors
/// [`VramError::InvalidModelPath`].
pub fn check_relative(relative: &str) -> Result<()> {
    if relative.is_empty() {
        return Err(refused(relative, "it is empty"));
    }
    if relative.len() > MAX_MODEL_PATH_LEN {
        return Err(refused(relative, "it is longer than 4096 bytes"));
    }
    if relative.contains('\0') {
        return Err(refused(relative, "it contains a NUL byte"));
    }
    if relative
        .chars()
        .any(|c| c.is_control() || crate::ids::is_bidi_control(c))
    {
        return Err(refused(
            relative,
            "it contains a control character or a Unicode direction control",
        ));
    }
    let path = Path::new(relative);
    if path.is_absolute() || relative.starts_with('/') {
        return Err(refused(
            relative,
            "absolute paths are refused; give a path relative to the models directory",
        ));
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(refused(relative, "'..' components are refused")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(relative, "absolute paths are refused"));
            }
        }
    }
    Ok(())
}

/// The path as the caller gave it, shortened for messages.
fn shown(relative: &str) -> String {
    const MAX: usize = 200;
    if relative.len() <= MAX {
        relative.to_owned()
    } else {
        let mut end = MAX;
        while !relative.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        format!("{}...", relative.get(..end).unwrap_or_default())
    }
}

fn refused(relative: &str, reason: &str) -> VramError {
    VramError::InvalidModelPath {
        path: shown(relative),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        models: ModelsDir,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("models");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.bin"), b"model").unwrap();
        std::fs::write(root.join("sub/b.bin"), b"model").unwrap();
        let outside = dir.path().join("secret.bin");
        std::fs::write(&outside, b"not a model").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&outside, root.join("escape.bin")).unwrap();
            std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
            std::os::unix::fs::symlink("a.bin", root.join("inside-link.bin")).unwrap();
            std::os::unix::fs::symlink("../a.bin", root.join("sub/up-link.bin")).unwrap();
            std::os::unix::fs::symlink(root.join("a.bin"), root.join("absolute-link.bin")).unwrap();
        }
        let models = ModelsDir::new(&root).unwrap();
        Fixture {
            _dir: dir,
            models,
            outside,
        }
    }

    fn refused_reason(f: &Fixture, path: &str) -> String {
        match f.models.open(path) {
            Err(VramError::InvalidModelPath { reason, .. }) => reason,
            other => panic!("{path:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn relative_paths_inside_are_opened() {
        let f = fixture();
        for ok in ["a.bin", "sub/b.bin", "./a.bin", "sub//b.bin"] {
            let model = f.models.open(ok).unwrap();
            assert_eq!(model.len, 5);
            assert!(model.path.starts_with(f.models.root()));
        }
        #[cfg(unix)]
        {
            assert!(f.models.open("inside-link.bin").is_ok());
            assert!(f.models.open("sub/up-link.bin").is_ok());
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_confines_resolution_and_refuses_absolute_symlinks_even_into_the_dir() {
        let f = fixture();
        // This machine's kernel has openat2 (Linux >= 5.6); a test run where it does not must say so.
        assert_eq!(f.models.resolution(), "openat2 RESOLVE_BENEATH");
        let reason = refused_reason(&f, "absolute-link.bin");
        assert!(reason.contains("absolute symlink"), "{reason}");
        let reason = refused_reason(&f, "escape.bin");
        assert!(reason.contains("outside"), "{reason}");
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused_before_any_lookup_iv_005() {
        let f = fixture();
        assert!(refused_reason(&f, "../secret.bin").contains(".."));
        assert!(refused_reason(&f, "sub/../../secret.bin").contains(".."));
        assert!(refused_reason(&f, "sub/../a.bin").contains(".."));
        assert!(refused_reason(&f, f.outside.to_str().unwrap()).contains("absolute"));
        assert!(refused_reason(&f, "/etc/passwd").contains("absolute"));
        assert!(refused_reason(&f, "").contains("empty"));
        assert!(refused_reason(&f, "a\0.bin").contains("NUL"));
        assert!(refused_reason(&f, "evil\u{202E}nib.bin").contains("direction"));
        assert!(refused_reason(&f, "a\n.bin").contains("control"));
        assert!(refused_reason(&f, &"a/".repeat(3000)).contains("longer"));
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_that_escape_are_refused() {
        let f = fixture();
        assert!(refused_reason(&f, "escape.bin").contains("outside"));
        assert!(refused_reason(&f, "up/secret.bin").contains("outside"));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let f = fixture();
        assert!(refused_reason(&f, "sub").contains("regular file"));
        // The directory itself: "not a regular file" (openat2) or "the models directory itself".
        let reason = refused_reason(&f, ".");
        assert!(
            reason.contains("regular file") || reason.contains("itself"),
            "{reason}"
        );
        assert!(matches!(
            f.models.open("missing.bin"),
            Err(VramError::ModelNotFound { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_at_once_instead_of_blocking_the_open() {
        let f = fixture();
        let fifo = f.models.root().join("pipe.bin");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!(
                "\nskipped: mkfifo not available: a_fifo_is_refused_at_once_instead_of_blocking_the_open"
            );
            return;
        }
        let models = ModelsDir::new(f.models.root()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(models.open("pipe.bin").map(|m| m.len));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO blocked");
        match result {
            Err(VramError::InvalidModelPath { reason, .. }) => {
                assert!(reason.contains("regular file"), "{reason}");
            }
            other => panic!("a FIFO was not refused: {other:?}"),
        }
        // The open itself, as when a FIFO is swapped in after the path was resolved: without
        // O_NONBLOCK it would wait for a writer forever; with it, fstat refuses the FIFO at once.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(open_regular(&fifo, "pipe.bin").map(|(_, m)| m.len()));
        });
        match rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO blocked")
        {
            Err(VramError::InvalidModelPath { reason, .. }) => {
                assert!(reason.contains("FIFO"), "{reason}");
            }
            other => panic!("a FIFO was not refused: {other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_hard_link_is_the_file_itself_and_is_accepted() {
        let f = fixture();
        std::fs::hard_link(
            f.models.root().join("a.bin"),
            f.models.root().join("hard.bin"),
        )
        .unwrap();
        let model = f.models.open("hard.bin").unwrap();
        assert_eq!(model.len, 5);
    }

    #[test]
    fn errors_name_the_given_path_not_the_host_path() {
        let f = fixture();
        let err = f.models.open("escape.bin").unwrap_err().to_string();
        assert!(err.contains("escape.bin"), "{err}");
        assert!(!err.contains(f.models.root().to_str().unwrap()), "{err}");
    }
}
