//! The agent API accepts only mutual-TLS clients that are the operator or a peer agent: no client
//! certificate, a certificate of another CA, or a certificate of the right CA for another name are
//! all refused by the agent, and a peer agent may only stream a checkpoint. The operator's side
//! refuses an agent whose certificate another CA signed.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use agent_api::{
    tls::{AGENT_SERVER_NAME, TlsMaterial},
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
        let agent =
            TestAgent::start(client.clone(), &ns, &format!("{ns}-node"), &certs.agent()).await;

        // The operator may ask for everything.
        let mut operator = dial(agent.endpoint, certs.operator().client())
            .await
            .expect("the operator connects");
        let caps = operator
            .capabilities(CapabilitiesRequest {})
            .await
            .expect("the operator is served");
        assert_eq!(caps.get_ref().node_name, agent.node);

        // A peer agent is authenticated but may not drive migration steps.
        let mut peer = dial(agent.endpoint, certs.agent().client())
            .await
            .expect("a peer agent connects");
        let refused = peer.abort(StepRequest::default()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

        // Signed by the CA, but neither the operator nor an agent.
        let mut stranger = dial(agent.endpoint, certs.stranger().client())
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
            .domain_name(AGENT_SERVER_NAME);
        let other_ca = Certificates::generate();
        let read = |file: &str| std::fs::read(other_ca.operator_dir().join(file)).unwrap();
        let foreign = TlsMaterial::from_pem(ca.clone(), read("tls.crt"), read("tls.key"));
        for (what, tls) in [
            ("no certificate", anonymous),
            ("another CA", foreign.client()),
        ] {
            let outcome = served(agent.endpoint, tls).await;
            assert!(outcome.is_err(), "a client with {what} was served");
        }

        // An impostor agent (its certificate signed by another CA) is up and serves clients
        // that trust its CA, but the operator, trusting only its own, refuses it.
        let impostor =
            TestAgent::start(client, &ns, &format!("{ns}-impostor"), &other_ca.agent()).await;
        let mut fooled = dial(impostor.endpoint, other_ca.operator().client())
            .await
            .expect("the impostor serves its own CA's clients");
        fooled
            .capabilities(CapabilitiesRequest {})
            .await
            .expect("the impostor answers its own CA's clients");
        let outcome = served(impostor.endpoint, certs.operator().client()).await;
        assert!(outcome.is_err(), "the operator talked to an impostor agent");
    })
    .await;
}
