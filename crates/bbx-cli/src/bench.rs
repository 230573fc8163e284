pub async fn api(_: &crate::cli::Cli, _: &crate::cli::BenchApiArgs) -> anyhow::Result<()> {
    todo!()
}
