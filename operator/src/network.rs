//! Keeping the pod IP: one small adapter per IP reservation mechanism (docs/operator.md, "Keeping the pod IP"), each
//! writing what its IPAM reads into the replacement pod, pure.
//!
//! | mechanism | how the address is reserved | detected by (source pod annotation) |
//! |---|---|---|
//! | Calico | `cni.projectcalico.org/ipAddrs: ["<ip>"]` on the replacement pod | `cni.projectcalico.org/podIP` |
//! | Kube-OVN | `ovn.kubernetes.io/ip_address: <ip>` on the replacement pod | `ovn.kubernetes.io/allocated` |
//! | Multus static | `ips` of the entry in `k8s.v1.cni.cncf.io/networks` | (chosen explicitly; not built yet) |
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

/// Multus with static IPAM on a secondary network: documented, not built yet.
#[derive(Debug, Clone, Copy)]
pub struct MultusStatic;

impl IpKeeper for MultusStatic {
    fn mechanism(&self) -> NetworkMechanism {
        NetworkMechanism::MultusStatic
    }

    fn reserve(&self, _replacement: &mut Pod, _ip: &str) -> Result<(), String> {
        Err("the Multus static-IPAM mechanism is not supported yet; use Auto, Calico, KubeOVN or MigrosIPAM".into())
    }
}

/// The adapter for `mechanism`; `Auto` looks at the source pod's annotations.
pub fn keeper(mechanism: NetworkMechanism, source: &Pod) -> Box<dyn IpKeeper + Send + Sync> {
    match mechanism {
        NetworkMechanism::Calico => Box::new(Calico),
        NetworkMechanism::KubeOVN => Box::new(KubeOvn),
        NetworkMechanism::MultusStatic => Box::new(MultusStatic),
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
    fn bad_addresses_and_unbuilt_mechanisms_are_refused_without_touching_the_pod() {
        for keeper in [&Calico as &dyn IpKeeper, &KubeOvn, &MigrosIpam] {
            let mut p = pod(&[]);
            assert!(keeper.reserve(&mut p, "not-an-ip").is_err());
            assert_eq!(p.metadata.annotations.as_ref().map(|a| a.len()), Some(0));
        }
        let mut p = pod(&[]);
        let why = MultusStatic.reserve(&mut p, "10.0.0.1").unwrap_err();
        assert!(why.contains("not supported yet"), "{why}");
    }

    #[test]
    fn migros_ipam_leaves_the_pod_to_the_agents_reservation() {
        let mut p = pod(&[]);
        MigrosIpam.reserve(&mut p, "10.88.1.7").unwrap();
        assert_eq!(p.metadata.annotations.as_ref().map(|a| a.len()), Some(0));
    }
}
