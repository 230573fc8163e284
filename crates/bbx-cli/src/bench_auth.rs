//! `bbx bench auth`: authenticating and authorizing a request in process (no
//! HTTP), with an API key, with an access token on its first use (its signature
//! checked) and on later uses (from the verified cache), and with an API key under
//! 20 custom ABAC rules, next to the SHA-256 of a key's secret measured in the
//! same run.

use crate::bench::{NanoFigures, scratch_dir, time_each};
use crate::cli::{BenchAuthArgs, Cli};
use anyhow::{Result, bail};
use bbx_core::config::ConfigLayer;
use bbx_core::model::{CreateApiKey, Role};
use bbx_kernel::{Action, CreateToken, Kernel};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Report {
    api_key: NanoFigures,
    token_first_use: NanoFigures,
    token_cached: NanoFigures,
    /// An API key, then the roles and 20 custom ABAC rules (in 5 policies) on a
    /// labelled agent's state key.
    api_key_with_20_rules: NanoFigures,
    /// Whether those rules ran on regorus's VM (else its interpreter).
    rules_on_vm: bool,
    /// SHA-256 of a key's 64-character secret: what a key's check must do at least.
    reference_sha256: NanoFigures,
    targets: Targets,
}

#[derive(Serialize)]
struct Targets {
    api_key_p99_under_5us: bool,
    token_first_use_p99_under_60us: bool,
    token_cached_p99_under_5us: bool,
    with_20_rules_p99_under_25us: bool,
}

pub async fn auth(cli: &Cli, args: &BenchAuthArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    let scratch = scratch_dir(args.scratch_dir.as_deref())?;
    let (kernel, admin) = crate::bench::open_in_process(scratch.path(), ConfigLayer::default()).await?;
    let measure = Duration::from_secs_f64(args.seconds);
    let report = measure_all(&kernel, &admin, measure).await;
    kernel.shutdown().await;
    let report = report?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::bench::print_nano_table(&[
            ("api_key", &report.api_key),
            ("token_first_use", &report.token_first_use),
            ("token_cached", &report.token_cached),
            ("with_20_rules", &report.api_key_with_20_rules),
            ("reference_sha256", &report.reference_sha256),
        ]);
    }
    Ok(())
}

async fn measure_all(kernel: &Kernel, admin: &bbx_kernel::Caller, measure: Duration) -> Result<Report> {
    let reader = CreateApiKey {
        name: "bench".into(),
        tenant: Some("bench".into()),
        role: Some(Role::Reader),
        ..Default::default()
    };
    let key = kernel.create_key(admin, reader).await?.key;
    let api_key = time_each(measure, || {
        let caller = kernel.authenticate(&key).expect("the key authenticates");
        caller.may(Action::Read).expect("a reader reads");
    });
    let request = CreateToken {
        identity: "bench".into(),
        tenant: Some("bench".into()),
        role: Some(Role::Reader),
        ttl_secs: Some(3600),
        ..Default::default()
    };
    // Tokens made ahead, each used once: its signature is checked. As many as
    // `measure` allows at a few tens of microseconds each, at least 1,000.
    let count = ((measure.as_secs_f64() * 20_000.0) as usize).clamp(1_000, 100_000);
    let fresh: Vec<String> = (0..count)
        .map(|_| kernel.create_token(admin, request.clone()).map(|t| t.token))
        .collect::<bbx_core::Result<_>>()?;
    let mut first_uses = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let started = Instant::now();
    for token in &fresh {
        let t = Instant::now();
        let caller = kernel.authenticate(token).expect("the token authenticates");
        caller.may(Action::Read).expect("a reader reads");
        first_uses.saturating_record(t.elapsed().as_nanos().max(1) as u64);
    }
    let token_first_use = NanoFigures::from(&first_uses, started.elapsed());
    let reused = &fresh[0];
    let token_cached = time_each(measure, || {
        let caller = kernel.authenticate(reused).expect("the token authenticates");
        caller.may(Action::Read).expect("a reader reads");
    });
    let api_key_with_20_rules = with_rules(kernel, admin, &key, measure).await?;
    let rules_on_vm = kernel.policies_on_vm();
    let secret = key.rsplit('_').next().unwrap_or_default().to_owned();
    let reference_sha256 = time_each(measure, || {
        use sha2::Digest as _;
        std::hint::black_box(sha2::Sha256::digest(secret.as_bytes()));
    });
    Ok(Report {
        targets: Targets {
            api_key_p99_under_5us: api_key.p99_ns < 5_000,
            token_first_use_p99_under_60us: token_first_use.p99_ns < 60_000,
            token_cached_p99_under_5us: token_cached.p99_ns < 5_000,
            with_20_rules_p99_under_25us: api_key_with_20_rules.p99_ns < 25_000,
        },
        api_key,
        token_first_use,
        token_cached,
        api_key_with_20_rules,
        rules_on_vm,
        reference_sha256,
    })
}

/// Loads 20 rules in 5 policies, then times a reader's key authenticated and a
/// state read on a labelled agent authorized (no rule refuses it, so every rule
/// is evaluated).
async fn with_rules(kernel: &Kernel, admin: &bbx_kernel::Caller, key: &str, measure: Duration) -> Result<NanoFigures> {
    for policy in 0..5 {
        let rules: String = (0..4).map(|rule| rule_text(policy * 4 + rule)).collect();
        let source = format!("package bbx.authz.bench{policy}\n{rules}");
        kernel.put_policy(admin, &format!("bench-{policy}"), source).await?;
    }
    let agent = kernel
        .create_agent(
            admin,
            bbx_core::model::CreateAgent {
                name: "bench".into(),
                tenant: Some("bench".into()),
                labels: Some(
                    [
                        ("env".to_owned(), "dev".to_owned()),
                        ("team".to_owned(), "a".to_owned()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
        )
        .await?;
    let figures = time_each(measure, || {
        let caller = kernel.authenticate(key).expect("the key authenticates");
        caller.may(Action::Read).expect("a reader reads");
        let access = bbx_kernel::Access::new("state.get", Some(Action::Read), None)
            .on(&agent)
            .key("notes/today");
        kernel.authorize(&caller, &access).expect("no rule refuses it");
    });
    Ok(figures)
}

/// The `n`th of 20 rules over principal, action, resource and context, none of
/// which refuses the measured request.
fn rule_text(n: usize) -> String {
    let condition = match n % 5 {
        0 => format!(r#"input.resource.labels.env == "prod-{n}""#),
        1 => format!(r#"startswith(input.resource.key, "private{n}/")"#),
        2 => format!(r#"input.action.op_kind == "shell.exec"; input.principal.role == "reader-{n}""#),
        3 => format!(r#"input.context.source == "10.0.0.{n}""#),
        _ => format!(r#"input.principal.tenant == "blocked-{n}"; input.action.class == "act""#),
    };
    format!(
        "deny contains \"rule {n}\" if {{ {} }}\n",
        condition.replace("; ", "\n")
    )
}
