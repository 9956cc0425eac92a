//! Leader election with a coordination.k8s.io Lease: of several operator replicas only the holder
//! of the Lease reconciles. The holder renews it; a replica takes it over when it expired. Every
//! write of the Lease is guarded by its resourceVersion, so two replicas never both win.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tracing::{info, warn};

/// Timing of the election.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease stays valid after its last renewal.
    pub lease: Duration,
    /// The holder gives up leading when it could not renew for this long, which is shorter than
    /// `lease`: it has stopped acting before another replica may take the Lease over.
    pub renew_deadline: Duration,
    /// How often the holder renews, and a candidate retries.
    pub retry: Duration,
}

impl Timing {
    /// The timing for a Lease of `lease` renewed every `retry`: the renew deadline is two thirds
    /// of the Lease (client-go's 15 s / 10 s), at least one renewal attempt long.
    pub fn new(lease: Duration, retry: Duration) -> Self {
        Self {
            lease,
            renew_deadline: (lease * 2 / 3).max(retry),
            retry,
        }
    }

    /// Whether a holder surely stops before its Lease can be taken over.
    pub fn fenced(&self) -> bool {
        self.renew_deadline < self.lease && self.retry < self.renew_deadline
    }
}

/// One replica's view of the election.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timing,
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(false) if !announced => {
                    info!(lease = %self.name, "another replica leads; standing by");
                    announced = true;
                }
                Ok(false) => {}
                Err(e) => warn!(lease = %self.name, error = %e, "leader election failed; retrying"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the Lease until it cannot be renewed within the renew deadline (or it was taken
    /// over); returns then, before the Lease expires for the other replicas. An attempt that hangs
    /// counts as failed once the deadline passes.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let left = self
                .timing
                .renew_deadline
                .saturating_sub(last_renewal.elapsed());
            // A renewal counts from before it was sent: the Lease's renewTime is taken then, and
            // the other replicas count the Lease's duration from it.
            let attempt = tokio::time::Instant::now();
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = attempt,
                Ok(Ok(false)) => {
                    warn!(lease = %self.name, "the Lease was taken over");
                    return;
                }
                Ok(Err(e)) if last_renewal.elapsed() >= self.timing.renew_deadline => {
                    warn!(lease = %self.name, error = %e, "could not renew the Lease before the renew deadline");
                    return;
                }
                Ok(Err(e)) => {
                    warn!(lease = %self.name, error = %e, "renewing the Lease failed; retrying")
                }
                Err(_) => {
                    warn!(lease = %self.name, "no renewal of the Lease before the renew deadline");
                    return;
                }
            }
        }
    }

    /// Gives the Lease up so that a standby takes over at once (on shutdown).
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                if let Err(e) = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    warn!(lease = %self.name, error = %e, "could not release the Lease");
                }
            }
        }
    }

    /// True when this replica holds the Lease after the attempt.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let duration = i32::try_from(self.timing.lease.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, duration, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        if !ours && !expired(&spec, now) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(now, duration, acquired, transitions));
        // `replace` carries the resourceVersion read above: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn spec(
        &self,
        now: Timestamp,
        duration: i32,
        acquired: Option<MicroTime>,
        transitions: i32,
    ) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(duration),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

/// A Lease without holder or renewal, or renewed longer ago than its duration, is free.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    let (Some(renewed), false) = (spec.renew_time.as_ref(), holder.is_empty()) else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed
        .0
        .checked_add(duration)
        .is_ok_and(|until| until <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed_secs_ago: Option<i64>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: renewed_secs_ago
                .map(|s| MicroTime(Timestamp::now() - SignedDuration::from_secs(s))),
            lease_duration_seconds: Some(10),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_free_when_released_or_not_renewed_in_time() {
        let now = Timestamp::now();
        assert!(!expired(&spec(Some("a"), Some(3)), now));
        assert!(expired(&spec(Some("a"), Some(11)), now));
        assert!(expired(&spec(None, Some(1)), now));
        assert!(expired(&spec(Some("a"), None), now));
    }

    #[test]
    fn a_holder_stops_before_its_lease_can_be_taken_over() {
        let t = Timing::new(Duration::from_secs(15), Duration::from_secs(2));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert!(t.fenced());
        let short = Timing::new(Duration::from_secs(4), Duration::from_secs(1));
        assert!(short.renew_deadline < short.lease && short.fenced());
        let equal = Timing {
            renew_deadline: Duration::from_secs(15),
            ..t
        };
        assert!(
            !equal.fenced(),
            "a deadline as long as the Lease fences nothing"
        );
        let too_fast = Timing::new(Duration::from_secs(3), Duration::from_secs(2));
        assert!(!too_fast.fenced(), "no renewal fits before the deadline");
    }
}
