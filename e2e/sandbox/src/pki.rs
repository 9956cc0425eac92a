//! The sandbox's certificate files: PEM certificates and keys (mode 0600) written into a directory,
//! made by `agent_api::pki`, the project's one way to make certificates.

use std::path::Path;

use crate::error::{IoError, io_at};
use agent_api::pki::Pem;

/// A file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Generate(#[from] agent_api::pki::Error),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Writes `<stem>.crt` and `<stem>.key` into `dir`.
pub fn write_pem(dir: &Path, stem: &str, pem: &Pem) -> Result<(), Error> {
    write(&dir.join(format!("{stem}.crt")), &pem.cert, 0o644)?;
    write(&dir.join(format!("{stem}.key")), &pem.key, 0o600)
}

/// Reads a PEM (or any text) file.
pub fn read(path: &Path) -> Result<String, Error> {
    Ok(std::fs::read_to_string(path).map_err(io_at(path))?)
}

/// Writes `contents` with permission `mode`, creating or truncating the file.
pub fn write(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(io_at(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_private_and_certificates_readable() {
        let dir = tempfile::tempdir().unwrap();
        let ca = agent_api::pki::Ca::new("test").unwrap();
        write_pem(dir.path(), "ca", ca.pem()).unwrap();
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("ca.crt"), 0o644);
        assert_eq!(read(&dir.path().join("ca.crt")).unwrap(), ca.pem().cert);
    }
}
