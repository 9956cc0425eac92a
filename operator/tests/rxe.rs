//! rxe block allocation against the real API server: blocks stay cluster-unique when many
//! allocations race from two clients (as two operator replicas would), and one pod never ends up
//! with two blocks.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::collections::BTreeSet;

use crds::RxeBlock;
use futures::future::join_all;
use kube::{Api, api::ListParams};
use operator::rxe_blocks::{Allocator, Ranges};
use testkit::harness::{self, with_namespace};

#[tokio::test]
async fn fifty_racing_allocations_get_fifty_disjoint_blocks() {
    with_namespace("rxe-race", |client, ns| async move {
        harness::install_crds(&client).await;
        let ranges = Ranges::default();
        // Two independent clients, as two operator replicas racing.
        let replicas = [
            Allocator::new(client.clone(), ranges),
            Allocator::new(harness::client().await, ranges),
        ];
        let allocations = (0..50).map(|i| {
            let allocator = replicas[i % 2].clone();
            let ns = ns.clone();
            async move {
                allocator
                    .ensure(&ns, &format!("pod-{i}"))
                    .await
                    .expect("allocate")
            }
        });
        let blocks = join_all(allocations).await;
        let starts: BTreeSet<u32> = blocks.iter().map(|b| b.qpn_start).collect();
        assert_eq!(starts.len(), 50, "two pods got the same QPN block");
        let mut sorted: Vec<_> = blocks.clone();
        sorted.sort_by_key(|b| b.qpn_start);
        for pair in sorted.windows(2) {
            assert!(
                pair[0].qpn_start + pair[0].qpn_count <= pair[1].qpn_start,
                "QPN ranges overlap"
            );
            assert!(
                pair[0].mrn_start + pair[0].mrn_count <= pair[1].mrn_start,
                "MRN ranges overlap"
            );
        }

        // Asking again, from either replica and concurrently, returns the same block.
        let again = join_all((0..50).map(|i| {
            let allocator = replicas[(i + 1) % 2].clone();
            let ns = ns.clone();
            async move {
                allocator
                    .ensure(&ns, &format!("pod-{i}"))
                    .await
                    .expect("allocate again")
            }
        }))
        .await;
        assert_eq!(again, blocks);

        // One object per pod, visible to kubectl, and all are freed by the test.
        let api: Api<RxeBlock> = Api::all(client.clone());
        let selector = format!("{}={ns}", crds::RXE_POD_NAMESPACE_LABEL);
        let objects = api
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items;
        assert_eq!(objects.len(), 50);
        let env = harness::env().await;
        let table = harness::kubectl(&env, &["get", "rxeblocks", "-l", &selector]);
        let text = String::from_utf8_lossy(&table.stdout).to_string();
        assert!(
            text.starts_with("NAME") && text.contains("QPN-START") && text.contains("pod-49"),
            "{text}"
        );
        for block in objects {
            replicas[0].delete(&block).await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn a_namespace_holds_no_more_blocks_than_its_cap_even_when_allocations_race() {
    with_namespace("rxe-cap", |client, ns| async move {
        harness::install_crds(&client).await;
        let ranges = Ranges::default();
        let replicas = [
            Allocator::new(client.clone(), ranges).with_namespace_cap(3),
            Allocator::new(harness::client().await, ranges).with_namespace_cap(3),
        ];
        let outcomes = join_all((0..8).map(|i| {
            let allocator = replicas[i % 2].clone();
            let ns = ns.clone();
            async move { allocator.ensure(&ns, &format!("pod-{i}")).await }
        }))
        .await;
        let api: Api<RxeBlock> = Api::all(client.clone());
        let selector = format!("{}={ns}", crds::RXE_POD_NAMESPACE_LABEL);
        let held = || async {
            api.list(&ListParams::default().labels(&selector))
                .await
                .unwrap()
                .items
        };
        let objects = held().await;
        // The first three created keep their blocks; the cap is never passed.
        assert_eq!(objects.len(), 3, "{outcomes:?}");
        let refused: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert_eq!(refused.len(), 8 - objects.len(), "{outcomes:?}");
        assert!(
            refused.iter().all(|e| e.contains("holds its 3 rxe blocks")),
            "{refused:?}"
        );
        // Not a tenant's race lost for good: once the namespace is below its cap, one more fits;
        // another namespace is not held back meanwhile.
        let other = Allocator::new(client.clone(), ranges).with_namespace_cap(3);
        let elsewhere = format!("{ns}-other");
        let block = other
            .ensure(&elsewhere, "pod-x")
            .await
            .expect("another namespace");
        for b in objects {
            replicas[0].delete(&b).await.unwrap();
        }
        replicas[0]
            .ensure(&ns, "pod-late")
            .await
            .expect("room again");
        assert_eq!(held().await.len(), 1);
        for b in held().await {
            replicas[0].delete(&b).await.unwrap();
        }
        let leftover: Api<RxeBlock> = Api::all(client.clone());
        for b in leftover
            .list(
                &ListParams::default()
                    .labels(&format!("{}={elsewhere}", crds::RXE_POD_NAMESPACE_LABEL)),
            )
            .await
            .unwrap()
            .items
        {
            assert_eq!(b.spec.ranges(), block);
            other.delete(&b).await.unwrap();
        }
    })
    .await;
}
