//! The agent API accepts only mutual-TLS clients that are the operator or a peer agent: no client
//! certificate, a certificate of another CA, or a certificate of the right CA for another name are
//! all refused by the agent, and a peer agent may only stream a checkpoint. The operator's side
//! refuses an agent whose certificate another CA signed, and an agent of the same CA that is not
//! the one of the node it dials.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use agent_api::{
    tls::{TlsMaterial, agent_server_name},
    v1::{CapabilitiesRequest, StepRequest, agent_client::AgentClient},
};
use testkit::{
    fixtures::Certificates,
    harness::{self, with_namespace},
    testagent::TestAgent,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

async fn dial(
    endpoint: std::net::SocketAddr,
    tls: ClientTlsConfig,
) -> Result<AgentClient<tonic::transport::Channel>, String> {
    let channel = Endpoint::from_shared(format!("https://{endpoint}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(AgentClient::new(channel))
}

/// Whether a client with `tls` connects to `endpoint` and is answered a call.
async fn served(endpoint: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<(), String> {
    dial(endpoint, tls)
        .await?
        .capabilities(CapabilitiesRequest {})
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn only_the_operator_and_peer_agents_get_in() {
    with_namespace("agent-tls", |client, ns| async move {
        harness::wait_for_default_service_account(&client, &ns).await;
        let certs = Certificates::generate();
        let node = format!("{ns}-node");
        let agent = TestAgent::start(client.clone(), &ns, &node, &certs.agent(&node)).await;

        // The operator may ask for everything.
        let mut operator = dial(agent.endpoint, certs.operator().client_for(&node))
            .await
            .expect("the operator connects");
        let caps = operator
            .capabilities(CapabilitiesRequest {})
            .await
            .expect("the operator is served");
        assert_eq!(caps.get_ref().node_name, agent.node);

        // A peer agent is authenticated but may not drive migration steps.
        let mut peer = dial(
            agent.endpoint,
            certs.agent("another-node").client_for(&node),
        )
        .await
        .expect("a peer agent connects");
        let refused = peer.abort(StepRequest::default()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

        // Signed by the CA, but neither the operator nor an agent.
        let mut stranger = dial(agent.endpoint, certs.stranger(&node).client_for(&node))
            .await
            .expect("TLS itself succeeds");
        let refused = stranger
            .capabilities(CapabilitiesRequest {})
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

        // No client certificate, or the operator's name signed by another CA: the handshake or
        // the first call fails. Both clients trust the agent's CA, so the refusal is the
        // agent's, never the client distrusting the agent.
        let ca = std::fs::read(certs.operator_dir().join("ca.crt")).unwrap();
        let anonymous = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name(agent_server_name(&node));
        let other_ca = Certificates::generate();
        let read = |file: &str| std::fs::read(other_ca.operator_dir().join(file)).unwrap();
        let foreign = TlsMaterial::from_pem(ca.clone(), read("tls.crt"), read("tls.key"));
        for (what, tls) in [
            ("no certificate", anonymous),
            ("another CA", foreign.client_for(&node)),
        ] {
            let outcome = served(agent.endpoint, tls).await;
            assert!(outcome.is_err(), "a client with {what} was served");
        }

        // An impostor agent (its certificate signed by another CA) is up and serves clients
        // that trust its CA, but the operator, trusting only its own, refuses it.
        let impostor_node = format!("{ns}-impostor");
        let impostor = TestAgent::start(
            client.clone(),
            &ns,
            &impostor_node,
            &other_ca.agent(&impostor_node),
        )
        .await;
        let mut fooled = dial(
            impostor.endpoint,
            other_ca.operator().client_for(&impostor_node),
        )
        .await
        .expect("the impostor serves its own CA's clients");
        fooled
            .capabilities(CapabilitiesRequest {})
            .await
            .expect("the impostor answers its own CA's clients");
        let outcome = served(
            impostor.endpoint,
            certs.operator().client_for(&impostor_node),
        )
        .await;
        assert!(outcome.is_err(), "the operator talked to an impostor agent");

        // An agent of the right CA, but of another node: reached at its address as this node's
        // agent (a Lease that announces another node's endpoint), it is refused by the operator;
        // dialled as its own node's, it is served.
        let neighbour_node = format!("{ns}-neighbour");
        let neighbour =
            TestAgent::start(client, &ns, &neighbour_node, &certs.agent(&neighbour_node)).await;
        let outcome = served(neighbour.endpoint, certs.operator().client_for(&node)).await;
        assert!(
            outcome.is_err(),
            "the agent of {neighbour_node} was taken for the agent of {node}"
        );
        served(
            neighbour.endpoint,
            certs.operator().client_for(&neighbour_node),
        )
        .await
        .expect("the neighbour serves as its own node's agent");
    })
    .await;
}
