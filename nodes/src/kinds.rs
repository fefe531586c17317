//! Asset kinds from Thing Model files (`--models DIR`, `models_dir`): the only place a
//! node reads them from disk. Parsing, checking and the registry are in
//! `twinmesh_twins::kind`; kinds that reach a node over the fabric are stored and
//! reloaded by the actors (see `twinmesh_actors::kinds`).

use std::path::Path;

use twinmesh_twins::kind::{self, KindSource};
use twinmesh_twins::AssetKind;

/// Files of a models folder that are read: `*.json` (Thing Models are usually named
/// `*.tm.json`). Other files are left alone.
fn is_model_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
}

/// Registers every Thing Model of `dir` (in file-name order) and returns their kinds.
/// The first bad model stops the node: its error names the file, the property and the
/// reason.
pub fn load_dir(dir: &Path) -> crate::Result<Vec<AssetKind>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        crate::Error::config(format!("cannot read models folder {}: {e}", dir.display()))
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            crate::Error::config(format!("cannot read models folder {}: {e}", dir.display()))
        })?;
        let path = entry.path();
        if path.is_file() && is_model_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    let mut kinds = Vec::new();
    for path in files {
        let origin = path.display().to_string();
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len > kind::thing_model::MAX_MODEL_BYTES as u64 {
            return Err(crate::Error::config(format!(
                "invalid Thing Model {origin}: model is {len} bytes, at most {}",
                kind::thing_model::MAX_MODEL_BYTES
            )));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| crate::Error::config(format!("cannot read Thing Model {origin}: {e}")))?;
        let k = kind::register_text(&text, &origin, KindSource::File(origin.clone()))
            .map_err(|e| crate::Error::config(format!("invalid Thing Model {e}")))?;
        if kinds.contains(&k) {
            return Err(crate::Error::config(format!(
                "invalid Thing Model {origin}: kind {k} is defined by two files of {}",
                dir.display()
            )));
        }
        kinds.push(k);
    }
    Ok(kinds)
}
