//! The published JSON Schema of the workflow format (docs/goal-workflow.schema.json)
//! is the one the code accepts: regenerate it with `BBX_WRITE_SCHEMA=1 cargo test
//! -p bbx-goal --test schema` after changing the format.

#[test]
fn the_published_schema_is_the_one_the_code_accepts() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/goal-workflow.schema.json");
    let schema = serde_json::to_string_pretty(&bbx_goal::workflow::schema()).unwrap() + "\n";
    if std::env::var("BBX_WRITE_SCHEMA").as_deref() == Ok("1") {
        std::fs::write(&path, &schema).unwrap();
    }
    let published = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        published == schema,
        "{} is stale: run BBX_WRITE_SCHEMA=1 cargo test -p bbx-goal --test schema",
        path.display()
    );
}
