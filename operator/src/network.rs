//! Keeping the pod IP: one small adapter per IP reservation mechanism (docs/operator.md, "Keeping the pod IP"), each
//! writing what its IPAM reads into the replacement pod, pure.
//!
//! | mechanism | how the address is reserved | detected by (source pod annotation) |
//! |---|---|---|
//! | Calico | `cni.projectcalico.org/ipAddrs: ["<ip>"]` on the replacement pod | `cni.projectcalico.org/podIP` |
//! | Kube-OVN | `ovn.kubernetes.io/ip_address: <ip>` on the replacement pod | `ovn.kubernetes.io/allocated` |
//! | Multus static | the secondary attachments' `ips` in `k8s.v1.cni.cncf.io/networks`, checked and carried over; the pod IP by the cluster network's mechanism (as `Auto` finds it) | (chosen explicitly) |
//! | migros-ipam | the target agent writes a reservation file that the plugin reads | the fallback of `Auto` |
//!
//! Every mechanism needs the source sandbox to release the address first, which the migration
//! ensures (the source is stopped and its pod deleted before the replacement is created).

use std::collections::BTreeMap;

use crds::NetworkMechanism;
use k8s_openapi::api::core::v1::Pod;

/// Calico's per-pod IP request annotation (a JSON list of addresses).
pub const CALICO_IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";
/// Set by Calico on every pod it gave an address.
pub const CALICO_POD_IP: &str = "cni.projectcalico.org/podIP";
/// Kube-OVN's fixed-address annotation.
pub const KUBE_OVN_IP_ADDRESS: &str = "ovn.kubernetes.io/ip_address";
/// Set by Kube-OVN on every pod it gave an address.
pub const KUBE_OVN_ALLOCATED: &str = "ovn.kubernetes.io/allocated";

/// One IP reservation mechanism.
pub trait IpKeeper: std::fmt::Debug {
    fn mechanism(&self) -> NetworkMechanism;
    /// Makes the replacement pod get `ip`, or says why this mechanism cannot.
    fn reserve(&self, replacement: &mut Pod, ip: &str) -> Result<(), String>;
}

fn annotations(pod: &mut Pod) -> &mut BTreeMap<String, String> {
    pod.metadata.annotations.get_or_insert_with(BTreeMap::new)
}

fn has_annotation(pod: &Pod, key: &str) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(key))
}

fn check_ip(ip: &str) -> Result<(), String> {
    ip.parse::<std::net::IpAddr>()
        .map(drop)
        .map_err(|_| format!("{ip:?} is not an IP address"))
}

/// Calico IPAM: the replacement pod asks for the address.
#[derive(Debug, Clone, Copy)]
pub struct Calico;

impl IpKeeper for Calico {
    fn mechanism(&self) -> NetworkMechanism {
        NetworkMechanism::Calico
    }

    fn reserve(&self, replacement: &mut Pod, ip: &str) -> Result<(), String> {
        check_ip(ip)?;
        let list = serde_json::to_string(&[ip]).map_err(|e| e.to_string())?;
        let a = annotations(replacement);
        // The source's own record of its address is Calico's to write again.
        a.remove(CALICO_POD_IP);
        a.remove("cni.projectcalico.org/podIPs");
        a.insert(CALICO_IP_ADDRS.into(), list);
        Ok(())
    }
}

/// Kube-OVN: the replacement pod asks for the address.
#[derive(Debug, Clone, Copy)]
pub struct KubeOvn;

impl IpKeeper for KubeOvn {
    fn mechanism(&self) -> NetworkMechanism {
        NetworkMechanism::KubeOVN
    }

    fn reserve(&self, replacement: &mut Pod, ip: &str) -> Result<(), String> {
        check_ip(ip)?;
        let a = annotations(replacement);
        // Kube-OVN re-allocates from these when it sees the pod; the request is the address.
        a.remove(KUBE_OVN_ALLOCATED);
        a.insert(KUBE_OVN_IP_ADDRESS.into(), ip.into());
        Ok(())
    }
}

/// The kube-migros CNI IPAM plugin: the target agent writes the reservation on the node
/// (StageRestore); the pod itself only carries the address for people to read.
#[derive(Debug, Clone, Copy)]
pub struct MigrosIpam;

impl IpKeeper for MigrosIpam {
    fn mechanism(&self) -> NetworkMechanism {
        NetworkMechanism::MigrosIPAM
    }

    fn reserve(&self, _replacement: &mut Pod, ip: &str) -> Result<(), String> {
        check_ip(ip)
    }
}

/// Multus's network-selection annotation: the pod's secondary attachments.
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
/// Multus's record of the pod's attachments and their addresses, written after each start.
pub const MULTUS_NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";
/// The same record under its deprecated name, which older Multus versions write.
pub const MULTUS_NETWORKS_STATUS: &str = "k8s.v1.cni.cncf.io/networks-status";

/// One entry of [`MULTUS_NETWORKS`] (the Network Plumbing Working Group's network selection
/// element), as far as keeping addresses goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
struct Selection {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    interface: Option<String>,
    /// Static addresses in CIDR notation, handed to the attachment's IPAM (`ips` capability).
    #[serde(default)]
    ips: Vec<String>,
}

/// One entry of [`MULTUS_NETWORK_STATUS`].
#[derive(Debug, Clone, serde::Deserialize)]
struct Attached {
    name: String,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    default: bool,
}

/// The entries of a network-selection annotation: a JSON list of selection elements, or the
/// short form `[namespace/]name[@interface]`, comma-separated (which cannot carry `ips`).
fn selections(text: &str) -> Result<Vec<Selection>, String> {
    let text = text.trim();
    if text.starts_with('[') {
        return serde_json::from_str(text)
            .map_err(|e| format!("{MULTUS_NETWORKS} is not a list of network selections: {e}"));
    }
    Ok(text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (rest, interface) = match entry.split_once('@') {
                Some((rest, interface)) => (rest, Some(interface.to_string())),
                None => (entry, None),
            };
            let (namespace, name) = match rest.split_once('/') {
                Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
                None => (None, rest.to_string()),
            };
            Selection {
                name,
                namespace,
                interface,
                ips: vec![],
            }
        })
        .collect())
}

/// Multus with static IPAM on the pod's secondary networks: every attachment in
/// `k8s.v1.cni.cncf.io/networks` pins its addresses with `ips`, which the replacement carries
/// (it is a copy of the source), so the attachments' IPAM (with the `ips` capability) hands it the
/// same addresses on the target. Checked before anything is touched: the annotation parses, every
/// entry has valid `ips`, and every address Multus reports for an attachment is among them. The
/// pod IP itself, on the cluster network, is kept by `primary` (the mechanism `Auto` finds).
#[derive(Debug)]
pub struct MultusStatic {
    primary: Box<dyn IpKeeper + Send + Sync>,
}

impl MultusStatic {
    /// Why the pod's attachments would not keep their addresses, if they would not.
    fn check(pod: &Pod) -> Result<(), String> {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let Some(text) = annotations.get(MULTUS_NETWORKS) else {
            return Err(format!(
                "the pod has no {MULTUS_NETWORKS} annotation: MultusStatic keeps the addresses \
                 of Multus attachments"
            ));
        };
        let entries = selections(text)?;
        if entries.is_empty() {
            return Err(format!("{MULTUS_NETWORKS} lists no network"));
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        for entry in &entries {
            let at = entry
                .interface
                .as_ref()
                .map(|i| format!(" ({i})"))
                .unwrap_or_default();
            if entry.ips.is_empty() {
                return Err(format!(
                    "network {}{at} pins no address (`ips` in {MULTUS_NETWORKS}, in the JSON \
                     form): its IPAM would give the pod another address on the target",
                    entry.name
                ));
            }
            for ip in &entry.ips {
                let address = ip.split_once('/').map_or(ip.as_str(), |(a, _)| a);
                let prefix_ok = ip
                    .split_once('/')
                    .is_some_and(|(_, p)| p.parse::<u8>().is_ok_and(|p| p <= 128));
                if address.parse::<std::net::IpAddr>().is_err() || !prefix_ok {
                    return Err(format!(
                        "network {}{at}: {ip:?} is not an address in CIDR notation (such as \
                         10.10.0.5/24), as static IPAM wants it",
                        entry.name
                    ));
                }
            }
        }
        // What Multus reports the running pod has must be what the entries pin.
        let status = annotations
            .get(MULTUS_NETWORK_STATUS)
            .or_else(|| annotations.get(MULTUS_NETWORKS_STATUS));
        let attached: Vec<Attached> = match status {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| format!("{MULTUS_NETWORK_STATUS} does not parse: {e}"))?,
            None => vec![],
        };
        for a in attached.iter().filter(|a| !a.default) {
            let (a_ns, a_name) = a
                .name
                .split_once('/')
                .map_or((namespace.as_str(), a.name.as_str()), |(n, m)| (n, m));
            let entry = entries.iter().find(|e| {
                e.name == a_name
                    && e.namespace.as_deref().unwrap_or(&namespace) == a_ns
                    && (e.interface.is_none() || e.interface == a.interface)
            });
            let Some(entry) = entry else {
                continue;
            };
            let pinned: Vec<&str> = entry
                .ips
                .iter()
                .map(|ip| ip.split_once('/').map_or(ip.as_str(), |(a, _)| a))
                .collect();
            if let Some(ip) = a.ips.iter().find(|ip| !pinned.contains(&ip.as_str())) {
                return Err(format!(
                    "network {}{} has address {ip}, which its entry in {MULTUS_NETWORKS} does \
                     not pin (it pins {}): the target would give another",
                    a.name,
                    a.interface
                        .as_ref()
                        .map(|i| format!(" ({i})"))
                        .unwrap_or_default(),
                    entry.ips.join(", ")
                ));
            }
        }
        Ok(())
    }
}

impl IpKeeper for MultusStatic {
    fn mechanism(&self) -> NetworkMechanism {
        NetworkMechanism::MultusStatic
    }

    fn reserve(&self, replacement: &mut Pod, ip: &str) -> Result<(), String> {
        Self::check(replacement)?;
        self.primary.reserve(replacement, ip)?;
        // Multus writes the new attachments' record once the replacement runs.
        let a = annotations(replacement);
        a.remove(MULTUS_NETWORK_STATUS);
        a.remove(MULTUS_NETWORKS_STATUS);
        Ok(())
    }
}

/// Why `mechanism` cannot keep `source`'s address `ip` on the target, if it cannot: a dry run of
/// the reservation on a copy of the pod, checked before the migration touches anything.
pub fn cannot_keep(mechanism: NetworkMechanism, source: &Pod, ip: &str) -> Option<String> {
    let mut copy = source.clone();
    keeper(mechanism, source).reserve(&mut copy, ip).err()
}

/// The adapter for `mechanism`; `Auto` looks at the source pod's annotations.
pub fn keeper(mechanism: NetworkMechanism, source: &Pod) -> Box<dyn IpKeeper + Send + Sync> {
    match mechanism {
        NetworkMechanism::Calico => Box::new(Calico),
        NetworkMechanism::KubeOVN => Box::new(KubeOvn),
        NetworkMechanism::MultusStatic => Box::new(MultusStatic {
            primary: keeper(NetworkMechanism::Auto, source),
        }),
        NetworkMechanism::MigrosIPAM => Box::new(MigrosIpam),
        NetworkMechanism::Auto if has_annotation(source, CALICO_POD_IP) => Box::new(Calico),
        NetworkMechanism::Auto if has_annotation(source, KUBE_OVN_ALLOCATED) => Box::new(KubeOvn),
        NetworkMechanism::Auto => Box::new(MigrosIpam),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kube::api::ObjectMeta;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn get(pod: &Pod, key: &str) -> Option<String> {
        pod.metadata.annotations.as_ref()?.get(key).cloned()
    }

    #[test]
    fn auto_detects_calico_and_kube_ovn_from_the_source_and_falls_back_to_migros_ipam() {
        let calico = pod(&[(CALICO_POD_IP, "10.1.0.5/32")]);
        assert_eq!(
            keeper(NetworkMechanism::Auto, &calico).mechanism(),
            NetworkMechanism::Calico
        );
        let ovn = pod(&[(KUBE_OVN_ALLOCATED, "true")]);
        assert_eq!(
            keeper(NetworkMechanism::Auto, &ovn).mechanism(),
            NetworkMechanism::KubeOVN
        );
        let plain = pod(&[]);
        assert_eq!(
            keeper(NetworkMechanism::Auto, &plain).mechanism(),
            NetworkMechanism::MigrosIPAM
        );
        // An explicit choice wins over detection.
        assert_eq!(
            keeper(NetworkMechanism::KubeOVN, &calico).mechanism(),
            NetworkMechanism::KubeOVN
        );
    }

    #[test]
    fn calico_gets_the_address_as_a_json_list_and_loses_the_sources_record() {
        let mut p = pod(&[(CALICO_POD_IP, "10.1.0.5/32"), ("app", "x")]);
        Calico.reserve(&mut p, "10.1.0.5").unwrap();
        assert_eq!(get(&p, CALICO_IP_ADDRS).as_deref(), Some(r#"["10.1.0.5"]"#));
        assert_eq!(get(&p, CALICO_POD_IP), None);
        assert_eq!(get(&p, "app").as_deref(), Some("x"));
    }

    #[test]
    fn kube_ovn_gets_the_fixed_address() {
        let mut p = pod(&[(KUBE_OVN_ALLOCATED, "true")]);
        KubeOvn.reserve(&mut p, "10.16.0.9").unwrap();
        assert_eq!(get(&p, KUBE_OVN_IP_ADDRESS).as_deref(), Some("10.16.0.9"));
        assert_eq!(get(&p, KUBE_OVN_ALLOCATED), None);
    }

    #[test]
    fn bad_addresses_are_refused_without_touching_the_pod() {
        for keeper in [&Calico as &dyn IpKeeper, &KubeOvn, &MigrosIpam] {
            let mut p = pod(&[]);
            assert!(keeper.reserve(&mut p, "not-an-ip").is_err());
            assert_eq!(p.metadata.annotations.as_ref().map(|a| a.len()), Some(0));
        }
    }

    fn multus(annotations: &[(&str, &str)]) -> Result<Pod, String> {
        let mut p = pod(annotations);
        p.metadata.namespace = Some("apps".into());
        let source = p.clone();
        keeper(NetworkMechanism::MultusStatic, &source)
            .reserve(&mut p, "10.88.1.7")
            .map(|()| p)
    }

    #[test]
    fn multus_static_carries_the_pinned_addresses_and_drops_the_old_status() {
        let networks = r#"[{"name": "rdma-net", "interface": "net1", "ips": ["10.10.0.5/24"]},
                           {"name": "storage", "namespace": "infra", "ips": ["10.20.0.9/16", "fd00::9/64"]}]"#;
        let status = r#"[{"name": "cbr0", "interface": "eth0", "ips": ["10.88.1.7"], "default": true},
                         {"name": "apps/rdma-net", "interface": "net1", "ips": ["10.10.0.5"]},
                         {"name": "infra/storage", "interface": "net2", "ips": ["10.20.0.9", "fd00::9"]}]"#;
        let p = multus(&[(MULTUS_NETWORKS, networks), (MULTUS_NETWORK_STATUS, status)]).unwrap();
        assert_eq!(get(&p, MULTUS_NETWORKS).as_deref(), Some(networks));
        assert_eq!(get(&p, MULTUS_NETWORK_STATUS), None);
        // The pod IP on the cluster network: the mechanism Auto finds (Calico here).
        let p = multus(&[(MULTUS_NETWORKS, networks), (CALICO_POD_IP, "10.88.1.7/32")]).unwrap();
        assert_eq!(
            get(&p, CALICO_IP_ADDRS).as_deref(),
            Some(r#"["10.88.1.7"]"#)
        );
    }

    #[test]
    fn multus_static_refuses_what_would_not_keep_its_addresses() {
        let cases = [
            (vec![], "has no k8s.v1.cni.cncf.io/networks"),
            (
                vec![(MULTUS_NETWORKS, "rdma-net@net1, infra/storage")],
                "network rdma-net (net1) pins no address",
            ),
            (
                vec![(MULTUS_NETWORKS, r#"[{"name": "a", "ips": ["10.10.0.5"]}]"#)],
                "not an address in CIDR notation",
            ),
            (
                vec![(MULTUS_NETWORKS, r#"[{"name": "a", "ips": ["nope/24"]}]"#)],
                "not an address in CIDR notation",
            ),
            (vec![(MULTUS_NETWORKS, "{not json")], "pins no address"),
            (
                vec![(MULTUS_NETWORKS, "[{]")],
                "is not a list of network selections",
            ),
            (vec![(MULTUS_NETWORKS, "")], "lists no network"),
            (
                vec![
                    (
                        MULTUS_NETWORKS,
                        r#"[{"name": "a", "interface": "net1", "ips": ["10.10.0.5/24"]}]"#,
                    ),
                    (
                        MULTUS_NETWORK_STATUS,
                        r#"[{"name": "apps/a", "interface": "net1", "ips": ["10.10.0.77"]}]"#,
                    ),
                ],
                "network apps/a (net1) has address 10.10.0.77, which its entry",
            ),
        ];
        for (annotations, expected) in cases {
            let why = multus(&annotations).unwrap_err();
            assert!(why.contains(expected), "{annotations:?}: {why}");
            // The dry run before the migration starts says the same.
            let mut source = pod(&annotations);
            source.metadata.namespace = Some("apps".into());
            assert_eq!(
                cannot_keep(NetworkMechanism::MultusStatic, &source, "10.88.1.7").as_deref(),
                Some(why.as_str())
            );
        }
        let fine = pod(&[(
            MULTUS_NETWORKS,
            r#"[{"name": "a", "ips": ["10.10.0.5/24"]}]"#,
        )]);
        assert_eq!(
            cannot_keep(NetworkMechanism::MultusStatic, &fine, "10.88.1.7"),
            None
        );
        assert_eq!(
            cannot_keep(NetworkMechanism::Calico, &fine, "bad"),
            Some("\"bad\" is not an IP address".into())
        );
    }

    #[test]
    fn migros_ipam_leaves_the_pod_to_the_agents_reservation() {
        let mut p = pod(&[]);
        MigrosIpam.reserve(&mut p, "10.88.1.7").unwrap();
        assert_eq!(p.metadata.annotations.as_ref().map(|a| a.len()), Some(0));
    }
}
