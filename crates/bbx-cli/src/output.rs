//! Printing results: JSON for `--json`, short human text otherwise.

use bbx_core::model::{Agent, ApiKeyInfo, StateEntry};
use bbx_core::op::{BreakerInfo, Completion, RingStats, WalStatus};
use bbx_core::quota::{CgroupStatus, GpuStatus, QuotaInfo};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

pub fn json<T: Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("API types serialize"));
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(NOTHING).set_header(header.to_vec());
    table
}

pub fn agents(agents: &[Agent], next_cursor: Option<&str>) {
    let mut t = table(&["ID", "NAME", "TENANT", "STATUS", "LABELS", "CREATED"]);
    for a in agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.add_row(vec![
            a.id.to_string(),
            a.name.clone(),
            a.tenant.clone(),
            format!("{:?}", a.status).to_lowercase(),
            labels.join(","),
            a.created_at.to_rfc3339(),
        ]);
    }
    println!("{t}");
    more(next_cursor);
}

pub fn agent(a: &Agent) {
    agents(std::slice::from_ref(a), None);
}

pub fn entries(entries: &[StateEntry], next_cursor: Option<&str>) {
    let mut t = table(&["KEY", "VERSION", "VALUE"]);
    for e in entries {
        let mut value = e.value.to_string();
        if value.chars().count() > 60 {
            value = value.chars().take(57).collect::<String>() + "...";
        }
        t.add_row(vec![e.key.clone(), e.version.to_string(), value]);
    }
    println!("{t}");
    more(next_cursor);
}

pub fn keys(keys: &[ApiKeyInfo]) {
    let mut t = table(&["ID", "NAME", "TENANT", "CREATED", "REVOKED"]);
    for k in keys {
        t.add_row(vec![
            k.id.to_string(),
            k.name.clone(),
            k.tenant.clone().unwrap_or_else(|| "(admin)".into()),
            k.created_at.to_rfc3339(),
            k.revoked_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

fn more(next_cursor: Option<&str>) {
    if let Some(cursor) = next_cursor {
        println!("more: --cursor {cursor}");
    }
}

pub fn completion(c: &Completion) {
    println!("{} {} {}", c.op_id, c.kind, c.status.as_str());
    if let Some(result) = &c.result {
        println!("  result   {result}");
    }
    if let Some(error) = &c.error {
        println!("  error    {} [{}]", error.message, error.code.as_str());
    }
    println!(
        "  attempts {}, queued {} us, ran {} us, total {} us",
        c.attempts, c.queue_us, c.exec_us, c.total_us
    );
}

pub fn ring_stats(s: &RingStats) {
    println!(
        "pending {}/{}  running {}/{}  completing {}/{}  shared-memory sessions {}",
        s.pending, s.submission_capacity, s.running, s.max_running, s.completing, s.completion_capacity, s.shm_sessions
    );
    println!(
        "submitted {}  deduplicated {}  refused {}  retries {}  {:.1} completions/s (10 s)",
        s.submitted_total, s.deduplicated_total, s.refused_total, s.retries_total, s.completed_per_sec
    );
    let done: Vec<String> = s.completed.iter().map(|(k, v)| format!("{}={v}", k.as_str())).collect();
    println!("completed {}", done.join(" "));
    let mut t = table(&["PRIORITY", "QUEUED", "DONE", "P50 us", "P99 us", "P99.9 us"]);
    for (priority, latency) in &s.latency {
        t.add_row(vec![
            format!("{priority:?}").to_uppercase(),
            s.queued.get(priority).copied().unwrap_or(0).to_string(),
            latency.count.to_string(),
            latency.p50_us.to_string(),
            latency.p99_us.to_string(),
            latency.p999_us.to_string(),
        ]);
    }
    println!("{t}");
    if !s.breakers.is_empty() {
        breakers(&s.breakers);
    }
}

pub fn wal_status(w: &WalStatus) {
    println!("segments {}  bytes {}", w.segments, w.bytes);
    println!(
        "next lsn {}  synced lsn {}  checkpoint lsn {}",
        w.next_lsn, w.synced_lsn, w.checkpoint_lsn
    );
    println!(
        "history (point-in-time recovery) {} segments, {} bytes, kept {} s",
        w.history_segments, w.history_bytes, w.history_secs
    );
    println!(
        "records {} in {} syncs; sync p50 {} us, p99 {} us, p99.9 {} us",
        w.records_total, w.syncs_total, w.sync_latency.p50_us, w.sync_latency.p99_us, w.sync_latency.p999_us
    );
    let nice = |nice: Option<i32>| nice.map_or("unknown".to_string(), |nice| nice.to_string());
    let writer = nice(w.writer_nice);
    match w.writer_slice_us {
        Some(slice) => println!("writer thread nice {writer}, time slice {slice} us"),
        None => println!("writer thread nice {writer}"),
    }
    println!("store committer thread nice {}", nice(w.committer_nice));
}

pub fn breakers(breakers: &[BreakerInfo]) {
    let mut t = table(&["TENANT", "TARGET", "STATE", "FAILURES", "OPENED", "REJECTED"]);
    for b in breakers {
        t.add_row(vec![
            b.tenant.clone(),
            b.target.clone(),
            b.state.clone(),
            b.consecutive_failures.to_string(),
            b.opened_total.to_string(),
            b.rejected_total.to_string(),
        ]);
    }
    println!("{t}");
}

pub fn quotas(infos: &[QuotaInfo]) {
    fn show<T: ToString>(value: Option<T>) -> String {
        value.map_or_else(|| "-".to_owned(), |v| v.to_string())
    }
    let mut t = table(&[
        "NODE",
        "REQ/S",
        "TOOLS/MIN",
        "TOKENS/MIN",
        "TODAY $",
        "MONTH $",
        "IN FLIGHT",
        "MEMORY",
        "CPU %",
        "PIDS",
        "ACTION",
        "REFUSED",
        "THROTTLED",
    ]);
    for info in infos {
        let l = &info.limits;
        let u = &info.usage;
        t.add_row(vec![
            info.node.clone(),
            show(l.requests_per_second),
            show(l.tool_calls_per_minute),
            show(l.llm_tokens_per_minute),
            format!("{:.6}/{}", u.spent_today_usd, show(l.cost_per_day_usd)),
            format!("{:.6}/{}", u.spent_this_month_usd, show(l.cost_per_month_usd)),
            format!("{}/{}", info.usage.concurrent_ops, show(l.concurrent_ops)),
            show(l.memory_bytes),
            show(l.cpu_percent),
            show(l.pids),
            l.action
                .map_or_else(|| "reject".to_owned(), |a| format!("{a:?}").to_lowercase()),
            info.usage.rejected.to_string(),
            info.usage.throttled.to_string(),
        ]);
    }
    println!("{t}");
}

pub fn gpus(status: &GpuStatus) {
    if !status.available {
        println!("no GPU: {}", status.reason.as_deref().unwrap_or("unknown"));
        return;
    }
    println!("driver {}", status.driver_version.as_deref().unwrap_or("?"));
    let mut t = table(&["INDEX", "NAME", "MEMORY USED", "MEMORY TOTAL", "UTIL %"]);
    for d in &status.devices {
        t.add_row(vec![
            d.index.to_string(),
            d.name.clone(),
            d.memory_used_bytes.to_string(),
            d.memory_total_bytes.to_string(),
            d.utilization_percent.to_string(),
        ]);
    }
    println!("{t}");
}

pub fn cgroups(status: &CgroupStatus) {
    println!("driver {}  isolated {}", status.driver, status.isolated);
    for root in &status.roots {
        println!("  root {root}");
    }
    if status.groups.is_empty() {
        println!("no tool runs now");
    }
    for group in &status.groups {
        println!("  group {group}");
    }
}
