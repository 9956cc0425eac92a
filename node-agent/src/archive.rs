//! Checkpoint archives on the target, vetted before anything of them is used (and unpacked, for
//! the backends that restore from files), and their digests.
//!
//! An archive comes from a peer over the network; a bad or hostile one must not make the runtime
//! write outside its directory or fill the disk when it unpacks it. [`check`] reads every entry as
//! an unpacker would, writing nothing: relative paths without `..`, only regular files,
//! directories and links, no setuid or setgid file, links whose targets go down from where they
//! are (no `..`, which a chain of links can turn into a way out, and nothing absolute), no entry
//! written through a link, no path twice, and limits on the total size and the number of entries.
//! The writable layer inside (`rootfs-diff.tar`) is applied by `layer.rs`, which keeps its modes:
//! what it may set is not checked yet.
//!
//! On the source, a checkpoint taken without the CRI stays a directory; [`Layout`] streams it as a
//! tar archive of a size known before the first byte, without writing the archive anywhere.

use std::{
    collections::HashSet,
    fs,
    io::{self, Read},
    path::{Component, Path, PathBuf},
};

use cap_std::{ambient_authority, fs::Dir};
use sha2::{Digest, Sha256};

/// Limits of one archive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sum of the sizes of its files.
    pub max_bytes: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 30,
            max_entries: 100_000,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("entry {0:?} has an absolute path")]
    Absolute(PathBuf),
    #[error("entry {0:?} leaves the archive's directory (`..`)")]
    Escapes(PathBuf),
    #[error(
        "link {path:?} points to {target:?}: absolute or `..` link targets are refused (through \
         other links they can leave the archive's directory)"
    )]
    LinkEscapes { path: PathBuf, target: PathBuf },
    #[error("entry {path:?} has the mode {mode:o}: setuid and setgid files are refused")]
    Mode { path: PathBuf, mode: u32 },
    #[error("entry {path:?} would be written through the link {link:?}")]
    ThroughLink { path: PathBuf, link: PathBuf },
    #[error("entry {path:?} is a {kind}, which a checkpoint archive does not contain")]
    Kind { path: PathBuf, kind: String },
    #[error("the archive's files add up to more than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the archive has more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("entry {0:?} comes twice")]
    Duplicate(PathBuf),
    #[error("the archive is not a valid tar file: {0}")]
    Format(io::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a checked archive holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Contents {
    pub entries: usize,
    pub bytes: u64,
}

/// A path inside the archive, normalised: relative, without `.` and `..` components.
fn inside(path: &Path) -> Result<PathBuf, Error> {
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(Error::Escapes(path.to_path_buf())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::Absolute(path.to_path_buf()));
            }
        }
    }
    Ok(clean)
}

/// Where a link at `path` pointing to `target` ends up, when its target only goes down: relative,
/// no `..`. Text alone cannot tell where `..` leads once links chain (`s -> .` and `t -> s/../x`
/// leave the directory although `s/../x` reads as `x`), so `..` is refused outright; a target
/// that only goes down stays inside however links chain.
fn link_target(path: &Path, target: &Path, hard: bool) -> Option<PathBuf> {
    // Hard link targets are archive paths; symbolic ones are relative to the link's directory.
    let mut resolved = if hard {
        PathBuf::new()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    for c in target.components() {
        match c {
            Component::Normal(part) => resolved.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(resolved)
}

/// Checks the tar archive `reader` entry by entry (kinds, paths, links, size and entry limits, no
/// path twice) without writing anything: an archive that passes is one that unpacks into its
/// directory and nowhere else.
pub fn check(reader: impl Read, limits: Limits) -> Result<Contents, Error> {
    walk(reader, limits, |_, _| Ok(()))
}

/// Unpacks the tar archive `reader` into the directory `dest` (created; it must not exist), with
/// the checks of [`check`] on every entry before it is written, and every write confined to `dest`
/// (`cap_std`: no path, however it resolves, reaches outside). A checkpoint archive holds files
/// and directories only, so links are refused. On error what was written is left for the caller
/// to remove with `dest`.
pub fn unpack(reader: impl Read, dest: &Path, limits: Limits) -> Result<Contents, Error> {
    fs::create_dir(dest).map_err(io(dest))?;
    let root = Dir::open_ambient_dir(dest, ambient_authority()).map_err(io(dest))?;
    walk(reader, limits, |entry, path| {
        let at = |e| Error::Io {
            path: dest.join(path),
            source: e,
        };
        match entry.header().entry_type() {
            tar::EntryType::Directory => root.create_dir_all(path).map_err(at),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    root.create_dir_all(parent).map_err(at)?;
                }
                let file = root.create(path).map_err(at)?;
                // Large writes: checkpoint images are mostly big page files.
                let mut out = io::BufWriter::with_capacity(COPY_BUFFER, file);
                io::copy(entry, &mut out).map_err(at)?;
                io::Write::flush(&mut out).map_err(at)?;
                Ok(())
            }
            other => Err(Error::Kind {
                path: path.to_path_buf(),
                kind: format!("{other:?}").to_lowercase(),
            }),
        }
    })
}

/// Walks the entries of `reader`, checking each (see [`check`]) before `visit` gets it with its
/// clean path.
fn walk<R: Read>(
    reader: R,
    limits: Limits,
    mut visit: impl FnMut(&mut tar::Entry<'_, R>, &Path) -> Result<(), Error>,
) -> Result<Contents, Error> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    let mut links: HashSet<PathBuf> = HashSet::new();
    // Paths seen, and whether as a directory (only a directory may come twice).
    let mut seen: std::collections::HashMap<PathBuf, bool> = std::collections::HashMap::new();
    let mut done = Contents::default();
    for entry in archive.entries().map_err(Error::Format)? {
        let mut entry = entry.map_err(Error::Format)?;
        done.entries += 1;
        if done.entries > limits.max_entries {
            return Err(Error::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw = entry.path().map_err(Error::Format)?.into_owned();
        let path = inside(&raw)?;
        if path.as_os_str().is_empty() {
            continue; // the archive's root directory itself
        }
        if let Some(link) = path
            .ancestors()
            .skip(1)
            .find(|a| links.contains(*a))
            .map(Path::to_path_buf)
        {
            return Err(Error::ThroughLink { path, link });
        }
        let kind = entry.header().entry_type();
        // A set-ID file would run as its owner; a setgid directory (a store under one) is fine.
        let mode = entry.header().mode().map_err(Error::Format)?;
        if mode & 0o6000 != 0 && kind != tar::EntryType::Directory {
            return Err(Error::Mode { path, mode });
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(Error::Format)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let hard = kind == tar::EntryType::Link;
                if link_target(&path, &target, hard)
                    .is_none_or(|t| t.as_os_str().is_empty() && hard)
                {
                    return Err(Error::LinkEscapes { path, target });
                }
                links.insert(path.clone());
            }
            other => {
                return Err(Error::Kind {
                    path,
                    kind: format!("{other:?}").to_lowercase(),
                });
            }
        }
        done.bytes += entry.header().size().map_err(Error::Format)?;
        if done.bytes > limits.max_bytes {
            return Err(Error::TooLarge {
                limit: limits.max_bytes,
            });
        }
        // Unpacking never overwrites: a second entry for a path is refused.
        let dir = kind == tar::EntryType::Directory;
        if seen
            .insert(path.clone(), dir)
            .is_some_and(|was_dir| !(was_dir && dir))
        {
            return Err(Error::Duplicate(path));
        }
        visit(&mut entry, &path)?;
    }
    Ok(done)
}

/// `sha256:<hex>` of a file, and its size.
pub fn digest_file(path: &Path) -> Result<(String, u64), Error> {
    let mut file = fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let bytes = io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok((format_digest(hasher), bytes))
}

/// Bytes per write when unpacking.
const COPY_BUFFER: usize = 1 << 20;

/// A directory as a tar archive: its entries in a stable order (directories, regular files), each
/// a 512-byte header and its data padded to 512 bytes, then two zero blocks. The size is known
/// before writing ([`Layout::bytes`]), as a stream announces it; [`Layout::write`] fails if a file
/// changed size since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
    entries: Vec<LayoutEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LayoutEntry {
    /// Path in the archive (directories end in `/`).
    name: String,
    size: u64,
    mode: u32,
    mtime: u64,
    dir: bool,
}

/// Tar's block.
const BLOCK: u64 = 512;

impl Layout {
    /// The entries of `root` (recursively; links, sockets and devices are refused: a checkpoint
    /// directory holds none).
    pub fn of(root: &Path) -> Result<Self, Error> {
        let mut entries = Vec::new();
        Self::walk(root, Path::new(""), &mut entries)?;
        Ok(Self {
            root: root.to_path_buf(),
            entries,
        })
    }

    fn walk(root: &Path, dir: &Path, entries: &mut Vec<LayoutEntry>) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        let here = root.join(dir);
        let mut names: Vec<_> = fs::read_dir(&here)
            .map_err(io(&here))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io(&here))?;
        names.sort();
        for name in names {
            let inside = dir.join(&name);
            let path = root.join(&inside);
            let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
            let mut archived = inside
                .to_str()
                .ok_or_else(|| Error::Kind {
                    path: inside.clone(),
                    kind: "name that is not UTF-8".into(),
                })?
                .to_string();
            if meta.is_dir() {
                archived.push('/');
            } else if !meta.is_file() {
                return Err(Error::Kind {
                    path: inside,
                    kind: "file that is neither regular nor a directory".into(),
                });
            }
            // A plain header holds names up to 100 bytes (CRIU's image names are short).
            if archived.len() > 100 {
                return Err(Error::Kind {
                    path: inside,
                    kind: "name longer than 100 bytes".into(),
                });
            }
            entries.push(LayoutEntry {
                name: archived,
                size: if meta.is_dir() { 0 } else { meta.len() },
                mode: meta.mode() & 0o7777,
                mtime: u64::try_from(meta.mtime()).unwrap_or(0),
                dir: meta.is_dir(),
            });
            if meta.is_dir() {
                Self::walk(root, &inside, entries)?;
            }
        }
        Ok(())
    }

    /// The archive's size in bytes.
    pub fn bytes(&self) -> u64 {
        let data: u64 = self
            .entries
            .iter()
            .map(|e| BLOCK + e.size.div_ceil(BLOCK) * BLOCK)
            .sum();
        data + 2 * BLOCK
    }

    /// Writes the archive into `out`, reading each file in large pieces.
    pub fn write(&self, mut out: impl io::Write) -> Result<u64, Error> {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut written = 0u64;
        for e in &self.entries {
            let path = self.root.join(e.name.trim_end_matches('/'));
            let mut header = tar::Header::new_ustar();
            header.set_path(&e.name).map_err(io(&path))?;
            header.set_entry_type(if e.dir {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            header.set_size(e.size);
            header.set_mode(e.mode);
            header.set_mtime(e.mtime);
            header.set_cksum();
            out.write_all(header.as_bytes()).map_err(io(&path))?;
            written += BLOCK;
            if e.dir {
                continue;
            }
            let mut file = fs::File::open(&path).map_err(io(&path))?;
            let mut left = e.size;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = file.read(&mut buf[..want]).map_err(io(&path))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n]).map_err(io(&path))?;
                left -= n as u64;
            }
            let mut probe = [0u8; 1];
            if left > 0 || file.read(&mut probe).map_err(io(&path))? > 0 {
                return Err(Error::Io {
                    path,
                    source: io::Error::other("the file changed size while it was sent"),
                });
            }
            let pad = e.size.div_ceil(BLOCK) * BLOCK - e.size;
            out.write_all(&[0u8; BLOCK as usize][..pad as usize])
                .map_err(io(&path))?;
            written += e.size + pad;
        }
        out.write_all(&[0u8; 2 * BLOCK as usize])
            .map_err(io(&self.root))?;
        Ok(written + 2 * BLOCK)
    }
}

/// `sha256:<hex>` of what `hasher` saw.
pub fn format_digest(hasher: Sha256) -> String {
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
/// A tar whose entries are written raw, so that hostile names can be made (for tests).
pub(crate) fn tar_with(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        // set_path refuses `..`; write the name bytes directly like a hostile tool would.
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const FILE: tar::EntryType = tar::EntryType::Regular;

    fn check_bytes(tar: &[u8]) -> Result<Contents, Error> {
        check(tar, Limits::default())
    }

    #[test]
    fn a_checkpoint_shaped_archive_passes_with_its_size_and_entries() {
        let tar = tar_with(&[
            ("config.dump", FILE, b"{}", None),
            ("checkpoint/", tar::EntryType::Directory, b"", None),
            ("checkpoint/pages-1.img", FILE, &[7u8; 3000], None),
            (
                "checkpoint/link",
                tar::EntryType::Symlink,
                b"",
                Some("pages-1.img"),
            ),
            (
                "checkpoint/hard",
                tar::EntryType::Link,
                b"",
                Some("config.dump"),
            ),
        ]);
        assert_eq!(
            check_bytes(&tar).unwrap(),
            Contents {
                entries: 5,
                bytes: 3002
            }
        );
    }

    #[test]
    fn hostile_entries_are_refused_with_the_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (tar_with(&[("../evil", FILE, b"x", None)]), "leaves"),
            (tar_with(&[("a/../../evil", FILE, b"x", None)]), "leaves"),
            (tar_with(&[("/etc/evil", FILE, b"x", None)]), "absolute"),
            (
                tar_with(&[("l", tar::EntryType::Symlink, b"", Some("/etc"))]),
                "absolute",
            ),
            (
                tar_with(&[("a/l", tar::EntryType::Symlink, b"", Some("../../etc"))]),
                "`..`",
            ),
            // Reads as `x`, but `s` is the directory itself: `t` leads to its parent's `x`.
            (
                tar_with(&[
                    ("s", tar::EntryType::Symlink, b"", Some(".")),
                    ("t", tar::EntryType::Symlink, b"", Some("s/../x")),
                ]),
                "`..`",
            ),
            (
                tar_with(&[("a/l", tar::EntryType::Symlink, b"", Some("../b"))]),
                "`..`",
            ),
            (
                tar_with(&[
                    ("l", tar::EntryType::Symlink, b"", Some("sub")),
                    ("l/evil", FILE, b"x", None),
                ]),
                "through the link",
            ),
            (
                tar_with(&[("h", tar::EntryType::Link, b"", Some("../x"))]),
                "`..`",
            ),
            (
                tar_with(&[("dev", tar::EntryType::Char, b"", None)]),
                "char",
            ),
            (
                tar_with(&[("fifo", tar::EntryType::Fifo, b"", None)]),
                "fifo",
            ),
        ];
        for (tar, why) in cases {
            let message = check_bytes(&tar).unwrap_err().to_string();
            assert!(message.contains(why), "{message:?} should say {why:?}");
        }
    }

    #[test]
    fn setuid_and_setgid_files_are_refused() {
        for mode in [0o4755, 0o2755] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(FILE);
            h.set_size(1);
            h.set_mode(mode);
            h.set_cksum();
            b.append_data(&mut h, "checkpoint/tool", &b"x"[..]).unwrap();
            let tar = b.into_inner().unwrap();
            let message = check_bytes(&tar).unwrap_err().to_string();
            assert!(message.contains("setuid and setgid"), "{message}");
            let dir = tempfile::tempdir().unwrap();
            let r = unpack(&tar[..], &dir.path().join("out"), Limits::default());
            assert!(matches!(r, Err(Error::Mode { .. })), "{r:?}");
            assert!(!dir.path().join("out/checkpoint/tool").exists());
        }
        // A directory under a setgid parent keeps the bit: that is no way in.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o2755);
        h.set_cksum();
        b.append_data(&mut h, "checkpoint/", &b""[..]).unwrap();
        assert!(check_bytes(&b.into_inner().unwrap()).is_ok());
    }

    #[test]
    fn a_checkpoint_archive_unpacks_into_its_directory_and_links_are_refused() {
        let tar = tar_with(&[
            ("config.dump", FILE, b"{}", None),
            ("checkpoint/", tar::EntryType::Directory, b"", None),
            ("checkpoint/pages-1.img", FILE, &[7u8; 3000], None),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let got = unpack(&tar[..], &out, Limits::default()).unwrap();
        assert_eq!(got.bytes, 3002);
        assert_eq!(
            fs::read(out.join("checkpoint/pages-1.img")).unwrap(),
            [7u8; 3000]
        );
        let linked = tar_with(&[("l", tar::EntryType::Symlink, b"", Some("config.dump"))]);
        let r = unpack(&linked[..], &dir.path().join("o2"), Limits::default());
        assert!(matches!(r, Err(Error::Kind { .. })), "{r:?}");
        // Every refusal of the check refuses the unpack too, before anything is written outside.
        let evil = tar_with(&[("../evil", FILE, b"x", None)]);
        let r = unpack(&evil[..], &dir.path().join("o3"), Limits::default());
        assert!(matches!(r, Err(Error::Escapes(_))), "{r:?}");
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn a_directory_may_come_twice_but_no_other_path() {
        let good = tar_with(&[
            ("checkpoint/", tar::EntryType::Directory, b"", None),
            ("checkpoint/", tar::EntryType::Directory, b"", None),
            ("checkpoint/pages-1.img", FILE, &[7u8; 3000], None),
            ("config.dump", FILE, b"{}", None),
        ]);
        assert_eq!(check_bytes(&good).unwrap().bytes, 3002);
        for twice in [
            tar_with(&[("a", FILE, b"1", None), ("a", FILE, b"2", None)]),
            tar_with(&[
                ("a", FILE, b"1", None),
                ("a/", tar::EntryType::Directory, b"", None),
            ]),
        ] {
            let r = check_bytes(&twice);
            assert!(matches!(r, Err(Error::Duplicate(_))), "{r:?}");
        }
    }

    #[test]
    fn limits_on_size_and_entries_hold() {
        let tar = tar_with(&[
            ("a", FILE, &[1u8; 600], None),
            ("b", FILE, &[1u8; 600], None),
        ]);
        let small = Limits {
            max_bytes: 1000,
            max_entries: 10,
        };
        let r = check(&tar[..], small);
        assert!(matches!(r, Err(Error::TooLarge { limit: 1000 })), "{r:?}");
        let few = Limits {
            max_bytes: 1 << 20,
            max_entries: 1,
        };
        let r = check(&tar[..], few);
        assert!(
            matches!(r, Err(Error::TooManyEntries { limit: 1 })),
            "{r:?}"
        );
    }

    #[test]
    fn garbage_and_truncated_archives_are_format_errors() {
        assert!(check_bytes(&[0x42u8; 1024]).is_err());
        let tar = tar_with(&[("a", FILE, &[1u8; 5000], None)]);
        let r = check_bytes(&tar[..2048]);
        assert!(matches!(r, Err(Error::Format(_))), "{r:?}");
    }

    #[test]
    fn digests_name_the_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        let (digest, bytes) = digest_file(&f).unwrap();
        assert_eq!(bytes, 3);
        assert_eq!(
            digest,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_directory_streams_as_an_archive_of_the_size_it_announced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        fs::create_dir_all(root.join("checkpoint")).unwrap();
        fs::write(root.join("checkpoint/inventory.img"), b"inv").unwrap();
        fs::write(root.join("checkpoint/pages-1.img"), vec![5u8; 70_000]).unwrap();
        fs::write(root.join("rootfs-diff.tar"), b"layer").unwrap();
        let layout = Layout::of(&root).unwrap();
        let mut tar = Vec::new();
        let written = layout.write(&mut tar).unwrap();
        assert_eq!(
            (written, tar.len() as u64),
            (layout.bytes(), layout.bytes())
        );
        let unpacked = dir.path().join("unpacked");
        let contents = unpack(&tar[..], &unpacked, Limits::default()).unwrap();
        assert_eq!(contents.bytes, 3 + 70_000 + 5);
        assert_eq!(
            fs::read(unpacked.join("checkpoint/pages-1.img")).unwrap(),
            vec![5u8; 70_000]
        );
        assert_eq!(
            fs::read(unpacked.join("rootfs-diff.tar")).unwrap(),
            b"layer"
        );
        // The same directory, the same archive.
        let mut again = Vec::new();
        Layout::of(&root).unwrap().write(&mut again).unwrap();
        assert_eq!(again, tar);
        // A file that changed after the layout was taken is not sent as if it had not.
        fs::write(root.join("rootfs-diff.tar"), b"longer layer").unwrap();
        assert!(layout.write(std::io::sink()).is_err());
    }
}
