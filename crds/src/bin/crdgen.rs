//! Writes the CRD YAML of every kube-migros resource into the Helm chart (`charts/kube-migros/crds`).
//! `--check` compares instead of writing, and fails when the committed files are stale.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crds::CHART_CRD_DIR);
    let docs = match crds::rendered_crds() {
        Ok(docs) => docs,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = false;
    for (file, yaml) in docs {
        let path = dir.join(&file);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                eprintln!(
                    "crdgen: {} is stale; run `cargo run -p crds --bin crdgen`",
                    path.display()
                );
                stale = true;
            }
        } else if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, yaml))
        {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if stale {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
