//! Whether the nodes of a migration can do the strategy it asks for, pure: each agent reports what
//! its node offers the strategies beyond stop-and-copy and what it lacks
//! (`NodeCapabilities.strategies`, docs/node-agent.md#strategy-requirements); the source and a
//! target must both have what the strategy needs.

use agent_api::v1::NodeCapabilities;
use crds::Strategy;

/// What the node of `agent` lacks for `strategy`, in words, if anything. Every agent does
/// stop-and-copy; an agent that does not report the strategy at all is an older one.
pub fn lacks(strategy: Strategy, agent: &NodeCapabilities) -> Option<String> {
    if strategy == Strategy::StopAndCopy {
        return None;
    }
    let name = strategy.as_str();
    match agent.strategies.iter().find(|s| s.name == name) {
        Some(s) if s.met => None,
        Some(s) if s.missing.is_empty() => Some(format!("its agent says it cannot do {name}")),
        Some(s) => Some(s.missing.clone()),
        None => Some(format!(
            "its agent does not report what {name} needs (an agent older than the operator)"
        )),
    }
}

/// A node as the check sees it: its name and what its agent reported (`None`: no live agent, or
/// it did not answer).
pub type Node<'a> = (&'a str, Option<&'a NodeCapabilities>);

/// Whether `strategy` can run from `source` to one of `targets` (the named target, or every node
/// the operator could choose); otherwise why not, per node.
pub fn support(strategy: Strategy, source: Node<'_>, targets: &[Node<'_>]) -> Result<(), String> {
    let name = strategy.as_str();
    let why = |node: Node<'_>| match node.1 {
        None => Some("has no kube-migros agent that answers".to_string()),
        Some(agent) => lacks(strategy, agent),
    };
    if strategy == Strategy::StopAndCopy {
        return Ok(());
    }
    if let Some(missing) = why(source) {
        return Err(format!(
            "source node {} cannot do {name}: {missing}",
            source.0
        ));
    }
    let unfit: Vec<(&str, String)> = targets
        .iter()
        .filter_map(|t| why(*t).map(|missing| (t.0, missing)))
        .collect();
    if targets.is_empty() {
        return Err(format!("no node other than the source can do {name}"));
    }
    match unfit.as_slice() {
        _ if unfit.len() < targets.len() => Ok(()),
        [(node, missing)] => Err(format!("target node {node} cannot do {name}: {missing}")),
        all => Err(format!(
            "no node can do {name}: {}",
            all.iter()
                .map(|(node, missing)| format!("{node}: {missing}"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use agent_api::v1::StrategyRequirements;

    use super::*;

    fn agent(post_copy: Option<(bool, &str)>) -> NodeCapabilities {
        NodeCapabilities {
            strategies: post_copy
                .into_iter()
                .map(|(met, missing)| StrategyRequirements {
                    name: "PostCopy".into(),
                    met,
                    missing: missing.into(),
                })
                .collect(),
            ..NodeCapabilities::default()
        }
    }

    #[test]
    fn stop_and_copy_needs_nothing_reported() {
        let old = agent(None);
        assert_eq!(lacks(Strategy::StopAndCopy, &old), None);
        assert_eq!(
            support(Strategy::StopAndCopy, ("a", None), &[("b", None)]),
            Ok(())
        );
    }

    #[test]
    fn what_an_agent_lacks_is_said_as_it_said_it() {
        let able = agent(Some((true, "")));
        let small_pipe = agent(Some((false, "fs.pipe-max-size is 1048576 bytes")));
        let old = agent(None);
        assert_eq!(lacks(Strategy::PostCopy, &able), None);
        assert_eq!(
            lacks(Strategy::PostCopy, &small_pipe).as_deref(),
            Some("fs.pipe-max-size is 1048576 bytes")
        );
        assert!(lacks(Strategy::PostCopy, &old).unwrap().contains("older"));
        // Reported for PostCopy only: PreCopy is not known to this agent.
        assert!(lacks(Strategy::PreCopy, &able).is_some());
    }

    #[test]
    fn both_ends_must_have_it() {
        let able = agent(Some((true, "")));
        let unable = agent(Some((false, "userfaultfd: this kernel has none")));
        let s = Strategy::PostCopy;
        assert_eq!(
            support(s, ("a", Some(&able)), &[("b", Some(&able))]),
            Ok(())
        );
        assert_eq!(
            support(s, ("a", Some(&unable)), &[("b", Some(&able))]),
            Err("source node a cannot do PostCopy: userfaultfd: this kernel has none".into())
        );
        assert_eq!(
            support(s, ("a", Some(&able)), &[("b", Some(&unable))]),
            Err("target node b cannot do PostCopy: userfaultfd: this kernel has none".into())
        );
        assert_eq!(
            support(s, ("a", Some(&able)), &[("b", Some(&unable)), ("c", None)]),
            Err(
                "no node can do PostCopy: b: userfaultfd: this kernel has none; c: has no \
                 kube-migros agent that answers"
                    .into()
            )
        );
        // One able node among the candidates is enough.
        assert_eq!(
            support(
                s,
                ("a", Some(&able)),
                &[("b", Some(&unable)), ("c", Some(&able))]
            ),
            Ok(())
        );
        assert!(support(s, ("a", Some(&able)), &[]).is_err());
    }
}
