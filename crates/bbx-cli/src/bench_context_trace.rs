//! Access traces of long multi-tool agent sessions, for `bbx bench context`:
//! a generator that mimics how an agent works (a pinned system prompt and a
//! task it keeps going back to; turns of user and assistant messages; tool
//! results read right after they arrive and rarely again; notes consulted
//! throughout; documents read in bursts while a subtask is active, each
//! followed by its note), with facts planted in tool results and messages and
//! asked for many turns later.

use bbx_context::item::{Kind, Role};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What happens in a session, in order.
#[derive(Debug, Clone)]
pub enum Event {
    Put(Put),
    /// The agent reads an item again (by its place, from 1).
    Get(u64),
    /// The turn ends: a model call needs a window now. `needs` names facts
    /// the turn asks about.
    Turn {
        needs: Vec<usize>,
    },
}

#[derive(Debug, Clone)]
pub struct Put {
    pub kind: Kind,
    pub role: Role,
    pub text: String,
    pub pinned: bool,
    pub refs: Vec<u64>,
}

/// A fact planted in an item: the sentence that states it.
#[derive(Debug, Clone)]
pub struct Fact {
    pub sentence: String,
}

pub struct Session {
    pub events: Vec<Event>,
    pub facts: Vec<Fact>,
}

const WORDS: &[&str] = &[
    "agent", "result", "request", "service", "error", "config", "deploy", "cluster", "query", "table", "user",
    "report", "latency", "cache", "build", "module", "branch", "review", "metric", "schema", "endpoint", "token",
    "retry", "queue", "worker", "index", "backup", "release", "feature", "test", "the", "a", "of", "to", "and", "in",
    "is", "was", "for", "with", "that", "on", "from", "after", "before", "which", "then", "when",
];

/// About `words` (a range) words of prose.
fn prose(rng: &mut StdRng, words: std::ops::Range<usize>) -> String {
    let words = rng.random_range(words);
    let mut out = String::with_capacity(words * 7);
    for i in 0..words {
        if i > 0 {
            out.push(if i % 14 == 0 { '.' } else { ' ' });
            if i % 14 == 0 {
                out.push(' ');
            }
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out.push('.');
    out
}

/// What kind of thing an item is, for how the agent goes back to it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    System,
    Task,
    Message,
    ToolResult,
    Note,
    Document,
}

struct Known {
    class: Class,
    turn: usize,
    /// The note written about it, for a document.
    note: Option<u64>,
}

/// A session of `turns` turns.
pub fn session(seed: u64, turns: usize) -> Session {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    let mut facts: Vec<Fact> = Vec::new();
    let mut fact_turns: Vec<usize> = Vec::new();
    let mut known: Vec<Known> = Vec::new();
    let put = |events: &mut Vec<Event>, known: &mut Vec<Known>, class: Class, turn: usize, put: Put| {
        events.push(Event::Put(put));
        known.push(Known {
            class,
            turn,
            note: None,
        });
        known.len() as u64
    };
    let item = |kind, role, text: String| Put {
        kind,
        role,
        text,
        pinned: false,
        refs: Vec::new(),
    };
    let system = Put {
        pinned: true,
        ..item(
            Kind::Message,
            Role::System,
            format!("You are a meticulous operations agent. {}", prose(&mut rng, 60..61)),
        )
    };
    put(&mut events, &mut known, Class::System, 0, system);
    let task = prose(&mut rng, 120..121);
    put(
        &mut events,
        &mut known,
        Class::Task,
        0,
        item(Kind::Message, Role::User, task),
    );
    for turn in 1..=turns {
        let mut needs = Vec::new();
        // Facts asked about: planted at least 20 turns before.
        if turn % 7 == 0 {
            let old: Vec<usize> = (0..facts.len()).filter(|f| fact_turns[*f] + 20 <= turn).collect();
            if !old.is_empty() {
                needs.push(old[rng.random_range(0..old.len())]);
            }
        }
        let mut user = prose(&mut rng, 20..80);
        if rng.random_bool(0.15) {
            let fact = planted(&mut rng, facts.len());
            user.push(' ');
            user.push_str(&fact.sentence);
            facts.push(fact);
            fact_turns.push(turn);
        }
        put(
            &mut events,
            &mut known,
            Class::Message,
            turn,
            item(Kind::Message, Role::User, user),
        );
        let plan = prose(&mut rng, 30..90);
        put(
            &mut events,
            &mut known,
            Class::Message,
            turn,
            item(Kind::Message, Role::Assistant, plan),
        );
        for _ in 0..rng.random_range(1..=3) {
            let mut result = prose(&mut rng, 150..1200);
            if rng.random_bool(0.2) {
                let fact = planted(&mut rng, facts.len());
                let at = result.len() / 2;
                let at = result[..at].rfind(". ").map_or(0, |i| i + 2);
                result.insert_str(at, &format!("{} ", fact.sentence));
                facts.push(fact);
                fact_turns.push(turn);
            }
            let id = put(
                &mut events,
                &mut known,
                Class::ToolResult,
                turn,
                item(Kind::ToolResult, Role::Tool, result),
            );
            if rng.random_bool(0.25) {
                let note = Put {
                    refs: vec![id],
                    ..item(Kind::Note, Role::Assistant, prose(&mut rng, 15..40))
                };
                put(&mut events, &mut known, Class::Note, turn, note);
            }
        }
        if rng.random_bool(0.08) {
            let doc = put(
                &mut events,
                &mut known,
                Class::Document,
                turn,
                item(Kind::Document, Role::User, prose(&mut rng, 600..2500)),
            );
            let note = Put {
                refs: vec![doc],
                ..item(Kind::Note, Role::Assistant, prose(&mut rng, 30..31))
            };
            let note = put(&mut events, &mut known, Class::Note, turn, note);
            known[doc as usize - 1].note = Some(note);
        }
        // The agent goes back to what it knows.
        let mut gets = Vec::new();
        for (i, k) in known.iter().enumerate() {
            let age = turn - k.turn;
            let p = match k.class {
                Class::System => 0.0,
                Class::Task => {
                    if turn % 25 == 0 {
                        1.0
                    } else {
                        0.01
                    }
                }
                Class::Note => 0.06,
                Class::Document if age <= 40 => 0.2,
                Class::Document => 0.01,
                Class::ToolResult if age <= 2 => 0.45,
                Class::ToolResult => 0.002,
                Class::Message if age <= 5 => 0.04,
                Class::Message => 0.001,
            };
            if rng.random_bool(p) {
                gets.push(i as u64 + 1);
                if let Some(note) = k.note.filter(|_| rng.random_bool(0.7)) {
                    gets.push(note);
                }
            }
        }
        events.extend(gets.into_iter().map(Event::Get));
        // The window is assembled before the agent goes back to what the turn
        // asks about: an item read just before would be recent, and kept.
        let asked: Vec<u64> = needs.iter().map(|fact| fact_item(&events, &facts[*fact])).collect();
        events.push(Event::Turn { needs });
        events.extend(asked.into_iter().map(Event::Get));
    }
    Session { events, facts }
}

fn planted(rng: &mut StdRng, n: usize) -> Fact {
    let things = [
        "invoice", "ticket", "account", "host", "customer", "contract", "build", "region",
    ];
    let thing = things[rng.random_range(0..things.len())];
    Fact {
        sentence: format!(
            "The {thing} code for case {n} is Q{}-{}.",
            rng.random_range(100..999),
            n
        ),
    }
}

/// The item that states a fact.
fn fact_item(events: &[Event], fact: &Fact) -> u64 {
    let mut id = 0;
    for event in events {
        if let Event::Put(put) = event {
            id += 1;
            if put.text.contains(&fact.sentence) {
                return id;
            }
        }
    }
    id
}
