//! Following migrations as they go: a watch of each one's namespace, and per migration a line
//! that is a live progress bar on a terminal (indicatif) or plain lines, one per change, when the
//! output is a pipe or a file.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use crds::{Phase, PodMigration};
use futures::{StreamExt, stream};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use crate::view;

/// A migration to follow: namespace and name.
pub type Key = (String, String);

/// How the lines are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A live bar per migration (stdout is a terminal).
    Bars,
    /// A plain line per change.
    Plain,
}

impl Mode {
    /// Bars on a terminal, plain lines otherwise.
    pub fn detect() -> Self {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            Mode::Bars
        } else {
            Mode::Plain
        }
    }
}

/// How a followed migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// It reached a final phase.
    Final(view::Outcome),
    /// It was deleted; the last phase seen before, if any.
    Gone(Option<Phase>),
    /// The wait's time ran out; the phase it was in.
    Waiting(Option<Phase>),
}

/// Lines of the followed migrations.
#[derive(Debug)]
pub struct Display {
    mode: Mode,
    multi: MultiProgress,
    lines: BTreeMap<Key, Line>,
    started: Instant,
}

#[derive(Debug)]
struct Line {
    label: String,
    bar: Option<ProgressBar>,
    last: String,
    /// Bytes moved and when, as last seen: the plain lines' rate and ETA.
    seen: Option<(i64, Instant)>,
}

impl Line {
    /// What a plain line starts with: the label, if any.
    fn prefix(&self) -> String {
        if self.label.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.label)
        }
    }
}

impl Display {
    /// Lines for `keys`, each labelled (empty labels for a single migration).
    pub fn new(mode: Mode, keys: &[(Key, String)]) -> Self {
        let multi = MultiProgress::with_draw_target(match mode {
            Mode::Bars => ProgressDrawTarget::stdout(),
            Mode::Plain => ProgressDrawTarget::hidden(),
        });
        let lines = keys
            .iter()
            .map(|(key, label)| {
                let bar = (mode == Mode::Bars).then(|| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(spinner_style());
                    bar.set_prefix(label.clone());
                    bar.set_message("Pending");
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                let line = Line {
                    label: label.clone(),
                    bar,
                    last: String::new(),
                    seen: None,
                };
                (key.clone(), line)
            })
            .collect();
        Self {
            mode,
            multi,
            lines,
            started: Instant::now(),
        }
    }

    /// Shows `pm` as it is now.
    pub fn update(&mut self, pm: &PodMigration) {
        let key = (pm.namespace().unwrap_or_default(), pm.name_any());
        let elapsed = self.started.elapsed();
        let mode = self.mode;
        let Some(line) = self.lines.get_mut(&key) else {
            return;
        };
        let status = pm.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or_default();
        let done = phase.is_final();
        let text = if done {
            view::summary(pm)
        } else {
            view::state(pm)
        };
        // The bytes that move in this phase, if any: the checkpoint's, or PostCopy's memory.
        let moving = match phase {
            Phase::Transferring => status
                .progress
                .filter(|p| p.bytes_total > 0)
                .map(|p| (p.bytes_transferred, p.bytes_total)),
            Phase::CopyingMemory => status
                .memory
                .as_ref()
                .filter(|m| m.bytes_total > 0)
                .map(|m| (m.bytes_transferred, m.bytes_total)),
            _ => None,
        };
        match (mode, &line.bar) {
            (Mode::Bars, Some(bar)) => {
                if done {
                    bar.set_style(done_style());
                    bar.finish_with_message(text);
                    return;
                }
                match moving {
                    Some((moved, total)) => {
                        if bar.length() != Some(total as u64) {
                            bar.set_style(bytes_style());
                            bar.set_length(total as u64);
                            bar.reset_eta();
                        }
                        bar.set_position(moved.max(0) as u64);
                        bar.set_message(format!("{phase:?}"));
                    }
                    None => {
                        if bar.length().is_some() {
                            bar.set_style(spinner_style());
                            bar.unset_length();
                        }
                        bar.set_message(text);
                    }
                }
            }
            _ => {
                let mut text = text;
                if let Some((moved, total)) = moving {
                    let now = Instant::now();
                    if let Some((before, at)) = line.seen
                        && moved > before
                    {
                        let rate = (moved - before) as f64 / now.duration_since(at).as_secs_f64();
                        let eta = (total - moved) as f64 / rate.max(1.0);
                        text.push_str(&format!(
                            ", {}/s, ETA {}",
                            view::bytes(rate as i64),
                            view::millis((eta * 1000.0) as i64)
                        ));
                    }
                    if line.seen.is_none_or(|(before, _)| moved != before) {
                        line.seen = Some((moved, now));
                    }
                }
                if text != line.last {
                    println!("[{:>5.1}s] {}{text}", elapsed.as_secs_f64(), line.prefix());
                    line.last = text;
                }
            }
        }
    }

    /// Says on `key`'s line that it ended without a final phase (`end`).
    pub fn close(&mut self, key: &Key, end: &End) {
        let Some(line) = self.lines.get_mut(key) else {
            return;
        };
        let text = match end {
            End::Final(_) => return,
            End::Gone(phase) => format!(
                "deleted{}",
                phase.map(|p| format!(" ({p:?})")).unwrap_or_default()
            ),
            End::Waiting(phase) => format!(
                "still {:?} when the wait ended (the migration goes on)",
                phase.unwrap_or_default()
            ),
        };
        match &line.bar {
            Some(bar) => {
                bar.set_style(done_style());
                bar.finish_with_message(text);
            }
            None => {
                println!(
                    "[{:>5.1}s] {}{text}",
                    self.started.elapsed().as_secs_f64(),
                    line.prefix()
                );
            }
        }
    }

    /// Prints a line above the bars (or plainly).
    pub fn println(&self, text: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(text);
            }
            Mode::Plain => println!("{text}"),
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:.bold} {spinner} {msg} {elapsed:.dim}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:.bold} {msg} [{wide_bar:.cyan/blue}] {binary_bytes}/{binary_total_bytes} \
         {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

fn done_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:.bold} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// Follows the migrations `keys` until each has ended (a final phase; with `until_gone`, its
/// deletion), or until `timeout`. Watches each namespace once (one migration: by its name).
pub async fn follow(
    client: &Client,
    display: &mut Display,
    keys: &[Key],
    until_gone: bool,
    timeout: Option<Duration>,
) -> Result<BTreeMap<Key, End>, kube::Error> {
    let mut namespaces: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (ns, name) in keys {
        namespaces.entry(ns).or_default().push(name);
    }
    let watches = namespaces.into_iter().map(|(ns, names)| {
        let api: Api<PodMigration> = Api::namespaced(client.clone(), ns);
        let config = match names.as_slice() {
            [one] => watcher::Config::default().fields(&format!("metadata.name={one}")),
            _ => watcher::Config::default(),
        };
        let ns = ns.to_string();
        watcher(api, config)
            .default_backoff()
            .map(move |event| (ns.clone(), event))
            .boxed()
    });
    let mut events = stream::select_all(watches);
    let mut ends: BTreeMap<Key, End> = BTreeMap::new();
    let mut phases: BTreeMap<Key, Option<Phase>> = BTreeMap::new();
    let mut listed: BTreeSet<Key> = BTreeSet::new();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    while ends.len() < keys.len() {
        let next = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => events.next().await,
        };
        let Some((ns, next)) = next else { break };
        let event = match next {
            Ok(event) => event,
            // The watcher lists and watches again on its own, with back-off, after a dropped
            // connection or an API server restart; a refusal (no permission, no such resource)
            // does not go away, so it ends the wait.
            Err(watcher::Error::InitialListFailed(e))
            | Err(watcher::Error::WatchStartFailed(e))
                if matches!(&e, kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404)) =>
            {
                return Err(e);
            }
            Err(_) => continue,
        };
        let (pm, deleted) = match event {
            watcher::Event::Apply(pm) => (pm, false),
            watcher::Event::InitApply(pm) => {
                listed.insert((pm.namespace().unwrap_or_default(), pm.name_any()));
                (pm, false)
            }
            watcher::Event::Delete(pm) => (pm, true),
            watcher::Event::Init => {
                listed.retain(|(n, _)| *n != ns);
                continue;
            }
            // A (re)list that did not show a migration: it went while nobody watched.
            watcher::Event::InitDone => {
                for key in keys.iter().filter(|(n, _)| *n == ns) {
                    if !listed.contains(key) && !ends.contains_key(key) {
                        let end = End::Gone(phases.get(key).copied().flatten());
                        display.close(key, &end);
                        ends.insert(key.clone(), end);
                    }
                }
                continue;
            }
        };
        let key = (pm.namespace().unwrap_or_default(), pm.name_any());
        if !keys.contains(&key) || ends.contains_key(&key) {
            continue;
        }
        display.update(&pm);
        let phase = pm.status.as_ref().and_then(|s| s.phase);
        phases.insert(key.clone(), phase);
        if deleted {
            let end = End::Gone(phase);
            display.close(&key, &end);
            ends.insert(key, end);
        } else if !until_gone && let Some(outcome) = view::Outcome::of(&pm) {
            ends.insert(key, End::Final(outcome));
        }
    }
    for key in keys {
        if !ends.contains_key(key) {
            let end = End::Waiting(phases.get(key).copied().flatten());
            display.close(key, &end);
            ends.insert(key.clone(), end);
        }
    }
    Ok(ends)
}
