//! Taint tracking: what came in from outside is remembered, by fingerprint, per
//! agent, so that a later op whose args carry it is labelled with where it came
//! from.
//!
//! Fingerprints of untrusted content: the host and port of every URL, domain
//! names, e-mail addresses, paths, and tokens of at least [`MIN_TOKEN`]
//! characters (keys, ids, long words), so that common short fragments (`127`,
//! `0`, `the`) taint nothing. A URL in an op's args matches at the level of its
//! host and port, or a bare domain name that was seen. Tables are bounded per
//! agent ([`MAX_PER_AGENT`]) and in all ([`MAX_AGENTS`] agents); what is evicted
//! to stay within them is counted.

use bbx_core::{AgentId, OpId};
use serde::Serialize;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// The shortest token that is remembered.
pub const MIN_TOKEN: usize = 12;
/// Fingerprints one agent keeps at most; the oldest go first.
pub const MAX_PER_AGENT: usize = 100_000;
/// Scopes (agents, and their runs) with fingerprints at most; the first
/// tainted goes first.
pub const MAX_AGENTS: usize = 10_000;
/// Runs of one agent with fingerprints at most; its oldest goes first.
pub const MAX_RUNS_PER_AGENT: usize = 64;
/// Token fingerprints taken from one output at most.
const MAX_PER_OUTPUT: usize = 10_000;
/// Fingerprints of all agents together at most; past it, the least recently
/// tainted agent's go.
pub const MAX_TOTAL: usize = 2_000_000;

/// One tainted arg: where in the args (a JSON pointer) and which op brought the
/// content in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tainted {
    pub path: String,
    pub source: OpId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    HostPort,
    Domain,
    Email,
    Path,
    Token,
}

/// One fingerprint: its hash, and for a URL the hash of its host as a bare domain
/// (which a URL's host also matches).
#[derive(Debug, Clone, Copy)]
struct Print {
    kind: Kind,
    hash: u64,
    domain: Option<u64>,
}

/// The hash of `text` as `kind`, case-insensitive, with no allocation.
fn hash(kind: Kind, text: &str, port: Option<u16>) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    kind.hash(&mut hasher);
    for byte in text.bytes() {
        hasher.write_u8(byte.to_ascii_lowercase());
    }
    if let Some(port) = port {
        hasher.write_u16(port);
    }
    hasher.finish()
}

/// Calls `sink` with each fingerprint of `text`.
fn fingerprints(text: &str, mut sink: impl FnMut(Print)) {
    // A whole value that is one URL is read as the client reads it: with tabs and
    // newlines inside removed, which splitting into words would not see.
    if text.contains("://") && text.contains(['\t', '\n', '\r']) {
        let joined: String = text
            .trim()
            .chars()
            .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
            .collect();
        if !joined.contains(' ')
            && let Some((host, port)) = url_host_port(&joined)
        {
            sink(Print {
                kind: Kind::HostPort,
                hash: hash(Kind::HostPort, &host, Some(port)),
                domain: Some(hash(Kind::Domain, &host, None)),
            });
        }
    }
    let separators = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '(' | ')' | ',' | ';' | '`');
    for word in text.split(separators) {
        // The shortest fingerprint is a domain like `a.bc`; a word of no dot, `@`,
        // `/` or `:` is at most a token, which is long.
        if word.len() < 4 {
            continue;
        }
        let marked = word.bytes().any(|b| matches!(b, b'.' | b'@' | b'/' | b':'));
        if !marked && word.len() < MIN_TOKEN {
            continue;
        }
        let word = word.trim_matches(|c: char| matches!(c, '.' | ':' | '!' | '?' | '[' | ']' | '{' | '}'));
        if let Some((host, port)) = url_host_port(word) {
            sink(Print {
                kind: Kind::HostPort,
                hash: hash(Kind::HostPort, &host, Some(port)),
                domain: Some(hash(Kind::Domain, &host, None)),
            });
        } else if let Some((user, domain)) = word.split_once('@')
            && !user.is_empty()
            && is_domain(domain)
        {
            sink(Print {
                kind: Kind::Email,
                hash: hash(Kind::Email, word, None),
                domain: None,
            });
        } else if is_domain(word) {
            sink(Print {
                kind: Kind::Domain,
                hash: hash(Kind::Domain, word, None),
                domain: None,
            });
        } else if (word.starts_with('/') || word.starts_with("~/")) && word.matches('/').count() >= 2 {
            sink(Print {
                kind: Kind::Path,
                hash: hash(Kind::Path, word, None),
                domain: None,
            });
        } else if word.len() >= MIN_TOKEN
            && word
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'/' | b'=' | b'.'))
        {
            sink(Print {
                kind: Kind::Token,
                hash: hash(Kind::Token, word, None),
                domain: None,
            });
        }
    }
}

/// The host and port of a URL, as the HTTP client will read it: parsed by the
/// URL standard (so `\\`, `%65`, a trailing dot, `:` with no port, numeric IPv4
/// and tabs inside are what the request would use), lower-cased, without a
/// trailing dot, with the scheme's default port if none is given.
fn url_host_port(word: &str) -> Option<(String, u16)> {
    // JSON inside HTML escapes `/` as `\/`.
    let unescaped;
    let word = if word.contains("\\/") {
        unescaped = word.replace("\\/", "/");
        unescaped.as_str()
    } else {
        word
    };
    let start = word.find("://")?;
    let scheme_start = word[..start]
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |i| i + 1);
    let url = url::Url::parse(&word[scheme_start..]).ok()?;
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    let port = url.port_or_known_default()?;
    (!host.is_empty()).then_some((host, port))
}

/// A domain name: labels of letters, digits and `-` joined by dots, the last of
/// letters only (so no bare number, no version string).
fn is_domain(word: &str) -> bool {
    let mut labels = 0;
    let mut last = "";
    for label in word.split('.') {
        if label.is_empty() || label.len() > 63 || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return false;
        }
        labels += 1;
        last = label;
    }
    labels >= 2 && last.len() >= 2 && last.bytes().all(|b| b.is_ascii_alphabetic())
}

/// Every string of `value` with its JSON pointer.
fn strings<'a>(value: &'a Value, path: &mut String, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(s) => out.push((path.clone(), s)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                strings(item, path, out);
                path.truncate(len);
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields {
                let len = path.len();
                path.push('/');
                path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                strings(field, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Where untrusted content is remembered: an agent's ops of one run, or its ops
/// outside any run. An op of a run sees its run's and the agent's own; an op
/// outside runs sees all of the agent's. Run ids are the harness's (a workflow's),
/// not the model's: a run keeps another run's content from tainting it, which is
/// only as strong as the agent's harness keeping the model from choosing runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope {
    pub agent: AgentId,
    /// The run's name hashed; 0 outside any run.
    run: u64,
}

impl Scope {
    pub fn new(agent: AgentId, run: Option<&str>) -> Self {
        let run = run.map_or(0, |run| {
            let mut hasher = rustc_hash::FxHasher::default();
            run.hash(&mut hasher);
            hasher.finish().max(1)
        });
        Self { agent, run }
    }
}

impl From<AgentId> for Scope {
    fn from(agent: AgentId) -> Self {
        Self::new(agent, None)
    }
}

#[derive(Default)]
struct AgentTable {
    sources: HashMap<u64, OpId>,
    order: VecDeque<u64>,
}

/// The fingerprints of every agent's untrusted content.
#[derive(Default)]
pub struct Taints {
    tables: parking_lot::RwLock<Tables>,
    evicted: AtomicU64,
    recorded: AtomicU64,
}

#[derive(Default)]
struct Tables {
    agents: HashMap<Scope, AgentTable>,
    /// Scopes in the order they were first tainted, for eviction.
    order: VecDeque<Scope>,
    /// Each agent's scopes (their runs), the oldest first.
    runs: HashMap<AgentId, Vec<u64>>,
    /// Fingerprints of all agents.
    total: usize,
}

impl Tables {
    /// Drops the scope first tainted (but `keep`): false if there is none.
    fn evict_oldest(&mut self, keep: &Scope, evicted: &AtomicU64) -> bool {
        let Some(&oldest) = self.order.iter().find(|a| *a != keep) else {
            return false;
        };
        self.remove(oldest, evicted);
        true
    }

    fn remove(&mut self, scope: Scope, evicted: &AtomicU64) {
        self.order.retain(|s| *s != scope);
        if let Some(runs) = self.runs.get_mut(&scope.agent) {
            runs.retain(|run| *run != scope.run);
            if runs.is_empty() {
                self.runs.remove(&scope.agent);
            }
        }
        if let Some(table) = self.agents.remove(&scope) {
            self.total -= table.sources.len();
            evicted.fetch_add(table.sources.len() as u64, Ordering::Relaxed);
        }
    }

    /// Makes room for a new scope: within [`MAX_AGENTS`] scopes in all, and
    /// [`MAX_RUNS_PER_AGENT`] for its agent (whose oldest run goes first, so that
    /// an agent naming many runs evicts only its own).
    fn make_room(&mut self, scope: Scope, evicted: &AtomicU64) {
        let own = self.runs.get(&scope.agent).map_or(0, Vec::len);
        if own >= MAX_RUNS_PER_AGENT
            && let Some(&oldest) = self.runs[&scope.agent].iter().find(|run| **run != scope.run)
        {
            self.remove(Scope { run: oldest, ..scope }, evicted);
        }
        while self.agents.len() >= MAX_AGENTS && self.evict_oldest(&scope, evicted) {}
        self.order.push_back(scope);
        self.runs.entry(scope.agent).or_default().push(scope.run);
    }
}

/// What the tables hold, for `flow.stats`.
#[derive(Debug, Clone, Serialize)]
pub struct TaintStats {
    pub agents: usize,
    pub fingerprints: usize,
    pub recorded: u64,
    pub evicted: u64,
}

impl Taints {
    /// Remembers the fingerprints of `output` (every string in it) as brought in
    /// by `source`, an op in `agent`'s scope.
    pub fn record(&self, agent: impl Into<Scope>, source: OpId, output: &Value) {
        let agent = agent.into();
        let mut texts = Vec::new();
        strings(output, &mut String::new(), &mut texts);
        // Tokens are capped per output; hosts, domains, e-mails and paths are not,
        // so padding a page with tokens cannot push its address out.
        let mut found = Vec::new();
        let mut tokens = 0;
        for (_, text) in texts {
            fingerprints(text, |print| {
                if print.kind != Kind::Token {
                    found.push(print.hash);
                } else if tokens < MAX_PER_OUTPUT {
                    tokens += 1;
                    found.push(print.hash);
                }
            });
        }
        if found.is_empty() {
            return;
        }
        let mut tables = self.tables.write();
        if !tables.agents.contains_key(&agent) {
            tables.make_room(agent, &self.evicted);
        }
        let room = found.len().min(MAX_PER_AGENT);
        while tables.total + room > MAX_TOTAL && tables.evict_oldest(&agent, &self.evicted) {}
        let Tables { agents, total, .. } = &mut *tables;
        let table = agents.entry(agent).or_default();
        for print in found {
            if table.sources.insert(print, source).is_none() {
                table.order.push_back(print);
                *total += 1;
                self.recorded.fetch_add(1, Ordering::Relaxed);
            }
            while table.order.len() > MAX_PER_AGENT {
                if let Some(old) = table.order.pop_front()
                    && table.sources.remove(&old).is_some()
                {
                    *total -= 1;
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The args of an op in `scope` that carry untrusted content, each with the
    /// op that brought it in.
    pub fn tainted(&self, scope: impl Into<Scope>, args: &Value) -> Vec<Tainted> {
        let scope = scope.into();
        let tables = self.tables.read();
        // A run's op sees its run and the agent's ops outside runs; an op outside
        // runs sees every run's (a run cannot hide what it read from the agent).
        let runs: &[u64] = if scope.run == 0 {
            tables.runs.get(&scope.agent).map_or(&[], Vec::as_slice)
        } else {
            &[scope.run, 0]
        };
        let tables: Vec<&AgentTable> = runs
            .iter()
            .filter_map(|&run| tables.agents.get(&Scope { run, ..scope }))
            .collect();
        if tables.is_empty() {
            return Vec::new();
        }
        let mut texts = Vec::new();
        strings(args, &mut String::new(), &mut texts);
        let mut out = Vec::new();
        for (path, text) in texts {
            let mut source = None;
            fingerprints(text, |print| {
                for table in &tables {
                    let seen = || print.domain.and_then(|domain| table.sources.get(&domain));
                    if source.is_none() {
                        source = table.sources.get(&print.hash).or_else(seen).copied();
                    }
                }
            });
            if let Some(source) = source {
                out.push(Tainted { path, source });
            }
        }
        out
    }

    /// Forgets `value`'s fingerprints for `agent`, in all its scopes (an
    /// operator declassified it): how many were forgotten.
    pub fn declassify(&self, agent: &AgentId, value: &str) -> usize {
        let mut found = Vec::new();
        fingerprints(value, |print| found.push(print.hash));
        let mut tables = self.tables.write();
        let Tables { agents, total, .. } = &mut *tables;
        let mut count = 0;
        for (_, table) in agents.iter_mut().filter(|(scope, _)| scope.agent == *agent) {
            let forgotten: Vec<u64> = found
                .iter()
                .copied()
                .filter(|print| table.sources.remove(print).is_some())
                .collect();
            // Out of the eviction order too, or a print recorded again later would
            // be evicted by its forgotten place.
            table.order.retain(|print| !forgotten.contains(print));
            *total -= forgotten.len();
            count += forgotten.len();
        }
        count
    }

    pub fn forget_agent(&self, agent: &AgentId) {
        let mut tables = self.tables.write();
        let runs = tables.runs.get(agent).cloned().unwrap_or_default();
        let forgotten = AtomicU64::new(0);
        for run in runs {
            tables.remove(Scope { agent: *agent, run }, &forgotten);
        }
    }

    pub fn stats(&self) -> TaintStats {
        let tables = self.tables.read();
        TaintStats {
            agents: tables.agents.len(),
            fingerprints: tables.total,
            recorded: self.recorded.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
