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

#[cfg(test)]
mod tests {
    use super::*;

    const COMPRESSOR: &str = include_str!("../../examples/models/compressor.tm.json");

    fn folder(files: &[(&str, String)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_models_folder_defines_kinds_and_a_config_may_name_them() {
        let text = COMPRESSOR.replace("\"compressor\"", "\"nodes_compressor\"");
        let dir = folder(&[
            ("compressor.tm.json", text),
            ("README.txt", "not a model".into()),
        ]);
        let kinds = load_dir(dir.path()).unwrap();
        assert_eq!(kinds.len(), 1);
        assert_eq!(kinds[0].as_str(), "nodes_compressor");
        let path = dir.path().join("compressor.tm.json").display().to_string();
        assert_eq!(kinds[0].schema().source, KindSource::File(path));
        // Again (a node restarted in the same process, a config made in code): the same.
        assert_eq!(load_dir(dir.path()).unwrap(), kinds);

        // A gateway's configuration reads its folder first: its chains may name the kind.
        let config = dir.path().join("node.toml");
        std::fs::write(
            &config,
            format!(
                r#"
                id = "iot-a"
                tier = "iot"
                site = "site-a"
                models_dir = "{}"
                [[chains.nodes_compressor.stage]]
                op = "stats"
                tier = "edge"
                signal = "motor_current"
                "#,
                dir.path().display()
            ),
        )
        .unwrap();
        let cfg = crate::config::NodeConfig::from_file(&config).unwrap();
        assert_eq!(
            cfg.chains[&kinds[0]].stage[0].signal.as_deref(),
            Some("motor_current")
        );
        assert_eq!(cfg.models_dir.as_deref(), Some(dir.path()));
    }

    #[test]
    fn a_bad_folder_is_refused_with_the_file() {
        let text = COMPRESSOR.replace("\"compressor\"", "\"nodes_twice\"");
        let dir = folder(&[("a.tm.json", text.clone()), ("b.tm.json", text)]);
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{}: kind nodes_twice is defined by two files",
                dir.path().join("b.tm.json").display()
            )),
            "{e}"
        );

        let dir = folder(&[(
            "c.tm.json",
            COMPRESSOR
                .replace("\"compressor\"", "\"nodes_bad\"")
                .replace("\"minimum\": 4", "\"minimum\": 40"),
        )]);
        let e = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "{}: property \"pressure_limit\": minimum 40 must be below maximum 14",
                dir.path().join("c.tm.json").display()
            )),
            "{e}"
        );
        let e = load_dir(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read models folder"), "{e}");
    }
}
