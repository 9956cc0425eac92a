//! The sandbox control plane itself: it comes up ready with a normal cluster's behaviour (RBAC, the
//! controller-manager's controllers, the scheduler), `down` leaves no process or state behind, and
//! `up` after `down` works again. One test, so nothing else in this binary races the restart.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::time::Duration;

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::ConfigMap,
};
use kube::{
    Api,
    api::PostParams,
    runtime::wait::{await_condition, conditions},
};
use sandbox::{Dirs, controlplane::ControlPlane, k8s, process};
use testkit::harness;

#[tokio::test]
async fn control_plane_comes_up_goes_down_cleanly_and_comes_up_again() {
    let env = harness::env().await;
    let client = env.client().await.expect("admin client");

    // The version served is the pinned release, built with its version stamps.
    let version = client.apiserver_version().await.expect("/version");
    assert_eq!(version.git_version, k8s::K8S_VERSION);

    // The admin is a cluster admin through RBAC's system:masters binding.
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some("create".into()),
                resource: Some("customresourcedefinitions".into()),
                group: Some("apiextensions.k8s.io".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("access review");
    assert!(
        answer.status.is_some_and(|s| s.allowed),
        "the admin may not create CRDs"
    );

    // The controller-manager's root-CA publisher runs: every namespace gets kube-root-ca.crt
    // holding the cluster CA.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let published = await_condition(config_maps, "kube-root-ca.crt", |cm: Option<&ConfigMap>| {
        cm.is_some_and(|cm| cm.data.as_ref().is_some_and(|d| d.contains_key("ca.crt")))
    });
    tokio::time::timeout(Duration::from_secs(60), published)
        .await
        .expect("kube-root-ca.crt published within 60s")
        .expect("watch ConfigMaps");

    // down: no process of the sandbox's binaries and no state remain.
    let dirs = Dirs::from_env();
    let control_plane = ControlPlane::new(&dirs);
    control_plane.down().expect("control-plane down");
    let left = process::processes_running_from(&dirs.cache.join("k8s"));
    assert!(left.is_empty(), "processes left after down: {left:?}");
    assert!(
        !dirs.state.join("control-plane").exists(),
        "state left after down"
    );
    assert!(control_plane.status().iter().all(|(_, pid)| pid.is_none()));

    // up again: a fresh, ready control plane at the same address.
    let env = control_plane
        .up()
        .await
        .expect("control-plane up after down");
    assert!(control_plane.is_ready().await);
    let client = env.client().await.expect("admin client");
    let crds = harness::install_crds(&client).await;
    let established = conditions::is_crd_established();
    assert!(
        crds.iter()
            .all(|crd| kube::runtime::wait::Condition::matches_object(&established, Some(crd)))
    );
}
