//! Keeping a pod's IP across a move: IP reservations on the target node, and `migros-ipam`, the CNI
//! IPAM plugin that honours them.
//!
//! Before the replacement pod's sandbox is created, the target agent writes a reservation for the
//! pod (by namespace and name) into a directory of the node. When the runtime sets up the sandbox's
//! network, the CNI plugin (e.g. `bridge`) asks its IPAM plugin for an address; `migros-ipam` answers
//! the reserved address if there is a reservation for the pod, and otherwise hands the request to
//! another IPAM plugin (`host-local`), so every other pod is served as before:
//!
//! ```json
//! "ipam": {
//!   "type": "migros-ipam",
//!   "reservations": "/var/lib/kube-migros/ipam",
//!   "delegate": { "type": "host-local", "ranges": [[{ "subnet": "10.88.0.0/16", "gateway": "10.88.0.1" }]],
//!                 "routes": [{ "dst": "0.0.0.0/0" }] }
//! }
//! ```
//!
//! The prefix length, gateway and routes of a reserved address are those of the delegate's first
//! range, so a moved pod sits in the same network as a fresh one.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A reservation: the pod of this namespace and name gets this address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    /// The migration that made it.
    pub migration: String,
}

/// The reservations of a node, one file per pod: `<dir>/<namespace>/<name>`.
#[derive(Debug, Clone)]
pub struct Reservations {
    dir: PathBuf,
}

impl Reservations {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, namespace: &str, name: &str) -> std::io::Result<PathBuf> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && s != "."
                && s != ".."
        };
        if !plain(namespace) || !plain(name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{namespace}/{name} is not a pod name"),
            ));
        }
        Ok(self.dir.join(namespace).join(name))
    }

    pub fn reserve(&self, namespace: &str, name: &str, r: &Reservation) -> std::io::Result<()> {
        let path = self.path(namespace, name)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(r)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn get(&self, namespace: &str, name: &str) -> std::io::Result<Option<Reservation>> {
        match std::fs::read(self.path(namespace, name)?) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the reservation if it is the one `migration` made.
    pub fn release(&self, namespace: &str, name: &str, migration: &str) -> std::io::Result<()> {
        match self.get(namespace, name)? {
            Some(r) if r.migration == migration => {
                std::fs::remove_file(self.path(namespace, name)?)
            }
            _ => Ok(()),
        }
    }
}

/// A CNI error result (printed on stdout, exit status 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as the CNI specification prints it.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// CNI error codes (specification section "Error").
const INVALID_CONFIG: u32 = 7;
const INVALID_ENV: u32 = 4;
const TRY_LATER: u32 = 11;

/// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` of `CNI_ARGS` (`K=V;K=V`).
pub fn pod_of(cni_args: &str) -> Option<(String, String)> {
    let args: HashMap<&str, &str> = cni_args
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    Some((
        args.get("K8S_POD_NAMESPACE")?.to_string(),
        args.get("K8S_POD_NAME")?.to_string(),
    ))
}

/// The network configuration handed to the delegate: ours with `ipam` replaced by `delegate`.
pub fn delegate_conf(conf: &Value) -> Result<Value, CniError> {
    let delegate = conf["ipam"]["delegate"].clone();
    if !delegate["type"].is_string() {
        return Err(CniError::new(
            INVALID_CONFIG,
            "migros-ipam needs ipam.delegate",
            "ipam.delegate.type names the IPAM plugin for pods without a reservation (e.g. host-local)",
        ));
    }
    let mut out = conf.clone();
    out["ipam"] = delegate;
    Ok(out)
}

/// The CNI result for a reserved address: prefix length, gateway and routes of the delegate's first
/// range, which must contain the address.
pub fn reserved_result(conf: &Value, ip: Ipv4Addr) -> Result<Value, CniError> {
    let range = &conf["ipam"]["delegate"]["ranges"][0][0];
    let subnet = range["subnet"].as_str().unwrap_or_default();
    let (net, prefix) = subnet
        .split_once('/')
        .and_then(|(n, p)| Some((n.parse::<Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .filter(|(_, p)| *p <= 32)
        .ok_or_else(|| {
            CniError::new(
                INVALID_CONFIG,
                "migros-ipam needs ipam.delegate.ranges[0][0].subnet",
                format!("{subnet:?} is not an IPv4 subnet"),
            )
        })?;
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    if u32::from(ip) & mask != u32::from(net) & mask {
        return Err(CniError::new(
            INVALID_CONFIG,
            "reserved address outside the network",
            format!("{ip} is not in {subnet}"),
        ));
    }
    let mut address = json!({"address": format!("{ip}/{prefix}")});
    if let Some(gw) = range["gateway"].as_str() {
        address["gateway"] = json!(gw);
    }
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0");
    let mut result = json!({"cniVersion": version, "ips": [address]});
    if let Some(routes) = conf["ipam"]["delegate"]["routes"].as_array() {
        result["routes"] = json!(routes);
    }
    Ok(result)
}

/// The supported-versions answer of `VERSION`.
pub fn version_result() -> Value {
    json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
}

/// Runs the delegate IPAM plugin with `conf` on stdin and the same environment; returns its
/// stdout and whether it succeeded.
fn run_delegate(conf: &Value) -> Result<(Vec<u8>, bool), CniError> {
    let name = conf["ipam"]["type"].as_str().unwrap_or_default();
    if name.contains('/') || name.is_empty() {
        return Err(CniError::new(
            INVALID_CONFIG,
            "bad delegate plugin name",
            name,
        ));
    }
    let paths = std::env::var("CNI_PATH").unwrap_or_default();
    let plugin = paths
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                INVALID_ENV,
                "delegate plugin not found",
                format!("{name} in CNI_PATH={paths}"),
            )
        })?;
    let mut child = Command::new(&plugin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(
                TRY_LATER,
                "cannot run the delegate",
                format!("{}: {e}", plugin.display()),
            )
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let bytes = serde_json::to_vec(conf).unwrap_or_default();
        stdin
            .write_all(&bytes)
            .map_err(|e| CniError::new(TRY_LATER, "cannot talk to the delegate", e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(TRY_LATER, "the delegate failed", e.to_string()))?;
    Ok((out.stdout, out.status.success()))
}

/// The plugin: reads the command from `CNI_COMMAND` and the configuration from stdin, writes the
/// result (or error) to stdout. Returns the exit status.
pub fn plugin_main() -> i32 {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        println!("{}", version_result());
        return 0;
    }
    let mut input = String::new();
    let conf: Value = match std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str(&input).map_err(|e| e.to_string()))
    {
        Ok(conf) => conf,
        Err(e) => {
            let err = CniError::new(INVALID_CONFIG, "invalid network configuration", e);
            println!("{}", err.to_json("1.0.0"));
            return 1;
        }
    };
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    match run(&command, &conf) {
        Ok((out, ok)) => {
            let _ = std::io::stdout().write_all(&out);
            i32::from(!ok)
        }
        Err(err) => {
            println!("{}", err.to_json(&version));
            1
        }
    }
}

fn run(command: &str, conf: &Value) -> Result<(Vec<u8>, bool), CniError> {
    let delegate = delegate_conf(conf)?;
    if command == "ADD" {
        let dir = conf["ipam"]["reservations"]
            .as_str()
            .unwrap_or("/var/lib/kube-migros/ipam");
        let args = std::env::var("CNI_ARGS").unwrap_or_default();
        if let Some((namespace, name)) = pod_of(&args) {
            let reserved = Reservations::new(Path::new(dir))
                .get(&namespace, &name)
                .map_err(|e| {
                    CniError::new(TRY_LATER, "cannot read the IP reservation", e.to_string())
                })?;
            if let Some(r) = reserved {
                let result = reserved_result(conf, r.ip)?;
                return Ok((serde_json::to_vec(&result).unwrap_or_default(), true));
            }
        }
    }
    // DEL, CHECK, GC, STATUS and pods without a reservation: the delegate's business. A reserved
    // address was never the delegate's, so its DEL finds nothing to free.
    run_delegate(&delegate)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn conf() -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "migros", "type": "bridge",
            "ipam": {"type": "migros-ipam", "reservations": "/r",
                     "delegate": {"type": "host-local",
                                  "ranges": [[{"subnet": "10.88.0.0/16", "rangeStart": "10.88.1.2",
                                               "rangeEnd": "10.88.1.254", "gateway": "10.88.0.1"}]],
                                  "routes": [{"dst": "0.0.0.0/0"}]}}
        })
    }

    #[test]
    fn the_pod_is_read_from_cni_args() {
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=app-0;K8S_POD_INFRA_CONTAINER_ID=x";
        assert_eq!(pod_of(args), Some(("demo".into(), "app-0".into())));
        assert_eq!(pod_of("IgnoreUnknown=1"), None);
    }

    #[test]
    fn a_reserved_address_gets_the_networks_prefix_gateway_and_routes() {
        let r = reserved_result(&conf(), Ipv4Addr::new(10, 88, 2, 9)).unwrap();
        assert_eq!(
            r,
            json!({"cniVersion": "1.0.0",
                   "ips": [{"address": "10.88.2.9/16", "gateway": "10.88.0.1"}],
                   "routes": [{"dst": "0.0.0.0/0"}]})
        );
        let outside = reserved_result(&conf(), Ipv4Addr::new(10, 89, 0, 1)).unwrap_err();
        assert!(outside.details.contains("not in 10.88.0.0/16"), "{outside}");
    }

    #[test]
    fn the_delegate_gets_our_configuration_with_its_own_ipam() {
        let d = delegate_conf(&conf()).unwrap();
        assert_eq!(d["ipam"]["type"], "host-local");
        assert_eq!(d["name"], "migros");
        assert_eq!(d["type"], "bridge");
        let mut bad = conf();
        bad["ipam"].as_object_mut().unwrap().remove("delegate");
        assert_eq!(delegate_conf(&bad).unwrap_err().code, INVALID_CONFIG);
    }

    #[test]
    fn reservations_are_per_pod_and_released_only_by_their_migration() {
        let dir = tempfile::tempdir().unwrap();
        let r = Reservations::new(dir.path());
        let res = Reservation {
            ip: Ipv4Addr::new(10, 88, 1, 7),
            migration: "m1".into(),
        };
        r.reserve("demo", "app", &res).unwrap();
        assert_eq!(r.get("demo", "app").unwrap(), Some(res));
        assert_eq!(r.get("demo", "other").unwrap(), None);
        r.release("demo", "app", "m2").unwrap();
        assert!(r.get("demo", "app").unwrap().is_some());
        r.release("demo", "app", "m1").unwrap();
        assert_eq!(r.get("demo", "app").unwrap(), None);
        assert!(
            r.reserve(
                "..",
                "x",
                &Reservation {
                    ip: Ipv4Addr::LOCALHOST,
                    migration: "m".into()
                }
            )
            .is_err()
        );
    }
}
