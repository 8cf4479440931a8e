//! The crate's layering, checked: every top-level module of `src/` may use only the modules of
//! lower layers (docs/architecture.md, "Layers"). A `use crate::…` that points up, or a new
//! module not placed in a layer, fails here, so a dependency cycle cannot creep back in.

use std::collections::BTreeMap;
use std::path::Path;

/// From the bottom up. A module uses only modules of the layers below its own; modules of one
/// layer do not use each other.
const LAYERS: &[&[&str]] = &[
    &[
        "error",
        "route",
        "ring",
        "registry",
        "acl",
        "refusal",
        "mqtt_store",
        "trace",
        "message_path",
    ],
    &["config"],
    &["session", "mqant_conf"],
    &["mqtt_session"],
    &["fanout", "bus", "retained"],
    &["module"],
    &["router", "remote"],
    &["auth"],
    &["gate"],
    &["node"],
    &["lib"],
];

fn layer_of(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

/// The top-level module a source file belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_owned()
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut uses: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in &all {
        let m = module_of(&src, f);
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != m {
                    uses.entry(m.clone())
                        .or_default()
                        .entry(name)
                        .or_insert_with(|| f.display().to_string());
                }
            }
        }
    }
    let mut wrong = Vec::new();
    for f in &all {
        let m = module_of(&src, f);
        if layer_of(&m).is_none() {
            wrong.push(format!("{m} (src/{m}) is in no layer: place it in LAYERS"));
        }
    }
    for (m, deps) in &uses {
        let Some(lm) = layer_of(m) else { continue };
        for (d, file) in deps {
            match layer_of(d) {
                Some(ld) if ld < lm => {}
                Some(_) => wrong.push(format!("{m} uses {d}, which is not below it ({file})")),
                None => {}
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}
