//! AES-256 key files (`KEY_ID HEX64` per line, the last one seals).
//! Files are created with mode 0600 and their keys are never printed.

use std::io::Write;
use std::path::Path;

use twinmesh_actors::seal::KeyRing;

fn open_private(path: &Path, create_new: bool) -> crate::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    if create_new {
        o.write(true).create_new(true);
    } else {
        o.append(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
        .map_err(|e| crate::Error::config(format!("cannot write key file {}: {e}", path.display())))
}

/// Creates `path` with one new key; refuses to overwrite an existing file.
pub fn new_key_file(path: &Path, id: &str) -> crate::Result<()> {
    let line = KeyRing::generate_line(id)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::Error::config(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut f = open_private(path, true)?;
    f.write_all(
        format!("# twinmesh key file: KEY_ID HEX64 per line, the last one seals\n{line}")
            .as_bytes(),
    )?;
    f.sync_all()?;
    Ok(())
}

/// Appends a new key after checking that the file and the new id are valid.
pub fn rotate(path: &Path, id: &str) -> crate::Result<()> {
    let ring = crate::config::load_key_ring(path, "key")?;
    if ring.key_ids().iter().any(|k| k == id) {
        return Err(crate::Error::config(format!(
            "key file {} already has a key {id:?}",
            path.display()
        )));
    }
    let line = KeyRing::generate_line(id)?;
    let mut f = open_private(path, false)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_then_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys/site-a.key");
        new_key_file(&p, "k1").unwrap();
        assert!(new_key_file(&p, "k1").is_err(), "overwrote a key file");
        let r1 = crate::config::load_key_ring(&p, "key").unwrap();
        let sealed = r1.seal(b"c", b"v");
        rotate(&p, "k2").unwrap();
        assert!(rotate(&p, "k2").is_err());
        let r2 = crate::config::load_key_ring(&p, "key").unwrap();
        assert_eq!(r2.current_id(), "k2");
        assert_eq!(r2.open(b"c", &sealed).unwrap(), b"v");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
