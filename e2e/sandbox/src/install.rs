//! Installs what the chart ships into the sandbox: today the CRDs, server-side applied from
//! `charts/kube-migros/crds` (the files users install), waiting until the API server serves them.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::wait::{await_condition, conditions},
};

/// Field manager of everything the sandbox applies.
pub const FIELD_MANAGER: &str = "kube-migros-sandbox";

/// Errors while installing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a CustomResourceDefinition: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("applying CRD {name}: {source}")]
    Apply { name: String, source: kube::Error },
    #[error("CRD {name} is not Established after {seconds}s")]
    NotEstablished { name: String, seconds: u64 },
    #[error("watching CRD {name}: {source}")]
    Watch {
        name: String,
        source: kube::runtime::wait::Error,
    },
}

/// The chart's CRD files, sorted.
pub fn chart_crd_files() -> Result<Vec<PathBuf>, Error> {
    let dir = crate::repo_root().join(crds::CHART_CRD_DIR);
    let entries = std::fs::read_dir(&dir).map_err(|source| Error::Read {
        path: dir.clone(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Applies every CRD of the chart and waits until each is Established.
pub async fn apply_chart_crds(client: &Client) -> Result<Vec<CustomResourceDefinition>, Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let timeout = Duration::from_secs(60);
    let mut installed = Vec::new();
    for path in chart_crd_files()? {
        let yaml = std::fs::read_to_string(&path).map_err(|source| Error::Read {
            path: path.clone(),
            source,
        })?;
        let crd: CustomResourceDefinition =
            serde_yaml_ng::from_str(&yaml).map_err(|source| Error::Parse {
                path: path.clone(),
                source,
            })?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|source| Error::Apply {
            name: name.clone(),
            source,
        })?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        let crd = tokio::time::timeout(timeout, established)
            .await
            .map_err(|_| Error::NotEstablished {
                name: name.clone(),
                seconds: timeout.as_secs(),
            })?
            .map_err(|source| Error::Watch {
                name: name.clone(),
                source,
            })?
            .ok_or_else(|| Error::NotEstablished {
                name: name.clone(),
                seconds: 0,
            })?;
        installed.push(crd);
    }
    Ok(installed)
}
