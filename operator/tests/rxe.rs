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
