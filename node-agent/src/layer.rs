//! A container's filesystem changes carried by its checkpoint (`rootfs-diff.tar`: an OCI layer,
//! with whiteouts for what was deleted), applied to the root filesystem of the restored container
//! before its process is restored, so that a file the workload wrote before the move is there after
//! it. Every write goes through a `cap_std` directory handle of the root filesystem: no entry,
//! however its path or a link on the way resolves, reaches anything outside it.

use std::{
    collections::HashSet,
    io::{self, Read},
    path::{Component, Path, PathBuf},
};

use cap_std::{ambient_authority, fs::Dir};

/// Prefix of an OCI whiteout: `dir/.wh.name` deletes `dir/name`.
const WHITEOUT: &str = ".wh.";
/// An opaque whiteout: the directory's earlier contents are hidden.
const OPAQUE: &str = ".wh..wh..opq";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the layer is not a valid tar file: {0}")]
    Format(#[source] io::Error),
    #[error("layer entry {0:?} leaves the root filesystem")]
    Escapes(PathBuf),
    #[error("layer entry {path:?} is a {kind}, which a container's changes do not contain")]
    Kind { path: PathBuf, kind: String },
    #[error("{path:?} in the root filesystem: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What applying a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub written: usize,
    pub deleted: usize,
}

/// The layer in `reader` as a tar stream: containerd writes it gzip-compressed, zstd or plain.
pub fn decompressed<R: io::BufRead + 'static>(mut reader: R) -> io::Result<Box<dyn Read>> {
    let magic = reader.fill_buf()?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::GzDecoder::new(reader))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader)?)
    } else {
        Box::new(reader)
    })
}

/// Applies the layer `reader` to the root filesystem at `rootfs`.
pub fn apply(reader: impl Read, rootfs: &Path) -> Result<Applied, Error> {
    let root = Dir::open_ambient_dir(rootfs, ambient_authority()).map_err(|source| Error::Io {
        path: rootfs.to_path_buf(),
        source,
    })?;
    let mut done = Applied::default();
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut opaque: Vec<PathBuf> = Vec::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(Error::Format)? {
        let mut entry = entry.map_err(Error::Format)?;
        let path = relative(&entry.path().map_err(Error::Format)?)?;
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue; // the root itself
        };
        let parent = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            opaque.push(parent);
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if matches!(hidden, "" | "." | "..") {
                return Err(Error::Escapes(path));
            }
            remove(&root, &parent.join(hidden))?;
            done.deleted += 1;
        } else {
            write(&root, &mut entry, &path)?;
            written.insert(path);
            done.written += 1;
        }
    }
    // An opaque directory keeps only what this layer put there.
    for dir in opaque {
        done.deleted += clear(&root, &dir, &written)?;
    }
    Ok(done)
}

/// `path` as a path inside the root: relative, no `..`.
fn relative(path: &Path) -> Result<PathBuf, Error> {
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::Escapes(path.to_path_buf()));
            }
        }
    }
    Ok(clean)
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write<R: Read>(root: &Dir, entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        root.create_dir_all(parent).map_err(at(path))?;
    }
    let header = entry.header();
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    match header.entry_type() {
        tar::EntryType::Directory => {
            root.create_dir_all(path).map_err(at(path))?;
            set_mode(root, path, mode)
        }
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            // A layer replaces what was there, whatever it was.
            let _ = root.remove_file(path);
            let mut file = root.create(path).map_err(at(path))?;
            io::copy(entry, &mut file).map_err(at(path))?;
            set_mode(root, path, mode)
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(Error::Format)?
                .unwrap_or_default()
                .into_owned();
            let _ = root.remove_file(path);
            // The link is the container's: its target means what it means inside the container
            // and is never followed from here.
            root.symlink_contents(&target, path).map_err(at(path))
        }
        tar::EntryType::Link => {
            let target = relative(
                &entry
                    .link_name()
                    .map_err(Error::Format)?
                    .unwrap_or_default(),
            )?;
            let _ = root.remove_file(path);
            root.hard_link(&target, root, path).map_err(at(path))
        }
        other => Err(Error::Kind {
            path: path.to_path_buf(),
            kind: format!("{other:?}").to_lowercase(),
        }),
    }
}

fn set_mode(root: &Dir, path: &Path, mode: u32) -> Result<(), Error> {
    use cap_std::fs::PermissionsExt;
    root.set_permissions(path, cap_std::fs::Permissions::from_mode(mode))
        .map_err(at(path))
}

/// Deletes `path`, a file or a directory tree; nothing there is fine.
fn remove(root: &Dir, path: &Path) -> Result<(), Error> {
    match root.symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => root.remove_dir_all(path).map_err(at(path)),
        Ok(_) => root.remove_file(path).map_err(at(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(at(path)(e)),
    }
}

/// Deletes the children of `dir` this layer did not write; answers how many.
fn clear(root: &Dir, dir: &Path, written: &HashSet<PathBuf>) -> Result<usize, Error> {
    let entries = match root.read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(at(dir)(e)),
    };
    let mut removed = 0;
    for entry in entries {
        let child = dir.join(entry.map_err(at(dir))?.file_name());
        if !written.iter().any(|w| w.starts_with(&child)) {
            remove(root, &child)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o640
            });
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    const FILE: tar::EntryType = tar::EntryType::Regular;

    #[test]
    fn written_files_come_back_and_deleted_ones_stay_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/old")).unwrap();
        std::fs::write(root.join("etc/old/conf"), "lower").unwrap();
        std::fs::write(root.join("etc/gone"), "lower").unwrap();
        std::fs::create_dir_all(root.join("cache")).unwrap();
        std::fs::write(root.join("cache/stale"), "lower").unwrap();
        let diff = layer(&[
            ("data/", tar::EntryType::Directory, b"", None),
            ("data/state.db", FILE, b"written before the move", None),
            ("etc/.wh.gone", FILE, b"", None),
            ("etc/.wh.old", FILE, b"", None),
            ("cache/.wh..wh..opq", FILE, b"", None),
            ("cache/fresh", FILE, b"new", None),
            (
                "data/latest",
                tar::EntryType::Symlink,
                b"",
                Some("/data/state.db"),
            ),
        ]);
        let applied = apply(&diff[..], root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("data/state.db")).unwrap(),
            "written before the move"
        );
        assert!(!root.join("etc/gone").exists() && !root.join("etc/old").exists());
        assert!(!root.join("cache/stale").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("cache/fresh")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_link(root.join("data/latest")).unwrap(),
            PathBuf::from("/data/state.db")
        );
        assert_eq!(
            applied,
            Applied {
                written: 4,
                deleted: 3
            }
        );
    }

    #[test]
    fn compressed_layers_are_read_as_containerd_writes_them() {
        use std::io::Write;
        let plain = layer(&[("f", FILE, b"content", None)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::bulk::compress(&plain, 1).unwrap();
        for bytes in [plain.clone(), gz, zst] {
            let dir = tempfile::tempdir().unwrap();
            let reader = decompressed(std::io::Cursor::new(bytes)).unwrap();
            apply(reader, dir.path()).unwrap();
            assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"content");
        }
    }

    #[test]
    fn nothing_is_written_outside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        // A link the container had, pointing out of its root as the host sees it.
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        for evil in [
            layer(&[("../evil", FILE, b"x", None)]),
            layer(&[("up/evil", FILE, b"x", None)]),
            layer(&[("a/.wh...", FILE, b"", None)]),
        ] {
            assert!(apply(&evil[..], &root).is_err());
            assert!(!dir.path().join("evil").exists());
        }
        assert!(dir.path().exists(), "a whiteout removed something outside");
    }
}
