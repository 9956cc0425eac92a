//! A container's filesystem changes carried by its checkpoint (`rootfs-diff.tar`: an OCI layer,
//! with whiteouts for what was deleted), applied to the root filesystem of the restored container
//! before its process is restored, so that a file the workload wrote before the move is there after
//! it. Every write goes through a `cap_std` directory handle of the root filesystem: no entry,
//! however its path or a link on the way resolves, reaches anything outside it.
//!
//! The source writes the layer itself when it checkpoints without the CRI ([`write_upper`]): the
//! upper directory of the container's overlay root filesystem holds exactly its changes, with
//! overlayfs's own marks for deletions (a 0/0 character device) and hidden directories (the
//! `overlay.opaque` extended attribute), which become OCI whiteouts.

use std::{
    collections::HashSet,
    io::{self, Read, Write},
    os::unix::fs::{FileTypeExt, MetadataExt},
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

/// Reads the layer `reader` through as [`apply`] would, writing nothing: every entry's path stays
/// inside the root, whiteouts name something, hard links point inside, and only files,
/// directories and links are there. The target checks the layers of a checkpoint it received
/// before staging it, so that a hostile one is refused before the commit point rather than found
/// at the restore. Answers the number of entries.
pub fn check(reader: impl Read) -> Result<usize, Error> {
    let mut archive = tar::Archive::new(reader);
    let mut entries = 0;
    for entry in archive.entries().map_err(Error::Format)? {
        let entry = entry.map_err(Error::Format)?;
        let path = relative(&entry.path().map_err(Error::Format)?)?;
        entries += 1;
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(hidden) = name.strip_prefix(WHITEOUT)
            && name != OPAQUE
            && matches!(hidden, "" | "." | "..")
        {
            return Err(Error::Escapes(path));
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory
            | tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Symlink => {}
            tar::EntryType::Link => {
                relative(
                    &entry
                        .link_name()
                        .map_err(Error::Format)?
                        .unwrap_or_default(),
                )?;
            }
            other => {
                return Err(Error::Kind {
                    path,
                    kind: format!("{other:?}").to_lowercase(),
                });
            }
        }
    }
    Ok(entries)
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

/// The upper directory of the overlay mounted at `/` in a process's `/proc/<pid>/mountinfo`: the
/// container's writable layer, as a path in the mount namespace of whoever mounted it.
pub fn overlay_upper(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let point = mount.split(' ').nth(4)?;
        let mut fs = fs.split(' ');
        if point != "/" || fs.next()? != "overlay" {
            return None;
        }
        let options = fs.nth(1)?;
        let upper = options
            .split(',')
            .find_map(|o| o.strip_prefix("upperdir="))?;
        Some(PathBuf::from(unescape(upper)))
    })
}

/// The writable layer of the container whose process is `pid` (in this PID namespace): the
/// upper directory of its overlay root, reached through the root of the process that mounted it
/// (its parent, the runtime's shim), so that it is found whatever mount namespace this runs in.
pub fn upper_of(pid: u32) -> io::Result<PathBuf> {
    let proc = Path::new("/proc").join(pid.to_string());
    let mountinfo = std::fs::read_to_string(proc.join("mountinfo"))?;
    let upper = overlay_upper(&mountinfo).ok_or_else(|| {
        io::Error::other("its root filesystem is not an overlay with an upper directory")
    })?;
    let stat = std::fs::read_to_string(proc.join("stat"))?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let ppid = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .ok_or_else(|| io::Error::other(format!("cannot read the parent of process {pid}")))?;
    let root = Path::new("/proc").join(ppid).join("root");
    Ok(root.join(upper.strip_prefix("/").unwrap_or(&upper)))
}

/// mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What writing a layer did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Files, directories and links.
    pub entries: usize,
    /// Whiteouts (deleted entries and opaque directories).
    pub whiteouts: usize,
    /// Sockets, FIFOs and device nodes, which a layer does not carry.
    pub skipped: usize,
}

/// Writes the overlay upper directory `upper` as an OCI layer (a plain tar) into `out`: its
/// files, directories and symbolic links with their modes, owners and times, a `.wh.<name>` for
/// each deletion mark and a `.wh..wh..opq` in each opaque directory. Links are never followed.
pub fn write_upper(upper: &Path, out: impl Write) -> Result<Written, Error> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut done = Written::default();
    walk_upper(&mut tar, upper, Path::new(""), &mut done)?;
    tar.into_inner()
        .map_err(at(upper))?
        .flush()
        .map_err(at(upper))?;
    Ok(done)
}

fn walk_upper<W: Write>(
    tar: &mut tar::Builder<W>,
    upper: &Path,
    dir: &Path,
    done: &mut Written,
) -> Result<(), Error> {
    let here = upper.join(dir);
    let mut names: Vec<_> = std::fs::read_dir(&here)
        .map_err(at(&here))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(at(&here))?;
    // The same tree gives the same layer.
    names.sort();
    for name in names {
        let (path, inside) = (here.join(&name), dir.join(&name));
        let meta = std::fs::symlink_metadata(&path).map_err(at(&path))?;
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            let mut whiteout = std::ffi::OsString::from(WHITEOUT);
            whiteout.push(&name);
            empty_file(tar, &dir.join(whiteout), &meta)?;
            done.whiteouts += 1;
        } else if kind.is_dir() {
            tar.append_path_with_name(&path, &inside)
                .map_err(at(&path))?;
            done.entries += 1;
            if opaque(&path) {
                empty_file(tar, &inside.join(OPAQUE), &meta)?;
                done.whiteouts += 1;
            }
            walk_upper(tar, upper, &inside, done)?;
        } else if kind.is_file() || kind.is_symlink() {
            tar.append_path_with_name(&path, &inside)
                .map_err(at(&path))?;
            done.entries += 1;
        } else {
            done.skipped += 1;
        }
    }
    Ok(())
}

/// Whether overlayfs marked the directory opaque (its lower contents hidden).
fn opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|attr| matches!(xattr::get(dir, attr), Ok(Some(v)) if v == b"y"))
}

fn empty_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), Error> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(0);
    header.set_mode(0o644);
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    tar.append_data(&mut header, path, io::empty())
        .map_err(at(path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A layer whose entries are written raw (hostile names included).
    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        crate::archive::tar_with(entries)
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

    #[test]
    fn a_check_refuses_what_apply_would_and_passes_a_good_layer() {
        let good = layer(&[
            ("data/", tar::EntryType::Directory, b"", None),
            ("data/f", FILE, b"x", None),
            ("data/.wh.old", FILE, b"", None),
            ("cache/.wh..wh..opq", FILE, b"", None),
            ("data/l", tar::EntryType::Symlink, b"", Some("/anywhere")),
            ("data/h", tar::EntryType::Link, b"", Some("data/f")),
        ]);
        assert_eq!(check(&good[..]).unwrap(), 6);
        for (what, evil) in [
            ("a parent path", layer(&[("../evil", FILE, b"x", None)])),
            ("a whiteout of ..", layer(&[("a/.wh...", FILE, b"", None)])),
            (
                "a hard link out",
                layer(&[("h", tar::EntryType::Link, b"", Some("../../etc/shadow"))]),
            ),
            (
                "a device",
                layer(&[("dev", tar::EntryType::Char, b"", None)]),
            ),
            ("garbage", b"not a tar file at all, just text".repeat(20)),
        ] {
            assert!(check(&evil[..]).is_err(), "{what} passed the check");
        }
    }

    #[test]
    fn the_upper_directory_is_found_in_mountinfo() {
        let mountinfo = "\
1071 1060 0:90 / / rw,relatime - overlay overlay rw,lowerdir=/var/lib/containerd/s/1/fs,upperdir=/var/lib/containerd/s/7/fs,workdir=/var/lib/containerd/s/7/work
1072 1071 0:92 / /proc rw,nosuid - proc proc rw
1090 1071 0:95 / /data rw - overlay overlay rw,upperdir=/elsewhere,workdir=/w
";
        assert_eq!(
            overlay_upper(mountinfo),
            Some(PathBuf::from("/var/lib/containerd/s/7/fs"))
        );
        let escaped = "1 0 0:1 / / rw - overlay overlay rw,upperdir=/a\\040b/fs,workdir=/w\n";
        assert_eq!(overlay_upper(escaped), Some(PathBuf::from("/a b/fs")));
        let not_overlay = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n";
        assert_eq!(overlay_upper(not_overlay), None);
    }

    #[test]
    fn an_upper_directory_becomes_a_layer_that_applies_its_changes() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let (upper, root) = (dir.path().join("upper"), dir.path().join("root"));
        // What the image had.
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/gone"), "lower").unwrap();
        std::fs::create_dir_all(root.join("cache")).unwrap();
        std::fs::write(root.join("cache/stale"), "lower").unwrap();
        // What the container changed, as overlayfs keeps it.
        std::fs::create_dir_all(upper.join("data")).unwrap();
        std::fs::write(upper.join("data/state.db"), "written before the move").unwrap();
        symlink("/data/state.db", upper.join("data/latest")).unwrap();
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        std::fs::create_dir_all(upper.join("cache")).unwrap();
        std::fs::write(upper.join("cache/fresh"), "new").unwrap();
        // (mknod and trusted.* need root, as the agent has.)
        xattr::set(upper.join("cache"), "trusted.overlay.opaque", b"y").unwrap();
        let mut layer = Vec::new();
        let written = write_upper(&upper, &mut layer).unwrap();
        assert_eq!(
            written,
            Written {
                entries: 6,
                whiteouts: 2,
                skipped: 0
            }
        );
        let applied = apply(&layer[..], &root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("data/state.db")).unwrap(),
            "written before the move"
        );
        assert_eq!(
            std::fs::read_link(root.join("data/latest")).unwrap(),
            PathBuf::from("/data/state.db")
        );
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("cache/stale").exists());
        assert_eq!(
            std::fs::read_to_string(root.join("cache/fresh")).unwrap(),
            "new"
        );
        assert_eq!(applied.deleted, 2);
    }
}
